"""The layer library: each layer a spec (shapes, parameter count) and a forward and a backward on views
of the one flat float32 parameter vector, in the style of llm.c.

Activations are NHWC: a batch of 2-d maps is (N, H, W, C), of 1-d signals (N, 1, L, C) (a conv1d is a
conv2d of kernel height 1), of flat features (N, F).  A layer's parameters are the slice [W | b] of the flat
vector at its offset: dense W (in, out) row-major as it always was; conv W (C_out, KH·KW·C_in), row-major
over (C_out, KH, KW, C_in) (kernels/cpu.py).  An activation in a stack is fused into the dense or conv
layer before it (one pass after the GEMM), so it is a flag of that layer, not a layer.  A conv followed by a
max pooling leaves its bias and activation to the pooling: both are monotone, so max(act(z + b)) =
act(max(z) + b), and they then run on the pooled pixels only, in both passes (Pool.conv).

Syntax of a layer (model.layers is a list of these strings):
  dense N                      N outputs
  conv2d C K [same|valid] [stride=S]    C output channels, K = 5 or 5x3; padding valid by default
  conv1d C K [same|valid] [stride=S]
  maxpool2d K [stride=S], avgpool2d K [stride=S], maxpool1d K [stride=S], avgpool1d K [stride=S]
                               no padding; the stride defaults to the kernel
  flatten                      (N, H, W, C) → (N, H·W·C): needed before a dense after conv/pool
  relu, tanh                   fused into the dense/conv layer just before
'same' pads as TensorFlow does (output ⌈in/stride⌉, the odd pixel of padding at the bottom/right).
"""
import math

from ..errors import MpitrainError
from ..kernels.cpu import ACTIVATIONS, IDENTITY

ACTS = ("relu", "tanh")


def _pair(text, dims, what):
    parts = [int(p) for p in text.split("x")]  # ValueError → caller's message
    if len(parts) == 1:
        parts = parts * dims if dims == 2 else parts
    if len(parts) != dims or min(parts) < 1:
        raise ValueError(what)
    return (1, parts[0]) if dims == 1 else tuple(parts)


def _size(n, k, s, same):
    """(output size, padding before) of one spatial axis."""
    if same:
        out = -(-n // s)
        return out, max((out - 1) * s + k - n, 0) // 2
    return (n - k) // s + 1, 0


class Layer:
    """in_shape/out_shape: NHWC per sample ((H, W, C)) or flat ((F,)); n_params; offset (set by build)."""
    n_params = 0
    act = IDENTITY
    conv = None  # a max pooling: the conv before it, whose bias and activation it applies (module doc)

    def views(self, flat, at=None):
        """(W, b) on flat at the layer's offset (or at `at`), None for a layer without parameters."""
        return None

    def scratch(self, n, xp):
        """Per-batch-size buffers besides the output: {name: array}."""
        return {}


class Dense(Layer):
    def __init__(self, units, in_shape):
        (self.n_in,) = in_shape
        self.units, self.in_shape, self.out_shape = units, in_shape, (units,)
        self.n_params = (self.n_in + 1) * units
        self.fan = (self.n_in, units)

    def text(self):
        return f"dense {self.units}"

    def views(self, flat, at=None):
        o, a, b = self.offset if at is None else at, self.n_in, self.units
        return flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + b]

    def forward(self, k, p, x, out, s, act=None):
        """out ← act(x @ W + b), with the layer's own activation unless act is given (tensor.Row)."""
        k.dense_forward(x, *p, self.act if act is None else act, out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        """dy ← dL/dz in place; g ← the layer's gradient; dx ← dL/dx unless it is None."""
        if dx is None:
            k.dense_backward_params(x, y, dy, self.act, *g)
        else:
            k.dense_backward(x, p[0], y, dy, self.act, *g, dx)


class Conv(Layer):
    pooled = False  # a max pooling follows and applies the bias and activation (module doc)

    def __init__(self, dims, channels, kernel, stride, same, in_shape):
        H, W, C = in_shape
        (KH, KW), (SH, SW) = kernel, stride
        (OH, PH), (OW, PW) = _size(H, KH, SH, same), _size(W, KW, SW, same)
        self.dims, self.channels, self.same = dims, channels, same
        self.in_shape, self.out_shape = in_shape, (OH, OW, channels)
        self.geom = (KH, KW, SH, SW, PH, PW, OH, OW)
        self.k_len = KH * KW * C
        self.n_params = (self.k_len + 1) * channels
        self.fan = (self.k_len, KH * KW * channels)

    def text(self):
        KH, KW, SH, SW = self.geom[:4]
        k, s = (f"{KW}", f"{SW}") if self.dims == 1 else (f"{KH}x{KW}", f"{SH}x{SW}")
        return f"conv{self.dims}d {self.channels} {k} {'same' if self.same else 'valid'} stride={s}"

    def views(self, flat, at=None):
        o, a, b = self.offset if at is None else at, self.channels, self.k_len
        return flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + a]

    def scratch(self, n, xp):
        OH, OW = self.geom[6:]
        return {"cols": xp.empty((n * OH * OW, self.k_len))}  # im2col of the input; dcols in backward

    def forward(self, k, p, x, out, s, act=None):
        """out ← act(conv(x) + b), or conv(x) alone when pooled; act: another activation than the layer's
        (tensor parallelism's row layers add bias and activation after their sum)."""
        k.conv_forward(x, p[0], None if self.pooled else p[1], self.act if act is None else act, self.geom,
                       s["cols"], out)

    def backward(self, k, p, g, x, y, dy, dx, s):
        """pooled: dy is dL/dz and g's bias gradient is written already (Pool.backward)."""
        dw, db = g
        k.conv_backward(s["cols"], p[0], y, dy, self.act, self.geom, dw, None if self.pooled else db, s["cols"], dx)


class Pool(Layer):
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

    def __init__(self, in_shape):
        self.in_shape, self.out_shape = in_shape, (math.prod(in_shape),)

    def text(self):
        return "flatten"


def _shape_text(shape, dims):
    if len(shape) == 1:
        return f"{shape[0]} features"
    H, W, C = shape
    return f"{C}×{W} (C×L)" if dims == 1 else f"{C}×{H}×{W} (C×H×W)"


def input_shape(feature_shape, first):
    """The per-sample NHWC shape the first layer sees, and whether a batch must be transposed from the
    stored channels-first order: conv1d reads (L,) or (C, L); conv2d/pool2d (H, W) or (C, H, W); a dense
    or flatten first reads the flat features."""
    fs = tuple(int(d) for d in feature_shape)
    word = first.split()[0] if first.split() else ""
    if word.endswith("1d"):
        if len(fs) > 2:
            raise MpitrainError(f"model.layers[0] ({first}): a 1-d layer needs data of feature_shape (L,) or "
                                f"(C, L); the data has {fs}")
        C, L = (1, fs[0]) if len(fs) == 1 else fs
        return (1, L, C), C > 1
    if word.endswith("2d"):
        if len(fs) not in (2, 3):
            raise MpitrainError(f"model.layers[0] ({first}): a 2-d layer needs data of feature_shape (H, W) or "
                                f"(C, H, W); the data has {fs}")
        C, H, W = (1, *fs) if len(fs) == 2 else fs
        return (H, W, C), C > 1
    return (math.prod(fs),), False


def build(stack, feature_shape, n_classes):
    """The layers of `stack` (strings, see the module doc) on data of `feature_shape`, with offsets into
    the flat vector; a stack that does not fit is one MpitrainError naming the layer, its index and the
    shapes."""
    if not stack:
        raise MpitrainError("model.layers is empty: expected a list of layers ending in 'dense <classes>'")
    shape, _ = input_shape(feature_shape, stack[0])
    dims = 1 if stack[0].split()[0].endswith("1d") else 2
    layers, offset = [], 0
    for i, text in enumerate(stack):
        where = f"model.layers[{i}] ({text})"
        words = text.split()
        kind, args = (words[0].lower(), words[1:]) if words else ("", [])
        if kind in ACTS:
            if args or not layers or not isinstance(layers[-1], (Dense, Conv)) or layers[-1].act != IDENTITY:
                raise MpitrainError(f"{where}: an activation follows a dense or conv layer (it is fused into it)")
            layers[-1].act = ACTIVATIONS[kind]
            continue
        try:
            layer = _layer(kind, args, shape, dims)
        except (ValueError, IndexError):
            raise MpitrainError(f"{where}: expected one of 'dense N', 'conv2d C K [same|valid] [stride=S]', "
                                "'conv1d …', 'maxpool2d K [stride=S]', 'avgpool2d …', 'maxpool1d …', "
                                "'avgpool1d …', 'flatten', 'relu', 'tanh'") from None
        except MpitrainError as exc:
            raise MpitrainError(f"{where}: {exc} (input {_shape_text(shape, dims)})") from None
        if isinstance(layer, (Conv, Pool)) and layer.dims != dims:
            raise MpitrainError(f"{where}: a {layer.dims}-d layer in a stack on {dims}-d input "
                                f"{_shape_text(shape, dims)}")
        if isinstance(layer, Pool) and layer.kind == "max" and isinstance(layers[-1] if layers else None, Conv):
            layer.conv, layers[-1].pooled = layers[-1], True
        layer.offset, offset = offset, offset + layer.n_params
        layers.append(layer)
        shape = layer.out_shape
    last = layers[-1]
    if not isinstance(last, Dense) or last.act != IDENTITY or last.units != n_classes:
        raise MpitrainError(f"model.layers[{len(stack) - 1}] ({stack[-1]}): a stack ends in 'dense {n_classes}' "
                            f"(one output per class, no activation: softmax cross-entropy follows)")
    return layers


def _layer(kind, args, shape, dims):
    """One layer from its words; ValueError/IndexError = bad syntax, MpitrainError = does not fit."""
    if kind == "dense" and len(args) == 1:
        if len(shape) != 1:
            raise MpitrainError("a dense layer takes flat features: put a flatten before it")
        units = int(args[0])
        if units < 1:
            raise ValueError
        return Dense(units, shape)
    if kind == "flatten" and not args:
        return Flatten(shape)
    opts = {a.split("=")[0]: a.split("=")[1] for a in args if "=" in a}
    plain = [a for a in args if "=" not in a]
    if set(opts) - {"stride"}:
        raise ValueError
    d = int(kind[-2]) if kind[-2:] in ("1d", "2d") else 0
    if d == 0 or len(shape) != 3:
        if d and len(shape) != 3:
            raise MpitrainError(f"{kind} after flatten or dense: it needs a {d}-d map")
        raise ValueError
    if kind in ("conv1d", "conv2d"):
        channels = int(plain[0])
        kernel = _pair(plain[1], d, "kernel")
        pad = plain[2] if len(plain) > 2 else "valid"
        if channels < 1 or len(plain) > 3 or pad not in ("same", "valid"):
            raise ValueError
        stride = _pair(opts.get("stride", "1"), d, "stride")
        if pad == "valid" and (kernel[0] > shape[0] or kernel[1] > shape[1]):
            raise MpitrainError("the kernel is larger than the input")
        return Conv(d, channels, kernel, stride, pad == "same", shape)
    if kind[3:7] == "pool" and kind[:3] in ("max", "avg") and len(plain) == 1:
        kernel = _pair(plain[0], d, "kernel")
        stride = _pair(opts["stride"], d, "stride") if "stride" in opts else kernel
        if kernel[0] > shape[0] or kernel[1] > shape[1]:
            raise MpitrainError("the pooling window is larger than the input")
        return Pool(d, kind[:3], kernel, stride, shape)
    raise ValueError
