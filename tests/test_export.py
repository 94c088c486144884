"""`mpitrain export`: models trained with the real CLI, exported to ONNX (run with onnxruntime) and to
PyTorch-layout npz (rebuilt in NumPy from the arrays and the description, and in torch when it is
installed); the logits must match mpitrain's own and the accuracy eval's.  Then the error cases."""
import json
import os
import sys

import h5py
import numpy as np
import pytest
from conftest import launch, mpirun, summary

from mpitrain.checkpoint import load_model, save_model
from mpitrain.errors import MpitrainError
from mpitrain.model import Model, ModelSpec

TOL = 1e-4


def export_cli(*args, n=None):
    """`python -m mpitrain export ARGS`, under mpiexec -n N when n is given."""
    if n:
        return mpirun(n, "export", *args)
    return launch([sys.executable, "-m", "mpitrain", "export", *map(str, args)])


def split_of(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["test/x"][...], np.float32), np.asarray(f["test/y"][...])


def onnx_logits(path, x, name="x"):
    """The ONNX file's logits of x (float samples as x, or int token windows as tokens, int64)."""
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == (name, "logits") and isinstance(inp.shape[0], str)  # N is dynamic
    x = x.astype(np.int64) if name == "tokens" else x.reshape(len(x), *inp.shape[1:])
    return sess.run(None, {name: x})[0]


# ---- the npz rebuilt in NumPy from its description alone ----

def _windows(x, kernel, stride):
    """(N, C, OH, OW, KH, KW) windows of x (N, C, H, W)."""
    w = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))
    return w[:, :, ::stride[0], ::stride[1]]


def _two(v, one):
    """A PyTorch size argument as a pair: 1-d modules are run as 2-d ones of height 1."""
    return (one, v) if isinstance(v, int) else tuple(v)


def _per_channel(a, x):
    """A per-channel vector (axis 1 of x) shaped to broadcast over x."""
    return a.reshape(-1, *[1] * (x.ndim - 2))


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_sequential(modules, arrays, x, prefix=""):
    """The network of the description's modules (those of a residual branch with prefix) on x, in float64."""
    x = x if x.dtype.kind == "i" else x.astype(np.float64)
    for m in modules:
        name, args, kw = m["module"], m["args"], m["kwargs"]

        def a(key):
            return arrays[f"{prefix}{m['index']}.{key}"].astype(np.float64)

        spatial = name[-2:] == "1d" and not name.startswith("BatchNorm")  # run as 2-d of height 1
        if spatial:
            x = x[:, :, None, :]
        if name == "Linear":
            assert args == list(arrays[f"{prefix}{m['index']}.weight"].shape[::-1])
            x = x @ a("weight").T + a("bias")
        elif name in ("Conv1d", "Conv2d"):
            w = a("weight")
            assert w.shape[:2] == (args[1], args[0])
            w = w[:, :, None, :] if spatial else w
            (ph, pw), kernel = _two(kw["padding"], 0), _two(args[2], 1)
            assert w.shape[2:] == kernel
            x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
            x = np.einsum("nchwij,ocij->nohw", _windows(x, kernel, _two(kw["stride"], 1)), w)
            if kw.get("bias", True):
                x = x + a("bias")[None, :, None, None]
        elif name == "ZeroPad2d":
            left, right, top, bottom = args[0]
            x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        elif name == "ConstantPad1d":
            (left, right), value = args
            x = np.pad(x, ((0, 0), (0, 0), (0, 0), (left, right)), constant_values=value)
        elif name in ("MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d"):
            win = _windows(x, _two(args[0], 1), _two(kw["stride"], 1))
            x = win.max(axis=(-2, -1)) if name.startswith("Max") else win.mean(axis=(-2, -1))
        elif name in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d"):
            assert args == [1]
            x = x.mean(axis=(2, 3), keepdims=True)
        elif name == "ReLU":
            x = np.maximum(x, 0)
        elif name == "Tanh":
            x = np.tanh(x)
        elif name == "GELU":
            assert kw == {"approximate": "tanh"}
            x = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        elif name == "Flatten":
            x = x.reshape(len(x), -1)
        elif name == "Permute":
            x = x.transpose(args)
        elif name == "Dropout":
            assert 0 < args[0] < 1  # the identity at inference
        elif name == "LayerNorm":
            assert x.shape[-1] == args[0]
            z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + kw["eps"])
            x = z * a("weight") + a("bias")
        elif name == "GroupNorm":
            G, C = args
            g = x.reshape(len(x), G, -1)
            g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + kw["eps"])
            x = g.reshape(x.shape) * _per_channel(a("weight"), x) + _per_channel(a("bias"), x)
        elif name in ("BatchNorm1d", "BatchNorm2d"):
            assert x.shape[1] == args[0] and x.ndim == (4 if name == "BatchNorm2d" else x.ndim) and x.ndim <= 4
            assert arrays[f"{prefix}{m['index']}.num_batches_tracked"].dtype == np.int64
            z = (x - _per_channel(a("running_mean"), x)) / np.sqrt(_per_channel(a("running_var"), x) + kw["eps"])
            x = z * _per_channel(a("weight"), x) + _per_channel(a("bias"), x)
        elif name == "TokenEmbedding":
            V, C, *positions = args
            x = a("wte.weight")[x] + (a("wpe.weight")[:x.shape[1]] if positions else 0)
            assert a("wte.weight").shape == (V, C)
        elif name == "CausalSelfAttention":
            C, H = args
            N, T, _ = x.shape
            q, k, v = (x @ a("qkv.weight").T + a("qkv.bias")).reshape(N, T, 3, H, C // H).transpose(2, 0, 3, 1, 4)
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H)
            s[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
            x = (_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(N, T, C)
        elif name == "Tied":
            x = x @ arrays[m["tied_to"]].astype(np.float64).T
        elif name == "Residual":
            at = f"{prefix}{m['index']}."
            y = numpy_sequential(m["main"], arrays, x, at + "main.")
            x = y + (numpy_sequential(m["shortcut"], arrays, x, at + "shortcut.") if m["shortcut"] else x)
        else:
            raise AssertionError(f"unexpected module {name}")
        if spatial:
            x = x[:, :, 0, :]
    return x


def torch_logits(description, arrays, x):
    """The Sequential built from description['sequential'] (with its torch_modules) and the state_dict loaded
    strictly; None without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(1)
    namespace = {"nn": nn}
    if description["torch_modules"]:
        exec(description["torch_modules"], namespace)  # the description's own module definitions
    net = eval(description["sequential"], namespace)  # and constructor text
    net.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    description = json.loads(str(arrays.pop("description")))
    return arrays, description


def check_npz(path, spec, x, ref):
    arrays, d = read_npz(path)
    assert d["format"] == "mpitrain-torch-sequential" and d["version"] == 2 and d["classes"] == spec.n_out
    assert d["feature_shape"] == list(spec.feature_shape) and d["mpitrain_layers"] == list(spec.stack)
    assert sorted(arrays) == sorted(d["state_dict"])
    assert all(a.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, a in arrays.items())
    xin = x.reshape(len(x), *d["input_shape"]).astype(d["input_dtype"])
    assert d["output_shape"] == list(ref.shape[1:])
    assert np.abs(numpy_sequential(d["modules"], arrays, xin) - ref).max() <= TOL
    got = torch_logits(d, arrays, xin)
    if got is not None:
        assert np.abs(got - ref).max() <= TOL
    return d


# ---- models trained with the real CLI ----

@pytest.fixture(scope="module")
def datasets(tmp_path_factory, synth):
    """synth (12 features), digits (1×8×8), a 3-channel 6×5 image set and a 2-channel signal set (2×24)."""
    root = tmp_path_factory.mktemp("export-data")
    rng = np.random.default_rng(7)
    out = {"synth": synth}
    for name, shape, classes in (("rgb", (3, 6, 5), 3), ("signal", (2, 24), 3)):
        x = rng.normal(size=(600, *shape)).astype(np.float32)
        y = np.argmax(x.reshape(len(x), -1) @ rng.normal(size=(x[0].size, classes)), axis=1)
        np.savez(root / f"{name}.npz", x=x, y=y)
        out[name] = str(root / f"{name}.h5")
        r = launch([sys.executable, "-m", "mpitrain", "prepare", "--source", f"npz:{root / name}.npz",
                    "--out", out[name]])
        assert r.returncode == 0, r.stderr
    out["digits"] = str(root / "digits.h5")
    r = launch([sys.executable, "-m", "mpitrain", "prepare", "--source", "digits", "--out", out["digits"]])
    assert r.returncode == 0, r.stderr
    return out


CASES = {
    "mlp": ("synth", ["model.kind=mlp", "model.hidden=[16]"]),
    "cnn_digits": ("digits", ["model.kind=layers", 'model.layers=["conv2d 4 4 same stride=2", "tanh", '
                              '"avgpool2d 2", "flatten", "dense 10"]']),
    # C = 3: the batch is transposed to NHWC inside mpitrain; asymmetric 'same' pads (odd pixel at the end)
    "cnn_rgb": ("rgb", ["model.kind=layers", 'model.layers=["conv2d 4 2 same stride=2", "tanh", '
                        '"avgpool2d 2 stride=1", "conv2d 3 3x2 same", "relu", "maxpool2d 2x1", "flatten", '
                        '"dense 3"]']),
    "cnn_1d": ("signal", ["model.kind=layers", 'model.layers=["conv1d 4 4 same stride=2", "relu", '
                          '"maxpool1d 2", "conv1d 3 3 same", "tanh", "avgpool1d 2 stride=1", "flatten", '
                          '"dense 8", "relu", "dense 3"]']),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trained_model_exports(case, datasets, tmp_path):
    pytest.importorskip("onnxruntime")
    data_name, settings = CASES[case]
    data = datasets[data_name]
    run = tmp_path / "run"
    sets = [a for s in settings + ["train.steps=30", f"data.path={data}"] for a in ("--set", s)]
    r = mpirun(2, "train", "--quiet", "--out", run, *sets)
    assert r.returncode == 0, r.stderr
    model_h5 = str(run / "model.h5")
    r = mpirun(2, "eval", "--model", model_h5, "--data", data)
    assert r.returncode == 0, r.stderr
    accuracy = json.loads(r.stdout)["accuracy"]
    assert accuracy == pytest.approx(summary(run)["test_accuracy"])

    spec, params, state = load_model(model_h5, state=True)
    model = Model(spec)
    if state is not None:  # BatchNorm's running statistics, as eval uses them
        model.ctx.state[:] = state
    x, y = split_of(data)
    ref = model.logits(params, x)

    out = tmp_path / "model.onnx"
    r = export_cli("--model", model_h5, "--format", "onnx", "--out", out, n=2)  # rank 0 alone writes
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and str(out) in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "run"]  # no temp file left behind
    import onnx

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert (proto.opset_import[0].version, proto.ir_version) == (17, 8)
    logits = onnx_logits(str(out), x)
    assert logits.shape == (len(x), spec.n_out)
    assert np.abs(logits - ref).max() <= TOL
    correct = int((logits.argmax(axis=1) == y).sum())
    assert correct == round(accuracy * len(y)) and correct / len(y) == pytest.approx(accuracy, abs=1e-12)

    npz = tmp_path / "model.npz"
    r = export_cli("--model", model_h5, "--format", "npz", "--out", npz)
    assert r.returncode == 0, r.stderr
    d = check_npz(str(npz), spec, x, ref)
    assert d["standardize"] is not None and len(d["standardize"]["mean"]) in (spec.n_in, spec.feature_shape[0])
    props = {p.key: p.value for p in proto.metadata_props}  # the ONNX file carries the same statistics
    assert json.loads(props["mpitrain.standardize"]) == d["standardize"]


def test_trained_language_model_exports(tmp_path):
    """A GPT trained with dropout on: tokens in, logits at every position out; the tokenizer travels along."""
    pytest.importorskip("onnxruntime")
    import onnx

    text = "".join(np.random.default_rng(3).choice(list("abc de\n"), 3000))
    (tmp_path / "t.txt").write_text(text)
    data, run = tmp_path / "t.h5", tmp_path / "run"
    r = launch([sys.executable, "-m", "mpitrain", "prepare", "--source", f"text:{tmp_path / 't.txt'}", "--out", data])
    assert r.returncode == 0, r.stderr
    sets = ["model.kind=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8",
            "model.dropout=0.1", "train.steps=5", f"data.path={data}"]
    r = mpirun(2, "train", "--quiet", "--out", run, *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    spec, params = load_model(str(run / "model.h5"))
    with h5py.File(data, "r") as f:
        x = np.asarray(f["test/tokens"][:8 * 20], np.int32).reshape(20, 8)
    ref = Model(spec).logits(params, x)
    tokenizer = {"tokenizer": "chars", "vocab": sorted(set(text))}

    r = export_cli("--model", run / "model.h5", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "input tokens [N, 8] → logits [N, 8, 7]" in r.stdout  # a, b, c, space, d, e, newline
    assert np.abs(onnx_logits(str(tmp_path / "m.onnx"), x, "tokens") - ref).max() <= TOL
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["mpitrain.tokenizer"]) == tokenizer and json.loads(props["mpitrain.standardize"]) is None
    r = export_cli("--model", run / "model.h5", "--format", "npz", "--out", tmp_path / "m.npz")
    assert r.returncode == 0, r.stderr
    d = check_npz(str(tmp_path / "m.npz"), spec, x, ref)
    assert d["tokenizer"] == tokenizer and d["input_dtype"] == "int64"


# ---- every model kind, from a model.h5 written directly (random weights) ----

KINDS = [
    dict(kind="softmax", n_in=64, n_out=10, feature_shape=(1, 8, 8)),
    dict(kind="mlp", n_in=12, n_out=4, hidden=(16, 8), activation="tanh"),
    dict(kind="lenet5", n_in=784, n_out=10, feature_shape=(1, 28, 28)),
    dict(kind="fedavg_cnn", n_in=784, n_out=10, feature_shape=(28, 28)),  # (H, W): reshaped to one channel
    dict(kind="layers", n_in=40, n_out=5, feature_shape=(40,),  # (L,): one channel; asymmetric 1-d pads
         layers=("conv1d 4 4 same stride=3", "relu", "maxpool1d 2", "conv1d 3 2 same", "tanh",
                 "avgpool1d 2 stride=1", "flatten", "dense 5")),
    dict(kind="layers", n_in=30, n_out=3, feature_shape=(6, 5),  # a pool first, a flatten of flat features
         layers=("maxpool2d 2", "conv2d 2 2 valid stride=2", "flatten", "flatten", "dense 3")),
]


@pytest.mark.parametrize("kw", KINDS, ids=[f"{k['kind']}-{'x'.join(map(str, k.get('feature_shape', ())))}"
                                           for k in KINDS])
def test_every_kind_exports(kw, tmp_path):
    pytest.importorskip("onnxruntime")
    from mpitrain.export import export

    spec = ModelSpec(**kw)
    model = Model(spec)
    rng = np.random.default_rng(1)
    params = model.init_params(3) + rng.normal(0, 0.05, spec.n_params).astype(np.float32)
    save_model(str(tmp_path / "model.h5"), spec, params)
    x = rng.normal(size=(19, spec.n_in)).astype(np.float32)
    ref = model.logits(params, x)
    export(str(tmp_path / "model.h5"), "onnx", str(tmp_path / "m.onnx"))
    assert np.abs(onnx_logits(str(tmp_path / "m.onnx"), x) - ref).max() <= TOL
    export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    d = check_npz(str(tmp_path / "m.npz"), spec, x, ref)
    assert d["standardize"] is None


def test_npz_description_names_pytorch_modules(tmp_path):
    from mpitrain.export import export

    spec = ModelSpec(kind="lenet5", n_in=784, n_out=10, feature_shape=(1, 28, 28))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    arrays, d = read_npz(str(tmp_path / "m.npz"))
    assert d["input_shape"] == [1, 28, 28] and d["classes"] == 10
    assert [m["module"] for m in d["modules"]] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
                                                   "Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert d["modules"][0]["torch"] == "nn.Conv2d(1, 6, (5, 5), stride=(1, 1), padding=(2, 2))"
    assert [m["source"] for m in d["modules"][:2]] == ["model.layers[0] (conv2d 6 5x5 same stride=1x1)",
                                                       "model.layers[1] (relu)"]
    assert {k: v.shape for k, v in arrays.items()} == {
        "0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5), "3.bias": (16,),
        "7.weight": (120, 400), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
        "11.weight": (10, 84), "11.bias": (10,)}
    assert d["state_dict"] == ["0.bias", "0.weight", "3.bias", "3.weight", "7.bias", "7.weight", "9.bias",
                               "9.weight", "11.bias", "11.weight"]


# ---- the layers of modern networks, from a model.h5 written directly (random weights and statistics) ----

MODERN = {  # spec, ONNX operators and npz modules it must use
    "gpt": (dict(kind="gpt", n_in=8, n_out=11, feature_shape=(8,), task="lm", n_layer=2, n_head=2, n_embd=16,
                 dropout=0.1),  # dropout in the blocks: nothing in ONNX, nn.Dropout in the npz
            {"Gather", "LayerNormalization", "Softmax", "Tanh", "Transpose"},
            {"TokenEmbedding", "CausalSelfAttention", "Tied", "Residual", "Dropout", "GELU", "LayerNorm", "Linear"}),
    "resnet8-batch": (dict(kind="resnet8", n_in=3 * 8 * 8, n_out=5, feature_shape=(3, 8, 8), norm="batch"),
                      {"BatchNormalization", "GlobalAveragePool", "Conv", "Add"},
                      {"BatchNorm2d", "Residual", "AdaptiveAvgPool2d", "Conv2d"}),
    "resnet8-group": (dict(kind="resnet8", n_in=3 * 8 * 8, n_out=5, feature_shape=(3, 8, 8), norm="group"),
                      {"InstanceNormalization", "GlobalAveragePool"}, {"GroupNorm", "Residual"}),
    # layernorm on a map (between transposes), a standalone tanh after a conv without bias and after
    # global average pooling, groupnorm, layernorm on flat features
    "maps": (dict(kind="layers", n_in=90, n_out=3, feature_shape=(3, 6, 5), layers=(
        "conv2d 4 3 same bias=false", "batchnorm", "tanh", "residual [layernorm, gelu, conv2d 4 3 same, relu]",
        "groupnorm 2", "dropout 0.3", "globalavgpool", "tanh", "layernorm", "dense 3")),
        {"LayerNormalization", "Tanh", "Relu", "InstanceNormalization", "BatchNormalization"},
        {"Permute", "LayerNorm", "GELU", "GroupNorm", "BatchNorm2d", "Tanh", "Dropout"}),
    # a flatten that no dense reads (its features in mpitrain's order), batchnorm on flat features, a
    # residual block of dense layers
    "flatten": (dict(kind="layers", n_in=90, n_out=3, feature_shape=(3, 6, 5), layers=(
        "conv2d 4 3 same stride=2", "relu", "flatten", "layernorm", "gelu", "dense 6", "batchnorm", "tanh",
        "residual [dense 6, tanh, dropout 0.2]", "dense 3")),
        {"Flatten", "LayerNormalization", "BatchNormalization", "Gemm"}, {"Permute", "BatchNorm1d", "Residual"}),
    # 1-d: batchnorm, layernorm and groupnorm on signals, a projection shortcut, a flatten a dense reads
    # through gelu
    "signal": (dict(kind="layers", n_in=24, n_out=3, feature_shape=(2, 12), layers=(
        "conv1d 4 3 same", "relu", "batchnorm", "layernorm", "groupnorm 2",
        "residual [conv1d 4 3 same bias=false, batchnorm] shortcut [conv1d 4 1]", "maxpool1d 2", "flatten",
        "gelu", "dense 3")), {"BatchNormalization", "InstanceNormalization", "MaxPool"},
        {"Conv1d", "BatchNorm1d", "GroupNorm", "MaxPool1d", "Permute"}),
    "signal-gap": (dict(kind="layers", n_in=12, n_out=3, feature_shape=(12,), layers=(
        "conv1d 3 3 same", "tanh", "globalavgpool", "dense 3")), {"GlobalAveragePool"}, {"AdaptiveAvgPool1d"}),
    # a language model of kind layers: no position rows, batchnorm on sequences, an untied output layer
    "lm-layers": (dict(kind="layers", n_in=6, n_out=7, feature_shape=(6,), task="lm", layers=(
        "embedding 8 positions=false", "batchnorm", "residual [layernorm, attention 2, dense 8, dropout 0.2]",
        "residual [batchnorm, dense 16, gelu, dense 8]", "layernorm", "dense 7")),
        {"Gather", "BatchNormalization", "Softmax", "MatMul"}, {"TokenEmbedding", "BatchNorm1d", "Permute"}),
}


def all_modules(modules):
    for m in modules:
        yield m
        yield from all_modules(m.get("main", []) + m.get("shortcut", []))


@pytest.mark.parametrize("case", list(MODERN))
def test_modern_layers_export(case, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from mpitrain.export import export

    kw, ops, modules = MODERN[case]
    spec = ModelSpec(**kw)
    model = Model(spec)
    rng = np.random.default_rng(2)
    params = model.init_params(3) + rng.normal(0, 0.05, spec.n_params).astype(np.float32)
    state = model.ctx.state  # BatchNorm's running statistics, not the initial ones (means 0, variances 1)
    for e in model.state_table:
        state[e.offset:e.offset + e.size] = (rng.normal(0, 0.3, e.size) if e.name.endswith("mean")
                                             else rng.uniform(0.5, 2.0, e.size))
    save_model(str(tmp_path / "model.h5"), spec, params, state=state.copy())
    lm = spec.task == "lm"
    x = (rng.integers(0, spec.n_out, (7, spec.n_in)) if lm else rng.normal(size=(7, spec.n_in))).astype(
        np.int32 if lm else np.float32)
    ref = model.logits(params, x)
    assert ref.std(axis=0).mean() > 0.01  # the logits depend on the sample (no layer's output is lost)

    export(str(tmp_path / "model.h5"), "onnx", str(tmp_path / "m.onnx"))
    used = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ops <= used and "Dropout" not in used, used
    got = onnx_logits(str(tmp_path / "m.onnx"), x, "tokens" if lm else "x")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL
    export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    d = check_npz(str(tmp_path / "m.npz"), spec, x, ref)
    assert modules <= {m["module"] for m in all_modules(d["modules"])}
    assert d["input_dtype"] == ("int64" if lm else "float32")


def test_npz_description_nests_residual_blocks(tmp_path):
    """A residual block's branches are nested module lists whose keys PyTorch's state_dict would have; a tied
    output layer names the embedding's weight instead of holding a copy."""
    from mpitrain.export import TORCH_MODULES, export

    spec = ModelSpec(kind="gpt", n_in=4, n_out=5, feature_shape=(4,), task="lm", n_layer=1, n_head=2, n_embd=4)
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    arrays, d = read_npz(str(tmp_path / "m.npz"))
    assert [m["module"] for m in d["modules"]] == ["TokenEmbedding", "Residual", "Residual", "LayerNorm", "Tied"]
    attn, mlp = d["modules"][1], d["modules"][2]
    assert [m["module"] for m in attn["main"]] == ["LayerNorm", "CausalSelfAttention", "Linear"]
    assert attn["shortcut"] == [] and attn["source"].startswith("model.layers[1] (residual [layernorm, ")
    assert attn["main"][1]["source"] == "model.layers[1].main[1] (attention 2)"
    assert [m["module"] for m in mlp["main"]] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert d["modules"][4] == {"index": 4, "module": "Tied", "args": [], "kwargs": {}, "torch": "Tied(embedding)",
                               "source": "model.layers[4] (tied)", "tied_to": "0.wte.weight"}
    assert d["sequential"].startswith("nn.Sequential((embedding := TokenEmbedding(5, 4, 4)), Residual(nn.Sequential("
                                      "nn.LayerNorm(4, eps=1e-05), CausalSelfAttention(4, 2), nn.Linear(4, 4))), ")
    assert d["custom_modules"] == ["CausalSelfAttention", "Residual", "Tied", "TokenEmbedding"]
    assert d["torch_modules"] == TORCH_MODULES
    assert {k: v.shape for k, v in arrays.items()} == {
        "0.wte.weight": (5, 4), "0.wpe.weight": (4, 4), "1.main.0.weight": (4,), "1.main.0.bias": (4,),
        "1.main.1.qkv.weight": (12, 4), "1.main.1.qkv.bias": (12,), "1.main.2.weight": (4, 4), "1.main.2.bias": (4,),
        "2.main.0.weight": (4,), "2.main.0.bias": (4,), "2.main.1.weight": (16, 4), "2.main.1.bias": (16,),
        "2.main.3.weight": (4, 16), "2.main.3.bias": (4,), "3.weight": (4,), "3.bias": (4,)}
    assert d["state_dict"][:4] == ["0.wpe.weight", "0.wte.weight", "1.main.0.bias", "1.main.0.weight"]
    assert d["output_shape"] == [4, 5] and d["input_shape"] == [4] and d["tokenizer"] is None


# ---- errors ----

def one_error(r):
    lines = r.error_lines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mpitrain: error: "), r.stderr
    return lines[0]


def test_bad_model_file(tmp_path):
    out = tmp_path / "m.onnx"
    assert "no such model file" in one_error(export_cli("--model", tmp_path / "nope.h5", "--format", "npz",
                                                        "--out", out))
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"not hdf5 at all\n" * 10)
    assert "not an HDF5 file" in one_error(export_cli("--model", bad, "--format", "onnx", "--out", out, n=2))
    assert sorted(os.listdir(tmp_path)) == ["model.h5"]


def test_onnx_missing_is_one_line(tmp_path):
    spec = ModelSpec(kind="mlp", n_in=12, n_out=4, hidden=(8,))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    script = ("import sys; sys.modules['onnx'] = None; from mpitrain.cli import main; "
              "sys.exit(main(sys.argv[1:]))")

    def run(fmt, out):
        return launch([sys.executable, "-c", script, "export", "--model", str(tmp_path / "model.h5"),
                       "--format", fmt, "--out", str(tmp_path / out)])

    assert "pip install 'mpitrain[export]'" in one_error(run("onnx", "m.onnx"))
    r = run("npz", "m.npz")  # npz needs no onnx
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "model.h5"]


def unknown_layer(shape):
    """A layer of a kind the exporter does not know."""
    from mpitrain.model.base import Layer

    class Unknown(Layer):
        in_shape = out_shape = shape

        def text(self):
            return "unknown"

    return Unknown()


def test_layer_without_equivalent_names_it(tmp_path, monkeypatch):
    from mpitrain import export as ex
    from mpitrain.model.stack import build

    real = build
    monkeypatch.setattr(ex, "build", lambda *args: [unknown_layer((6,)), *real(*args)[1:]])
    spec = ModelSpec(kind="layers", n_in=6, n_out=3, layers=("flatten", "dense 3"))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    with pytest.raises(MpitrainError, match=r"^model.layers\[0\] \(unknown\): this layer cannot be exported to npz"):
        ex.export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    assert not (tmp_path / "m.npz").exists()


def test_layer_without_equivalent_in_a_block_names_it(tmp_path, monkeypatch):
    """Inside a residual block's branch: its place as the layer syntax's messages give it."""
    from mpitrain import export as ex
    from mpitrain.model.stack import build

    def patched(*args):
        net = build(*args)
        net[1].shortcut[1] = unknown_layer((6,))
        return net

    monkeypatch.setattr(ex, "build", patched)
    spec = ModelSpec(kind="layers", n_in=6, n_out=3,
                     layers=("dense 6", "tanh", "residual [dense 6] shortcut [dense 6, layernorm]", "dense 3"))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    with pytest.raises(MpitrainError, match=r"^model.layers\[2\].shortcut\[1\] \(unknown\): this layer cannot be "
                                            r"exported to npz"):
        ex.export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "m.npz"))
    assert not (tmp_path / "m.npz").exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    from mpitrain.export import export

    spec = ModelSpec(kind="softmax", n_in=12, n_out=4)
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    out = tmp_path / "m.npz"
    out.write_bytes(b"the previous export")

    def failing_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(MpitrainError, match="m.npz: cannot write .No space left on device."):
        export(str(tmp_path / "model.h5"), "npz", str(out))
    assert out.read_bytes() == b"the previous export"
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "model.h5"]
    monkeypatch.undo()
    export(str(tmp_path / "model.h5"), "npz", str(tmp_path / "missing" / "m.npz"))  # its folder is made, as prepare's
    assert os.listdir(tmp_path / "missing") == ["m.npz"]


def test_a_regression_model_exports_its_targets_units(tmp_path):
    """ONNX's output `targets` and the npz description's target statistics give predict's values."""
    import onnxruntime as ort

    import mpitrain
    from mpitrain.data.prepare import per_feature, prepare
    from mpitrain.evaluate import model_targets
    from mpitrain.export import export

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.stack([x @ rng.normal(size=5) * 30 + 100, x[:, 0] - 5], axis=1).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    prepare(f"npz:{tmp_path / 'reg.npz'}", str(tmp_path / "reg.h5"))
    mpitrain.train(overrides={"data.path": str(tmp_path / "reg.h5"), "model.hidden": [8], "train.steps": 20,
                              "train.global_batch": 16},
                   out=str(tmp_path / "run"))
    model = str(tmp_path / "run" / "model.h5")
    export(model, "onnx", str(tmp_path / "r.onnx"))
    export(model, "npz", str(tmp_path / "r.npz"))
    p = mpitrain.load_model(model)
    mean, std = per_feature(p.standardize, 5)
    session = ort.InferenceSession(str(tmp_path / "r.onnx"))
    (got,) = session.run(["targets"], {"x": ((x - mean) / std).astype(np.float32)})
    want = p.predict(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    d = json.loads(str(np.load(tmp_path / "r.npz")["description"]))
    mean, std = model_targets(model)
    assert d["targets"]["mean"] == mean.tolist() and d["targets"]["std"] == std.tolist() and abs(mean).max() > 1
