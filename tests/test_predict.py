"""Using a model: class names from string labels (prepare → model.h5), `predict` (its CSV is the API's
predict), eval's per-class metrics and confusion matrix (1 rank ≡ 2 ranks), and one line for bad input."""
import csv
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import mpirun
from mpitrain.data.prepare import prepare
from mpitrain.errors import MpitrainError

NAMES = ("cat", "dog", "emu")


def _animals(n, seed):
    """Raw samples (unstandardised: far from 0 and 1) whose label is the largest of their first 3 features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)) * 2 + 5
    return x, np.array(NAMES)[np.argmax(x[:, :3], axis=1)]


def _csv(path, x, y, header=True):
    with open(path, "w", encoding="utf-8") as f:
        f.write("f1,f2,f3,f4,animal\n" if header else "")
        f.writelines(",".join(map(str, r)) + f",{n}\n" for r, n in zip(x, y))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data file, model.h5) of a softmax trained briefly on a CSV whose labels are names."""
    d = tmp_path_factory.mktemp("animals")
    prepare("csv:" + _csv(d / "a.csv", *_animals(300, 0)), str(d / "a.h5"))
    r = mpirun(1, "train", "--data", d / "a.h5", "--out", d / "run", "--set", "model.kind=softmax",
               "--set", "train.steps=40", "--quiet")
    assert r.returncode == 0, r.stderr
    return str(d / "a.h5"), str(d / "run" / "model.h5")


def test_string_labels_become_sorted_classes(tmp_path):
    x, y = _animals(40, 1)
    y[:3] = ["emu", "cat", "dog"]  # every class in the headerless file's first rows
    files = {"header": _csv(tmp_path / "h.csv", x, y), "no header": _csv(tmp_path / "n.csv", x, y, header=False)}
    np.savez(tmp_path / "u.npz", x=x, y=y)
    files["npz"] = str(tmp_path / "u.npz")
    for what, path in files.items():
        out = str(tmp_path / (what + ".h5"))
        prepare(("npz:" if what == "npz" else "csv:") + path, out, test_fraction=0.25)
        with h5py.File(out, "r") as f:
            assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["class_names"]] == list(NAMES)
            assert f.attrs["n_classes"] == 3 and f["train/x"].shape == (30, 4), what
            labels = np.concatenate([f["train/y"][...], f["test/y"][...]])
        assert sorted(np.array(NAMES)[labels]) == sorted(y), what  # every row kept, named as given
    np.savez(tmp_path / "o.npz", x=x, y=y.astype(object))
    with pytest.raises(MpitrainError, match="cannot read as .npz"):  # never unpickled
        prepare("npz:" + str(tmp_path / "o.npz"), str(tmp_path / "o.h5"))
    with pytest.raises(MpitrainError, match="--classes: not for"):
        prepare("npz:" + files["npz"], str(tmp_path / "c.h5"), classes=3)
    y[5] = "7"  # a number among names (or a name among numbers) is a typo, not a class of its own
    with pytest.raises(MpitrainError, match=r"n.csv: line 6, column 5 is a number; expected a label"):
        prepare("csv:" + _csv(tmp_path / "n.csv", x, y, header=False), str(tmp_path / "t.h5"))


def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_predict_csv_equals_the_api(run, tmp_path):
    import mpitrain

    data, model_h5 = run
    with h5py.File(model_h5, "r") as f:  # carried from the data file by train
        assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["class_names"]] == list(NAMES)
    x, _ = _animals(25, 7)
    np.savez(tmp_path / "new.npz", x=x)
    r = mpirun(2, "predict", "--model", model_h5, "--input", tmp_path / "new.npz", "--output", tmp_path / "p.csv",
               "--top", 2, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "p.csv")
    assert rows[0] == ["row", "class", "class_1", "p_1", "class_2", "p_2"] and len(rows) == 26
    model = mpitrain.load_model(model_h5)
    proba = model.predict_proba(x)
    assert model.class_names == list(NAMES)
    assert [r[1] for r in rows[1:]] == [NAMES[k] for k in model.predict(x)]
    assert [r[2] for r in rows[1:]] == [r[1] for r in rows[1:]]
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], proba.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose([float(r[5]) for r in rows[1:]], np.sort(proba, axis=1)[:, -2], rtol=1e-5)
    # a data file: its test rows, standardised as prepare stored them
    r = mpirun(1, "predict", "--model", model_h5, "--input", data, "--output", tmp_path / "t.csv", timeout=120)
    assert r.returncode == 0, r.stderr
    with h5py.File(data, "r") as f:
        expected = model.predict(f["test/x"][...], standardized=True)
    assert [r[1] for r in _rows(tmp_path / "t.csv")[1:]] == [NAMES[k] for k in expected]
    # without --output: a short table on stdout
    r = mpirun(1, "predict", "--model", model_h5, "--input", tmp_path / "new.npz", timeout=120)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["row", "class"], r.stderr
    assert "… 5 more rows" in r.stdout


def test_predict_image_folder(tmp_path):
    """A folder of images, read as prepare reads them, predicted as the API predicts their pixels."""
    import mpitrain
    from mpitrain.checkpoint import save_model
    from mpitrain.model import Model, ModelSpec

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    for i, a in enumerate(pixels):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    spec = ModelSpec(kind="softmax", n_in=60, n_out=2, feature_shape=(3, 4, 5))
    save_model(str(tmp_path / "model.h5"), spec, Model(spec).init_params(1),
               (np.full(3, 100, np.float32), np.full(3, 50, np.float32)),
               class_names=np.array(["left", "right"], dtype=h5py.string_dtype()))
    out = tmp_path / "p.csv"
    r = mpirun(1, "predict", "--model", tmp_path / "model.h5", "--input", tmp_path, "--output", out, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert rows[0] == ["row", "file", "class"] and [r[1] for r in rows[1:]] == ["0.png", "1.png", "2.png"]
    expected = mpitrain.load_model(str(tmp_path / "model.h5")).predict(pixels, layout="nhwc")
    assert [r[2] for r in rows[1:]] == [["left", "right"][k] for k in expected]
    tree = tmp_path / "tree"  # images:DIR's layout: class folders
    for i, cls in enumerate(("b", "a", "a")):
        (tree / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(tree / cls / f"{i}.png")
    r = mpirun(1, "predict", "--model", tmp_path / "model.h5", "--input", tree, "--output", out, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [r[1:] for r in _rows(out)[1:]] == [["a/1.png", rows[2][2]], ["a/2.png", rows[3][2]],
                                               ["b/0.png", rows[1][2]]]


def _eval(n, model_h5, data, *more):
    r = mpirun(n, "eval", "--model", model_h5, "--data", data, *more, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_eval_per_class_and_confusion(run, tmp_path):
    import mpitrain

    data, model_h5 = run
    one = _eval(1, model_h5, data)
    two = _eval(2, model_h5, data, "--plot", tmp_path / "cm.png")  # the matrix summed over 2 ranks
    assert one.pop("loss") == pytest.approx(two.pop("loss"), rel=1e-12)  # summed in another order
    assert one == two and one["classes"] == list(NAMES)
    with h5py.File(data, "r") as f:
        y = f["test/y"][...]
        pred = mpitrain.load_model(model_h5).predict(f["test/x"][...], standardized=True)
    counts = np.zeros((3, 3), np.int64)
    np.add.at(counts, (y, pred), 1)
    assert one["confusion"] == counts.tolist() and one["accuracy"] == pytest.approx(np.trace(counts) / len(y))
    dog = one["per_class"]["dog"]
    assert dog["support"] == counts[1].sum()
    assert dog["precision"] == pytest.approx(counts[1, 1] / counts[:, 1].sum())
    assert dog["recall"] == pytest.approx(counts[1, 1] / counts[1].sum())
    with open(tmp_path / "cm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_speaks_in_names(run, tmp_path):
    """A file prepared apart, with fewer classes, is scored in the model's; a class the model lacks: one line."""
    data, model_h5 = run
    x, y = _animals(60, 3)
    keep = y != "cat"
    prepare("csv:" + _csv(tmp_path / "two.csv", x[keep], y[keep]), str(tmp_path / "two.h5"))
    got = _eval(2, model_h5, str(tmp_path / "two.h5"))
    assert got["per_class"]["cat"]["support"] == 0 and got["per_class"]["dog"]["support"] > 0
    y[y == "cat"] = "fox"
    prepare("csv:" + _csv(tmp_path / "fox.csv", x, y), str(tmp_path / "fox.h5"))
    r = mpirun(2, "eval", "--model", model_h5, "--data", tmp_path / "fox.h5", timeout=120)
    assert r.returncode != 0 and len(r.error_lines()) == 1, r.stderr
    assert "class 'fox' is not one of the classes of" in r.stderr


@pytest.mark.parametrize("args, message", [
    (("--top", "4"), "--top 4: expected 1…3"),
    (("--split", "val"), "no val/ split"),
    (("--layout", "nhwc"), "--layout: only for an .npz --input"),
])
def test_predict_refusals(run, args, message):
    data, model_h5 = run
    r = mpirun(2, "predict", "--model", model_h5, "--input", data, *args, timeout=120)
    assert r.returncode != 0 and len(r.error_lines()) == 1 and message in r.stderr, r.stderr
