"""The validation workflow: prepare --validation-fraction, evaluation on val/ with the test split scored once
at the end, train.early_stop and train.keep_best (best.h5), kept across a resume."""
import importlib.util
import json
import os

import h5py
import numpy as np
import pytest

from conftest import mpirun, ok, records, summary
from mpitrain.data.prepare import prepare
from mpitrain.data.shard import DataFile
from mpitrain.errors import MpitrainError

# momentum at lr 5: the val loss soon rises and keeps rising (a planted curve)
RISING = ["model.hidden=[16]", "train.optimizer=momentum", "train.lr=5", "train.schedule=constant",
          "train.global_batch=16", "train.eval_every=5", "train.early_stop.patience=2", "train.keep_best=true",
          "checkpoint.every=5", "checkpoint.keep=100"]


@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("val") / "val.h5")
    prepare("synthetic", path, samples=400, features=8, classes=3, seed=1, validation_fraction=0.2)
    return path


def train(n, out, data, *sets, resume=False):
    args = ["train", "--quiet", "--out", out, "--set", f"data.path={data}"] + ["--resume", "auto"] * resume
    for s in sets:
        args += ["--set", s]
    return mpirun(n, *args, timeout=300)


def h5_params(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["params"][...])


def rows(f, split):
    return {r.tobytes() for r in f[f"{split}/x"][...]}


def test_prepare_writes_a_disjoint_val_split_and_accepts_no_test_split(tmp_path, with_val):
    with h5py.File(with_val, "r") as f:
        assert (len(f["train/y"]), len(f["val/y"]), len(f["test/y"])) == (240, 80, 80)
        train, val, test = rows(f, "train"), rows(f, "val"), rows(f, "test")
        assert not (train & val or train & test or val & test)
    assert DataFile(with_val).n_val == 80
    none = str(tmp_path / "none.h5")
    line = prepare("synthetic", none, samples=100, features=4, classes=2, test_fraction=0, validation_fraction=0.1)
    assert "90 train + 10 validation + 0 test samples" in line
    data = DataFile(none)
    assert (data.n_train, data.n_val, data.n_test) == (90, 10, 0)
    with pytest.raises(MpitrainError, match="too few to split off a validation set"):
        prepare("synthetic", str(tmp_path / "x.h5"), samples=10, features=4, classes=2, validation_fraction=0.9)
    assert not os.path.exists(tmp_path / "x.h5")


def test_an_image_folder_keeps_its_own_val_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for label, cls in enumerate(("cat", "dog")):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                Image.fromarray(np.full((2, 3), 40 * label + i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    out = str(tmp_path / "i.h5")
    with pytest.raises(MpitrainError, match="has its own validation split"):
        prepare(f"images:{tmp_path}", out, grayscale=True, validation_fraction=0.1)
    assert "6 train + 4 validation + 2 test samples" in prepare(f"images:{tmp_path}", out, grayscale=True)
    with h5py.File(out, "r") as f:
        assert sorted(f["val/y"][...]) == [0, 0, 1, 1]


def test_text_val_split_is_the_slice_before_the_test_tail(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcdefghij" * 50, encoding="utf-8")
    out = str(tmp_path / "t.h5")
    prepare(f"text:{src}", out, test_fraction=0.1, validation_fraction=0.2)
    with h5py.File(out, "r") as f:
        parts = [f[f"{s}/tokens"][...] for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [350, 100, 50]
    chars = "abcdefghij"
    assert "".join(chars[i] for i in np.concatenate(parts)) == chars * 50
    run = str(tmp_path / "gpt")  # a language model evaluates on the val windows, the test tail at the end
    ok(train(2, run, out, "model.kind=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
             "model.block_size=8", "train.global_batch=4", "train.steps=4", "train.eval_every=2",
             "train.keep_best=true"))
    assert [r["step"] for r in records(run) if "val_loss" in r] == [2, 4]
    assert summary(run)["test_loss"] is not None and os.path.exists(os.path.join(run, "best.h5"))


def test_early_stop_on_a_rising_val_loss_and_best_h5_is_the_best_step(tmp_path, with_val):
    out = str(tmp_path / "run")
    ok(train(2, out, with_val, *RISING, "train.steps=60"))
    s, logged = summary(out), records(out)
    assert not any(k.startswith("test") for r in logged for k in r)  # the test split never steered training
    val = [(r["step"], r["val_loss"]) for r in logged if "val_loss" in r]
    best = min(val, key=lambda v: v[1])
    # the rule: stop once `patience` (2) evaluations in a row have not improved on the best
    assert val[-1][0] == best[0] + 2 * 5 < 60 and val.index(best) == len(val) - 3
    assert (s["stopped_early_at_step"], s["steps"], s["best_step"]) == (best[0] + 10, best[0] + 10, best[0])
    assert s["best_val_loss"] == pytest.approx(best[1]) and s["test_accuracy"] is not None
    ckpt = os.path.join(out, "checkpoints", f"ckpt-{best[0]:09d}.h5")
    np.testing.assert_array_equal(h5_params(os.path.join(out, "best.h5")), h5_params(ckpt))
    r = ok(mpirun(2, "eval", "--model", os.path.join(out, "best.h5"), "--data", with_val, "--split", "val"))
    assert json.loads(r.stdout)["loss"] == pytest.approx(best[1])
    if importlib.util.find_spec("matplotlib"):  # plot draws the val curves
        from mpitrain.plot import Run, figure

        lines = {line.get_label() for ax in figure([Run(out)]).axes for line in ax.get_lines()}
        assert {"run: val_loss", "run: val_accuracy"} <= lines
    assert not np.array_equal(h5_params(os.path.join(out, "best.h5")), h5_params(os.path.join(out, "model.h5")))

    # preempted after the best (a run to the evaluation after it, then resumed): it keeps the same best
    cut = str(tmp_path / "cut")
    ok(train(2, cut, with_val, *RISING, f"train.steps={best[0] + 5}"))
    assert summary(cut)["best_step"] == best[0]
    ok(train(2, cut, with_val, *RISING, "train.steps=60", resume=True))
    r = summary(cut)
    assert (r["resumed_from_step"], r["best_step"], r["stopped_early_at_step"]) == (best[0] + 5, best[0], best[0] + 10)
    np.testing.assert_array_equal(h5_params(os.path.join(cut, "best.h5")), h5_params(ckpt))


@pytest.mark.parametrize("mode", ["comm.mode=fsdp", "parallel.tensor=2"])
def test_keep_best_saves_whole_vectors_when_ranks_hold_parts(tmp_path, with_val, mode):
    out = str(tmp_path / "run")
    ok(train(2, out, with_val, *RISING, "train.steps=60", mode))
    s = summary(out)
    ckpt = os.path.join(out, "checkpoints", f"ckpt-{s['best_step']:09d}.h5")
    np.testing.assert_array_equal(h5_params(os.path.join(out, "best.h5")), h5_params(ckpt))


def test_a_metric_the_file_lacks_is_one_line_and_no_test_split_no_score(tmp_path, synth, with_val):
    r = train(2, str(tmp_path / "a"), synth, "train.steps=2", "train.early_stop.patience=1")
    needle = (f"train.early_stop.metric = 'val_loss' (train.early_stop): {synth} has no val/ split "
              "(prepare --validation-fraction writes one)")
    assert r.returncode != 0 and len(r.error_lines()) == 1 and needle in r.error_lines()[0], r.stderr
    assert not os.path.exists(tmp_path / "a" / "summary.json")
    r = train(1, str(tmp_path / "b"), with_val, "train.steps=2", "train.keep_best=true",
              "train.early_stop.metric=test_accuracy")
    assert r.returncode != 0 and len(r.error_lines()) == 1 and "never steers training" in r.error_lines()[0]
    none = str(tmp_path / "none.h5")
    prepare("synthetic", none, samples=100, features=4, classes=2, test_fraction=0, validation_fraction=0.2)
    r = ok(train(1, str(tmp_path / "c"), none, "train.steps=6", "train.global_batch=8", "train.eval_every=1",
                 "train.keep_best=true", "train.early_stop.metric=val_accuracy"))  # mode auto: max
    s, val = summary(str(tmp_path / "c")), [(r["val_accuracy"], -r["step"]) for r in records(str(tmp_path / "c"))
                                            if "val_accuracy" in r]
    assert s["test_accuracy"] is None and s["val_accuracy"] == val[-1][0]
    assert (s["best_val_accuracy"], -s["best_step"]) == max(val)  # the first step of the highest accuracy
    r = mpirun(2, "eval", "--model", tmp_path / "c" / "best.h5", "--data", none)
    assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {none}: no test rows to score"], r.stderr


def test_early_stop_settings_are_checked():
    from mpitrain.config import load

    with pytest.raises(MpitrainError, match=r"^train.early_stop.metric = 'val_acc': expected one of val_loss, "):
        load(overrides=["train.early_stop.metric=val_acc", "train.early_stop.patience=3"], command="train")
    with pytest.raises(MpitrainError, match="train.early_stop.metric has no effect: train.early_stop.patience = 0 "
                                            "and train.keep_best = false"):
        load(overrides=["train.early_stop.metric=val_accuracy"], command="train")
    with pytest.raises(MpitrainError, match="train.keep_best has no effect: federate runs fed.rounds rounds"):
        load(overrides=["train.keep_best=true"], command="federate")
    e = load(overrides={"train.early_stop.patience": 2, "train.early_stop.mode": "max"}, command="train").train
    assert (e.early_stop.patience, e.early_stop.mode) == (2, "max")
