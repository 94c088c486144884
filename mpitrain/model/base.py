"""What every layer shares: the parameter entries it declares for the table, the run context it reads,
and Sequence, which runs a list of layers forward and backward on per-batch-size buffers (the model's
top level and the branches of a residual block alike)."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One named tensor of a layer's slice of the flat vector, in the order the slice holds them.
    init: ("uniform", limit) | ("normal", std) | ("zeros",) | ("ones",); group: weight | bias | norm |
    embedding (| state), what AdamW's weight decay is chosen by (train.decay); split: how tensor parallelism
    cuts it (column | row | heads | vocab | replicated)."""
    name: str
    shape: tuple
    init: tuple
    group: str
    split: str = "replicated"

    @property
    def size(self):
        return math.prod(self.shape)


class Context:
    """What a step tells the layers besides their arrays: train or eval mode, the dropout key (seed, step,
    the global index of this rank's first sample), the data group whose batch statistics a BatchNorm sums
    (None: this process alone) and the non-trainable state vector (BatchNorm running statistics)."""

    def __init__(self):
        self.training = False
        self.seed, self.step, self.first = 0, 0, 0
        self.comm = None
        self.state = None


class Layer:
    """in_shape/out_shape: per sample, NHWC ((H, W, C)), a sequence ((T, C)), tokens ((T,), int) or flat
    ((F,)); offset and name set by build; ctx: the model's Context."""
    act = 0  # kernels.cpu.IDENTITY: an activation fused into the layer (dense, conv, residual)
    conv = None  # a max pooling: the conv before it, whose bias and activation it applies (layers.py)
    per_example = False  # DP-SGD can compute this layer's per-example gradient norms (federated/dp.py)
    tensor = False  # tensor.py can split it (dense, conv) or pass it through (pooling, flatten)
    cuda = False  # kernels/cuda.py has its kernels (dense, conv, pooling, flatten)
    n_params = 0  # the size of its slice: the sum of its params()' sizes
    state_size = 0  # non-trainable values (BatchNorm running statistics) in the model's state vector
    view = False  # the output is a reshaped view of the input (flatten): no buffer, no computation
    skips_dx = False  # backward takes dx = None (first layer: no input gradient) and saves that work
    shares = None  # the layer whose parameters this one uses (a tied output layer: the embedding)

    def params(self):
        """[Param] of this layer's slice, names relative to the layer ("weight", "bias", …)."""
        return []

    def views(self, flat, at=None):
        """This layer's tensors on flat at its offset (or at `at`), in params() order; None without any."""
        if not self.n_params:
            return None
        o, out = self.offset if at is None else at, []
        for p in self.params():
            out.append(flat[o:o + p.size].reshape(p.shape))
            o += p.size
        return tuple(out)

    def scratch(self, n, xp):
        """Per-batch-size buffers besides the output: {name: array}."""
        return {}

    def entries(self):
        """(full name, Param) of every tensor, nested layers included."""
        return [(f"{self.name}.{p.name}", p) for p in self.params()]

    def layers(self):
        """This layer and the layers nested in it (a residual block's)."""
        return [self]


class Sequence:
    """A list of layers run one after the other on buffers kept per batch size: each layer's output (a
    flatten's is a view), its scratch, and the gradient flowing into each layer but the first.
    weights(layer, down) and grads(layer) give a layer's views of the parameters and the gradient."""

    def __init__(self, layers, xp):
        self.net, self.xp, self._buffers = layers, xp, {}

    def bufs(self, n):
        if n not in self._buffers:
            xp = self.xp
            outs = [None if l.view else xp.empty((n, *l.out_shape)) for l in self.net]
            scratch = [l.scratch(n, xp) for l in self.net]
            downs = [None if l.view or i == 0 and l.skips_dx else xp.empty((n, *l.in_shape))
                     for i, l in enumerate(self.net)]
            self._buffers[n] = outs, scratch, downs
        return self._buffers[n]

    def buffers(self):
        """Every buffer a batch leaves behind here (federated trace erasure zeroes them)."""
        for outs, scratch, downs in self._buffers.values():
            yield from (a for a in (*outs, *downs) if a is not None)
            for s in scratch:
                yield from (a for a in s.values() if hasattr(a, "fill"))
        for l in self.net:
            for inner in getattr(l, "branches", ()):
                yield from inner.buffers()

    def forward(self, k, weights, x):
        """Each layer's input, and the output."""
        n = len(x)
        outs, scratch, _ = self.bufs(n)
        ins = []
        for l, out, s in zip(self.net, outs, scratch):
            ins.append(x)
            if l.view:
                x = x.reshape(n, *l.out_shape)
            else:
                l.forward(k, weights(l.conv or l.shares or l, False), x, out, s)
                x = out
        return ins, x

    def backward(self, k, weights, grads, ins, d, dx=None, done=None):
        """d: dL/d(output), consumed.  dx (the first layer's input shape) receives dL/d(input) when given.
        done(layer, input, dz, scratch) is called after each layer with parameters (overlap, DP-SGD)."""
        n = len(ins[0])
        outs, scratch, downs = self.bufs(n)
        for i in range(len(self.net) - 1, -1, -1):
            l = self.net[i]
            if l.view:
                d = d.reshape(n, *l.in_shape)
                if i == 0 and dx is not None:
                    dx[...] = d
                continue
            if i == 0 and dx is None and not l.n_params and not l.conv:
                break  # a first layer without parameters: nothing below needs its gradient
            down = downs[i] if i or dx is None else dx
            src = l.conv or l.shares or l  # whose parameters: a pooling after a conv has the conv's
            l.backward(k, weights(src, True), grads(src), ins[i], outs[i], d, down, scratch[i])
            if l.n_params and done is not None:
                done(l, ins[i], d, scratch[i])  # d is dL/dz now (the activation's gradient applied)
            d = downs[i]
