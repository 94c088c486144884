"""Dense models on one flat float32 parameter vector.

A model is a stack of dense layers (softmax = no hidden layer; mlp = hidden layers with relu/tanh) ending
in softmax cross-entropy.  Layer l owns the slice [W_l (in×out, row-major) | b_l] of the flat vector;
layers hold *views*, so the optimizer, the allreduce and the checkpoint each see one contiguous array.
"""
from dataclasses import dataclass

import numpy as np

from .errors import MpitrainError
from .kernels import arrays, backend
from .kernels.cpu import ACTIVATIONS, IDENTITY

KINDS = ("softmax", "mlp")


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    n_in: int
    n_out: int
    hidden: tuple = ()
    activation: str = "relu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MpitrainError(f"model.kind = {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.activation not in ("relu", "tanh"):
            raise MpitrainError(f"model.activation = {self.activation!r}: expected relu or tanh")
        if self.kind == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise MpitrainError(f"model.hidden = {list(self.hidden)}: an mlp needs one or more positive sizes")

    @property
    def sizes(self):
        hidden = tuple(self.hidden) if self.kind == "mlp" else ()
        return (self.n_in, *hidden, self.n_out)

    @property
    def n_params(self):
        s = self.sizes
        return sum((a + 1) * b for a, b in zip(s[:-1], s[1:]))

    def attrs(self):
        """HDF5 attributes describing the model (stored beside the parameter vector)."""
        return {"kind": self.kind, "n_in": self.n_in, "n_out": self.n_out,
                "hidden": np.array(self.sizes[1:-1], np.int64), "activation": self.activation}

    @classmethod
    def from_attrs(cls, a):
        return cls(kind=str(a["kind"]), n_in=int(a["n_in"]), n_out=int(a["n_out"]),
                   hidden=tuple(int(h) for h in a["hidden"]), activation=str(a["activation"]))


class Model:
    def __init__(self, spec, device="cpu"):
        self.spec = spec
        self.k = backend(device)
        self.xp = arrays(self.k)  # buffers live where the kernels compute (host or GPU)
        s = spec.sizes
        self.shapes = list(zip(s[:-1], s[1:]))
        self.starts = [int(o) for o in np.cumsum([0] + [(a + 1) * b for a, b in self.shapes[:-1]])]  # layer slices
        self.acts = [ACTIVATIONS[spec.activation]] * (len(self.shapes) - 1) + [IDENTITY]
        self._buffers = {}

    @property
    def n_params(self):
        return self.spec.n_params

    def layers(self, flat):
        """[(W, b)] views into a flat vector (parameters or gradients)."""
        return [(flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + b])
                for (a, b), o in zip(self.shapes, self.starts)]

    def init_params(self, seed):
        """He (relu) or Glorot (tanh, output) uniform weights, zero biases; seeded.  A host array whatever
        the device (the caller broadcasts it, then moves it)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1417]))
        flat = np.zeros(self.n_params, np.float32)
        for (w, _), (a, b), act in zip(self.layers(flat), self.shapes, self.acts):
            limit = np.sqrt(6.0 / a) if act == ACTIVATIONS["relu"] else np.sqrt(6.0 / (a + b))
            w[...] = rng.uniform(-limit, limit, size=(a, b))
        return flat

    def _bufs(self, n):
        """Per-batch-size scratch: activations of every layer and gradients flowing down."""
        if n not in self._buffers:
            self._buffers[n] = ([self.xp.empty((n, b)) for _, b in self.shapes],
                                [self.xp.empty((n, b)) for _, b in self.shapes[:-1]])
        return self._buffers[n]

    def _forward(self, params, x):
        acts, _ = self._bufs(len(x))
        inp = x
        for (w, b), act, out in zip(self.layers(params), self.acts, acts):
            self.k.dense_forward(inp, w, b, act, out)
            inp = out
        return acts

    def loss_grad(self, params, grad, x, y, ready=None):
        """grad ← d(summed loss)/d(params) over the batch (x, y).  Returns (loss sum, number correct).
        ready(offset), if given, is called as soon as grad[offset:] is final (after each layer)."""
        acts = self._forward(params, x)
        _, downs = self._bufs(len(x))
        loss, correct = self.k.softmax_xent(acts[-1], y)
        d = acts[-1]
        params_l, grads_l = self.layers(params), self.layers(grad)
        for i in range(len(self.shapes) - 1, -1, -1):
            w, _ = params_l[i]
            dw, db = grads_l[i]
            inp = x if i == 0 else acts[i - 1]
            if i == 0:
                self.k.dense_backward_params(inp, acts[i], d, self.acts[i], dw, db)
            else:
                self.k.dense_backward(inp, w, acts[i], d, self.acts[i], dw, db, downs[i - 1])
                d = downs[i - 1]
            if ready is not None:
                ready(self.starts[i])
        return loss, correct

    def score(self, params, x, y, chunk=4096):
        """(loss sum, number correct) of the model on host arrays (x, y), in chunks (moved to the device)."""
        loss, correct = 0.0, 0
        for i in range(0, len(x), chunk):
            acts = self._forward(params, self.xp.to_device(x[i:i + chunk]))
            l, c = self.k.softmax_xent(acts[-1], self.xp.to_device(y[i:i + chunk]))
            loss, correct = loss + l, correct + c
        return loss, correct
