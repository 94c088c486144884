"""The bench machinery on tiny sizes: runs, saves JSON/CSV that parse, reports consistent numbers."""

import importlib.util
import re

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
               "--seconds", 0.02, "--repeats", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "step")[1]
    assert {row["impl"] for row in rows} >= {"mpitrain", "numpy", "floor", "floor_padded"}
    for row in rows:
        assert row["samples_per_s"] > 0 and row["gflops"] > 0
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
        assert row["mem_grad_in"] == 4 * b * (6 * 6 * 4 + 36)  # into the pool and the dense layer
        assert row["mem_entry"] == 4 * b * 2 * 36  # 2 channels: the batch copied into NHWC
        assert row["mem_state"] == 4 * (3 * 187 + 2)  # parameters, [gradient | loss | correct], momentum
        assert row["mem_step"] == sum(row[k] for k in ("mem_outputs", "mem_im2col", "mem_pool_arg",
                                                       "mem_grad_in", "mem_entry", "mem_state"))
    parts = [row for row in rows if "part" in row]
    for b in (4, 8):
        mine = {row["part"]: row for row in parts if row["batch"] == b and row["impl"] == "mpitrain"}
        assert {"gemm (conv)", "gemm (dense)", "im2col", "pool", "momentum update", "python (the rest)"} <= set(mine)
        assert "col2im" not in mine  # the first layer's input gradient is never computed
        assert mine["gemm (conv)"]["calls_per_step"] == 2 and mine["gemm (dense)"]["calls_per_step"] == 3
        assert all(row["us_per_step"] > 0 for name, row in mine.items() if name != "python (the rest)")
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


@pytest.mark.skipif(not INSTALLED_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("model, shape", [("lenet5", None), ("fedavg_cnn", None),
                                          (TINY_CNN, "2,6,6"),  # even/odd same padding on 2-d and 1-d:
                                          ('["conv2d 3 4 same", "relu", "avgpool2d 2", "flatten", "dense 4"]',
                                           "3,9,9"),
                                          ('["conv1d 5 5 same stride=2", "tanh", "maxpool1d 2", "conv1d 6 3 same '
                                           'stride=2", "relu", "flatten", "dense 4"]', "1,40")])
def test_torch_peer_is_the_same_model(model, shape):
    """PyTorch's model of a stack has the parameters, output shape and GEMM FLOPs (forward + backward,
    counted by torch's FlopCounterMode) of mpitrain's."""
    import argparse

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mpitrain.bench import model_spec
    from mpitrain.bench.step import flops_per_sample, torch_input_shape, torch_net

    spec = model_spec(argparse.Namespace(model=model, input_shape=shape, features=784, hidden="8", classes=10))
    net = torch_net(torch, spec)
    assert sum(p.numel() for p in net.parameters()) == spec.n_params
    x = torch.randn(3, *torch_input_shape(spec))
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        out.sum().backward()
    assert out.shape == (3, spec.n_out)
    assert counter.get_total_flops() == 3 * flops_per_sample(spec)
