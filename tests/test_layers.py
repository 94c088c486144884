"""The layer library: presets, the layer syntax and its errors, and whole CNNs against an independent
NumPy reference (channels-first, float64) in the loss and in directional derivatives of the gradient."""
import json

import numpy as np
import pytest

from mpitrain.errors import MpitrainError
from mpitrain.model import Model, ModelSpec
from mpitrain.model.layers import Conv


def spec(stack, shape, classes):
    return ModelSpec("layers", int(np.prod(shape)), classes, layers=tuple(stack), feature_shape=shape)


def test_presets_have_the_papers_parameter_counts():
    assert ModelSpec("lenet5", 784, 10, feature_shape=(1, 28, 28)).n_params == 61_706
    assert ModelSpec("fedavg_cnn", 784, 10, feature_shape=(1, 28, 28)).n_params == 1_663_370
    # He et al. 2016's CIFAR ResNets with 1×1 projection shortcuts; GPT-2 small (tied embeddings), counted from
    # the spec alone: nothing is allocated
    for norm in ("batch", "group"):
        assert ModelSpec("resnet20", 3072, 10, feature_shape=(3, 32, 32), norm=norm).n_params == 272_474
        assert ModelSpec("resnet8", 3072, 10, feature_shape=(3, 32, 32), norm=norm).n_params == 78_042
    gpt2 = ModelSpec("gpt", 1024, 50257, feature_shape=(1024,), task="lm", n_layer=12, n_head=12, n_embd=768)
    assert gpt2.n_params == 124_439_808
    mlp = ModelSpec("mlp", 64, 10, (128,))  # as before the layer library: same layout, same count
    assert mlp.stack == ("dense 128", "relu", "dense 10") and mlp.n_params == 65 * 128 + 129 * 10
    assert ModelSpec("softmax", 64, 10).stack == ("dense 10",)


def test_canonical_stack_round_trips_through_the_attributes():
    s = spec(["conv1d 4 5 same", "relu", "maxpool1d 2", "flatten", "dense 3"], (2, 20), 3)
    assert s.stack == ("conv1d 4 5 same stride=1", "relu", "maxpool1d 2 stride=2", "flatten", "dense 3")
    back = ModelSpec.from_attrs(s.attrs())
    assert back.stack == s.stack and back.feature_shape == (2, 20) and back.n_params == s.n_params
    old = {"kind": "mlp", "n_in": 64, "n_out": 10, "hidden": np.array([32]), "activation": "tanh"}  # pre-layers file
    assert ModelSpec.from_attrs(old).stack == ("dense 32", "tanh", "dense 10")
    assert json.loads(s.attrs()["layers"]) == list(s.stack)
    for fam in (ModelSpec("gpt", 16, 11, feature_shape=(16,), task="lm", n_layer=2, n_head=2, n_embd=8, dropout=0.1),
                ModelSpec("resnet8", 3 * 8 * 8, 5, feature_shape=(3, 8, 8), norm="group")):
        back = ModelSpec.from_attrs(fam.attrs())  # a family is rebuilt from the stack it stored
        assert (back.kind, back.stack, back.n_params, back.task) == (fam.kind, fam.stack, fam.n_params, fam.task)


BAD = [
    (["conv2d 4 9 valid", "flatten", "dense 10"], (1, 8, 8), "model.layers[0] (conv2d 4 9 valid): the kernel is "
                                                             "larger than the input (input 1×8×8 (C×H×W))"),
    (["conv2d 4 3", "flatten", "conv2d 4 3", "flatten", "dense 10"], (1, 8, 8),
     "model.layers[2] (conv2d 4 3): conv2d after flatten or dense"),
    (["conv2d 4 3", "dense 10"], (1, 8, 8), "model.layers[1] (dense 10): a dense layer takes flat features: "
                                            "put a flatten before it (input 4×6×6 (C×H×W))"),
    (["flatten", "dense 7"], (1, 8, 8), "model.layers[1] (dense 7): a stack ends in 'dense 10'"),
    (["flatten", "dense 10", "relu"], (1, 8, 8), "model.layers[2] (relu): a stack ends in 'dense 10'"),
    # the bad token is named with what its place expects
    (["conv2d x 3", "flatten", "dense 10"], (1, 8, 8), "model.layers[0] (conv2d x 3): 'x': expected a number of "
                                                       "channels ≥ 1"),
    (["conv2d 8 3 smae", "flatten", "dense 10"], (1, 8, 8), "(conv2d 8 3 smae): 'smae': expected same or valid"),
    (["conv2d 0 3", "flatten", "dense 10"], (1, 8, 8), "(conv2d 0 3): '0': expected a number of channels ≥ 1"),
    (["conv2d 4 3 stride=0", "flatten", "dense 10"], (1, 8, 8), "'0': expected stride: a positive integer or HxW"),
    (["conv2d 4 3 pad=1", "flatten", "dense 10"], (1, 8, 8), "'pad=1': expected no option 'pad' for conv2d"),
    (["convd2 4 3", "flatten", "dense 10"], (1, 8, 8), "'convd2': expected one of 'dense N'"),
    (["dense 4 5", "dense 10"], (64,), "(dense 4 5): '4 5': expected 1 argument(s) for dense"),
    (["conv2d 4 3", "flatten", "dense 10"], (1, 40), "the kernel is larger than the input (a 1-row input: use "
                                                     "conv1d)"),
    (["conv2d 4 3", "groupnorm 3", "flatten", "dense 10"], (1, 8, 8), "(groupnorm 3): expected a map whose "
                                                                      "channels the 3 groups divide"),
    (["residual [conv2d 4 3 same]", "flatten", "dense 10"], (1, 8, 8), "the branches' outputs differ"),
    (["residual [dense 64", "dense 10"], (64,), "'[': expected a matching ']'"),
    (["embedding 8", "tied"], (16,), "an embedding reads tokens: the data is not a token stream"),
    (["dense 16", "tied"], (16,), "a tied output layer needs an embedding first"),
    (["maxpool2d 9", "flatten", "dense 10"], (1, 8, 8), "the pooling window is larger than the input"),
    (["conv2d 4 3", "flatten", "dense 10"], (64,), "model.layers[0] (conv2d 4 3): a 2-d layer needs data of "
                                                   "feature_shape (H, W) or (C, H, W); the data has (64,)"),
    (["conv2d 4 3", "conv1d 2 3", "flatten", "dense 10"], (1, 8, 8), "model.layers[1] (conv1d 2 3): a 1-d layer in "
                                                                     "a stack on 2-d input"),
    ([], (1, 8, 8), "model.kind = 'layers' needs a list of layers"),
]


@pytest.mark.parametrize("stack,shape,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_stack_that_does_not_fit_is_one_line_naming_the_layer(stack, shape, needle):
    with pytest.raises(MpitrainError) as e:
        spec(stack, shape, 10)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_layers_belong_to_kind_layers():
    with pytest.raises(MpitrainError, match="only used with model.kind = 'layers'"):
        ModelSpec("mlp", 64, 10, (8,), layers=("dense 10",))


# -- an independent reference: channels first, float64, direct loops --------------------------------

def _same(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def ref_conv(x, w, b, KH, KW, s, same):
    """x (N, C, H, W); w (C_out, KH, KW, C_in) as mpitrain lays it out."""
    N, C, H, W = x.shape
    if same:
        (t, bo), (l, r) = _same(H, KH, s[0]), _same(W, KW, s[1])
        x = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    OH, OW = (x.shape[2] - KH) // s[0] + 1, (x.shape[3] - KW) // s[1] + 1
    wt = w.transpose(0, 3, 1, 2)  # (C_out, C_in, KH, KW)
    out = np.zeros((N, len(w), OH, OW))
    for i in range(OH):
        for j in range(OW):
            patch = x[:, :, i * s[0]:i * s[0] + KH, j * s[1]:j * s[1] + KW]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, wt) + b
    return out


def ref_pool(x, KH, KW, s, kind):
    N, C, H, W = x.shape
    OH, OW = (H - KH) // s[0] + 1, (W - KW) // s[1] + 1
    out = np.zeros((N, C, OH, OW))
    for i in range(OH):
        for j in range(OW):
            win = x[:, :, i * s[0]:i * s[0] + KH, j * s[1]:j * s[1] + KW]
            out[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return out


ACT = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh}


def ref_loss(model, flat, x, y):
    """Summed softmax cross-entropy of the stack, written from the layer strings alone."""
    fs = model.spec.feature_shape
    one_d = model.spec.stack[0].split()[0].endswith("1d")
    a = x.astype(np.float64).reshape(len(x), *fs)
    if one_d:  # (C, L) → (C, 1, L)
        a = a.reshape(len(x), -1, 1, fs[-1]) if len(fs) == 2 else a.reshape(len(x), 1, 1, -1)
    elif len(fs) == 2:
        a = a[:, None]
    params = iter(model.layers(flat.astype(np.float64)))
    for text in model.spec.stack:
        word, *args = text.split()
        opts = dict(x.split("=") for x in args if "=" in x)
        plain = [x for x in args if "=" not in x]
        if word in ACT:
            a = ACT[word](a)
        elif word.startswith("conv"):
            w, b = next(params)
            KH, KW = (1, int(plain[1])) if one_d else map(int, plain[1].split("x"))
            s = (1, int(opts["stride"])) if one_d else tuple(map(int, opts["stride"].split("x")))
            a = ref_conv(a, w.reshape(len(w), KH, KW, -1), b, KH, KW, s, plain[2] == "same")
        elif "pool" in word:
            KH, KW = (1, int(plain[0])) if one_d else map(int, plain[0].split("x"))
            s = (1, int(opts["stride"])) if one_d else tuple(map(int, opts["stride"].split("x")))
            a = ref_pool(a, KH, KW, s, word[:3])
        elif word == "flatten":
            a = a.transpose(0, 2, 3, 1).reshape(len(a), -1)  # mpitrain flattens (H, W, C), channels last
        else:
            w, b = next(params)
            a = a @ w + b
    z = a - a.max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


CNNS = {
    "2d, 3 channels, stride 2, overlapping max-pool": (
        ["conv2d 4 3 same stride=2", "relu", "maxpool2d 2 stride=1", "conv2d 5 2x3 valid", "tanh", "avgpool2d 2x1",
         "flatten", "dense 6", "relu", "dense 3"], (3, 9, 8)),
    "1d, 2 channels": (["conv1d 4 4 same", "relu", "maxpool1d 2", "conv1d 3 3 valid stride=2", "relu", "flatten",
                        "dense 3"], (2, 20)),
    "pool first, one channel": (["maxpool2d 2", "conv2d 3 3 same", "tanh", "flatten", "dense 3"], (8, 8)),
    # a max pooling applies the conv's bias and activation after pooling: tanh, and no activation at all
    "max-pool after tanh and after a bare conv": (
        ["conv2d 3 3 same", "tanh", "maxpool2d 2", "conv2d 4 2 valid", "maxpool2d 2 stride=1", "flatten",
         "dense 3"], (2, 10, 10)),
}


@pytest.mark.parametrize("case", list(CNNS))
def test_cnn_loss_and_gradient_match_the_reference(case):
    stack, shape = CNNS[case]
    model = Model(spec(stack, shape, 3))
    r = np.random.default_rng(list(CNNS).index(case))
    flat = model.init_params(1) + (0.05 * r.standard_normal(model.n_params)).astype(np.float32)
    x = r.standard_normal((7, int(np.prod(shape)))).astype(np.float32)
    y = r.integers(0, 3, 7)
    words = [t.split()[0] for t in stack if t not in ACT]
    pooled = [b.startswith("maxpool") for a, b in zip(words, words[1:]) if a.startswith("conv")]
    assert [l.pooled for l in model.net if isinstance(l, Conv)] == pooled  # the fused pairs are in use
    grad = np.full(model.n_params, np.nan, np.float32)
    loss, correct = model.loss_grad(flat, grad, x, y)
    assert loss == pytest.approx(ref_loss(model, flat, x, y), rel=1e-5)
    assert np.all(np.isfinite(grad))
    for _ in range(3):  # directional derivatives of the float64 reference, central differences
        u = r.standard_normal(model.n_params)
        eps = 1e-4 / np.linalg.norm(u)
        fd = (ref_loss(model, flat + eps * u, x, y) - ref_loss(model, flat - eps * u, x, y)) / (2 * eps)
        assert grad.astype(np.float64) @ u == pytest.approx(fd, rel=1e-3, abs=1e-4)
    for layer, (w, b) in zip(model.with_params, model.layers(grad)):  # every layer's slice is exercised
        assert np.abs(w).max() > 0 and np.abs(b).max() > 0, layer.text()
    s_loss, s_correct = model.score(flat, x, y, chunk=3)
    assert s_loss == pytest.approx(loss, rel=1e-5) and s_correct == correct


def test_the_decay_mask_follows_the_tables_groups():
    from mpitrain.model import Model

    m = Model(ModelSpec("gpt", 8, 11, feature_shape=(8,), task="lm", n_layer=1, n_head=2, n_embd=4))
    groups = {e.name: e.param.group for e in m.table}
    assert groups["layers.0.wte"] == "embedding" and groups["layers.1.main.0.weight"] == "norm"
    assert groups["layers.1.main.1.qkv.weight"] == "weight" and groups["layers.1.main.1.qkv.bias"] == "bias"
    default, more = m.table.decay_mask(), m.table.decay_mask(("weight", "embedding"))
    for e in m.table:
        part = slice(e.offset, e.offset + e.size)
        assert default[part].all() == (e.param.group == "weight") and not default[part].any() == (e.param.group != "weight")
        assert more[part].all() == (e.param.group in ("weight", "embedding"))
