"""parallel.tensor = T: equal to plain with each rank holding only its slices, resume across layouts, and
one-line refusals."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MPIEXEC, mpirun, params, summary
from test_checkpoint import _rank_pids, checkpoints

CNN = ["model.kind=layers", "model.layers=" + json.dumps(  # column, pool, row, column, flatten of a split map, row
    ["conv2d 6 3 same", "relu", "maxpool2d 2", "conv2d 12 3 valid", "relu", "conv2d 8 1", "relu", "flatten",
     "dense 10"])]
MLP = ["model.hidden=[32, 16]"]
# Parameters per rank at T = 2, counted by hand from the module doc's rules:
# MLP 12-32-16-4: column 12×16+16, row 16×16+16 (bias whole), the classifier whole 16×4+4
# CNN on 1×8×8: conv column 3 of 6 channels 3·3·1·3+3, conv row over 3 of 6 input channels 12·3·3·3+12 (4×4 →
# 2×2), 1×1 conv column 4 of 8 channels 4·12+4, classifier row over 2·2·4 of the 32 flat features 16×10+10
LOCAL = {"mlp": 12 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4, "cnn": 30 + 12 * 27 + 12 + 4 * 12 + 4 + 16 * 10 + 10}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tensor") / "digits.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", path).returncode == 0
    return path


def train(n, out, data, *sets, resume=None):
    args = ["train", "--quiet", "--out", str(out), "--data", data] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, timeout=300)
    assert r.returncode == 0, r.stderr
    return summary(str(out))


def close(a, b):
    return np.max(np.abs(a - b)) <= 1e-5 * np.abs(a).max()


CASES = [("sgd", 2, "plain"), ("momentum", 4, "fsdp")]


@pytest.mark.parametrize("optimizer,ranks,mode", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_tensor_mlp_equals_plain_with_its_slices_per_rank(tmp_path, synth, optimizer, ranks, mode):
    """T = 2 on 2 ranks, and a 2 × 2 grid with fsdp over the data group (the Adam CNN is below)."""
    sets = [*MLP, "train.steps=50", "train.global_batch=48", f"train.optimizer={optimizer}", "train.lr=0.05",
            "train.schedule=cosine", "train.warmup_steps=5"]
    ref = train(1, tmp_path / "plain", synth, *sets)
    s = train(ranks, tmp_path / "tensor", synth, *sets, "parallel.tensor=2", f"comm.mode={mode}")
    assert close(params(str(tmp_path / "plain")), params(str(tmp_path / "tensor")))
    assert abs(ref["test_loss"] - s["test_loss"]) < 1e-4 and ref["train_loss"] < 0.9 * np.log(4)  # evaluated; trained
    dp = ranks // 2
    local = 4 * (LOCAL["mlp"] if mode == "plain" else -(-LOCAL["mlp"] // dp))  # fsdp: ⌈local/dp⌉
    assert (s["param_bytes_per_rank"], s["grad_bytes_per_rank"], s["data_parallel"]) == (local, local, dp)
    assert s["tensor_comm_bytes_per_step"] > 0 and ref["param_bytes_per_rank"] == 4 * ref["n_params"]


def test_tensor_grid_cnn_resumes_on_other_layouts(tmp_path, digits):
    """2 × 2 grid (Adam, CNN) = plain, with its slices per rank; its checkpoint resumes bit-exact on the same
    grid and on one plain rank; a plain checkpoint resumes on tensor 2 (2 ranks)."""
    sets = [*CNN, "train.steps=50", "train.global_batch=48", "train.optimizer=adam", "train.lr=0.005",
            "checkpoint.every=25"]
    plain, grid = tmp_path / "plain", tmp_path / "grid"
    train(1, plain, digits, *sets)
    s = train(4, grid, digits, *sets, "parallel.tensor=2")
    assert s["param_bytes_per_rank"] == 4 * LOCAL["cnn"]
    ref = params(str(plain))
    assert close(ref, params(str(grid)))
    mid = os.path.join(grid, "checkpoints", "ckpt-000000025.h5")
    train(4, tmp_path / "same", digits, *sets, "parallel.tensor=2", resume=mid)
    assert np.array_equal(params(str(grid)), params(str(tmp_path / "same")))  # same layout: bit-exact
    train(1, tmp_path / "to-plain", digits, *sets, resume=mid)  # tensor 2 × data 2 → plain on 1
    assert close(ref, params(str(tmp_path / "to-plain")))
    train(2, tmp_path / "to-tensor", digits, *sets, "parallel.tensor=2",
          resume=os.path.join(plain, "checkpoints", "ckpt-000000025.h5"))  # plain → tensor 2
    assert close(ref, params(str(tmp_path / "to-tensor")))


@pytest.mark.parametrize("ranks,command,sets,expected", [
    (2, "train", ["parallel.tensor=3"], "parallel.tensor = 3 does not divide the 2 rank(s) of this run: expected one of 1, 2"),
    (1, "train", ["parallel.tensor=2", "comm.mode=topk"], "comm.mode = 'topk' with parallel.tensor = 2: "),
    (1, "federate", ["parallel.tensor=2"], "parallel.tensor = 2: federated training keeps a whole model per client"),
], ids=["bad-T", "mode", "federated"])
def test_refusals_are_one_line(tmp_path, synth, ranks, command, sets, expected):
    args = [command, "--quiet", "--out", str(tmp_path / "run"), "--data", synth]
    for s in sets:
        args += ["--set", s]
    r = mpirun(ranks, *args, timeout=120)
    lines = r.error_lines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"mpitrain: error: {expected}"), r.stderr


def test_a_signal_to_one_rank_of_a_tensor_group_stops_both(tmp_path, synth):
    """SIGUSR1 reaches only tensor rank 1 (its data group is itself): the stop flag crosses the tensor group
    too, so both ranks checkpoint at the same step and exit 75 (without that, rank 1 alone would stop)."""
    out = str(tmp_path / "sig")
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "train", "--quiet", "--out", out, "--data", synth,
           *[a for s in (*MLP, "train.steps=200000", "parallel.tensor=2") for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) or len(_rank_pids(out)) < 2:
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(_rank_pids(out)[1], signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 75, err
    assert len(checkpoints(out)) == 1 and not os.path.exists(os.path.join(out, "summary.json"))

