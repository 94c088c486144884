"""`mpitrain export`: a trained model.h5 as an ONNX graph, or as PyTorch-layout weight arrays (npz).

Both describe the same network, in inference mode (BatchNorm with the running statistics model.h5 holds,
dropout the identity), and give the logits (softmax follows in training).  Maps are channels first, the
convention of ONNX and PyTorch: [N, C, H, W], or [N, C, L] for a 1-d stack; sequences stay (N, T, C), as
PyTorch's transformers hold them; flat features (N, F).  The input is

* a language model's (a stack starting with an embedding): tokens, int64 (N, T) with T the block size,
  → logits (N, T, vocabulary);
* otherwise samples standardised with the model's training statistics (model.h5's, which both files carry),
  each channels first in the C order of its feature_shape (data of shape (H, W) or (L,) is reshaped to one
  channel first), or flat (N, features) for a stack that starts with dense/flatten, → logits (N, outputs).

ONNX (opset 17, IR version 8, built with the onnx package's helper API and checked with onnx.checker):
input `x` float32 [N, …] or `tokens` int64 [N, T] (N dynamic), output `logits`.  Each layer becomes
  conv        Conv (explicit pads [begin…, end…]: TensorFlow 'same' padding is asymmetric; no B without a bias)
  pooling     MaxPool / AveragePool;  globalavgpool: GlobalAveragePool + Flatten
  flatten     Flatten when a dense reads it, through elementwise layers only (its rows are permuted, below),
              else Transpose to channels last + Flatten (mpitrain's (H, W, C) order, for the layers after it)
  dense       Gemm on flat features; MatMul + Add per position of a sequence [N, T, C]
  relu, tanh  Relu / Tanh;  gelu: its tanh form composed at opset 17 (0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))))
  layernorm   LayerNormalization (axis −1; on a map between Transposes to channels last and back)
  groupnorm   Reshape [N, G, −1] + InstanceNormalization + Reshape back + Mul/Add of the per-channel affine
              (the composition PyTorch's exporter writes before opset 18's GroupNormalization)
  batchnorm   BatchNormalization (inference) with the running mean and variance (a sequence between Transposes)
  dropout     nothing (the identity at inference)
  embedding   Gather of the token rows of wte + Add of the position rows wpe (T, C)
  attention   MatMul + Add (the fused q/k/v projection), Reshape [N, T, 3, H, C/H] + Transpose into heads,
              MatMul q·kᵀ, Mul by 1/√(C/H), Add of the causal mask (a constant (T, T): −inf above the
              diagonal), Softmax, MatMul by v, Transpose + Reshape back to [N, T, C]
  tied        MatMul with Transpose(wte) (the embedding's initializer, not a copy)
  residual    its branches inline, then Add (of the shortcut branch's output, or of the block's input)

npz (format mpitrain-torch-sequential, version 2): the state_dict of a torch.nn.Sequential in PyTorch's
layouts, plus `description`, a 0-d unicode array holding JSON: `modules`, the modules in order, each {index,
module, args, kwargs, torch (its constructor text), source (the mpitrain layer it comes from)}, a residual
block's also `main` and `shortcut` (its branches' modules, indexed within the branch; shortcut [] for the
identity), a tied layer's `tied_to` (the state_dict key of the weight it shares, not copied); `sequential`
(the whole constructor expression; the embedding bound to the name `embedding` that Tied's text uses);
`custom_modules` (the modules it uses that are not torch.nn's own) and `torch_modules` (TORCH_MODULES, the
Python source defining all five: Permute, Residual, TokenEmbedding, CausalSelfAttention, Tied; null when
none is used); `state_dict` (every key); the input shape and dtype, the output shape, the data's
standardisation and a language model's tokenizer.  State_dict keys are PyTorch's: `<index>.weight`, in a
block `<index>.main.<j>.weight`; nn.Linear (out, in); nn.Conv2d (C_out, C_in, KH, KW), nn.Conv1d (C_out,
C_in, K); norms `weight`, `bias`, BatchNorm also `running_mean`, `running_var` and `num_batches_tracked`
(int64 0: mpitrain does not count; PyTorch reads it only with momentum=None); TokenEmbedding `wte.weight`
(V, C), `wpe.weight` (T, C); CausalSelfAttention `qkv.weight` (3C, C), `qkv.bias`.  Each layer becomes
  conv: [nn.ZeroPad2d | nn.ConstantPad1d (asymmetric 'same' padding)] nn.Conv2d | nn.Conv1d (padding 0 then);
  pooling: nn.MaxPool/AvgPool{1,2}d;  globalavgpool: nn.AdaptiveAvgPool{1,2}d(1), nn.Flatten();
  flatten: nn.Flatten() (a dense reads it) or Permute to channels last, nn.Flatten();  dense: nn.Linear;
  relu/tanh: nn.ReLU/nn.Tanh (a fused one after its layer);  gelu: nn.GELU(approximate='tanh');
  layernorm: nn.LayerNorm(C) (on a map between Permutes);  groupnorm: nn.GroupNorm(G, C);
  batchnorm: nn.BatchNorm1d(F) on flat features, nn.BatchNorm2d/1d(C) on a map, nn.BatchNorm1d(C) between
  Permutes on a sequence;  dropout: nn.Dropout(p);  embedding: TokenEmbedding(V, C[, T]);  attention:
  CausalSelfAttention(C, H);  tied: Tied(embedding);  residual: Residual(nn.Sequential(main…)[, nn.Sequential(
  shortcut…)]).  Norms keep mpitrain's eps (1e-5) and BatchNorm's momentum (0.1), PyTorch's defaults.

mpitrain computes NHWC with conv weights (C_out, KH, KW, C_in) and `flatten` ordering a map (H, W, C);
the export permutes conv weights to (C_out, C_in, KH, KW) and the rows of the dense layer a flatten feeds
from (H, W, C) to (C, H, W) order, so the channels-first Flatten feeds it the same numbers.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from . import __version__
from .errors import MpitrainError
from .kernels.cpu import ACTIVATIONS, IDENTITY, RELU, TANH
from .model.layers import Conv, Dense, Flatten, Pool
from .model.nn import (BN_MOMENTUM, GELU, LN_EPS, Activation, Attention, BatchNorm, Dropout, Embedding,
                       GlobalAvgPool, GroupNorm, LayerNorm, Residual, Tied)
from .model.stack import build
from .model.table import ParameterTable

FORMATS = ("onnx", "npz")
OPSET = 17  # LayerNormalization's first opset
IR_VERSION = 8  # the IR of opset 17: readable by every onnxruntime that runs opset 17
NPZ_FORMAT = "mpitrain-torch-sequential"
NPZ_VERSION = 2  # 2: the layers of modern networks (nested residual modules, custom modules, torch_modules)
_ACT = {RELU: ("Relu", "ReLU"), TANH: ("Tanh", "Tanh")}  # (ONNX op, nn module)
_WORD = {code: word for word, code in ACTIVATIONS.items()}
_TO_LAST = {1: ([0, 2, 1], [0, 2, 1]), 2: ([0, 2, 3, 1], [0, 3, 1, 2])}  # a map's (to channels last, back)
_ELEMENTWISE = (Activation, GELU, Dropout)  # layers a permutation of the features passes through unchanged

# The PyTorch modules an npz's description uses beyond torch.nn's own (carried in it as `torch_modules`).
TORCH_MODULES = '''\
import torch
from torch import nn


class Permute(nn.Module):
    """x.permute(*dims): channels first (convolutions) <-> channels last (a LayerNorm on a map, a BatchNorm
    on a sequence, a flatten in mpitrain's (H, W, C) order)."""

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class Residual(nn.Module):
    """main(x) + shortcut(x), or main(x) + x without a shortcut."""

    def __init__(self, main, shortcut=None):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class TokenEmbedding(nn.Module):
    """tokens (N, T) int64 -> wte[tokens] + wpe[t] at position t (no wpe when positions is 0)."""

    def __init__(self, vocab, width, positions=0):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(positions, width) if positions else None

    def forward(self, tokens):
        x = self.wte(tokens)
        return x if self.wpe is None else x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))


class CausalSelfAttention(nn.Module):
    """(N, T, C) -> (N, T, C): qkv = Linear(C, 3C) holds q, k and v as three C-wide blocks (head h: columns
    h*C/H ... (h+1)*C/H of each); softmax(q k^T / sqrt(C/H)) with the causal mask, times v.  No output
    projection: the Linear after it."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        N, T, C = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(N, T, C)


class Tied(nn.Module):
    """logits = x @ wte^T with a TokenEmbedding's weight (held outside this module's state_dict)."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = [embedding]

    def forward(self, x):
        return x @ self.embedding[0].wte.weight.T
'''


def _dims(layers):
    """1 for a stack of 1-d layers, else 2 (the first conv or pooling found, nested ones included)."""
    for l in (x for layer in layers for x in layer.layers()):
        if isinstance(l, (Conv, Pool)):
            return l.dims
    return 2


@dataclass
class Plan:
    """The exported network: steps (see plan), its input (name, ONNX element type, dims with N first), the
    channels-first per-sample shape it reads, and the output's dims."""
    steps: list
    name: str
    dtype: str
    in_dims: list
    shape: tuple
    out_dims: list


def _layout(shape):
    return {1: "flat", 2: "seq", 3: "map"}[len(shape)]


def _feeds_dense(layers, i):
    """Whether the flatten layers[i] hands its features to a dense layer through elementwise layers only
    (then that dense layer's rows absorb the channels-first order)."""
    for l in layers[i + 1:]:
        if isinstance(l, Dense):
            return True
        if not isinstance(l, (*_ELEMENTWISE, Flatten)):  # a flatten of flat features is nothing
            return False
    return False


def plan(spec, params, fmt="onnx", state=None):
    """The network of (spec, flat params, state vector) as a Plan whose steps are in channels-first terms,
    each a dict with op, its arrays already in the exported layout, `name` (the layer's name in the
    parameter table) and `where` (its place and text in model.layers, for messages); a residual block's
    steps hold its branches'.  state None: the initial state (BatchNorm running mean 0, variance 1).  A layer
    the exporter cannot express is one MpitrainError naming it."""
    net = build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)
    if state is None:
        state = ParameterTable(net, state=True).init(0)
    dims, first = _dims(net), net[0].in_shape
    steps = _plan(net, "model.layers", params, state, fmt, dims)
    out = ["N", *net[-1].out_shape]
    if isinstance(net[0], Embedding):
        return Plan(steps, "tokens", "INT64", ["N", *first], first, out)
    if len(first) == 3:
        H, W, C = first
        return Plan(steps, "x", "FLOAT", ["N", *spec.feature_shape], (C, W) if dims == 1 else (C, H, W), out)
    return Plan(steps, "x", "FLOAT", ["N", spec.n_in], first, out)


def _plan(layers, prefix, params, state, fmt, dims):
    steps, flat_from = [], None  # flat_from: the (H, W, C) map a flatten ordered, until the dense reads it
    place = 0  # the layer's index in the canonical stack (a fused activation is an entry of its own)
    for i, layer in enumerate(layers):
        where = f"{prefix}[{place}] ({layer.text()})"
        act = layer.act
        place += 1 + (act != IDENTITY)
        if act != IDENTITY and act not in _ACT:
            raise MpitrainError(f"{where}: its activation cannot be exported to {fmt}")
        # wrap: (before, after) permutations of the axes around the step (None: none)
        step = dict(where=where, name=getattr(layer, "name", where), layout=_layout(layer.in_shape), wrap=None)
        if isinstance(layer, Conv):
            KH, KW, SH, SW, PH, PW, OH, OW = layer.geom
            H, W, C = layer.in_shape
            end_h, end_w = (max((o - 1) * s + k - n - p, 0)  # the rest of TF 'same' padding (odd pixel here)
                            for o, s, k, n, p in ((OH, SH, KH, H, PH), (OW, SW, KW, W, PW)))
            w, b = layer.views(params)
            w = w.reshape(layer.channels, KH, KW, C).transpose(0, 3, 1, 2)  # → (C_out, C_in, KH, KW)
            if layer.dims == 1:
                w, kernel, stride, begin, end, out = w[:, :, 0, :], (KW,), (SW,), (PW,), (end_w,), (OW,)
            else:
                kernel, stride, begin, end, out = (KH, KW), (SH, SW), (PH, PW), (end_h, end_w), (OH, OW)
            n_in = (W,) if layer.dims == 1 else (H, W)
            if any((n + p + q - k) // s + 1 != o for n, p, q, k, s, o in zip(n_in, begin, end, kernel, stride, out)):
                raise MpitrainError(f"{where}: its padding cannot be exported to {fmt}")
            step.update(op="conv", dims=layer.dims, c_in=C, c_out=layer.channels,
                        weight=np.ascontiguousarray(w, np.float32),
                        bias=None if b is None else np.array(b, np.float32),
                        kernel=kernel, stride=stride, begin=begin, end=end)
        elif isinstance(layer, Pool):
            KH, KW, SH, SW = layer.win
            kernel, stride = ((KW,), (SW,)) if layer.dims == 1 else ((KH, KW), (SH, SW))
            step.update(op="pool", dims=layer.dims, kind=layer.kind, kernel=kernel, stride=stride)
        elif isinstance(layer, Flatten):
            if len(layer.in_shape) == 1:  # a flatten of flat features is nothing
                continue
            # a map: in mpitrain's (H, W, C) order unless a dense reads it; a sequence's (T, C) order is PyTorch's
            if len(layer.in_shape) == 3 and _feeds_dense(layers, i):
                flat_from = layer.in_shape
            elif len(layer.in_shape) == 3:
                step["wrap"] = (_TO_LAST[dims][0], None)
            step.update(op="flatten")
        elif isinstance(layer, Dense):
            w, b = layer.views(params)  # (in, out)
            if flat_from is not None:  # rows in (H, W, C) order → (C, H, W), as a channels-first Flatten lays out
                H, W, C = flat_from
                w = w.reshape(H, W, C, layer.units).transpose(2, 0, 1, 3).reshape(-1, layer.units)
                flat_from = None
            step.update(op="dense", n_in=layer.n_in, units=layer.units,
                        weight=np.ascontiguousarray(w, np.float32), bias=np.array(b, np.float32))
        elif isinstance(layer, Activation):
            if layer.act_code not in _ACT:
                raise MpitrainError(f"{where}: this activation cannot be exported to {fmt}")
            step.update(op="act", code=layer.act_code)
        elif isinstance(layer, GELU):
            step.update(op="gelu")
        elif isinstance(layer, GlobalAvgPool):
            step.update(op="globalavgpool", dims=dims, C=layer.out_shape[0])
        elif isinstance(layer, (LayerNorm, GroupNorm, BatchNorm)):
            w, b = (np.array(a, np.float32) for a in layer.views(params))
            step.update(op=type(layer).__name__.lower(), dims=dims, C=layer.C, weight=w, bias=b)
            if isinstance(layer, LayerNorm) and step["layout"] == "map":  # over the channels of each pixel
                step["wrap"] = _TO_LAST[dims]
            if isinstance(layer, BatchNorm) and step["layout"] == "seq":  # over the positions of each channel
                step["wrap"] = ([0, 2, 1], [0, 2, 1])
            if isinstance(layer, GroupNorm):
                H, W, C = layer.in_shape
                step.update(groups=layer.G, shape=(C, W) if dims == 1 else (C, H, W))
            if isinstance(layer, BatchNorm):
                o = layer.state_offset
                step.update(mean=np.array(state[o:o + layer.C], np.float32),
                            var=np.array(state[o + layer.C:o + 2 * layer.C], np.float32))
        elif isinstance(layer, Dropout):
            step.update(op="dropout", rate=layer.rate)
        elif isinstance(layer, Embedding):
            p = layer.views(params)
            step.update(op="embedding", V=layer.V, C=layer.C, T=layer.T, wte=np.array(p[0], np.float32),
                        wpe=np.array(p[1], np.float32) if layer.positions else None)
        elif isinstance(layer, Attention):
            w, b = layer.views(params)  # (C, 3C): the q, k, v column blocks
            step.update(op="attention", C=layer.C, H=layer.H, T=layer.T, weight=np.array(w, np.float32),
                        bias=np.array(b, np.float32))
        elif isinstance(layer, Tied):
            step.update(op="tied", source=layer.shares.name, V=layer.shares.V, C=layer.shares.C)
        elif isinstance(layer, Residual):
            base = where.split(" (")[0]
            step.update(op="residual", main=_plan(layer.main, f"{base}.main", params, state, fmt, dims),
                        shortcut=_plan(layer.shortcut, f"{base}.shortcut", params, state, fmt, dims))
        else:
            raise MpitrainError(f"{where}: this layer cannot be exported to {fmt} (no equivalent there)")
        if act != IDENTITY:  # the activation's own entry of the stack, right after its layer
            step.update(act=act, act_where=f"{prefix}[{place - 1}] ({_WORD[act]})")
        steps.append(step)
    return steps


def _need_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import checker, helper, numpy_helper  # noqa: F401
    except ImportError:
        raise MpitrainError("export --format onnx needs the onnx package: pip install 'mpitrain[export]'") from None


class _Graph:
    """The nodes and initializers of an ONNX graph being written; names are the layers' table names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []

    def const(self, name, array):
        self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, out, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def steps(self, steps, value):
        for s in steps:
            before, after = s["wrap"] or (None, None)
            if before:
                value = self.node("Transpose", [value], f"{s['name']}.before", perm=before)
            value = self.step(s, value)
            if after:
                value = self.node("Transpose", [value], f"{s['name']}.after", perm=after)
            if s.get("act", IDENTITY) != IDENTITY:
                op = _ACT[s["act"]][0]
                value = self.node(op, [value], f"{s['name']}.{op.lower()}")
        return value

    def step(self, s, x):
        op, n, node, const = s["op"], s["name"], self.node, self.const
        if op == "conv":
            ins = [x, const(f"{n}.weight", s["weight"])]
            if s["bias"] is not None:
                ins.append(const(f"{n}.bias", s["bias"]))
            return node("Conv", ins, n, kernel_shape=list(s["kernel"]), strides=list(s["stride"]),
                        pads=[*s["begin"], *s["end"]])
        if op == "pool":
            return node("MaxPool" if s["kind"] == "max" else "AveragePool", [x], n, kernel_shape=list(s["kernel"]),
                        strides=list(s["stride"]))
        if op == "flatten":
            return node("Flatten", [x], n, axis=1)
        if op == "dense":
            if s["layout"] == "flat":
                return node("Gemm", [x, const(f"{n}.weight", s["weight"]), const(f"{n}.bias", s["bias"])], n)
            y = node("MatMul", [x, const(f"{n}.weight", s["weight"])], f"{n}.matmul")
            return node("Add", [y, const(f"{n}.bias", s["bias"])], n)
        if op == "act":
            return node(_ACT[s["code"]][0], [x], n)
        if op == "gelu":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as mpitrain's kernel
            c = {k: const(f"{n}.{k}", np.float32(v)) for k, v in
                 (("half", 0.5), ("one", 1.0), ("a", 0.044715), ("s", np.sqrt(2.0 / np.pi)))}
            x3 = node("Mul", [node("Mul", [x, x], f"{n}.x2"), x], f"{n}.x3")
            inner = node("Add", [x, node("Mul", [x3, c["a"]], f"{n}.ax3")], f"{n}.inner")
            t = node("Tanh", [node("Mul", [inner, c["s"]], f"{n}.scaled")], f"{n}.tanh")
            half = node("Mul", [x, c["half"]], f"{n}.halfx")
            return node("Mul", [half, node("Add", [t, c["one"]], f"{n}.onet")], n)
        if op == "globalavgpool":
            return node("Flatten", [node("GlobalAveragePool", [x], f"{n}.pool")], n, axis=1)
        if op == "layernorm":
            return node("LayerNormalization", [x, const(f"{n}.weight", s["weight"]), const(f"{n}.bias", s["bias"])],
                        n, axis=-1, epsilon=LN_EPS)
        if op == "groupnorm":
            G, C = s["groups"], s["C"]
            per = [C] + [1] * (len(s["shape"]) - 1)  # the affine's shape, broadcast over the positions
            g = node("Reshape", [x, const(f"{n}.groups_shape", np.array([0, G, -1], np.int64))], f"{n}.groups")
            g = node("InstanceNormalization", [g, const(f"{n}.ones", np.ones(G, np.float32)),
                                               const(f"{n}.zeros", np.zeros(G, np.float32))], f"{n}.norm",
                     epsilon=LN_EPS)
            y = node("Reshape", [g, const(f"{n}.map_shape", np.array([0, *s["shape"]], np.int64))], f"{n}.map")
            y = node("Mul", [y, const(f"{n}.weight", s["weight"].reshape(per))], f"{n}.scaled")
            return node("Add", [y, const(f"{n}.bias", s["bias"].reshape(per))], n)
        if op == "batchnorm":  # inference: the running statistics
            ins = [x] + [const(f"{n}.{k}", s[k]) for k in ("weight", "bias", "mean", "var")]
            return node("BatchNormalization", ins, n, epsilon=LN_EPS)
        if op == "dropout":
            return x
        if op == "embedding":
            y = node("Gather", [const(f"{n}.wte", s["wte"]), x], f"{n}.tokens" if s["wpe"] is not None else n, axis=0)
            return y if s["wpe"] is None else node("Add", [y, const(f"{n}.wpe", s["wpe"])], n)
        if op == "attention":
            return self.attention(s, x)
        if op == "tied":
            wt = node("Transpose", [f"{s['source']}.wte"], f"{n}.wte_t", perm=[1, 0])
            return node("MatMul", [x, wt], n)
        if op == "residual":
            y = self.steps(s["main"], x)
            z = self.steps(s["shortcut"], x) if s["shortcut"] else x
            return self.node("Add", [y, z], n)
        raise AssertionError(op)

    def attention(self, s, x):
        n, node, const = s["name"], self.node, self.const
        T, C, H = s["T"], s["C"], s["H"]
        qkv = node("Add", [node("MatMul", [x, const(f"{n}.qkv.weight", s["weight"])], f"{n}.qkv_mm"),
                           const(f"{n}.qkv.bias", s["bias"])], f"{n}.qkv")
        heads = node("Reshape", [qkv, const(f"{n}.heads_shape", np.array([0, T, 3, H, C // H], np.int64))],
                     f"{n}.split")
        heads = node("Transpose", [heads], f"{n}.heads", perm=[2, 0, 3, 1, 4])  # [3, N, H, T, C/H]
        q, k, v = (node("Gather", [heads, const(f"{n}.{w}_index", np.array(i, np.int64))], f"{n}.{w}", axis=0)
                   for i, w in enumerate("qkv"))
        scores = node("MatMul", [q, node("Transpose", [k], f"{n}.k_t", perm=[0, 1, 3, 2])], f"{n}.scores")
        scores = node("Mul", [scores, const(f"{n}.scale", np.float32(1.0 / np.sqrt(C // H)))], f"{n}.scaled")
        mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)  # position t sees positions ≤ t only
        scores = node("Add", [scores, const(f"{n}.causal_mask", mask)], f"{n}.masked")
        y = node("MatMul", [node("Softmax", [scores], f"{n}.probs", axis=-1), v], f"{n}.context")
        y = node("Transpose", [y], f"{n}.positions", perm=[0, 2, 1, 3])  # [N, T, H, C/H]
        return node("Reshape", [y, const(f"{n}.out_shape", np.array([0, T, C], np.int64))], n)


def to_onnx(spec, p, standardize=None, tokenizer=None, targets=None):
    """The onnx.ModelProto of p = plan(spec, …), checked; standardize: model.h5's (mean, std), in its
    properties; tokenizer: a language model's ({"tokenizer": …, "vocab": …}), likewise; targets: a regression
    model's target (mean, std): the graph's output `targets` is then in the targets' units."""
    import onnx
    from onnx import TensorProto, helper

    g, value = _Graph(), p.name
    if p.in_dims[1:] != [*p.shape]:  # a map stored (H, W) → (1, H, W), (L,) → (1, L)
        value = g.node("Reshape", [value, g.const("input_shape", np.array([-1, *p.shape], np.int64))], "x_nchw")
    value = g.steps(p.steps, value)
    if targets is not None:  # the standardised outputs back to the targets' units
        mean, std = (np.asarray(v, np.float32).reshape(-1) for v in targets)
        value = g.node("Add", [g.node("Mul", [value, g.const("target_std", std)], "unscaled"),
                               g.const("target_mean", mean)], "targets")
    out = "targets" if targets is not None else "logits"
    assert g.nodes[-1].output[0] == value
    g.nodes[-1].output[0] = out
    graph = helper.make_graph(
        g.nodes, f"mpitrain_{spec.kind}",
        [helper.make_tensor_value_info(p.name, getattr(TensorProto, p.dtype), p.in_dims)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, p.out_dims)], initializer=g.inits)
    graph.input[0].doc_string = ("token ids (int64), the block size of them" if p.dtype == "INT64" else
                                 "samples channels first, standardised with the training statistics (the "
                                 "property mpitrain.standardize)")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mpitrain",
                              producer_version=__version__, ir_version=IR_VERSION)
    props = {"mpitrain.kind": spec.kind, "mpitrain.task": spec.task, "mpitrain.layers": json.dumps(list(spec.stack)),
             "mpitrain.feature_shape": json.dumps(list(spec.feature_shape)),
             "mpitrain.standardize": json.dumps(_stats(standardize))}
    if tokenizer:
        props["mpitrain.tokenizer"] = json.dumps(tokenizer)
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


_CUSTOM = ("Permute", "Residual", "TokenEmbedding", "CausalSelfAttention", "Tied")


def _module(index, source, name, *args, **kwargs):
    """One entry of the npz description: a torch.nn (or TORCH_MODULES) module, its arguments and its
    constructor text."""
    call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    prefix = "" if name in _CUSTOM else "nn."
    return {"index": index, "module": name, "args": list(args), "kwargs": kwargs, "torch": f"{prefix}{name}({call})",
            "source": source}


class _Torch:
    """The npz's modules and state_dict, written from plan steps (a residual's branches recursively)."""

    def __init__(self):
        self.arrays, self.embedding = {}, {}  # embedding: its layer name → state_dict prefix

    def modules(self, steps, prefix=""):
        """(module entries, nn.Sequential constructor text) of steps, their state_dict keys starting with prefix."""
        modules, texts = [], []

        def add(source, name, *args, arrays=(), text=None, **kwargs):
            m = _module(len(modules), source, name, *args, **kwargs)
            if text:
                m["torch"] = text
            for key, a in arrays:
                self.arrays[f"{prefix}{m['index']}.{key}"] = a
            modules.append(m)
            texts.append(m["torch"])
            return m

        for s in steps:
            src, op, (before, after) = s["where"], s["op"], s["wrap"] or (None, None)
            d = s.get("dims", 2)
            one = (lambda t: t[0]) if d == 1 else tuple
            if before:
                add(src, "Permute", *before)
            if op == "conv":
                pad = s["begin"]
                if s["begin"] != s["end"]:  # asymmetric: F.pad as a module, then an unpadded conv
                    if d == 1:
                        add(src, "ConstantPad1d", (s["begin"][0], s["end"][0]), 0.0)
                    else:  # ZeroPad2d takes (left, right, top, bottom)
                        add(src, "ZeroPad2d", (s["begin"][1], s["end"][1], s["begin"][0], s["end"][0]))
                    pad = (0,) * d
                no_bias = s["bias"] is None
                add(src, f"Conv{d}d", s["c_in"], s["c_out"], one(s["kernel"]), stride=one(s["stride"]),
                    padding=one(pad), **({"bias": False} if no_bias else {}),
                    arrays=[("weight", s["weight"])] + ([] if no_bias else [("bias", s["bias"])]))
            elif op == "pool":
                add(src, f"{'Max' if s['kind'] == 'max' else 'Avg'}Pool{d}d", one(s["kernel"]), stride=one(s["stride"]))
            elif op == "flatten":
                add(src, "Flatten")
            elif op == "dense":
                add(src, "Linear", s["n_in"], s["units"],
                    arrays=[("weight", np.ascontiguousarray(s["weight"].T)), ("bias", s["bias"])])
            elif op == "act":
                add(src, _ACT[s["code"]][1])
            elif op == "gelu":
                add(src, "GELU", approximate="tanh")
            elif op == "globalavgpool":
                add(src, f"AdaptiveAvgPool{d}d", 1)
                add(src, "Flatten")
            elif op == "layernorm":
                add(src, "LayerNorm", s["C"], eps=LN_EPS, arrays=[("weight", s["weight"]), ("bias", s["bias"])])
            elif op == "batchnorm":
                arrays = [("weight", s["weight"]), ("bias", s["bias"]), ("running_mean", s["mean"]),
                          ("running_var", s["var"]), ("num_batches_tracked", np.array(0, np.int64))]
                add(src, f"BatchNorm{2 if s['layout'] == 'map' and d == 2 else 1}d", s["C"], eps=LN_EPS,
                    momentum=BN_MOMENTUM, arrays=arrays)
            elif op == "groupnorm":
                add(src, "GroupNorm", s["groups"], s["C"], eps=LN_EPS,
                    arrays=[("weight", s["weight"]), ("bias", s["bias"])])
            elif op == "dropout":
                add(src, "Dropout", s["rate"])
            elif op == "embedding":
                arrays = [("wte.weight", s["wte"])] + ([] if s["wpe"] is None else [("wpe.weight", s["wpe"])])
                m = add(src, "TokenEmbedding", s["V"], s["C"], *([] if s["wpe"] is None else [s["T"]]), arrays=arrays)
                texts[-1] = f"(embedding := {m['torch']})"  # the name Tied's constructor text uses
                self.embedding[s["name"]] = f"{prefix}{m['index']}."
            elif op == "attention":
                add(src, "CausalSelfAttention", s["C"], s["H"],
                    arrays=[("qkv.weight", np.ascontiguousarray(s["weight"].T)), ("qkv.bias", s["bias"])])
            elif op == "tied":
                m = add(src, "Tied", text="Tied(embedding)")
                m["tied_to"] = f"{self.embedding[s['source']]}wte.weight"
            elif op == "residual":
                i = len(modules)
                main, main_text = self.modules(s["main"], f"{prefix}{i}.main.")
                short, short_text = self.modules(s["shortcut"], f"{prefix}{i}.shortcut.")
                text = f"Residual({main_text}" + (f", {short_text})" if short else ")")
                m = add(src, "Residual", text=text)
                m.update(main=main, shortcut=short)
            else:
                raise AssertionError(op)
            if after:
                add(src, "Permute", *after)
            if s.get("act", IDENTITY) != IDENTITY:
                add(s["act_where"], _ACT[s["act"]][1])
        return modules, "nn.Sequential(" + ", ".join(texts) + ")"


def _natural(key):
    """A state_dict key's sort key: module indices as numbers."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def to_npz(spec, p, standardize=None, tokenizer=None):
    """({state_dict key: array}, description dict) of p = plan(spec, …) as a torch.nn.Sequential."""
    t = _Torch()
    modules, sequential = t.modules(p.steps)
    dims, out = ", ".join(map(str, p.shape)), ", ".join(map(str, p.out_dims[1:]))
    custom = sorted({m["module"] for m in _all(modules)} & set(_CUSTOM))
    description = {
        "format": NPZ_FORMAT, "version": NPZ_VERSION, "mpitrain_version": __version__,
        "container": "torch.nn.Sequential",
        "input_shape": list(p.shape), "input_dtype": p.dtype.lower() if p.dtype == "INT64" else "float32",
        "input": (f"int64 (N, {dims}): token ids, the block size of them" if p.dtype == "INT64" else
                  f"float32 (N, {dims}): samples channels first, standardised with 'standardize' (the training "
                  "statistics)") + f"; the Sequential outputs the logits (N, {out})",
        "output_shape": p.out_dims[1:],
        "feature_shape": list(spec.feature_shape), "n_features": spec.n_in, "classes": spec.n_out,
        "task": spec.task, "kind": spec.kind, "mpitrain_layers": list(spec.stack),
        "modules": modules,
        "sequential": sequential,
        "custom_modules": custom,
        "torch_modules": TORCH_MODULES if custom else None,
        "state_dict": sorted(t.arrays, key=_natural),
        "standardize": _stats(standardize),
        "tokenizer": tokenizer or None,
    }
    return t.arrays, description


def _all(modules):
    """Every module entry, those inside residual blocks included."""
    for m in modules:
        yield m
        for branch in ("main", "shortcut"):
            yield from _all(m.get(branch, ()))


def _stats(standardize):
    """model.h5's training statistics (the model's, whatever file it is later used on) for a reader."""
    return None if standardize is None else {
        "mean": np.asarray(standardize[0], np.float64).tolist(),
        "std": np.asarray(standardize[1], np.float64).tolist(),
        "note": "raw x → (x - mean) / std; one value per feature, or per channel (repeat it over the "
                "channel's H·W features)"}


def _tokenizer(path):
    """A language model's tokenizer as model.h5 keeps it ({"tokenizer": chars | bytes, "vocab": [...]}), or None."""
    import h5py

    with h5py.File(path, "r") as f:
        if "tokenizer" not in f.attrs:
            return None
        out = {"tokenizer": str(f.attrs["tokenizer"])}
        if "vocab" in f.attrs:
            out["vocab"] = json.loads(str(f.attrs["vocab"]))
        return out


def export(model_path, fmt, out):
    """Write the model of model_path as `fmt` to out (atomically); returns the line to print."""
    from .checkpoint import atomic_write, load_model
    from .evaluate import model_targets

    if fmt not in FORMATS:
        raise MpitrainError(f"export --format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _need_onnx()
    spec, params, stats, state = load_model(model_path, standardize=True, state=True)
    tokenizer = _tokenizer(model_path)
    p = plan(spec, params, fmt, state)
    if os.path.isdir(out):
        raise MpitrainError(f"{out}: is a directory (expected a file name)")
    targets = model_targets(model_path) if spec.task == "regress" else None
    if fmt == "onnx":
        model = to_onnx(spec, p, stats, tokenizer, targets)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        what = (f"onnx opset {OPSET}, input {p.name} [{', '.join(map(str, p.in_dims))}] → "
                f"{'targets' if targets is not None else 'logits'} "
                f"[{', '.join(map(str, p.out_dims))}]")
    else:
        arrays, description = to_npz(spec, p, stats, tokenizer)
        if targets is not None:  # the Sequential's outputs are standardised targets
            description["targets"] = {"mean": np.asarray(targets[0], np.float64).tolist(),
                                      "std": np.asarray(targets[1], np.float64).tolist(),
                                      "note": "output · std + mean: the targets in their units"}

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, description=np.array(json.dumps(description)), **arrays)
        what = (f"npz, {len(arrays)} arrays + description, torch.nn.Sequential of {len(description['modules'])} "
                f"modules on input (N, {', '.join(map(str, description['input_shape']))})")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as prepare and plot do
        atomic_write(out, write)
    except OSError as exc:
        raise MpitrainError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return f"{out}: {spec.describe()} ({spec.n_params} parameters) as {what}"
