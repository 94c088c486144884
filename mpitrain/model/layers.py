"""The layer library: each layer a spec (shapes, parameter count) and a forward and a backward on views
of the one flat float32 parameter vector, in the style of llm.c.

Activations are NHWC: a batch of 2-d maps is (N, H, W, C), of 1-d signals (N, 1, L, C) (a conv1d is a
conv2d of kernel height 1), of flat features (N, F).  A layer's parameters are the slice [W | b] of the flat
vector at its offset: dense W (in, out) row-major as it always was; conv W (C_out, KH·KW·C_in), row-major
over (C_out, KH, KW, C_in) (kernels/cpu.py).  An activation in a stack is fused into the dense or conv
layer before it (one pass after the GEMM), so it is a flag of that layer, not a layer (nn.Activation where
no such layer precedes it).  A conv followed by a
max pooling leaves its bias and activation to the pooling: both are monotone, so max(act(z + b)) =
act(max(z) + b), and they then run on the pooled pixels only, in both passes (Pool.conv).

The syntax that builds them is in stack.py; nn.py has the layers of modern networks.
"""
import math

from ..errors import MpitrainError
from ..kernels.cpu import RELU
from .base import Layer, Param

def uniform_init(act, fan_in, fan_out):
    """He (relu) or Glorot (otherwise) uniform: the rule every dense and conv weight has always had."""
    return ("uniform", math.sqrt(6.0 / fan_in) if act == RELU else math.sqrt(6.0 / (fan_in + fan_out)))


def _size(n, k, s, same):
    """(output size, padding before) of one spatial axis."""
    if same:
        out = -(-n // s)
        return out, max((out - 1) * s + k - n, 0) // 2
    return (n - k) // s + 1, 0


class Dense(Layer):
    """x @ W + b (W (in, out) row-major), activation fused; on flat features or per position of a sequence."""
    skips_dx = cuda = True

    def __init__(self, units, in_shape, std=0.0):
        *lead, self.n_in = in_shape
        self.units, self.in_shape, self.out_shape, self.std = units, in_shape, (*lead, units), std
        self.n_params = (self.n_in + 1) * units
        self.fan = (self.n_in, units)
        self.tensor = self.per_example = not lead  # sequences: tensor parallelism and DP-SGD come later

    def text(self):
        return f"dense {self.units}" + (f" std={self.std:g}" if self.std else "")

    def params(self):
        init = ("normal", self.std) if self.std else uniform_init(self.act, *self.fan)
        return [Param("weight", (self.n_in, self.units), init, "weight", "column"),
                Param("bias", (self.units,), ("zeros",), "bias", "column")]

    def views(self, flat, at=None):
        o, a, b = self.offset if at is None else at, self.n_in, self.units
        return flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + b]

    def forward(self, k, p, x, out, s, act=None):
        """out ← act(x @ W + b), with the layer's own activation unless act is given (tensor.Row)."""
        k.dense_forward(x.reshape(-1, self.n_in), *p, self.act if act is None else act,
                        out.reshape(-1, self.units))

    def backward(self, k, p, g, x, y, dy, dx, s):
        """dy ← dL/dz in place; g ← the layer's gradient; dx ← dL/dx unless it is None."""
        x, y, dy = x.reshape(-1, self.n_in), y.reshape(-1, self.units), dy.reshape(-1, self.units)
        if dx is None:
            k.dense_backward_params(x, y, dy, self.act, *g)
        else:
            k.dense_backward(x, p[0], y, dy, self.act, *g, dx.reshape(-1, self.n_in))


class Conv(Layer):
    pooled = False  # a max pooling follows and applies the bias and activation (module doc)
    tensor = skips_dx = cuda = True

    def __init__(self, dims, channels, kernel, stride, same, in_shape, bias=True):
        H, W, C = in_shape
        (KH, KW), (SH, SW) = kernel, stride
        (OH, PH), (OW, PW) = _size(H, KH, SH, same), _size(W, KW, SW, same)
        self.dims, self.channels, self.same, self.bias = dims, channels, same, bias
        self.in_shape, self.out_shape = in_shape, (OH, OW, channels)
        self.geom = (KH, KW, SH, SW, PH, PW, OH, OW)
        self.k_len = KH * KW * C
        self.n_params = (self.k_len + bias) * channels
        self.fan = (self.k_len, KH * KW * channels)
        self.per_example = bias  # DP-SGD's kernels write a bias gradient

    def text(self):
        KH, KW, SH, SW = self.geom[:4]
        k, s = (f"{KW}", f"{SW}") if self.dims == 1 else (f"{KH}x{KW}", f"{SH}x{SW}")
        return (f"conv{self.dims}d {self.channels} {k} {'same' if self.same else 'valid'} stride={s}"
                + ("" if self.bias else " bias=false"))

    def params(self):
        w = Param("weight", (self.channels, self.k_len), uniform_init(self.act, *self.fan), "weight", "column")
        return [w, Param("bias", (self.channels,), ("zeros",), "bias", "column")] if self.bias else [w]

    def views(self, flat, at=None):
        o, a, b = self.offset if at is None else at, self.channels, self.k_len
        return flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + a] if self.bias else None

    def scratch(self, n, xp):
        OH, OW = self.geom[6:]
        return {"cols": xp.empty((n * OH * OW, self.k_len))}  # im2col of the input; dcols in backward

    def forward(self, k, p, x, out, s, act=None):
        """out ← act(conv(x) + b), or conv(x) alone when pooled or without a bias; act: another activation
        than the layer's (tensor parallelism's row layers add bias and activation after their sum)."""
        k.conv_forward(x, p[0], None if self.pooled else p[1], self.act if act is None else act, self.geom,
                       s["cols"], out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        """pooled: dy is dL/dz and g's bias gradient is written already (Pool.backward)."""
        dw, db = g
        k.conv_backward(s["cols"], p[0], y, dy, self.act, self.geom, dw, None if self.pooled else db, s["cols"], dx)


class Pool(Layer):
    tensor = cuda = True

    def __init__(self, dims, kind, kernel, stride, in_shape):
        H, W, C = in_shape
        (KH, KW), (SH, SW) = kernel, stride
        self.dims, self.kind, self.in_shape = dims, kind, in_shape
        self.win = (KH, KW, SH, SW)
        self.out_shape = ((H - KH) // SH + 1, (W - KW) // SW + 1, C)

    def text(self):
        KH, KW, SH, SW = self.win
        k, s = (f"{KW}", f"{SW}") if self.dims == 1 else (f"{KH}x{KW}", f"{SH}x{SW}")
        return f"{self.kind}pool{self.dims}d {k} stride={s}"

    def scratch(self, n, xp):
        return {"arg": xp.ints((n, *self.out_shape))} if self.kind == "max" else {}

    def forward(self, k, p, x, out, s):
        """p: the conv's (W, b) when self.conv (x is then its output before bias and activation)."""
        if self.kind == "max":
            k.maxpool_forward(x, *self.win, out, s["arg"])
            if self.conv:
                C = self.out_shape[2]
                k.bias_act(out.reshape(out.size // C, C), p[1], self.conv.act)
        else:
            k.avgpool_forward(x, *self.win, out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        """g: the conv's gradient (W, b) when self.conv: dy ← dL/d(max(z) + b), its bias gradient ← Σ dy,
        then dx ← dL/dz."""
        if self.kind == "max":
            if self.conv:
                C = self.out_shape[2]
                k.act_grad(y.reshape(y.size // C, C), dy.reshape(dy.size // C, C), self.conv.act, g[1])
            k.maxpool_backward(dy, s["arg"], dx)
        else:
            k.avgpool_backward(dy, *self.win, dx)


class Flatten(Layer):
    """A view: NHWC memory is already (N, H·W·C)."""
    view = tensor = cuda = True

    def __init__(self, in_shape):
        self.in_shape, self.out_shape = in_shape, (math.prod(in_shape),)

    def text(self):
        return "flatten"


def _shape_text(shape, dims):
    if len(shape) == 1:
        return f"{shape[0]} features"
    if len(shape) == 2:
        return f"{shape[0]}×{shape[1]} (T×C)"
    H, W, C = shape
    return f"{C}×{W} (C×L)" if dims == 1 else f"{C}×{H}×{W} (C×H×W)"


def first_word(text):
    """The name of the layer that reads a stack's input: the first word of its first string, or of the first
    layer inside a residual block that opens it."""
    while text.split() and text.split()[0].lower() == "residual" and "[" in text:
        text = text[text.index("[") + 1:]
    words = text.replace(",", " ").replace("]", " ").split()
    return words[0].lower() if words else ""


def input_shape(feature_shape, first):
    """The per-sample shape the first layer sees, and whether a batch must be transposed from the stored
    channels-first order: conv1d reads (L,) or (C, L); conv2d/pool2d (H, W) or (C, H, W); an embedding
    reads (T,) tokens; a dense or flatten first reads the flat features."""
    fs = tuple(int(d) for d in feature_shape)
    word = first_word(first)
    if word.endswith("1d"):
        if len(fs) > 2:
            raise MpitrainError(f"model.layers[0] ({first}): a 1-d layer needs data of feature_shape (L,) or "
                                f"(C, L); the data has {fs}")
        C, L = (1, fs[0]) if len(fs) == 1 else fs
        return (1, L, C), C > 1
    if word.endswith("2d"):
        if len(fs) not in (2, 3):
            raise MpitrainError(f"model.layers[0] ({first}): a 2-d layer needs data of feature_shape (H, W) or "
                                f"(C, H, W); the data has {fs}" + (" (a 1-d signal: use conv1d)" if len(fs) == 1
                                                                    else ""))
        C, H, W = (1, *fs) if len(fs) == 2 else fs
        return (H, W, C), C > 1
    if word == "embedding":
        return (fs[-1],), False
    return (math.prod(fs),), False
