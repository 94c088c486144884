"""Writes tests/reference/reference.npz: PyTorch's numbers for mpitrain's transformer and residual networks,
the way llm.c's test_gpt2.c checks its C code against a PyTorch debug state.

For each model of MODELS, PyTorch builds the same network from mpitrain's initial weights (its parameter
table: names, shapes, layouts), and records the batch, the outputs, the gradient of the mean loss (laid out
as mpitrain's flat vector) and the losses of STEPS AdamW steps with global-norm clipping.
tests/test_reference.py checks mpitrain against the file without needing PyTorch.

Rerun (needs torch; mpitrain is imported from this checkout):
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy numba scipy h5py
    PYTHONPATH=. /tmp/torchenv/bin/python tests/reference/make_reference.py
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
               os.path.dirname(os.path.abspath(__file__))]
from mpitrain.model import ModelSpec  # noqa: E402
from mpitrain.model.layers import Conv, Dense  # noqa: E402
from mpitrain.model.nn import (GELU, Activation, Attention, BatchNorm, Embedding, GlobalAvgPool,  # noqa: E402
                               GroupNorm, LayerNorm, Residual, Tied)
from mpitrain.model.stack import build  # noqa: E402
from mpitrain.model.table import ParameterTable  # noqa: E402

from cases import BETAS, CLIP, EPS, LR, MODELS, SEED, STEPS, WD  # noqa: E402

def batch(spec, n, rng):
    if spec.task == "lm":
        tokens = rng.integers(0, spec.n_out, (n, spec.feature_shape[0] + 1))
        return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    return rng.standard_normal((n, spec.n_in)).astype(np.float32), rng.integers(0, spec.n_out, n).astype(np.int64)


class Torch:
    """The network of an mpitrain layer list, run by PyTorch on tensors made from the flat vector."""

    def __init__(self, spec, flat):
        self.spec = spec
        self.net = build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)
        self.table = ParameterTable(self.net)
        self.tensors = {}  # name → torch leaf in PyTorch's layout
        for e in self.table:
            v = flat[e.offset:e.offset + e.size].reshape(e.param.shape)
            self.tensors[e.name] = torch.tensor(self.to_torch(e.name, v), dtype=torch.float64, requires_grad=True)

    def layer_of(self, name):
        for layer in self.net:
            for l in layer.layers():
                if name.startswith(l.name + ".") and name[len(l.name) + 1:] in [p.name for p in l.params()]:
                    return l

    def to_torch(self, name, v):
        l = self.layer_of(name)
        if isinstance(l, Conv) and name.endswith("weight"):
            KH, KW = l.geom[:2]
            return v.reshape(l.channels, KH, KW, -1).transpose(0, 3, 1, 2).copy()  # (C_out, C_in, KH, KW)
        if isinstance(l, (Dense, Attention)) and v.ndim == 2:
            return v.T.copy()  # Linear: (out, in)
        return v.copy()

    def from_torch(self, name, v):
        l = self.layer_of(name)
        if isinstance(l, Conv) and name.endswith("weight"):
            return v.transpose(0, 2, 3, 1).reshape(l.channels, -1)
        if isinstance(l, (Dense, Attention)) and v.ndim == 2:
            return v.T
        return v

    def flat_grad(self):
        out = np.zeros(self.table.size)
        for e in self.table:
            out[e.offset:e.offset + e.size] = self.from_torch(e.name, self.tensors[e.name].grad.numpy()).ravel()
        return out

    def p(self, l, what):
        return self.tensors[f"{l.name}.{what}"]

    def run(self, layers, x):
        for l in layers:
            x = self.layer(l, x)
        return x

    def layer(self, l, x):
        act = {1: torch.relu, 2: torch.tanh}.get(l.act)
        if isinstance(l, Dense):
            x = x @ self.p(l, "weight").T + self.p(l, "bias")
        elif isinstance(l, Conv):  # channels first here; 'same' pads as TensorFlow (the odd pixel after)
            KH, KW, SH, SW, PH, PW, OH, OW = l.geom
            H, W = x.shape[2:]
            th, tw = max((OH - 1) * SH + KH - H, 0), max((OW - 1) * SW + KW - W, 0)
            if l.same:
                x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            x = F.conv2d(x, self.p(l, "weight"), self.p(l, "bias") if l.bias else None, stride=(SH, SW))
        elif isinstance(l, Activation):
            x = {"relu": torch.relu, "tanh": torch.tanh}[l.word](x)
        elif isinstance(l, GroupNorm):
            x = F.group_norm(x, l.G, self.p(l, "weight"), self.p(l, "bias"), 1e-5)
        elif isinstance(l, BatchNorm):
            x = F.batch_norm(x, None, None, self.p(l, "weight"), self.p(l, "bias"), training=True, eps=1e-5)
        elif isinstance(l, LayerNorm):
            if x.dim() == 4:  # a map: over the channels of each pixel
                x = F.layer_norm(x.permute(0, 2, 3, 1), (l.C,), self.p(l, "weight"), self.p(l, "bias"), 1e-5)
                return x.permute(0, 3, 1, 2)
            x = F.layer_norm(x, (l.C,), self.p(l, "weight"), self.p(l, "bias"), 1e-5)
        elif isinstance(l, GlobalAvgPool):
            x = x.mean(dim=(2, 3))
        elif isinstance(l, GELU):
            x = F.gelu(x, approximate="tanh")
        elif isinstance(l, Embedding):
            x = self.p(l, "wte")[x] + self.p(l, "wpe")[None]
        elif isinstance(l, Attention):
            B, T, C = x.shape
            q, k, v = (x @ self.p(l, "qkv.weight").T + self.p(l, "qkv.bias")).split(C, dim=2)
            q, k, v = (t.view(B, T, l.H, C // l.H).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // l.H)
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
            x = (att @ v).transpose(1, 2).reshape(B, T, C)
        elif isinstance(l, Tied):
            x = x @ self.p(l.shares, "wte").T
        elif isinstance(l, Residual):
            y = self.run(l.main, x)
            x = y + (self.run(l.shortcut, x) if l.shortcut else x)
        else:
            raise NotImplementedError(type(l).__name__)
        return act(x) if act is not None and not isinstance(l, Activation) else x

    def forward(self, x):
        if self.spec.task == "lm":
            return self.run(self.net, torch.from_numpy(x).long())
        return self.run(self.net, torch.from_numpy(x).double().reshape(len(x), *self.spec.feature_shape))

    def loss(self, out, y):
        y = torch.from_numpy(y).long()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    out = {}
    for name, (kw, n) in MODELS.items():
        spec = ModelSpec(**kw)
        flat = ParameterTable(build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)).init(SEED)
        x, y = batch(spec, n, rng)
        net = Torch(spec, flat)
        logits = net.forward(x)
        net.loss(logits, y).backward()
        out.update({f"{name}/x": x, f"{name}/y": y, f"{name}/logits": logits.detach().numpy().astype(np.float32),
                    f"{name}/grad": net.flat_grad().astype(np.float32)})
        # AdamW with PyTorch's decoupled decay on the table's decay entries only, global-norm clipping
        decay = [net.tensors[e.name] for e in net.table if e.param.group == "weight"]
        rest = [net.tensors[e.name] for e in net.table if e.param.group != "weight"]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
                                lr=LR, betas=BETAS, eps=EPS)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = net.loss(net.forward(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(net.tensors.values()), CLIP)
            opt.step()
            losses.append(loss.item())
        out[f"{name}/losses"] = np.array(losses)
        print(f"{name}: {net.table.size} parameters, loss {losses[0]:.6f} → {losses[-1]:.6f}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.npz")
    np.savez_compressed(path, **out)
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
