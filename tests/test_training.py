"""Distributed training launched with real mpiexec."""
import json
import os

import numpy as np
import pytest

from conftest import mpirun, params, summary


def train(n, out, *sets, data=None, env=None, timeout=300):
    args = ["train", "--out", out, "--quiet"]
    if data:
        args += ["--set", f"data.path={data}"]
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return summary(out)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_one_rank_equals_four_ranks(tmp_path, synth, optimizer):
    """Same seed and global batch: 4 ranks compute the 1-rank trajectory (up to float summation order)."""
    sets = ["model.hidden=[32, 16]", "train.steps=50", "train.global_batch=60", f"train.optimizer={optimizer}",
            "train.lr=0.05" if optimizer != "adam" else "train.lr=0.005"]
    one, four = str(tmp_path / "n1"), str(tmp_path / "n4")
    train(1, one, *sets, data=synth)
    s4 = train(4, four, *sets, data=synth)
    p1, p4 = params(one), params(four)
    scale = np.abs(p1).max()
    assert s4["world_size"] == 4 and s4["steps"] == 50
    assert np.max(np.abs(p1 - p4)) <= 1e-5 * scale
    # the comparison is not vacuous: the parameters moved well beyond the tolerance
    from mpitrain.model import Model, ModelSpec

    start = Model(ModelSpec("mlp", 12, 4, (32, 16))).init_params(0)
    assert np.max(np.abs(p1 - start)) > 1e-2 * scale


def test_uneven_split_three_ranks(tmp_path, synth):
    """A global batch that 3 ranks cannot split evenly still matches one rank."""
    sets = ["model.hidden=[16]", "train.steps=30", "train.global_batch=50"]
    train(1, str(tmp_path / "a"), *sets, data=synth)
    train(3, str(tmp_path / "b"), *sets, data=synth)
    p1, p3 = params(str(tmp_path / "a")), params(str(tmp_path / "b"))
    assert np.max(np.abs(p1 - p3)) <= 1e-5 * np.abs(p1).max()


def test_default_job_mlp_on_digits(tmp_path):
    """`mpiexec -n 4 python -m mpitrain` with no arguments: prepares digits once, MLP reaches ≥ 97 %."""
    cache_home = str(tmp_path / "xdg")  # its own empty cache: the session's may hold digits.h5 already
    out = tmp_path / "run"
    os.makedirs(out)
    r = mpirun(4, env={"XDG_CACHE_HOME": cache_home}, cwd=str(out))
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(cache_home, "mpitrain", "digits.h5"))
    assert r.stdout.count("digits.h5: ") == 1  # prepared by one rank, once
    (run_dir,) = [os.path.join(out, "runs", d) for d in os.listdir(out / "runs")]
    s = summary(run_dir)
    assert s["test_accuracy"] >= 0.97
    assert s["world_size"] == 4 and s["samples_per_second"] > 0 and s["comm_seconds"] >= 0
    for key in ("test_loss", "steps", "wall_seconds"):
        assert key in s
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    assert any("test_accuracy" in m for m in lines) and any("train_loss" in m for m in lines)
    assert "[train]" in open(os.path.join(run_dir, "config.toml"), encoding="utf-8").read()


def test_softmax_on_digits(tmp_path, cache_home):
    s = train(4, str(tmp_path / "sm"), "model.kind=softmax", env={"XDG_CACHE_HOME": cache_home})
    assert s["test_accuracy"] >= 0.95


def test_sixteen_ranks_on_two_cores(tmp_path, synth):
    """Oversubscribed: 16 ranks finish and learn (and match 1 rank, like any rank count)."""
    sets = ["model.hidden=[16]", "train.steps=40", "train.global_batch=64"]
    s = train(16, str(tmp_path / "n16"), *sets, data=synth, timeout=600)
    train(1, str(tmp_path / "n1"), *sets, data=synth)
    assert s["world_size"] == 16 and s["threads_per_rank"] == 1
    p1, p16 = params(str(tmp_path / "n1")), params(str(tmp_path / "n16"))
    assert np.max(np.abs(p1 - p16)) <= 1e-5 * np.abs(p1).max()


def test_eval_scores_saved_model(tmp_path, synth):
    out = str(tmp_path / "r")
    s = train(2, out, "model.hidden=[16]", "train.epochs=5", data=synth)
    r = mpirun(3, "eval", "--model", os.path.join(out, "model.h5"), "--data", synth)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-12)
    assert result["loss"] == pytest.approx(s["test_loss"], rel=1e-5)


def test_compile_once_per_node(tmp_path, synth):
    """With an empty kernel cache, only the node's first rank compiles; the others load its cache."""
    r = mpirun(4, "tests/mpi_probe.py", "cache", synth, module=False,
               env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    misses = {int(k): int(v) for k, v in (line.split() for line in r.stdout.split("\n") if line.startswith(tuple("0123456789")))}
    assert sorted(misses) == [0, 1, 2, 3]
    assert misses[0] > 0 and all(misses[r] == 0 for r in (1, 2, 3))
