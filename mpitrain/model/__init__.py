"""Models on one flat float32 parameter vector: a stack of layers (layers.py) ending in softmax
cross-entropy.  Each layer owns the slice [W | b] of the flat vector at its offset and sees views, so the
optimizer, the allreduce, the checkpoint, DP and secure aggregation each see one contiguous array.

model.kind names a preset (softmax, mlp, lenet5, fedavg_cnn) or `layers` (model.layers, a list of layer
strings); either way the model is the canonical stack `spec.stack`, stored in model.h5 and checkpoints.
"""
import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import MpitrainError
from ..kernels import arrays, backend
from ..kernels.cpu import ACTIVATIONS, IDENTITY
from .layers import Conv, Flatten, build, input_shape

KINDS = ("softmax", "mlp", "lenet5", "fedavg_cnn", "layers")

PRESETS = {
    # LeCun et al. 1998 with ReLU and max-pooling: 61,706 parameters on 1×28×28, 10 classes
    "lenet5": ("conv2d 6 5 same", "relu", "maxpool2d 2", "conv2d 16 5 valid", "relu", "maxpool2d 2", "flatten",
               "dense 120", "relu", "dense 84", "relu"),
    # McMahan et al. 2017: 1,663,370 parameters on 1×28×28, 10 classes ('same' padding: 7·7·64 → 512)
    "fedavg_cnn": ("conv2d 32 5 same", "relu", "maxpool2d 2", "conv2d 64 5 same", "relu", "maxpool2d 2",
                   "flatten", "dense 512", "relu"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, independent of its parameters: the kind (and hidden sizes and activation of an
    mlp, or the user's layers), the data's feature shape and the number of classes."""
    kind: str
    n_in: int
    n_out: int
    hidden: tuple = ()
    activation: str = "relu"
    layers: tuple = ()
    feature_shape: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MpitrainError(f"model.kind = {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.activation not in ("relu", "tanh"):
            raise MpitrainError(f"model.activation = {self.activation!r}: expected relu or tanh")
        if self.kind == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise MpitrainError(f"model.hidden = {list(self.hidden)}: an mlp needs one or more positive sizes")
        if (self.kind == "layers") != bool(self.layers):
            raise MpitrainError("model.layers: " + ("model.kind = 'layers' needs a list of layers" if self.layers == ()
                                                    else f"only used with model.kind = 'layers' (not {self.kind!r})"))
        shape = tuple(int(d) for d in self.feature_shape) or (self.n_in,)
        if math.prod(shape) != self.n_in:
            raise MpitrainError(f"feature_shape {shape} does not hold {self.n_in} features")
        object.__setattr__(self, "feature_shape", shape)
        if self.kind == "softmax":
            stack = ()
        elif self.kind == "mlp":
            stack = tuple(x for h in self.hidden for x in (f"dense {h}", self.activation))
        else:
            stack = PRESETS.get(self.kind, tuple(self.layers))
        if self.kind != "layers":
            stack += (f"dense {self.n_out}",)
        built = build(list(stack), shape, self.n_out)
        canon = tuple(t for l in built for t in (l.text(), *[a for a, c in ACTIVATIONS.items()
                                                               if c == l.act != IDENTITY]))
        object.__setattr__(self, "stack", canon)
        object.__setattr__(self, "n_params", sum(l.n_params for l in built))

    @property
    def sizes(self):
        """(inputs, outputs of every dense layer) of a stack of dense layers only; None otherwise."""
        if not all(t.startswith("dense") or t in ACTIVATIONS for t in self.stack):
            return None
        return (self.n_in, *(int(t.split()[1]) for t in self.stack if t.startswith("dense")))

    def describe(self):
        """For log lines: 64-128-10 for dense stacks, else the layers."""
        return "-".join(map(str, self.sizes)) if self.sizes else ", ".join(self.stack)

    def attrs(self):
        """HDF5 attributes describing the model (stored beside the parameter vector): everything a reader
        needs to rebuild it; the hidden/activation pair keeps older readers of mlp files working."""
        return {"kind": self.kind, "n_in": self.n_in, "n_out": self.n_out,
                "hidden": np.array(self.hidden if self.kind == "mlp" else (), np.int64),
                "activation": self.activation, "layers": json.dumps(list(self.stack)),
                "feature_shape": np.array(self.feature_shape, np.int64)}

    @classmethod
    def from_attrs(cls, a):
        """From attrs(), or from a model.h5 written before the layer library (softmax/mlp, flat input)."""
        kind = str(a["kind"])
        return cls(kind=kind, n_in=int(a["n_in"]), n_out=int(a["n_out"]),
                   hidden=tuple(int(h) for h in a["hidden"]), activation=str(a["activation"]),
                   layers=tuple(json.loads(str(a["layers"]))) if kind == "layers" else (),
                   feature_shape=tuple(int(d) for d in a.get("feature_shape", ())))


INIT_CHUNK = 1 << 16  # values drawn at a time by init_params: the generator's stream is the same in chunks


class Model:
    """The layers of a spec with their per-batch-size buffers, on a kernel backend (cpu or cuda)."""

    def __init__(self, spec, device="cpu"):
        self.spec = spec
        self.k = backend(device)
        self.xp = arrays(self.k)  # buffers live where the kernels compute (host or GPU)
        self.net = build(list(spec.stack), spec.feature_shape, spec.n_out)
        self.with_params = [l for l in self.net if l.n_params]
        self.starts = [l.offset for l in self.with_params]  # layer slices (overlap buckets cut there)
        self.nhwc, self.transpose = input_shape(spec.feature_shape, spec.stack[0])
        self._buffers = {}
        self.trace = []  # after loss_grad: (layer, input, dL/dz, scratch) of each layer with parameters (DP-SGD)

    @property
    def n_params(self):
        return self.spec.n_params

    def layers(self, flat):
        """[(W, b)] views into a flat vector (parameters or gradients), one per layer with parameters."""
        return [l.views(flat) for l in self.with_params]

    def init_params(self, seed, part=None):
        """He (relu) or Glorot (tanh, output) uniform weights, zero biases; seeded, layer after layer.  A
        host array whatever the device (the caller broadcasts it, then moves it).  part (a slice of the flat
        vector): only those entries, the same values, made one layer at a time (fsdp never holds them all)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1417]))
        part = part or slice(0, self.n_params)
        flat = np.zeros(part.stop - part.start, np.float32)
        for l in self.with_params:
            fan_in, fan_out = l.fan
            limit = np.sqrt(6.0 / fan_in) if l.act == ACTIVATIONS["relu"] else np.sqrt(6.0 / (fan_in + fan_out))
            size = l.n_params - l.out_shape[-1]  # [W | b], one bias per output unit or channel
            for c in range(l.offset, l.offset + size, INIT_CHUNK):  # W's values in order, a chunk at a time
                values = rng.uniform(-limit, limit, size=min(INIT_CHUNK, l.offset + size - c))  # drawn, kept or not
                lo, hi = max(c, part.start), min(c + len(values), part.stop)
                if lo < hi:
                    flat[lo - part.start:hi - part.start] = values[lo - c:hi - c]
        return flat

    def _bufs(self, n):
        """Per-batch-size buffers: each layer's output (a flatten's is a view), its scratch, and the
        gradient flowing into each layer but the first."""
        if n not in self._buffers:
            xp = self.xp
            outs = [None if isinstance(l, Flatten) else xp.empty((n, *l.out_shape)) for l in self.net]
            scratch = [l.scratch(n, xp) for l in self.net]
            downs = [None if i == 0 or isinstance(l, Flatten) else xp.empty((n, *l.in_shape))
                     for i, l in enumerate(self.net)]
            entry = xp.empty((n, *self.nhwc)) if self.transpose else None
            self._buffers[n] = outs, scratch, downs, entry
        return self._buffers[n]

    def buffers(self):
        """Every per-batch-size buffer (activations, scratch, gradients between layers, the NHWC copy of
        the input): what a batch leaves behind here (federated trace erasure zeroes them)."""
        for outs, scratch, downs, entry in self._buffers.values():
            yield from (a for a in (*outs, *downs, entry) if a is not None)
            for s in scratch:
                yield from s.values()

    def _forward(self, params, x):
        """Each layer's input, and the logits."""
        n = len(x)
        outs, scratch, _, entry = self._bufs(n)
        if self.transpose:  # stored channels-first: one copy of the batch into NHWC
            self.k.to_nhwc(x, entry)
            x = entry
        else:
            x = x.reshape(n, *self.nhwc)
        ins, p = [], None
        for l, out, s in zip(self.net, outs, scratch):
            ins.append(x)
            if isinstance(l, Flatten):
                x = x.reshape(n, -1)
            else:
                p = p if l.conv else _weights(params, l)  # a pooling after a conv gets the conv's (W, b)
                l.forward(self.k, p, x, out, s)
                x = out
        return ins, x

    def loss_grad(self, params, grad, x, y, ready=None, dx=None):
        """grad ← d(summed loss)/d(params) over the batch (x, y).  Returns (loss sum, number correct).
        ready(offset), if given, is called as soon as grad[offset:] is final (after each layer).  dx, if
        given (x's shape; channels-last for multi-channel images), receives d(summed loss)/dx (bench leakage)."""
        ins, logits = self._forward(params, x)
        outs, scratch, downs, _ = self._bufs(len(x))
        loss, correct = self.k.softmax_xent(logits, y)
        d = logits  # now dL/dlogits
        self.trace = []
        for i in range(len(self.net) - 1, -1, -1):
            l = self.net[i]
            if isinstance(l, Flatten):
                d = d.reshape(len(x), *l.in_shape)
                continue
            if i == 0 and not l.n_params and dx is None:  # a first pooling layer: nothing below needs its gradient
                break
            owner = l.conv or l  # a pooling after a conv writes the conv's bias gradient
            g = grad.grad_of(owner) if hasattr(grad, "grad_of") else owner.views(grad)
            down = downs[i] if i or dx is None else dx.reshape(len(x), *l.in_shape)
            l.backward(self.k, _weights(params, l, down=True), g, ins[i], outs[i], d, down, scratch[i])
            if l.n_params:
                self.trace.append((l, ins[i], d, scratch[i]))  # d is dL/dz now (the activation's gradient applied)
                if ready is not None:
                    ready(l.offset)
            d = downs[i]
        return loss, correct

    def logits(self, params, x):
        """The logits (N, classes) of host rows x, as a host array, in chunks like score."""
        out = np.empty((len(x), self.spec.n_out), np.float32)
        chunk = self._chunk()
        for i in range(0, len(x), chunk):
            out[i:i + chunk] = self.xp.to_host(self._forward(params, self.xp.to_device(x[i:i + chunk]))[1])
        return out

    def _chunk(self):
        """Samples per chunk of evaluation: its buffers stay within ~64 MB."""
        per_sample = 4 * sum(math.prod(l.out_shape) for l in self.net)
        per_sample += sum(4 * math.prod(l.geom[6:]) * l.k_len for l in self.net if isinstance(l, Conv))
        return max(1, min(4096, (64 << 20) // per_sample))

    def score(self, params, x, y, chunk=None):
        """(loss sum, number correct) of the model on host arrays (x, y), in chunks (moved to the device)."""
        chunk = chunk or self._chunk()
        loss, correct = 0.0, 0
        for i in range(0, len(x), chunk):
            _, logits = self._forward(params, self.xp.to_device(x[i:i + chunk]))
            l, c = self.k.softmax_xent(logits, self.xp.to_device(y[i:i + chunk]))
            loss, correct = loss + l, correct + c
        return loss, correct


def _weights(params, l, down=False):
    """A layer's (W, b): views of the flat vector, or gathered for it by a store that holds only a shard
    (sync.FSDP: fetch, and grad_of for the gradient); None for a layer without parameters."""
    if not l.n_params:
        return None
    return params.fetch(l, down) if hasattr(params, "fetch") else l.views(params)
