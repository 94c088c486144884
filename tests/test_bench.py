"""The bench machinery on tiny sizes: runs, saves JSON/CSV that parse, reports consistent numbers."""

import importlib.util
import math
import re

import numpy as np
import pytest

from conftest import mpirun, saved

INSTALLED_TORCH = importlib.util.find_spec("torch") is not None


def test_bench_allreduce(tmp_path):
    r = mpirun(3, "bench", "allreduce", "--max-bytes", 1024, "--iters", 5, "--warmup", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "allreduce")[1]
    assert [row["bytes"] for row in rows] == [4, 4, 16, 16, 64, 64, 256, 256, 1024, 1024]
    for row in rows:
        assert row["ranks"] == 3 and 0 < row["min_us"] <= row["avg_us"] <= row["max_us"]
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * 2 / 3)
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / row["avg_us"] / 1e3)


def test_bench_step(tmp_path):
    r = mpirun(1, "bench", "step", "--features", 16, "--hidden", "8", "--classes", 3, "--batches", "4,8",
               "--seconds", 0.02, "--repeats", 2, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "step")[1]
    assert {row["impl"] for row in rows} >= {"mpitrain", "numpy", "floor", "floor_padded"}
    for row in rows:
        assert 0 < row["samples_per_s"] <= row["best_samples_per_s"] and row["optimizer"] == "momentum"
        assert row["gflops"] == pytest.approx(row["samples_per_s"] * (2 * (16 * 8 + 8 * 3) * 3 - 2 * 16 * 8) / 1e9)


def test_bench_checkpoint(tmp_path):
    r = mpirun(1, "bench", "checkpoint", "--sizes", "100,1000", "--repeats", 2, "--dir", tmp_path, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "checkpoint")[1]
    assert [row["n_params"] for row in rows] == [100, 1000]
    for row in rows:
        assert row["save_s"] > 0 and row["load_s"] > 0
        assert row["overhead_pct_at_default"] == pytest.approx(100 * row["save_s"] / 300)


TINY_CNN = '["conv2d 4 3 same", "relu", "maxpool2d 2", "flatten", "dense 3"]'  # on 2×6×6: 187 parameters


def test_bench_step_cnn(tmp_path):
    """--model with a stack: mpitrain, the GEMM floor and (installed) PyTorch on the same model, no NumPy
    row; GEMM FLOPs and the per-rank memory of the step from the layer shapes; --breakdown's parts."""
    r = mpirun(1, "bench", "step", "--model", TINY_CNN, "--input-shape", "2,6,6", "--batches", "4,8",
               "--seconds", 0.02, "--repeats", 1, "--breakdown", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "step")[1]
    speed = [row for row in rows if "samples_per_s" in row]
    impls = {row["impl"] for row in speed}
    assert impls >= {"mpitrain", "floor"} and "numpy" not in impls
    assert ("torch" in impls) == INSTALLED_TORCH
    # conv (first layer: no input gradient) 2·(6·6)·18·4 ×2 + dense (36→3) 2·36·3 ×3
    flops = 2 * 36 * 18 * 4 * 2 + 2 * 36 * 3 * 3
    for row in speed:
        assert row["model"] == "layers" and row["vs_numpy"] is None and row["samples_per_s"] > 0
        assert row["gflops"] == pytest.approx(row["samples_per_s"] * flops / 1e9)
        if INSTALLED_TORCH:
            assert row["vs_torch"] > 0
    for row in (r_ for r_ in speed if r_["impl"] == "mpitrain"):
        b = row["batch"]
        assert row["mem_im2col"] == 4 * b * 36 * 18  # (N·OH·OW, KH·KW·C_in) floats
        assert row["mem_outputs"] == 4 * b * (6 * 6 * 4 + 3 * 3 * 4 + 3)
        assert row["mem_pool_arg"] == 4 * b * 3 * 3 * 4  # int32
        assert row["mem_scratch"] == 0
        assert row["mem_grad_in"] == 4 * b * (6 * 6 * 4 + 36)  # into the pool and the dense layer
        assert row["mem_entry"] == 4 * b * 2 * 36  # 2 channels: the batch copied into NHWC
        assert row["mem_state"] == 4 * (3 * 187 + 2)  # parameters, [gradient | loss | correct], momentum
        assert row["mem_step"] == sum(row[k] for k in ("mem_outputs", "mem_im2col", "mem_pool_arg", "mem_scratch",
                                                       "mem_grad_in", "mem_entry", "mem_state"))
    parts = [row for row in rows if "part" in row]
    for b in (4, 8):
        mine = {row["part"]: row for row in parts if row["batch"] == b and row["impl"] == "mpitrain"}
        assert set(mine) == {f"{kind} {way}" for kind in ("conv2d", "maxpool2d", "dense")
                             for way in ("forward", "backward")} | {"loss", "optimizer update", "the rest"}
        # the conv's GEMMs: forward, weight gradient (no input gradient for the first layer); dense: three
        assert [mine[f"conv2d {way}"]["gemms_per_step"] for way in ("forward", "backward")] == [1, 1]
        assert [mine[f"dense {way}"]["gemms_per_step"] for way in ("forward", "backward")] == [1, 2]
        assert sum(row["gemms_per_step"] for row in mine.values()) == 5
        assert all(row["calls_per_step"] == 1 for name, row in mine.items() if name != "the rest")
        assert all(row["us_per_step"] > 0 for name, row in mine.items() if name != "the rest")
        assert sum(row["pct_step"] for row in mine.values()) == pytest.approx(100)
        if INSTALLED_TORCH:
            assert any(row["impl"] == "torch" and row["batch"] == b for row in parts)
    assert "memory per rank, batch 8" in r.stdout and "where the step goes: mpitrain, batch 8" in r.stdout


def test_bench_step_presets_and_refusals(tmp_path):
    r = mpirun(1, "bench", "step", "--model", "lenet5", "--batches", "2", "--seconds", 0.01, "--repeats", 1,
               "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "step")[1]
    assert {row["impl"] for row in rows} >= {"mpitrain", "floor"}
    assert all(row["gflops"] == pytest.approx(row["samples_per_s"] * 2263920 / 1e9) for row in rows)
    assert "61,706 parameters" in r.stdout
    import argparse

    from mpitrain.bench import model_spec
    from mpitrain.errors import MpitrainError

    for model, shape, words in [("resnet", "1,28,28", "expected mlp, lenet5, fedavg_cnn or a JSON list"),
                                ('["conv1d 4 3", "flatten", "dense 10"]', None, "needs --input-shape C,L"),
                                ("lenet5", "1,x", "--input-shape 1,x"),
                                ('["conv2d 4 3", "flatten", "dense 5"]', "1,2,2", "model.layers[0]")]:
        with pytest.raises(MpitrainError, match=re.escape(words)):
            model_spec(argparse.Namespace(model=model, input_shape=shape, features=784, hidden="8", classes=10))
    r = mpirun(1, "bench", "step", "--model", "resnet", "--out", tmp_path / "no", timeout=60)
    assert r.returncode == 2 and len(r.error_lines()) == 1 and "--model resnet: expected" in r.stderr, r.stderr
    assert not (tmp_path / "no").exists()


def test_bench_step_gpt_and_resnet(tmp_path):
    """The families: a gpt on random tokens with AdamW (tokens/s; its GEMMs, attention's and the tied
    output layer's included) and a resnet8 with GroupNorm and momentum, each beside its floor (and PyTorch
    where installed); --breakdown names every layer kind's forward and backward."""
    r = mpirun(1, "bench", "step", "--model", "gpt", "--n-layer", 1, "--n-head", 2, "--n-embd", 8, "--block-size", 4,
               "--vocab", 7, "--batches", 3, "--seconds", 0.01, "--repeats", 1, "--breakdown", "--out", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path / "g", "step")[1]
    speed = [row for row in rows if "samples_per_s" in row]
    assert {row["impl"] for row in speed} == {"mpitrain", "floor"} | ({"torch"} if INSTALLED_TORCH else set())
    L, T, C, V = 1, 4, 8, 7  # per sample: 3 GEMMs of each dense (qkv, proj, fc, fc proj) and of the tied layer,
    flops = L * (72 * T * C * C + 12 * T * T * C) + 6 * T * C * V  # attention's 2 forward and 4 backward
    for row in speed:
        assert row["model"] == "gpt" and row["optimizer"] == "adamw" and row["batch"] == 3
        assert row["tokens_per_s"] == pytest.approx(T * row["samples_per_s"])
        assert row["gflops"] == pytest.approx(row["samples_per_s"] * flops / 1e9)
    mine = {row["part"]: row for row in rows if row.get("impl") == "mpitrain" and "part" in row}
    kinds = ("embedding", "layernorm", "attention", "dense", "gelu", "residual", "tied")
    assert set(mine) == {f"{k} {way}" for k in kinds for way in ("forward", "backward")} | {
        "loss", "optimizer update", "the rest"}
    assert [mine[f"attention {way}"]["gemms_per_step"] for way in ("forward", "backward")] == [3, 6]
    assert "gpt [1 layer, 2 heads, 8 wide, block 4, vocabulary 7]" in r.stdout
    r = mpirun(1, "bench", "step", "--model", "resnet8", "--norm", "group", "--input-shape", "3,8,8", "--classes", 5,
               "--batches", 2, "--seconds", 0.01, "--repeats", 1, "--breakdown", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path / "r", "step")[1]
    assert all(row["optimizer"] == "momentum" for row in rows if "samples_per_s" in row)
    mine = {row["part"] for row in rows if row.get("impl") == "mpitrain" and "part" in row}
    assert {"conv2d backward", "groupnorm forward", "residual backward", "globalavgpool forward"} <= mine
    assert "77,717 parameters" in r.stdout  # 5 classes on 3×8×8


STACKS = {  # every layer of the stack syntax, on a map, a signal and a sequence
    "map": ((2, 8, 8), 5, ["conv2d 4 3 same stride=2", "tanh", "maxpool2d 2 stride=1", "conv2d 3 2 same bias=false",
                           "batchnorm", "layernorm", "relu", "avgpool2d 2 stride=1", "flatten", "dense 6 std=0.5",
                           "tanh", "batchnorm", "dense 5"]),
    "signal": ((2, 16), 4, ["conv1d 3 3 same stride=2", "relu", "maxpool1d 2", "groupnorm 3", "conv1d 6 2 valid",
                            "avgpool1d 2 stride=1", "residual [conv1d 6 3 same, tanh] shortcut [conv1d 6 1]",
                            "globalavgpool", "dense 4"]),
    "sequence": ((5,), 7, ["embedding 8 positions=false", "batchnorm", "dense 8 std=0.5", "tanh",
                           "residual [layernorm, attention 2, dense 8]",
                           "residual [layernorm, dense 16, gelu, dense 8]", "layernorm", "tied"]),
    "dropout": ((10,), 3, ["dense 6", "dropout 0.5", "dense 3"]),
}


@pytest.mark.skipif(not INSTALLED_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("name", list(STACKS))
def test_torch_model_is_mpitrains_model(name):
    """PyTorch's twin (bench/torch_model.py, float64) of stacks with every layer gives mpitrain's outputs
    and, in mpitrain's layout, its gradients (≤ 1e-4 relative) from the same parameters; with dropout, in
    evaluation mode (PyTorch's masks are its own)."""
    import torch

    from mpitrain.bench.step import batch_of
    from mpitrain.bench.torch_model import TorchModel
    from mpitrain.model import Model, ModelSpec

    shape, n_out, stack = STACKS[name]
    lm = name == "sequence"
    spec = ModelSpec("layers", math.prod(shape), n_out, layers=tuple(stack), feature_shape=shape,
                     task="lm" if lm else "classify")
    model = Model(spec)
    params = model.init_params(3)
    x, y = batch_of(spec, 6, 0)
    net = TorchModel(spec, params, torch.float64)
    tx, ty = net.inputs(x, y)
    relative = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
    dropout = name == "dropout"
    for training in (False,) if dropout else (False, True):  # BatchNorm: running, then the batch's statistics
        net.train(training)
        out = net(tx)
        model.ctx.training = training
        assert relative(model._forward(params, x)[1], out.detach().numpy()) <= 1e-4, training
    if dropout:
        return
    net.loss(out, ty).backward()
    grad = np.zeros_like(params)
    model.loss_grad(params, grad, x, y)
    want = net.flat_grad()
    for e in model.table:
        got = grad[e.offset:e.offset + e.size] / len(x)
        assert relative(got, want[e.offset:e.offset + e.size]) <= 1e-4, e.name


@pytest.mark.skipif(not INSTALLED_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("model, shape", [("lenet5", None), ("fedavg_cnn", None), ("resnet8", "3,8,8"),
                                          (TINY_CNN, "2,6,6"),  # even/odd same padding on 2-d and 1-d:
                                          ('["conv2d 3 4 same", "relu", "avgpool2d 2", "flatten", "dense 4"]',
                                           "3,9,9"),
                                          ('["conv1d 5 5 same stride=2", "tanh", "maxpool1d 2", "conv1d 6 3 same '
                                           'stride=2", "relu", "flatten", "dense 4"]', "1,40")])
def test_torch_peer_is_the_same_model(model, shape):
    """PyTorch's model of a stack has the parameters, output shape and GEMM FLOPs (forward + backward,
    counted by torch's FlopCounterMode) of mpitrain's step (its recorded GEMMs)."""
    import argparse

    from torch.utils.flop_counter import FlopCounterMode

    from mpitrain.bench import family_arguments, model_spec
    from mpitrain.bench.step import batch_of, gemm_flops, mpitrain_step, record_gemms
    from mpitrain.bench.torch_model import TorchModel

    families = argparse.ArgumentParser()
    family_arguments(families)
    spec = model_spec(argparse.Namespace(model=model, input_shape=shape, features=784, hidden="8", classes=10,
                                         **vars(families.parse_args([]))))
    x, y = batch_of(spec, 3, 0)
    net = TorchModel(spec, np.zeros(spec.n_params, np.float32))
    assert sum(p.numel() for p in net.parameters()) == spec.n_params
    tx, ty = net.inputs(x, y)
    with FlopCounterMode(display=False) as counter:
        out = net(tx)
        net.loss(out, ty).backward()
    assert out.shape == (3, spec.n_out)
    assert counter.get_total_flops() == gemm_flops(record_gemms(mpitrain_step(spec, x, y)[0]))
