"""The Python API under mpiexec: train and federate on a sub-communicator inside a larger MPI program, the
same one-line errors as the command line, and load_model's predictions."""
import json
import os
import sys
import textwrap

import h5py
import numpy as np

from conftest import MPIEXEC, launch

SCRIPT = textwrap.dedent('''
    import json, sys
    from mpi4py import MPI
    import mpitrain

    data, parts, out = sys.argv[1:4]
    world = MPI.COMM_WORLD
    sub = world.Split(0 if world.rank < 2 else 1, world.rank)  # ranks 0-1 train, rank 2 waits elsewhere
    result = {}
    if world.rank < 2:
        s = mpitrain.train(overrides={"data.path": data, "model.hidden": [16],
                                      "train.epochs": 10}, out=out + "/t", comm=sub)
        result["train"] = {k: s[k] for k in ("world_size", "test_accuracy", "steps")}
        f = mpitrain.federate(overrides={"data.path": parts, "fed.rounds": 2, "model.kind": "softmax"},
                              out=out + "/f", comm=sub)
        result["federate"] = {k: f[k] for k in ("world_size", "rounds")}
        try:
            mpitrain.train(overrides={"data.path": data, "train.lr": -1.0}, comm=sub)
        except mpitrain.MpitrainError as e:
            result["error"] = str(e)
    world.Barrier()  # the third rank took no part, and nobody is left waiting
    with open(f"{out}/rank-{world.rank}.json", "w") as f:  # stdout lines of ranks may interleave
        json.dump({"rank": world.rank, **result}, f)
''')


def test_train_and_federate_on_a_sub_communicator(tmp_path, synth):
    parts = str(tmp_path / "parts.h5")
    r = launch([sys.executable, "-m", "mpitrain", "prepare", "--source", "digits", "--out", parts, "--partition",
                "iid", "--clients", "4"])
    assert r.returncode == 0, r.stderr
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT, encoding="utf-8")
    r = launch([MPIEXEC, "-n", "3", sys.executable, str(script), synth, parts, str(tmp_path)], timeout=300)
    assert r.returncode == 0, r.stderr
    ranks = {}
    for rank in range(3):
        with open(tmp_path / f"rank-{rank}.json", encoding="utf-8") as f:
            ranks[rank] = json.load(f)
    assert sorted(ranks) == [0, 1, 2] and "train" not in ranks[2]
    for rank in (0, 1):  # every rank of the communicator gets the summary and the error
        assert ranks[rank]["train"]["world_size"] == 2 and ranks[rank]["train"]["test_accuracy"] > 0.5
        assert ranks[rank]["federate"] == {"world_size": 2, "rounds": 2}
        assert ranks[rank]["error"] == "train.lr = -1.0: expected > 0"
    with open(os.path.join(tmp_path, "t", "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["test_accuracy"] == ranks[0]["train"]["test_accuracy"]


def test_load_model_predicts_raw_and_standardised_inputs(tmp_path, synth):
    out = str(tmp_path / "run")
    r = launch([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "train", "--quiet", "--out", out, "--data", synth,
                "--set", "model.hidden=[16]", "--set", "train.epochs=5"])
    assert r.returncode == 0, r.stderr
    import mpitrain

    model = mpitrain.load_model(os.path.join(out, "model.h5"))
    with h5py.File(synth, "r") as f:
        x, y = f["test/x"][...], f["test/y"][...]
        mean, std = f["standardize/mean"][...], f["standardize/std"][...]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        accuracy = json.load(f)["test_accuracy"]
    assert np.mean(model.predict(x, standardized=True) == y) == accuracy
    raw = x * std + mean  # as the source gave them to prepare
    np.testing.assert_allclose(model.predict_proba(raw), model.predict_proba(x, standardized=True), atol=1e-5)
    p = model.predict_proba(raw[:3])
    assert p.shape == (3, 4) and np.allclose(p.sum(axis=1), 1)
    try:
        model.predict(np.zeros((2, 5)))
    except mpitrain.MpitrainError as e:
        assert str(e) == "predict: x has shape (2, 5); expected (N, 12)"
    else:
        raise AssertionError("no error for a wrong shape")
