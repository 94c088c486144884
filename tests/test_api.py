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


def test_predict_takes_the_models_layout_only(tmp_path):
    """A channels-last array of the right size is refused, naming it, unless layout='nhwc' says so."""
    import pytest

    import mpitrain
    from mpitrain.checkpoint import save_model
    from mpitrain.model import Model, ModelSpec

    spec = ModelSpec(kind="softmax", n_in=60, n_out=3, feature_shape=(3, 4, 5))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(0))
    model = mpitrain.load_model(str(tmp_path / "model.h5"))
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    p = model.predict_proba(x)
    np.testing.assert_array_equal(model.predict_proba(x.reshape(2, 60)), p)
    np.testing.assert_array_equal(model.predict_proba(x.transpose(0, 2, 3, 1), layout="nhwc"), p)
    for shape, message in (((2, 4, 5, 3), r"\(2, 4, 5, 3\): its samples have their channels last; expected "
                                          r"\(N, 3, 4, 5\) \(channels first\) or \(N, 60\), or pass layout='nhwc'"),
                           ((2, 5, 4, 3), r"\(2, 5, 4, 3\); expected \(N, 3, 4, 5\) or \(N, 60\)$"),
                           ((2, 3, 20), r"\(2, 3, 20\); expected \(N, 3, 4, 5\) or \(N, 60\)$")):
        with pytest.raises(mpitrain.MpitrainError, match=r"^predict: x has shape " + message):
            model.predict(np.zeros(shape))
    with pytest.raises(mpitrain.MpitrainError, match=r"with layout='nhwc' expected \(N, 4, 5, 3\)"):
        model.predict(x, layout="nhwc")


def test_eval_standardises_with_the_models_statistics(tmp_path):
    """A file prepared apart (classes 0 and 1 of the model's data: other statistics) scores in eval as
    predict scores its raw samples; a file of another feature shape is one line."""
    import mpitrain
    from mpitrain.checkpoint import save_model
    from mpitrain.data.prepare import prepare
    from mpitrain.model import ModelSpec

    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(6, 4))
    x = rng.normal(size=(400, 6)) * 2 + 1
    y = np.argmax((x - 1) @ teacher, axis=1)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x[y < 2], y=y[y < 2])
    np.savez(tmp_path / "c.npz", x=x.reshape(-1, 2, 3), y=y)
    for name, classes in (("a", None), ("b", 4), ("c", None)):
        prepare(f"npz:{tmp_path / name}.npz", str(tmp_path / f"{name}.h5"), classes=classes)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        stats = f["standardize/mean"][...], f["standardize/std"][...]
    spec = ModelSpec(kind="softmax", n_in=6, n_out=4)  # the teacher itself: [W (in × out) | b]
    model_h5 = str(tmp_path / "model.h5")
    save_model(model_h5, spec, np.concatenate([teacher.ravel(), np.zeros(4)]).astype(np.float32), stats)
    with h5py.File(tmp_path / "b.h5", "r") as f:
        bx, by = f["test/x"][...], f["test/y"][...]
        raw = bx * f["standardize/std"][...] + f["standardize/mean"][...]
    predicted = np.mean(mpitrain.load_model(model_h5).predict(raw) == by)
    r = launch([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "eval", "--model", model_h5, "--data",
                str(tmp_path / "b.h5")])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == predicted > 0.9  # b's own statistics: 0.65
    r = launch([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "eval", "--model", model_h5, "--data",
                str(tmp_path / "c.h5")])
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: {model_h5}: the model takes samples of shape [6] and 4 classes, {tmp_path / 'c.h5'} "
        f"has [2, 3] and 4 classes"]


def test_eval_help_describes_the_command_and_its_options():
    r = launch([sys.executable, "-m", "mpitrain", "eval", "--help"])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "standardised with the model's training statistics" in text
    assert "which split of --data to score (default: test)" in text and "the model.h5 of a run" in text
