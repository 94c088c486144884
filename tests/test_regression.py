"""Regression end to end: prepare (diabetes, csv --target, float y), training on 1 and 2 ranks, the metrics
in the targets' original units (train, eval, predict) against scikit-learn, and the one-line refusals."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

import mpitrain
from conftest import mpirun, params, summary
from mpitrain.data.prepare import prepare
from mpitrain.data.shard import DataFile
from mpitrain.errors import MpitrainError

# the documented example (docs/data.md): an MLP of 16 tanh units, Adam, 300 steps of 32 samples
MLP = ["model.kind=mlp", "model.hidden=[16]", "model.activation=tanh", "train.optimizer=adam", "train.lr=0.01",
       "train.global_batch=32", "train.steps=300"]


def _train(n, out, data, *sets):
    args = ["train", "--quiet", "--out", out, "--data", data]
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args)
    assert r.returncode == 0, r.stderr
    return summary(out)


def _eval(n, model, data):
    r = mpirun(n, "eval", "--model", model, "--data", data)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _split(path, split="test"):
    """(x, y) of a split as stored, y restored to the targets' units with the file's target/mean, std."""
    with h5py.File(path, "r") as f:
        return f[f"{split}/x"][...], f[f"{split}/y"][...] * f["target/std"][...] + f["target/mean"][...]


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    """(data file, run folder) of the documented example, trained on 2 ranks."""
    root = tmp_path_factory.mktemp("diabetes")
    data, out = str(root / "diabetes.h5"), str(root / "run")
    prepare("diabetes", data)
    _train(2, out, data, *MLP)
    return data, out


def test_diabetes_beats_linear_regression_in_original_units(diabetes):
    data, out = diabetes
    with h5py.File(data, "r") as f:
        assert f.attrs["task"] == "regress" and f.attrs["n_targets"] == 1 and "n_classes" not in f.attrs
        assert f["train/y"].shape == (354, 1) and f["train/y"].dtype == np.float32 and len(f["test/y"]) == 88
        assert abs(f["train/y"][...].mean()) < 1e-5 and abs(f["train/y"][...].std() - 1) < 1e-5
        ols = LinearRegression().fit(f["train/x"][...], f["train/y"][...])  # on the standardised targets
        ols = ols.predict(f["test/x"][...]) * f["target/std"][...] + f["target/mean"][...]
    x_test, y_test = _split(data)
    s = summary(out)
    assert "test_accuracy" not in s and "train_accuracy" not in s
    assert s["test_r2"] >= r2_score(y_test, ols), (s["test_r2"], r2_score(y_test, ols))  # 0.387 ≥ 0.369
    assert s["test_rmse"] < 60  # in the target's units (its std: 77)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        tests = [r for r in map(json.loads, f) if "test_loss" in r]
    assert tests[-1]["test_r2"] == s["test_r2"] and tests[-1]["test_rmse"] == s["test_rmse"]
    # eval and predict undo the target standardisation as training's evaluation does
    e = _eval(2, os.path.join(out, "model.h5"), data)
    assert set(e) == {"split", "samples", "loss", "rmse", "r2"} and e["samples"] == 88
    assert np.allclose([e["loss"], e["rmse"], e["r2"]], [s["test_loss"], s["test_rmse"], s["test_r2"]], rtol=1e-6)
    model = mpitrain.load_model(os.path.join(out, "model.h5"))
    pred = model.predict(x_test, standardized=True)
    assert pred.shape == (88, 1) and abs(r2_score(y_test, pred) - s["test_r2"]) < 1e-6
    assert abs(np.sqrt(np.mean((pred - y_test) ** 2)) - s["test_rmse"]) < 1e-4
    with h5py.File(data, "r") as f:  # raw rows, as prepare read them: the same predictions
        raw = x_test * f["standardize/std"][...] + f["standardize/mean"][...]
    assert np.allclose(model.predict(raw), pred, rtol=1e-4)
    with pytest.raises(MpitrainError, match=r"predict_proba: .*model.h5 is a regression model \(1 target\(s\)\), "
                                            r"without class probabilities; predict gives its targets"):
        model.predict_proba(raw)


def test_one_rank_equals_two_ranks_in_memory_and_streamed(tmp_path, diabetes):
    """A stream window holds a whole stratum here (block_rows 16 ≥ 354/32 rows), so the streamed run visits the
    in-memory plan bit for bit: its reader's float targets arrive as stored."""
    data = diabetes[0]
    few = MLP[:-1] + ["train.steps=60"]
    one, two, stream = (str(tmp_path / k) for k in ("one", "two", "stream"))
    s1, s2 = _train(1, one, data, *few), _train(2, two, data, *few)
    s3 = _train(2, stream, data, *few, "data.stream=true", "data.block_rows=16")
    assert s3["data_stream"] and not s2["data_stream"]
    ref = params(one)
    assert np.max(np.abs(ref - params(two))) <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(params(two), params(stream))
    for key in ("test_loss", "test_rmse", "test_r2", "train_loss"):
        assert abs(s1[key] - s2[key]) <= 1e-5 * abs(s1[key]), key
    bad = str(tmp_path / "bad.h5")
    shutil.copy(data, bad)
    with h5py.File(bad, "r+") as f:
        f["train/y"][300, 0] = np.nan  # rank 1's strata (rows 177…353)
    r = mpirun(2, "train", "--quiet", "--out", tmp_path / "stopped", "--data", bad,
               *[a for s in few + ["data.stream=true", "data.block_rows=16"] for a in ("--set", s)])
    assert r.returncode == 2 and len(r.error_lines()) == 1, r.stderr
    assert "(rank 1): targets contain NaN or Inf (first at row 300)" in r.error_lines()[0]
    with pytest.raises(MpitrainError, match=r"train rows 0\.\.353 \(rank 0\): targets contain NaN or Inf "
                                            r"\(first at row 300\)"):
        DataFile(bad).read("train", 0, 354, 0)


def test_csv_targets_by_name_and_index_and_eval_on_a_file_prepared_apart(tmp_path, diabetes):
    """Two targets of different scales (disease progression, std 77; blood pressure, column 4, std 14) from
    the other 9 columns; R² pools them as scikit-learn's variance_weighted does, in their units."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    table = np.column_stack([d.data[:, :3], d.target, d.data[:, 3:]])
    path = tmp_path / "diabetes.csv"
    names = ["age", "sex", "bmi", "progression", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    np.savetxt(path, table, delimiter=",", header=",".join(names), comments="", fmt="%.6g")
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    r = mpirun(1, "prepare", "--source", f"csv:{path}", "--target", "progression,4", "--out", a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{a}: 354 train + 88 test samples, 9 features (9,), 2 target(s) (regression), " \
                               f"from csv:{path}"
    prepare(f"csv:{path}", b, seed=1, target="progression,4")  # another split: other target statistics
    with h5py.File(a, "r") as f:
        assert f.attrs["n_targets"] == 2 and f["train/y"].shape == (354, 2) and f["train/x"].shape == (354, 9)
        assert np.allclose(f["train/y"][...].std(axis=0), 1, atol=1e-5)
    x, y = _split(a, "train")
    assert np.allclose(np.sort(np.concatenate([y, _split(a)[1]]), axis=0), np.sort(table[:, [3, 4]], axis=0),
                       rtol=1e-5)
    out = str(tmp_path / "run")
    s = _train(2, out, a, *MLP[:-1], "train.steps=100")
    model = mpitrain.load_model(os.path.join(out, "model.h5"))
    for data in (a, b):  # b: restored with its statistics, standardised with the model's
        with h5py.File(data, "r") as f:
            raw = f["test/x"][...] * f["standardize/std"][...] + f["standardize/mean"][...]
        y_test = _split(data)[1]
        pred = model.predict(raw)
        e = _eval(2, os.path.join(out, "model.h5"), data)
        assert abs(e["r2"] - r2_score(y_test, pred, multioutput="variance_weighted")) < 1e-5, data
        assert abs(e["rmse"] - np.sqrt(np.mean((pred - y_test) ** 2))) < 1e-4 * e["rmse"], data
    assert abs(e["r2"] - s["test_r2"]) > 1e-3  # b's test split is another
    assert np.allclose(_eval(1, os.path.join(out, "model.h5"), a)["r2"], s["test_r2"], rtol=1e-6)


def test_regression_refusals_are_one_line(tmp_path, synth, diabetes):
    out = str(tmp_path / "o.h5")
    csv, text = tmp_path / "t.csv", tmp_path / "text.csv"
    csv.write_text("a,b,t\n1,2,3\n4,5,6\n7,8,9\n1,1,1\n", encoding="utf-8")
    text.write_text("a,b,t\n1,2,3\n4,5,x\n7,8,9\n1,1,1\n", encoding="utf-8")
    np.savez(tmp_path / "f.npz", x=np.zeros((6, 2)), y=np.array([0, 1, np.nan, 3, 4, 5]))
    np.savez(tmp_path / "g.npz", x=np.zeros((6, 2)), y=np.zeros((6, 2, 2)))
    for source, kw, message in (
            ("diabetes", dict(classes=3), r"--classes: diabetes holds regression targets \(float y\), not class "
                                          r"labels \(integers\)"),
            (f"csv:{csv}", dict(target="t", classes=3), r"--classes: .* holds regression targets \(--target\)"),
            (f"npz:{tmp_path / 'f.npz'}", dict(target="0"), r"--target: only for a csv:PATH source"),
            (f"csv:{text}", dict(target="t"), r"text.csv: line 3, column 3 \(t\) is not a number; expected a number"),
            (f"csv:{csv}", dict(target="z"), r"t.csv: no column named 'z' \(columns: a, b, t\)"),
            (f"csv:{csv}", dict(target="3"), r"t.csv: target column 3 is out of range for 3 columns"),
            (f"csv:{csv}", dict(target="a,0"), r"--target a,0: names a column of .*t.csv twice"),
            (f"csv:{csv}", dict(target="a,b,t"), r"--target a,b,t: every column of .*t.csv is a target"),
            (f"csv:{csv}", dict(target="t", label_column="a"), r"--target with --label-column: a csv source has"),
            (f"npz:{tmp_path / 'f.npz'}", {}, r"f.npz y: targets must be finite"),
            (f"npz:{tmp_path / 'g.npz'}", {}, r"g.npz y: expected 6 float targets, shape \(6,\) or \(6, targets\), "
                                              r"got shape \(6, 2, 2\)"),
            ("diabetes", dict(partition={"scheme": "iid", "clients": 2}),
             r"--partition: not for diabetes \(task = 'regress'\): federated partitions hold class labels")):
        with pytest.raises(MpitrainError, match=message):
            prepare(source, out, **kw)
        assert not os.path.exists(out)
    r = mpirun(1, "prepare", "--source", "digits", "--target", "0", "--out", out)
    assert r.returncode == 2 and r.error_lines() == [
        "mpitrain: error: --target: only for a csv:PATH source (npz and npy sources give float y for regression), "
        "not 'digits'"]
    # classification targets on a regression model and the reverse
    data, run = diabetes
    classifier = str(tmp_path / "c")
    _train(1, classifier, synth, "train.steps=2")
    for model, file, line in (
            (os.path.join(run, "model.h5"), synth, "a regression model (1 target(s)) scores float regression "
                                                    f"targets; {synth} holds class labels"),
            (os.path.join(classifier, "model.h5"), data, "a classification model (4 classes) scores class labels; "
                                                         f"{data} holds float regression targets")):
        r = mpirun(2, "eval", "--model", model, "--data", file)
        assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {model}: {line}"], r.stderr
