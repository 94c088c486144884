"""The layers of modern networks: normalisations, dropout, GELU, embeddings, causal self-attention, the
tied output layer, global average pooling, a stand-alone activation and the residual block.  Each is a
forward and a backward side by side on its slice of the flat vector; the arithmetic is in kernels/ops.py.

Gradient convention: a layer's backward leaves its gradient slice equal to its gradient and writes dL/dx
(the kernels accumulate into parameter gradients, so a layer zeroes its slice first).  The one exception is
a tied embedding: the output layer, later in forward and so earlier in backward, writes the embedding
matrix's gradient, and the embedding adds its own to it."""
import numpy as np

from ..kernels.cpu import ACTIVATIONS, IDENTITY
from .base import Layer, Param, Sequence

LN_EPS = 1e-5  # PyTorch's LayerNorm/GroupNorm/BatchNorm default
BN_MOMENTUM = 0.1  # running statistics: r ← (1 − m)·r + m·batch (PyTorch's convention)


def _rows(a, width):
    return a.reshape(-1, width)


class Activation(Layer):
    """relu or tanh on its own, where no dense or conv layer with a bias comes just before to fuse it."""

    def __init__(self, word, act, in_shape):
        self.word, self.act_code, self.in_shape, self.out_shape = word, act, in_shape, in_shape
        self.zero = np.zeros(in_shape[-1], np.float32)

    def text(self):
        return self.word

    def scratch(self, n, xp):
        return {"db": xp.empty(self.in_shape[-1])}

    def forward(self, k, p, x, out, s):
        out[...] = x
        k.bias_act(_rows(out, len(self.zero)), self.zero, self.act_code)

    def backward(self, k, p, g, x, y, dy, dx, s):
        C = len(self.zero)
        k.act_grad(_rows(y, C), _rows(dy, C), self.act_code, s["db"])
        dx[...] = dy


class GELU(Layer):
    """GPT-2's GELU (tanh form)."""

    def __init__(self, in_shape):
        self.in_shape = self.out_shape = in_shape

    def text(self):
        return "gelu"

    def forward(self, k, p, x, out, s):
        k.gelu_forward(x, out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        k.gelu_backward(x, dy, dx)


class GlobalAvgPool(Layer):
    """(H, W, C) → (C,): the mean of every channel over the map."""

    def __init__(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError("a map (after conv or pooling)")
        self.in_shape, self.out_shape = in_shape, (in_shape[-1],)

    def text(self):
        return "globalavgpool"

    def forward(self, k, p, x, out, s):
        k.global_avgpool_forward(x.reshape(len(x), -1, self.out_shape[0]), out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        k.global_avgpool_backward(dy, dx.reshape(len(dx), -1, self.out_shape[0]))


class _Norm(Layer):
    """A weight and a bias per channel (the last axis), initialised to 1 and 0, never weight-decayed."""

    def __init__(self, in_shape):
        self.in_shape = self.out_shape = in_shape
        self.C = in_shape[-1]
        self.n_params = 2 * self.C

    def params(self):
        return [Param("weight", (self.C,), ("ones",), "norm"), Param("bias", (self.C,), ("zeros",), "norm")]

    def views(self, flat, at=None):
        o = self.offset if at is None else at
        return flat[o:o + self.C], flat[o + self.C:o + 2 * self.C]


class LayerNorm(_Norm):
    """Over the last axis of each position (or of flat features)."""
    skips_dx = True

    def text(self):
        return "layernorm"

    def scratch(self, n, xp):
        rows = n * int(np.prod(self.in_shape[:-1]))
        return {"mean": xp.empty(rows), "rstd": xp.empty(rows), "dx": xp.empty((rows, self.C))}

    def forward(self, k, p, x, out, s):
        k.layernorm_forward(_rows(x, self.C), *p, LN_EPS, _rows(out, self.C), s["mean"], s["rstd"])

    def backward(self, k, p, g, x, y, dy, dx, s):
        for a in g:
            a.fill(0.0)
        k.layernorm_backward(_rows(dy, self.C), _rows(x, self.C), p[0], s["mean"], s["rstd"],
                             s["dx"] if dx is None else _rows(dx, self.C), *g)


class GroupNorm(_Norm):
    """Channels in G groups; statistics over a group's channels and every position of one sample."""

    def __init__(self, groups, in_shape):
        super().__init__(in_shape)
        if len(in_shape) != 3 or self.C % groups:
            raise ValueError(f"a map whose channels the {groups} groups divide")
        self.G = groups

    def text(self):
        return f"groupnorm {self.G}"

    def scratch(self, n, xp):
        return {"mean": xp.empty((n, self.G)), "rstd": xp.empty((n, self.G))}

    def _map(self, a):
        return a.reshape(len(a), -1, self.C)

    def forward(self, k, p, x, out, s):
        k.groupnorm_forward(self._map(x), self.G, *p, LN_EPS, self._map(out), s["mean"], s["rstd"])

    def backward(self, k, p, g, x, y, dy, dx, s):
        for a in g:
            a.fill(0.0)
        k.groupnorm_backward(self._map(dy), self._map(x), p[0], s["mean"], s["rstd"], self.G, self._map(dx), *g)


class BatchNorm(_Norm):
    """Per channel over the batch and every position.  In training the batch statistics are summed over
    the data group (SyncBatchNorm: p ranks compute what one rank would), and the running mean and
    (unbiased) variance in the model's state vector move towards them; evaluation uses those."""

    def __init__(self, in_shape):
        super().__init__(in_shape)
        self.state_size = 2 * self.C

    def text(self):
        return "batchnorm"

    def state_entries(self):
        return [Param("running_mean", (self.C,), ("zeros",), "state"), Param("running_var", (self.C,), ("ones",), "state")]

    def scratch(self, n, xp):
        return {"sums": np.empty(2 * self.C + 1, np.float64), "mean": xp.empty(self.C), "rstd": xp.empty(self.C)}

    def _moments(self, fill, *args):
        """Fill sums[:2C] from this rank's rows, add the count, sum over the data group."""
        sums = args[-1]
        fill(*args[:-1], sums[:2 * self.C].reshape(2, self.C))
        sums[-1] = len(args[0])
        if self.ctx.comm is not None:
            self.ctx.comm.allreduce_sum(sums)
        return sums[:2 * self.C].reshape(2, self.C), sums[-1]

    def forward(self, k, p, x, out, s):
        x2, C = _rows(x, self.C), self.C
        running = self.ctx.state[self.state_offset:self.state_offset + 2 * C].reshape(2, C)
        if self.ctx.training:
            sums, count = self._moments(k.batchnorm_moments, x2, s["sums"])
            var = k.batchnorm_stats(sums, count, LN_EPS, s["mean"], s["rstd"])
            running[0] += BN_MOMENTUM * (sums[0] / count - running[0])
            running[1] += BN_MOMENTUM * (var * (count / max(count - 1, 1)) - running[1])
        else:
            s["mean"][:], s["rstd"][:] = running[0], 1.0 / np.sqrt(running[1] + LN_EPS)
        k.batchnorm_forward(x2, s["mean"], s["rstd"], *p, _rows(out, C))

    def backward(self, k, p, g, x, y, dy, dx, s):
        for a in g:
            a.fill(0.0)
        x2, dy2 = _rows(x, self.C), _rows(dy, self.C)
        sums, count = self._moments(k.batchnorm_backward_moments, dy2, x2, s["mean"], s["rstd"], s["sums"])
        k.batchnorm_backward(dy2, x2, s["mean"], s["rstd"], p[0], sums, count, _rows(dx, self.C), *g)


class Dropout(Layer):
    """Zeroes each value with probability p in training (kept ones scaled by 1/(1 − p)).  The mask is a
    hash of (seed, this layer's site, step, the sample's index in the global batch, the value's place in
    the sample): the same whatever the number of ranks, and again on resume."""

    def __init__(self, rate, in_shape, site):
        if not 0 <= rate < 1:
            raise ValueError("a rate in [0, 1)")
        self.rate, self.site, self.in_shape, self.out_shape = rate, site, in_shape, in_shape
        self.row = int(np.prod(in_shape))

    def text(self):
        return f"dropout {self.rate:g}"

    def _key(self):
        c = self.ctx
        return self.rate, c.seed, self.site, c.step, c.first, self.row

    def forward(self, k, p, x, out, s):
        if self.ctx.training and self.rate > 0:
            k.dropout_forward(x, out, *self._key())
        else:
            out[...] = x

    def backward(self, k, p, g, x, y, dy, dx, s):
        k.dropout_backward(dy, dx, *self._key())


class Embedding(Layer):
    """Tokens (T,) → (T, C): a row of wte (V, C) per token, plus a learned position row of wpe (T, C)."""
    skips_dx = True

    def __init__(self, vocab, width, in_shape, positions=True):
        (self.T,) = in_shape
        self.V, self.C, self.positions = vocab, width, positions
        self.in_shape, self.out_shape = in_shape, (self.T, width)
        self.n_params = (vocab + self.T * positions) * width
        self.tied = False  # a tied output layer writes wte's gradient before this one adds to it
        self.nopos = np.zeros((self.T, width), np.float32)

    def text(self):
        return f"embedding {self.C}" + ("" if self.positions else " positions=false")

    def params(self):
        wte = Param("wte", (self.V, self.C), ("normal", 0.02), "embedding", "vocab")
        return [wte, Param("wpe", (self.T, self.C), ("normal", 0.02), "embedding")] if self.positions else [wte]

    def forward(self, k, p, x, out, s):
        k.encoder_forward(x, p[0], p[1] if self.positions else self.nopos, out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        if not self.tied:
            g[0].fill(0.0)
        dwpe = g[1] if self.positions else self.nopos
        dwpe.fill(0.0)
        k.encoder_backward(dy, x, g[0], dwpe)


class Tied(Layer):
    """The output layer of a language model tied to its input embedding: logits = x @ wteᵀ."""
    skips_dx = True

    def __init__(self, source, in_shape):
        if in_shape[-1] != source.C:
            raise ValueError(f"an input of width {source.C} (the embedding's)")
        self.shares, self.in_shape, self.out_shape = source, in_shape, (*in_shape[:-1], source.V)
        source.tied = True

    def text(self):
        return "tied"

    def forward(self, k, p, x, out, s):
        np.matmul(_rows(x, self.in_shape[-1]), p[0].T, out=_rows(out, self.out_shape[-1]))

    def backward(self, k, p, g, x, y, dy, dx, s):
        x2, dy2 = _rows(x, self.in_shape[-1]), _rows(dy, self.out_shape[-1])
        np.matmul(dy2.T, x2, out=g[0])
        if dx is not None:
            np.matmul(dy2, p[0], out=_rows(dx, self.in_shape[-1]))


class Attention(Layer):
    """Causal multi-head self-attention on (T, C): the fused projection qkv = x @ W + b (W (C, 3C): the q,
    k and v columns side by side, head h their columns h·C/H … (h+1)·C/H), softmax(q kᵀ/√(C/H)) with the
    causal mask, times v.  The output projection is the dense layer that follows it in a block."""
    skips_dx = True

    def __init__(self, heads, in_shape, std=0.02):
        if len(in_shape) != 2 or in_shape[1] % heads:
            raise ValueError(f"a sequence (T, C) whose width C the {heads} heads divide")
        self.H, (self.T, self.C), self.std = heads, in_shape, std
        self.in_shape = self.out_shape = in_shape
        self.n_params = 3 * self.C * (self.C + 1)

    def text(self):
        return f"attention {self.H}"

    def params(self):
        return [Param("qkv.weight", (self.C, 3 * self.C), ("normal", self.std), "weight", "heads"),
                Param("qkv.bias", (3 * self.C,), ("zeros",), "bias", "heads")]

    def views(self, flat, at=None):
        o, C = self.offset if at is None else at, self.C
        return flat[o:o + 3 * C * C].reshape(C, 3 * C), flat[o + 3 * C * C:o + 3 * C * (C + 1)]

    def scratch(self, n, xp):
        T, C = self.T, self.C
        return {"qkv": xp.empty((n, T, 3 * C)), "att": xp.empty((n, self.H, T, T)), "datt": xp.empty((n, self.H, T, T)),
                "dqkv": xp.empty((n, T, 3 * C))}

    def forward(self, k, p, x, out, s):
        k.dense_forward(_rows(x, self.C), *p, 0, _rows(s["qkv"], 3 * self.C))
        k.attention_forward(s["qkv"], self.H, out, s["att"])

    def backward(self, k, p, g, x, y, dy, dx, s):
        k.attention_backward(dy, s["qkv"], s["att"], self.H, s["dqkv"], s["datt"])
        q2, d2 = _rows(s["qkv"], 3 * self.C), _rows(s["dqkv"], 3 * self.C)
        if dx is None:
            k.dense_backward_params(_rows(x, self.C), q2, d2, 0, *g)
        else:
            k.dense_backward(_rows(x, self.C), p[0], q2, d2, 0, *g, _rows(dx, self.C))


class Residual(Layer):
    """x → main(x) + shortcut(x) (the identity without a shortcut).  Its slice holds the main branch's
    tensors, then the shortcut's; backward sums the two branches' input gradients."""
    skips_dx = True

    def __init__(self, main, shortcut, in_shape):
        self.main, self.shortcut = main, shortcut  # lists of layers
        self.in_shape, self.out_shape = in_shape, main[-1].out_shape if main else in_shape
        self.n_params = sum(l.n_params for l in main + shortcut)

    def text(self):
        t = "residual [" + ", ".join(texts(self.main)) + "]"
        return t + (" shortcut [" + ", ".join(texts(self.shortcut)) + "]" if self.shortcut else "")

    def params(self):
        return [p for l in self.main + self.shortcut for _, p in l.entries()]

    def entries(self):
        return [e for l in self.main + self.shortcut for e in l.entries()]

    def layers(self):
        return [self] + [x for l in self.main + self.shortcut for x in l.layers()]

    def views(self, flat, at=None):
        o = self.offset if at is None else at
        return (flat[o:o + self.n_params],)

    def bind(self, xp):
        self.branches = [Sequence(self.main, xp)] + ([Sequence(self.shortcut, xp)] if self.shortcut else [])

    def scratch(self, n, xp):
        return {"d": xp.empty((n, *self.out_shape)), "dx": xp.empty((n, *self.in_shape)), "ins": [None, None]}

    def _inner(self, flat):
        return lambda l, down: l.views(flat, at=l.offset - self.offset) if l.n_params else None

    def forward(self, k, p, x, out, s):
        w = self._inner(p[0])
        s["ins"][0], y = self.branches[0].forward(k, w, x)
        if self.shortcut:
            s["ins"][1], z = self.branches[1].forward(k, w, x)
            np.add(y, z, out=out)
        else:
            np.add(y, x, out=out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        w, gr = self._inner(p[0]), self._inner(g[0])
        d = s["d"]
        d[...] = dy  # the main branch consumes its copy; the shortcut (or the identity) takes dy
        self.branches[0].backward(k, w, lambda l: gr(l, False), s["ins"][0], d, dx=s["dx"])
        if self.shortcut:
            self.branches[1].backward(k, w, lambda l: gr(l, False), s["ins"][1], dy, dx=dx)
            if dx is not None:
                dx += s["dx"]
        elif dx is not None:
            np.add(dy, s["dx"], out=dx)


def texts(layers):
    """The canonical texts of a list of layers, each fused activation after its layer."""
    return [t for l in layers for t in (l.text(), *[a for a, c in ACTIVATIONS.items() if c == l.act != IDENTITY])]
