"""The layer syntax: model.layers is a list of strings, each one layer, built into layers (layers.py,
nn.py) with their shapes, names and offsets into the flat vector.

  dense N [std=S]               N outputs, on flat features or per position of a sequence (T, C);
                                std: normal(0, S) weights instead of He/Glorot uniform
  conv2d C K [same|valid] [stride=S] [bias=false]   C output channels, K = 5 or 5x3; valid by default
  conv1d C K [same|valid] [stride=S] [bias=false]
  maxpool2d K [stride=S], avgpool2d K [stride=S], maxpool1d K [stride=S], avgpool1d K [stride=S]
                                no padding; the stride defaults to the kernel
  globalavgpool                 (H, W, C) → (C,): the mean of each channel
  flatten                       (N, H, W, C) → (N, H·W·C): needed before a dense after conv/pool
  relu, tanh                    fused into the dense or conv layer (with a bias) just before, else a layer
  gelu                          GELU, GPT-2's tanh form
  layernorm                     over the last axis (features, or each position's C)
  groupnorm G                   a map's channels in G groups
  batchnorm                     per channel (SyncBatchNorm across the ranks of a train run)
  dropout P                     in training only; masks keyed by (seed, step, global sample, position)
  embedding C [positions=false] tokens (T,) → (T, C): a C-wide row per token of the data's vocabulary,
                                plus a learned row per position (unless positions=false)
  attention H                   causal self-attention with H heads on (T, C), its fused q/k/v projection
                                inside (C → 3C); the output projection is the dense C after it
  tied                          logits = x @ wteᵀ: the output layer tied to the embedding
  residual [L, L, …] [shortcut [L, …]]   x → f(x) + g(x), f and g lists of layers (g the identity if
                                no shortcut is given); branches may nest
'same' pads as TensorFlow does (output ⌈in/stride⌉, the odd pixel of padding at the bottom/right).
"""
from ..errors import MpitrainError
from ..kernels.cpu import ACTIVATIONS, IDENTITY
from .layers import Conv, Dense, Flatten, Pool, _shape_text, first_word, input_shape
from .nn import (GELU, Activation, Attention, BatchNorm, Dropout, Embedding, GlobalAvgPool, GroupNorm, LayerNorm,
                 Residual, Tied)

SYNTAX = ("'dense N', 'conv2d C K [same|valid] [stride=S] [bias=false]', 'conv1d …', 'maxpool2d K [stride=S]', "
          "'avgpool2d …', 'maxpool1d …', 'avgpool1d …', 'globalavgpool', 'flatten', 'relu', 'tanh', 'gelu', "
          "'layernorm', 'groupnorm G', 'batchnorm', 'dropout P', 'embedding C', 'attention H', 'tied', "
          "'residual [...] [shortcut [...]]'")


class Bad(Exception):
    """A token that is not what its place expects: (token, what was expected)."""


class Located(MpitrainError):
    """An error already naming its layer (raised inside a residual block's branch)."""


def split_items(text):
    """The comma-separated items of a bracketed list's inside, at bracket depth 0."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise Bad("]", "a matching '['")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise Bad("[", "a matching ']'")
    items.append(cur.strip())
    if any(not i for i in items):
        raise Bad(text, "a comma-separated list of layers with no empty item")
    return items


def parse(text):
    """(kind, [plain args], {key: value}, [(label, inner text)]) of one layer string."""
    head, groups, rest = text, [], ""
    if "[" in text:
        head, rest = text[:text.index("[")], text[text.index("["):]
    while rest.strip():
        rest = rest.strip()
        label = ""
        if not rest.startswith("["):
            label, _, rest = rest.partition(" ")
            rest = rest.strip()
            if not rest.startswith("["):
                raise Bad(label, "'[' after it")
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "[") - (ch == "]")
            if depth == 0:
                break
        if depth:
            raise Bad("[", "a matching ']'")
        groups.append((label, rest[1:i]))
        rest = rest[i + 1:]
    words = head.split()
    if not words:
        raise Bad(text, "a layer name first")
    opts = {}
    for w in words[1:]:
        if "=" in w:
            key, _, value = w.partition("=")
            opts[key.lower()] = value
    return words[0].lower(), [w for w in words[1:] if "=" not in w], opts, groups


def _int(token, what, low=1):
    try:
        v = int(token)
    except ValueError:
        raise Bad(token, what) from None
    if v < low:
        raise Bad(token, what)
    return v


def _float(token, what):
    try:
        return float(token)
    except ValueError:
        raise Bad(token, what) from None


def _pair(text, dims, what):
    parts = [_int(p, f"{what}: a positive integer or HxW") for p in text.split("x")]
    if len(parts) == 1:
        parts = parts * dims if dims == 2 else parts
    if len(parts) != dims:
        raise Bad(text, f"{what}: one size for a 1-d layer")
    return (1, parts[0]) if dims == 1 else tuple(parts)


def _bool(token):
    if token.lower() not in ("true", "false"):
        raise Bad(token, "true or false")
    return token.lower() == "true"


class Builder:
    """Builds a stack, assigning names, offsets into the flat vector and the state vector, dropout sites."""

    def __init__(self, dims, vocab):
        self.dims, self.vocab = dims, vocab
        self.offset = self.state = self.sites = 0
        self.embedding = None

    def sequence(self, items, shape, prefix, where):
        layers = []
        for i, text in enumerate(items):
            here = f"{where}[{i}] ({text})"
            try:
                kind, args, opts, groups = parse(text)
                if kind in ACTIVATIONS and kind != "identity":
                    if args or opts or groups:
                        raise Bad(text, f"'{kind}' alone")
                    last = layers[-1] if layers else None
                    if isinstance(last, (Dense, Conv)) and last.act == IDENTITY and getattr(last, "bias", True):
                        last.act = ACTIVATIONS[kind]
                        continue
                    layer = Activation(kind, ACTIVATIONS[kind], shape)
                else:
                    layer = self.layer(kind, args, opts, groups, shape, f"{prefix}{len(layers)}", here)
            except Located:
                raise
            except Bad as exc:
                token, expected = exc.args
                raise Located(f"{here}: {token!r}: expected {expected}") from None
            except ValueError as exc:
                raise Located(f"{here}: expected {exc} (input {_shape_text(shape, self.dims)})") from None
            except MpitrainError as exc:
                raise Located(f"{here}: {exc} (input {_shape_text(shape, self.dims)})") from None
            if isinstance(layer, Pool) and layer.kind == "max" and isinstance(layers[-1] if layers else None, Conv) \
                    and layers[-1].bias:
                layer.conv, layers[-1].pooled = layers[-1], True
            layer.name = f"{prefix}{len(layers)}"
            if not isinstance(layer, Residual):  # a block's layers took their offsets as they were built
                layer.offset, self.offset = self.offset, self.offset + layer.n_params
                layer.state_offset, self.state = self.state, self.state + layer.state_size
            layers.append(layer)
            shape = layer.out_shape
        return layers, shape

    def layer(self, kind, args, opts, groups, shape, name, where):
        allowed = {"dense": {"std"}, "conv1d": {"stride", "bias"}, "conv2d": {"stride", "bias"},
                   "embedding": {"positions"}}.get(kind, {"stride"} if kind[3:7] == "pool" else set())
        for key in opts:
            if key not in allowed:
                raise Bad(f"{key}={opts[key]}", f"no option {key!r} for {kind}" if allowed or kind in KNOWN
                          else "one of " + SYNTAX)
        if groups and kind != "residual":
            raise Bad(f"[{groups[0][1]}]", f"no bracketed list after {kind}")

        def count(n):
            if len(args) != n:
                raise Bad(" ".join(args) or kind, f"{n} argument(s) for {kind}" if n else f"no arguments for {kind}")

        if kind == "dense":
            count(1)
            units = _int(args[0], "a number of outputs ≥ 1")
            if len(shape) == 3:
                raise MpitrainError("a dense layer takes flat features: put a flatten before it")
            return Dense(units, shape, std=_float(opts["std"], "a standard deviation") if "std" in opts else 0.0)
        if kind == "flatten":
            count(0)
            return Flatten(shape)
        if kind in ("conv1d", "conv2d") or kind[3:7] == "pool" and kind[:3] in ("max", "avg") and \
                kind[-2:] in ("1d", "2d"):
            d = int(kind[-2])
            if len(shape) != 3:
                raise MpitrainError(f"{kind} {'after flatten or dense' if len(shape) == 1 else 'on a sequence'}: it "
                                    f"needs a {d}-d map")
            if d != self.dims:
                raise MpitrainError(f"a {d}-d layer in a stack on {self.dims}-d input")
            if kind.startswith("conv"):
                if len(args) < 2 or len(args) > 3:
                    raise Bad(" ".join(args) or kind, "channels, a kernel and optionally same|valid")
                channels = _int(args[0], "a number of channels ≥ 1")
                kernel = _pair(args[1], d, "kernel")
                pad = args[2].lower() if len(args) > 2 else "valid"
                if pad not in ("same", "valid"):
                    raise Bad(args[2], "same or valid")
                stride = _pair(opts.get("stride", "1"), d, "stride")
                if pad == "valid" and (kernel[0] > shape[0] or kernel[1] > shape[1]):
                    raise MpitrainError("the kernel is larger than the input" + (
                        " (a 1-row input: use conv1d)" if shape[0] == 1 and d == 2 else ""))
                return Conv(d, channels, kernel, stride, pad == "same", shape,
                            bias=_bool(opts["bias"]) if "bias" in opts else True)
            count(1)
            kernel = _pair(args[0], d, "kernel")
            stride = _pair(opts["stride"], d, "stride") if "stride" in opts else kernel
            if kernel[0] > shape[0] or kernel[1] > shape[1]:
                raise MpitrainError("the pooling window is larger than the input")
            return Pool(d, kind[:3], kernel, stride, shape)
        if kind == "globalavgpool":
            count(0)
            return GlobalAvgPool(shape)
        if kind == "gelu":
            count(0)
            return GELU(shape)
        if kind == "layernorm":
            count(0)
            return LayerNorm(shape)
        if kind == "groupnorm":
            count(1)
            return GroupNorm(_int(args[0], "a number of groups ≥ 1"), shape)
        if kind == "batchnorm":
            count(0)
            return BatchNorm(shape)
        if kind == "dropout":
            count(1)
            self.sites += 1
            return Dropout(_float(args[0], "a rate in [0, 1)"), shape, self.sites)
        if kind == "embedding":
            count(1)
            if len(shape) != 1 or name != "0" and not name.endswith(".0"):
                raise MpitrainError("an embedding is the first layer: it reads the tokens")
            if self.vocab is None:
                raise MpitrainError("an embedding reads tokens: the data is not a token stream (prepare --source "
                                    "text:FILE)")
            self.embedding = Embedding(self.vocab, _int(args[0], "a width ≥ 1"), shape,
                                       _bool(opts["positions"]) if "positions" in opts else True)
            return self.embedding
        if kind == "attention":
            count(1)
            return Attention(_int(args[0], "a number of heads ≥ 1"), shape)
        if kind == "tied":
            count(0)
            if self.embedding is None:
                raise MpitrainError("a tied output layer needs an embedding first in the stack")
            return Tied(self.embedding, shape)
        if kind == "residual":
            count(0)
            labels = [g[0] for g in groups]
            if labels not in ([""], ["", "shortcut"]):
                raise Bad(" ".join(labels) or "residual", "residual [layers] or residual [layers] shortcut [layers]")
            start = self.offset
            where = where.split(" (")[0]
            main, out = self.sequence(split_items(groups[0][1]), shape, f"{name}.main.", f"{where}.main")
            short, out2 = (self.sequence(split_items(groups[1][1]), shape, f"{name}.shortcut.", f"{where}.shortcut")
                           if len(groups) > 1 else ([], shape))
            if out != out2:
                raise MpitrainError(f"the branches' outputs differ: {out} and {out2}"
                                    + ("" if len(groups) > 1 else " (the identity: add a shortcut)"))
            block = Residual(main, short, shape)
            block.offset = start
            return block
        raise Bad(kind, "one of " + SYNTAX)


KNOWN = ("dense", "conv1d", "conv2d", "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "globalavgpool",
         "flatten", "relu", "tanh", "gelu", "layernorm", "groupnorm", "batchnorm", "dropout", "embedding",
         "attention", "tied", "residual")


def build(stack, feature_shape, n_out, task="classify"):
    """The layers of `stack` on data of `feature_shape`, with names and offsets into the flat vector; a stack
    that does not fit is one MpitrainError naming the layer, its index, the bad token or the shapes.  The
    last layer gives n_out values per sample (classify, regress) or per position (lm: n_out = vocabulary)."""
    if not stack:
        raise MpitrainError("model.layers is empty: expected a list of layers ending in 'dense <classes>'")
    shape, _ = input_shape(feature_shape, stack[0])
    dims = 1 if first_word(stack[0]).endswith("1d") else 2
    b = Builder(dims, n_out if task == "lm" else None)
    layers, shape = b.sequence(list(stack), shape, "layers.", "model.layers")
    last = layers[-1]
    want = (*feature_shape, n_out) if task == "lm" else (n_out,)
    if shape != want or last.act != IDENTITY:
        what = {"classify": f"'dense {n_out}' (one output per class, no activation: softmax cross-entropy follows)",
                "regress": f"'dense {n_out}' (one output per target, no activation: the squared error follows)",
                "lm": f"'tied' or 'dense {n_out}' (one logit per token of the vocabulary at every position)"}[task]
        raise MpitrainError(f"model.layers[{len(stack) - 1}] ({stack[-1]}): a stack ends in {what}")
    return layers
