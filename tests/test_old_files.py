"""Files written by mpitrain before the parameter table and the modern layers (commit 66bba03; tests/data/old:
an MLP's model.h5 of 30 steps, and a CNN's model.h5 of 40 steps with its checkpoint of step 30, trained on
the embedded digits on 2 ranks) still load and give the same results: eval scores them as their runs did,
and the checkpoint resumes into the old run's final parameters, which today's code computes from scratch."""
import json
import os

import h5py
import numpy as np
import pytest

from conftest import mpirun, params

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "old")
CNN = ["model.kind=layers", "model.layers=" + json.dumps(["conv2d 4 3 same", "relu", "maxpool2d 2", "flatten",
                                                          "dense 10"]),
       "train.optimizer=adam", "train.lr=0.01"]
# what the old runs' summary.json said
SCORES = {"mlp": (0.8022284122562674, 0.7927605353537007), "cnn": (0.7632311977715878, 0.9555434049988407)}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("old") / "digits.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", path).returncode == 0
    return path


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_old_models_score_as_they_did(digits, kind):
    r = mpirun(2, "eval", "--model", os.path.join(OLD, f"{kind}-model.h5"), "--data", digits)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(got["accuracy"] - SCORES[kind][0]) < 1e-9 and abs(got["loss"] - SCORES[kind][1]) < 1e-6


def test_an_old_checkpoint_resumes_into_what_a_new_run_computes(tmp_path, digits):
    sets = [a for s in [*CNN, "train.steps=40"] for a in ("--set", s)]
    new, resumed = str(tmp_path / "new"), str(tmp_path / "resumed")
    assert mpirun(2, "train", "--quiet", "--data", digits, "--out", new, *sets).returncode == 0
    r = mpirun(2, "train", "--data", digits, "--out", resumed, *sets,
               "--resume", os.path.join(OLD, "cnn-ckpt-000000030.h5"))
    assert r.returncode == 0, r.stderr
    assert "written before checkpoints recorded train.global_batch" in r.stdout
    with h5py.File(os.path.join(OLD, "cnn-model.h5"), "r") as f:
        old = f["params"][...]
    assert np.array_equal(params(resumed), old) and np.array_equal(params(new), old)
