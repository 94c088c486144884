"""PyTorch's twin of an mpitrain model: any stack of model.layers (every layer of model/stack.py) as a
torch.nn.Module of PyTorch's own modules (Linear, Conv2d/1d, LayerNorm, GroupNorm, BatchNorm, Embedding,
scaled_dot_product_attention, …) in PyTorch's native channels-first layout, starting from mpitrain's
parameters (a flat vector laid out by the model's parameter table).  `bench step` and `bench peers` time
it; tests/reference/make_reference.py runs it in float64 to write the reference numbers.  Imported only
where torch is installed.

The same model, not only the same shapes: every tensor holds mpitrain's values in PyTorch's layout (Linear
(out, in), conv (C_out, C_in, KH, KW)); 'same' padding is TensorFlow's (the odd pixel after: an explicit pad
where the two sides differ); a flatten of a map orders its features as mpitrain's NHWC memory does (H, W,
C), so the dense layer after it reads its weights unchanged; dropout masks are PyTorch's own.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu import RELU, TANH
from ..model.layers import Conv, Dense, Flatten, Pool, input_shape
from ..model.nn import (GELU, Activation, Attention, BatchNorm, Dropout, Embedding, GlobalAvgPool, GroupNorm,
                        LayerNorm, Residual, Tied)
from ..model.stack import build
from ..model.table import ParameterTable


def torch_input_shape(spec):
    """The per-sample shape PyTorch's first layer reads: (C, H, W), (C, L), (features,) or (T,) tokens."""
    nhwc, _ = input_shape(spec.feature_shape, spec.stack[0])
    if len(nhwc) == 1:
        return nhwc
    H, W, C = nhwc
    return (C, W) if spec.stack[0].split()[0].endswith("1d") else (C, H, W)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _LastAxis(nn.Module):
    """A module applied with the channels moved last (LayerNorm on a map: each pixel's channels) or to
    axis 1 (BatchNorm on a sequence (N, T, C))."""

    def __init__(self, inner, src, dst):
        super().__init__()
        self.inner, self.src, self.dst = inner, src, dst

    def forward(self, x):
        return self.inner(x.movedim(self.src, self.dst)).movedim(self.dst, self.src)


class _Embedding(nn.Module):
    def __init__(self, l, dtype):
        super().__init__()
        self.wte = nn.Embedding(l.V, l.C, dtype=dtype)
        self.wpe = nn.Embedding(l.T, l.C, dtype=dtype) if l.positions else None

    def forward(self, tokens):
        x = self.wte(tokens)
        return x + self.wpe.weight if self.wpe is not None else x


class _Attention(nn.Module):
    """nanoGPT's CausalSelfAttention without its output projection (mpitrain's dense layer after it)."""

    def __init__(self, l, dtype):
        super().__init__()
        self.H = l.H
        self.qkv = nn.Linear(l.C, 3 * l.C, dtype=dtype)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


class _Residual(nn.Module):
    def __init__(self, main, shortcut):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + (self.shortcut(x) if self.shortcut is not None else x)


def _layouts(l, p):
    """(to PyTorch, back to mpitrain) of the values of tensor p of layer l, as NumPy arrays."""
    if isinstance(l, Conv) and p.name == "weight":
        KH, KW = l.geom[:2]

        def to(v):
            t = v.reshape(l.channels, KH, KW, -1).transpose(0, 3, 1, 2)  # (C_out, C_in, KH, KW)
            return t[:, :, 0] if l.dims == 1 else t

        return to, lambda v: (v[:, :, None] if l.dims == 1 else v).transpose(0, 2, 3, 1).reshape(l.channels, -1)
    if isinstance(l, (Dense, Attention)) and len(p.shape) == 2:
        return (lambda v: v.T), (lambda v: v.T)  # a Linear's weight is (out, in)
    return (lambda v: v), (lambda v: v)


class TorchModel(nn.Module):
    """The network of spec (a ModelSpec) with the parameters of flat (mpitrain's vector, its table's
    layout) in dtype.  forward(x) takes PyTorch's layout (inputs() makes it from stored samples);
    loss(out, y) is the task's mean loss, the gradient of which mpitrain's summed loss × 1/batch is."""

    def __init__(self, spec, flat, dtype=torch.float32):
        super().__init__()
        self.spec, self.dtype = spec, dtype
        self.net = build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)
        self.table = ParameterTable(self.net)
        self.dims = 1 if spec.stack[0].split()[0].lower().endswith("1d") else 2  # as build reads it
        self.tensors = {}  # table entry name → (PyTorch parameter, its layer, its Param)
        self.body = self._sequence(self.net)
        with torch.no_grad():
            for e in self.table:
                param, l, p = self.tensors[e.name]
                v = flat[e.offset:e.offset + e.size].reshape(e.param.shape)
                param.copy_(torch.from_numpy(np.ascontiguousarray(_layouts(l, p)[0](v))))

    def _sequence(self, layers):
        return nn.Sequential(*(m for l in layers for m in self._modules_of(l)))

    def _register(self, l, **params):
        """Names l's PyTorch parameters by its table entries (l.params() order)."""
        for p, param in zip(l.params(), params.values()):
            self.tensors[f"{l.name}.{p.name}"] = param, l, p

    def _modules_of(self, l):
        d = self.dtype
        shape = l.in_shape
        if isinstance(l, Dense):
            m = nn.Linear(l.n_in, l.units, dtype=d)
            self._register(l, weight=m.weight, bias=m.bias)
            mods = [m]
        elif isinstance(l, Conv):
            mods = [self._conv(l)]
        elif isinstance(l, Pool):
            KH, KW, SH, SW = l.win
            cls = {("max", 2): nn.MaxPool2d, ("avg", 2): nn.AvgPool2d, ("max", 1): nn.MaxPool1d,
                   ("avg", 1): nn.AvgPool1d}[l.kind, l.dims]
            mods = [cls((KH, KW), (SH, SW)) if l.dims == 2 else cls(KW, SW)]
        elif isinstance(l, Flatten):
            H, W, C = shape if len(shape) == 3 else (1, 1, 1)
            channels_last = C > 1 and H * W > 1  # NCHW memory holds (C, H, W): order it as mpitrain's (H, W, C)
            mods = [_Lambda(lambda x: x.movedim(1, -1).flatten(1)) if channels_last else nn.Flatten()]
        elif isinstance(l, GlobalAvgPool):
            mods = [_Lambda(lambda x: x.mean(dim=tuple(range(2, x.dim()))))]
        elif isinstance(l, Activation):
            mods = [nn.ReLU() if l.word == "relu" else nn.Tanh()]
        elif isinstance(l, GELU):
            mods = [nn.GELU(approximate="tanh")]
        elif isinstance(l, LayerNorm):
            m = nn.LayerNorm(l.C, eps=1e-5, dtype=d)
            self._register(l, weight=m.weight, bias=m.bias)
            mods = [_LastAxis(m, 1, -1) if len(shape) == 3 else m]
        elif isinstance(l, GroupNorm):
            m = nn.GroupNorm(l.G, l.C, eps=1e-5, dtype=d)
            self._register(l, weight=m.weight, bias=m.bias)
            mods = [m]
        elif isinstance(l, BatchNorm):
            m = (nn.BatchNorm2d if len(shape) == 3 and self.dims == 2 else nn.BatchNorm1d)(l.C, eps=1e-5, dtype=d)
            self._register(l, weight=m.weight, bias=m.bias)
            mods = [_LastAxis(m, -1, 1) if len(shape) == 2 else m]
        elif isinstance(l, Dropout):
            mods = [nn.Dropout(l.rate)]
        elif isinstance(l, Embedding):
            m = _Embedding(l, d)
            self._register(l, wte=m.wte.weight, **({"wpe": m.wpe.weight} if l.positions else {}))
            mods = [m]
        elif isinstance(l, Attention):
            m = _Attention(l, d)
            self._register(l, weight=m.qkv.weight, bias=m.qkv.bias)
            mods = [m]
        elif isinstance(l, Tied):
            m = nn.Linear(l.in_shape[-1], l.shares.V, bias=False, dtype=d)
            m.weight = self.tensors[f"{l.shares.name}.wte"][0]  # nanoGPT's weight tying
            mods = [m]
        elif isinstance(l, Residual):
            mods = [_Residual(self._sequence(l.main), self._sequence(l.shortcut) if l.shortcut else None)]
        else:
            raise NotImplementedError(f"layer {l.name} ({l.text()}): no PyTorch module for {type(l).__name__}")
        return mods + ([nn.ReLU()] if l.act == RELU else [nn.Tanh()] if l.act == TANH else [])

    def _conv(self, l):
        """A Conv2d/Conv1d with PyTorch's own padding where 'same' pads both sides alike, else after an
        explicit pad (TensorFlow's: the odd pixel at the bottom/right)."""
        KH, KW, SH, SW, PH, PW, OH, OW = l.geom
        H, W, C = l.in_shape
        total = [max((o - 1) * s + k - n, 0) if l.same else 0 for n, k, s, o in ((H, KH, SH, OH), (W, KW, SW, OW))]
        pads = [(PH, total[0] - PH), (PW, total[1] - PW)]
        even = all(a == b for a, b in pads)
        if l.dims == 2:
            m = nn.Conv2d(C, l.channels, (KH, KW), (SH, SW), padding=(PH, PW) if even else 0, bias=l.bias,
                          dtype=self.dtype)
            pad = None if even else nn.ZeroPad2d((*pads[1], *pads[0]))  # (left, right, top, bottom)
        else:
            m = nn.Conv1d(C, l.channels, KW, SW, padding=PW if even else 0, bias=l.bias, dtype=self.dtype)
            pad = None if even else nn.ConstantPad1d(pads[1], 0.0)
        self._register(l, weight=m.weight, **({"bias": m.bias} if l.bias else {}))
        return m if pad is None else nn.Sequential(pad, m)

    def forward(self, x):
        return self.body(x)

    def inputs(self, x, y):
        """Tensors of stored samples x (flat, channels first; tokens (N, T)) and targets y."""
        if self.spec.task == "lm":
            return torch.from_numpy(x).long(), torch.from_numpy(y).long()
        tx = torch.from_numpy(x).to(self.dtype).reshape(len(x), *torch_input_shape(self.spec))
        ty = torch.from_numpy(y)
        return tx, ty.to(self.dtype) if self.spec.task == "regress" else ty.long()

    def loss(self, out, y):
        """The mean loss: cross-entropy over the samples (or every position), or the squared error."""
        if self.spec.task == "regress":
            return F.mse_loss(out, y)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def flat_grad(self):
        """The parameters' gradients in mpitrain's flat layout (float64)."""
        out = np.zeros(self.table.size)
        for e in self.table:
            param, l, p = self.tensors[e.name]
            out[e.offset:e.offset + e.size] = _layouts(l, p)[1](param.grad.detach().double().numpy()).ravel()
        return out

    def decay_groups(self, weight_decay, groups=("weight",)):
        """AdamW's parameter groups: decay on the table's groups that train.decay names, none elsewhere."""
        decay = [self.tensors[e.name][0] for e in self.table if e.param.group in groups]
        rest = [self.tensors[e.name][0] for e in self.table if e.param.group not in groups]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
