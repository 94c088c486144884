"""comm.mode = fsdp (ZeRO-3): equal to plain, 1/p of every vector per rank, resume across layouts, and a
model too large for plain under a per-rank address-space limit."""
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from conftest import MPIEXEC, launch, mpirun, params, summary

CNN = ["model.kind=layers", "model.layers=" + json.dumps(
    ["conv2d 6 3 same", "relu", "maxpool2d 2", "conv2d 12 3 valid", "relu", "flatten", "dense 32", "relu", "dense 10"])]
MLP = ["model.hidden=[32, 16]"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp") / "digits.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", path).returncode == 0
    return path


def train(n, out, data, *sets, resume=None, timeout=300):
    args = ["train", "--quiet", "--out", out, "--data", data] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return summary(out)


# comm.bucket_mb: the smallest unit fsdp gathers.  The default 1 MiB makes these small models one unit;
# 0.0001 MiB (26 floats) one unit per layer; 0.0015 (393 floats) the CNN's units {conv, conv}, {dense, dense}
CASES = [("sgd", 2, "mlp", 0.0001), ("momentum", 3, "mlp", 1), ("adam", 4, "mlp", 1), ("momentum", 4, "cnn", 1),
         ("adam", 3, "cnn", 0.0015)]


@pytest.mark.parametrize("optimizer,ranks,model,unit_mb", CASES, ids=[f"{o}-{r}-{m}-{u}" for o, r, m, u in CASES])
def test_fsdp_equals_plain_with_one_pth_of_each_vector_per_rank(tmp_path, synth, digits, optimizer, ranks, model,
                                                                 unit_mb):
    data, layers = (synth, MLP) if model == "mlp" else (digits, CNN)
    sets = [*layers, "train.steps=50", "train.global_batch=48", f"train.optimizer={optimizer}",
            "train.lr=0.005" if optimizer == "adam" else "train.lr=0.05"]
    plain, fsdp = str(tmp_path / "plain"), str(tmp_path / "fsdp")
    train(1, plain, data, *sets)
    s = train(ranks, fsdp, data, *sets, "comm.mode=fsdp", f"comm.bucket_mb={unit_mb}")
    p1, pf = params(plain), params(fsdp)
    assert np.max(np.abs(p1 - pf)) <= 1e-5 * np.abs(p1).max()
    assert np.max(np.abs(p1 - summary_start(plain))) > 1e-2 * np.abs(p1).max()  # it trained
    shard = 4 * -(-s["n_params"] // ranks)  # ⌈n/p⌉ float32s, measured from the live buffers by the run
    slots = {"sgd": 0, "momentum": 1, "adam": 2}[optimizer]
    assert (s["param_bytes_per_rank"], s["grad_bytes_per_rank"], s["optimizer_state_bytes_per_rank"]) == \
        (shard, shard, slots * shard)
    assert summary(plain)["param_bytes_per_rank"] == 4 * s["n_params"]


def summary_start(out):
    from mpitrain.checkpoint import load_model
    from mpitrain.model import Model

    spec, _ = load_model(os.path.join(out, "model.h5"))
    return Model(spec).init_params(0)


def test_fsdp_checkpoints_resume_on_other_layouts(tmp_path, synth):
    sets = [*MLP, "train.steps=40", "train.global_batch=48", "train.optimizer=adam", "train.lr=0.005",
            "checkpoint.every=20"]
    full = str(tmp_path / "full")
    train(3, full, synth, *sets, "comm.mode=fsdp")
    mid = os.path.join(full, "checkpoints", "ckpt-000000020.h5")
    train(3, str(tmp_path / "same"), synth, *sets, "comm.mode=fsdp", resume=mid)
    assert np.array_equal(params(full), params(str(tmp_path / "same")))  # same layout: bit-exact
    train(1, str(tmp_path / "plain"), synth, *sets, resume=mid)  # fsdp on 3 → plain on 1
    ref = params(full)
    assert np.max(np.abs(ref - params(str(tmp_path / "plain")))) <= 1e-5 * np.abs(ref).max()
    plain = str(tmp_path / "p")
    train(1, plain, synth, *sets)
    train(2, str(tmp_path / "back"), synth, *sets, "comm.mode=fsdp",
          resume=os.path.join(plain, "checkpoints", "ckpt-000000020.h5"))  # plain → fsdp on 2
    assert np.max(np.abs(params(plain) - params(str(tmp_path / "back")))) <= 1e-5 * np.abs(ref).max()


LIMITED = textwrap.dedent('''
    import atexit, os, resource, runpy, sys

    limit, prefix = int(sys.argv.pop(1)), sys.argv.pop(1)  # then python -m mpitrain's arguments
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def peak():  # this rank's peak address space, for the test to size the limit by
        with open("/proc/self/status") as f:
            kb = [line.split()[1] for line in f if line.startswith("VmPeak")][0]
        with open(f"{prefix}.{os.getpid()}", "w") as f:
            f.write(kb)

    atexit.register(peak)
    sys.argv[0] = "mpitrain"
    runpy.run_module("mpitrain", run_name="__main__", alter_sys=True)
''')


def test_a_model_too_large_for_plain_trains_under_fsdp(tmp_path):
    """RLIMIT_AS per rank between what fsdp and plain need (measured from a tiny run's address space):
    plain stops with one out-of-memory line per failing rank and a non-zero exit; fsdp trains."""
    data = str(tmp_path / "big.h5")
    assert mpirun(1, "prepare", "--source", "synthetic", "--samples", 200, "--features", 256, "--out", data).returncode == 0
    script = tmp_path / "limited.py"
    script.write_text(LIMITED, encoding="utf-8")
    wide = "model.hidden=[" + ",".join(["2048"] * 10) + "]"

    def run(limit, mode, hidden, tag):
        cmd = [MPIEXEC, "-n", "4", sys.executable, str(script), str(limit), str(tmp_path / f"peak-{tag}"),
               "train", "--quiet", "--out", str(tmp_path / tag), "--data", data, "--set", hidden,
               "--set", "train.steps=3", "--set", "train.global_batch=8", "--set", "train.optimizer=adam",
               "--set", f"comm.mode={mode}"]
        return launch(cmd, timeout=300)

    assert run(0, "fsdp", "model.hidden=[8]", "base").returncode == 0
    base = max(int(open(p).read()) for p in (tmp_path.glob("peak-base.*"))) * 1024
    from mpitrain.model import ModelSpec

    nbytes = 4 * ModelSpec("mlp", 256, 10, (2048,) * 10).n_params  # ≈ 153 MB
    limit = base + int(3.5 * nbytes)  # fsdp: ≈ base + 2.4×, plain: ≈ base + 4.6× (measured 2026-12-02)
    r = run(limit, "plain", wide, "plain")
    assert r.returncode != 0
    lines = [line for line in r.error_lines() if not line.startswith("Abort(")]  # MPICH's own line
    assert lines and all(line.startswith("mpitrain: error on rank ") and ": out of memory (" in line
                         for line in lines), r.stderr
    r = run(limit, "fsdp", wide, "fsdp")
    assert r.returncode == 0, r.stderr
    s = summary(str(tmp_path / "fsdp"))
    assert s["param_bytes_per_rank"] == 4 * -(-s["n_params"] // 4) and s["steps"] == 3
