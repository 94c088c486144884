"""`mpitrain export`: a trained model.h5 as an ONNX graph, or as PyTorch-layout weight arrays (npz).

Both describe the same network in channels-first order, the convention of ONNX and PyTorch, reading
samples standardised with the model's training statistics (model.h5's, which both files carry; each sample
channels first in the C order of its feature_shape) and giving the logits (softmax follows in training):

* ONNX (opset 13, IR version 7, built with the onnx package's helper API and checked with
  onnx.checker): input `x` float32 [N, *feature_shape] (N dynamic), or [N, features] for a stack that
  starts with dense/flatten; output `logits` [N, classes].  Native NCHW operators: Conv (explicit pads
  [begin…, end…], strides), MaxPool/AveragePool, Relu/Tanh, Flatten, Gemm; a 1-d stack runs 1-d Conv/Pool
  on [N, C, L]; data of shape (H, W) or (L,) is reshaped to one channel first.
* npz: the state_dict of a torch.nn.Sequential (`<index>.weight`, `<index>.bias`: nn.Linear (out, in),
  nn.Conv2d (C_out, C_in, KH, KW), nn.Conv1d (C_out, C_in, K)), plus `description`, a 0-d unicode array
  holding JSON: the modules in order with their PyTorch names and arguments, the input shape the Sequential
  reads, the classes and the data's standardisation.  Asymmetric 'same' padding is a separate
  nn.ZeroPad2d / nn.ConstantPad1d module (F.pad) before a conv with padding 0.

mpitrain computes NHWC with conv weights (C_out, KH, KW, C_in) and `flatten` ordering a map (H, W, C);
the export permutes conv weights to (C_out, C_in, KH, KW) and the rows of the dense layer after a flatten
from (H, W, C) to (C, H, W) order, so the channels-first Flatten feeds it the same numbers.
"""
import json
import os

import numpy as np

from . import __version__
from .errors import MpitrainError
from .kernels.cpu import ACTIVATIONS, IDENTITY
from .model.layers import Conv, Dense, Flatten, Pool, input_shape
from .model.stack import build

FORMATS = ("onnx", "npz")
OPSET = 13
IR_VERSION = 7  # the IR of opset 13: readable by every onnxruntime that runs opset 13
NPZ_FORMAT = "mpitrain-torch-sequential"
_ACT = {ACTIVATIONS["relu"]: ("Relu", "ReLU"), ACTIVATIONS["tanh"]: ("Tanh", "Tanh")}  # (ONNX op, nn module)


def channels_first_shape(spec):
    """The per-sample shape the exported network reads: (C, H, W), (C, L) or (features,)."""
    nhwc, _ = input_shape(spec.feature_shape, spec.stack[0])
    if len(nhwc) == 1:
        return nhwc
    H, W, C = nhwc
    return (C, W) if spec.stack[0].split()[0].endswith("1d") else (C, H, W)


def plan(spec, params, fmt="onnx"):
    """The network of (spec, flat params) as steps in channels-first terms, each a dict with op (conv,
    pool, flatten, dense), its arrays already in the exported layout, and `where` (the layer's index and
    text in spec.stack, for messages).  A layer the exporter cannot express is one MpitrainError naming it."""
    net = build(list(spec.stack), spec.feature_shape, spec.n_out)
    positions = [i for i, t in enumerate(spec.stack) if t not in ACTIVATIONS]  # one per layer of net
    steps, flat_from = [], None  # flat_from: the (H, W, C) map the last flatten ordered, until a dense reads it
    for i, layer in zip(positions, net):
        text = layer.text() if hasattr(layer, "text") else type(layer).__name__
        where = f"model.layers[{i}] ({text})"
        act = getattr(layer, "act", IDENTITY)
        if act != IDENTITY and act not in _ACT:
            raise MpitrainError(f"{where}: its activation cannot be exported to {fmt}")
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
            steps.append(dict(op="conv", where=where, dims=layer.dims, c_in=C, c_out=layer.channels,
                              weight=np.ascontiguousarray(w, np.float32), bias=np.array(b, np.float32),
                              kernel=kernel, stride=stride, begin=begin, end=end, act=act))
        elif isinstance(layer, Pool):
            KH, KW, SH, SW = layer.win
            kernel, stride = ((KW,), (SW,)) if layer.dims == 1 else ((KH, KW), (SH, SW))
            steps.append(dict(op="pool", where=where, dims=layer.dims, kind=layer.kind, kernel=kernel,
                              stride=stride))
        elif isinstance(layer, Flatten):
            if len(layer.in_shape) == 3:  # a flatten of flat features is nothing
                flat_from = layer.in_shape
                steps.append(dict(op="flatten", where=where))
        elif isinstance(layer, Dense):
            w, b = layer.views(params)  # (in, out)
            if flat_from is not None:  # rows in (H, W, C) order → (C, H, W), as a channels-first Flatten lays out
                H, W, C = flat_from
                w = w.reshape(H, W, C, layer.units).transpose(2, 0, 1, 3).reshape(-1, layer.units)
                flat_from = None
            steps.append(dict(op="dense", where=where, n_in=layer.n_in, units=layer.units,
                              weight=np.ascontiguousarray(w, np.float32), bias=np.array(b, np.float32), act=act))
        else:
            raise MpitrainError(f"{where}: this layer cannot be exported to {fmt} (no equivalent there)")
        if act != IDENTITY:  # the activation's own entry of the stack, right after its layer
            steps[-1]["act_where"] = f"model.layers[{i + 1}] ({spec.stack[i + 1]})"
    return steps


def _need_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import checker, helper, numpy_helper  # noqa: F401
    except ImportError:
        raise MpitrainError("export --format onnx needs the onnx package: pip install 'mpitrain[export]'") from None


def to_onnx(spec, steps, standardize=None):
    """The onnx.ModelProto of plan(spec, …), checked; standardize: model.h5's (mean, std), in its properties."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    shape = channels_first_shape(spec)
    if steps[0]["op"] in ("conv", "pool"):
        x_dims, value = ["N", *spec.feature_shape], "x"
        if tuple(spec.feature_shape) != shape:  # (H, W) → (1, H, W), (L,) → (1, L)
            inits.append(numpy_helper.from_array(np.array([-1, *shape], np.int64), "input_shape"))
            nodes.append(helper.make_node("Reshape", ["x", "input_shape"], ["x_nchw"], name="input_reshape"))
            value = "x_nchw"
    else:
        x_dims, value = ["N", spec.n_in], "x"
    for s in steps:
        name = s["where"].split()[0]  # model.layers[i]
        out = name
        if s["op"] == "conv":
            inits += [numpy_helper.from_array(s["weight"], f"{name}.weight"),
                      numpy_helper.from_array(s["bias"], f"{name}.bias")]
            nodes.append(helper.make_node("Conv", [value, f"{name}.weight", f"{name}.bias"], [out], name=name,
                                          kernel_shape=list(s["kernel"]), strides=list(s["stride"]),
                                          pads=[*s["begin"], *s["end"]]))
        elif s["op"] == "pool":
            op = "MaxPool" if s["kind"] == "max" else "AveragePool"
            nodes.append(helper.make_node(op, [value], [out], name=name, kernel_shape=list(s["kernel"]),
                                          strides=list(s["stride"])))
        elif s["op"] == "flatten":
            nodes.append(helper.make_node("Flatten", [value], [out], name=name, axis=1))
        else:
            inits += [numpy_helper.from_array(s["weight"], f"{name}.weight"),
                      numpy_helper.from_array(s["bias"], f"{name}.bias")]
            nodes.append(helper.make_node("Gemm", [value, f"{name}.weight", f"{name}.bias"], [out], name=name))
        value = out
        if s.get("act", IDENTITY) != IDENTITY:
            op = _ACT[s["act"]][0]
            nodes.append(helper.make_node(op, [value], [f"{name}.{op.lower()}"], name=f"{name}.{op.lower()}"))
            value = f"{name}.{op.lower()}"
    nodes[-1].output[0] = "logits"  # the last dense (no activation)
    graph = helper.make_graph(
        nodes, f"mpitrain_{spec.kind}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.n_out])], initializer=inits)
    graph.input[0].doc_string = ("samples channels first, standardised with the training statistics (the "
                                 "property mpitrain.standardize)")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mpitrain",
                              producer_version=__version__, ir_version=IR_VERSION)
    helper.set_model_props(model, {"mpitrain.kind": spec.kind, "mpitrain.layers": json.dumps(list(spec.stack)),
                                   "mpitrain.feature_shape": json.dumps(list(spec.feature_shape)),
                                   "mpitrain.standardize": json.dumps(_stats(standardize))})
    onnx.checker.check_model(model, full_check=True)
    return model


def _module(index, source, name, *args, **kwargs):
    """One entry of the npz description: a torch.nn module, its arguments and its constructor text."""
    call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return {"index": index, "module": name, "args": list(args), "kwargs": kwargs, "torch": f"nn.{name}({call})",
            "source": source}


def to_npz(spec, steps, standardize=None):
    """({state_dict key: array}, description dict) of plan(spec, …) as a torch.nn.Sequential."""
    modules, arrays = [], {}

    def add(source, name, *args, **kwargs):
        modules.append(_module(len(modules), source, name, *args, **kwargs))
        return len(modules) - 1

    for s in steps:
        src = s["where"]
        if s["op"] == "conv":
            d = s["dims"]
            pad = s["begin"]
            if s["begin"] != s["end"]:  # asymmetric: F.pad as a module, then an unpadded conv
                if d == 1:
                    add(src, "ConstantPad1d", (s["begin"][0], s["end"][0]), 0.0)
                else:  # ZeroPad2d takes (left, right, top, bottom)
                    add(src, "ZeroPad2d", (s["begin"][1], s["end"][1], s["begin"][0], s["end"][0]))
                pad = (0,) * d
            one = (lambda t: t[0]) if d == 1 else tuple
            i = add(src, f"Conv{d}d", s["c_in"], s["c_out"], one(s["kernel"]), stride=one(s["stride"]),
                    padding=one(pad))
            arrays[f"{i}.weight"], arrays[f"{i}.bias"] = s["weight"], s["bias"]
        elif s["op"] == "pool":
            d = s["dims"]
            one = (lambda t: t[0]) if d == 1 else tuple
            add(src, f"{'Max' if s['kind'] == 'max' else 'Avg'}Pool{d}d", one(s["kernel"]), stride=one(s["stride"]))
        elif s["op"] == "flatten":
            add(src, "Flatten")
        else:
            i = add(src, "Linear", s["n_in"], s["units"])
            arrays[f"{i}.weight"], arrays[f"{i}.bias"] = np.ascontiguousarray(s["weight"].T), s["bias"]
        if s.get("act", IDENTITY) != IDENTITY:
            add(s["act_where"], _ACT[s["act"]][1])
    shape = channels_first_shape(spec)
    description = {
        "format": NPZ_FORMAT, "version": 1, "mpitrain_version": __version__,
        "container": "torch.nn.Sequential",
        "input_shape": list(shape),
        "input": f"float32 (N, {', '.join(map(str, shape))}): samples channels first, standardised with "
                 "'standardize' (the training statistics); the Sequential outputs the logits",
        "feature_shape": list(spec.feature_shape), "n_features": spec.n_in, "classes": spec.n_out,
        "kind": spec.kind, "mpitrain_layers": list(spec.stack),
        "modules": modules,
        "sequential": "nn.Sequential(" + ", ".join(m["torch"] for m in modules) + ")",
        "state_dict": sorted(arrays, key=lambda k: (int(k.split(".")[0]), k)),
        "standardize": _stats(standardize),
    }
    return arrays, description


def _stats(standardize):
    """model.h5's training statistics (the model's, whatever file it is later used on) for a reader."""
    return None if standardize is None else {
        "mean": np.asarray(standardize[0], np.float64).tolist(),
        "std": np.asarray(standardize[1], np.float64).tolist(),
        "note": "raw x → (x - mean) / std; one value per feature, or per channel (repeat it over the "
                "channel's H·W features)"}


def export(model_path, fmt, out):
    """Write the model of model_path as `fmt` to out (atomically); returns the line to print."""
    from .checkpoint import atomic_write, load_model

    if fmt not in FORMATS:
        raise MpitrainError(f"export --format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _need_onnx()
    spec, params, stats = load_model(model_path, standardize=True)
    steps = plan(spec, params, fmt)
    if os.path.isdir(out):
        raise MpitrainError(f"{out}: is a directory (expected a file name)")
    shape = channels_first_shape(spec)
    if fmt == "onnx":
        model = to_onnx(spec, steps, stats)
        ins = spec.feature_shape if steps[0]["op"] in ("conv", "pool") else (spec.n_in,)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        what = f"onnx opset {OPSET}, input x [N, {', '.join(map(str, ins))}] → logits [N, {spec.n_out}]"
    else:
        arrays, description = to_npz(spec, steps, stats)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, description=np.array(json.dumps(description)), **arrays)
        what = (f"npz, {len(arrays)} arrays + description, torch.nn.Sequential of {len(description['modules'])} "
                f"modules on input (N, {', '.join(map(str, shape))})")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as prepare and plot do
        atomic_write(out, write)
    except OSError as exc:
        raise MpitrainError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return f"{out}: {spec.describe()} ({spec.n_params} parameters) as {what}"
