"""`prepare` writes the documented HDF5 layout; each rank reads only its own hyperslab."""
import hashlib
import os

import h5py
import numpy as np
import pytest

from conftest import mpirun
from mpitrain.data.prepare import prepare
from mpitrain.errors import MpitrainError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout(path):
    with h5py.File(path, "r") as f:
        for key in ("train/x", "test/x"):
            assert f[key].dtype == np.float32 and f[key].chunks[1] == f[key].shape[1]
            assert f[key].chunks[0] <= f[key].shape[0]
        assert f["train/y"].dtype == np.int64 and f["test/y"].dtype == np.int64
        arrays = {k: f[k][...] for k in ("train/x", "train/y", "test/x", "test/y")}
        attrs = dict(f.attrs)
        mean, std = f["standardize/mean"][...], f["standardize/std"][...]
    digest = hashlib.sha256()
    for k in ("train/x", "train/y", "test/x", "test/y"):
        digest.update(arrays[k].tobytes())
    assert attrs["checksum"] == digest.hexdigest()
    return arrays, attrs, mean, std


def test_prepare_digits_layout(tmp_path):
    path = str(tmp_path / "d.h5")
    r = mpirun(2, "prepare", "--source", "digits", "--out", path, "--test-fraction", "0.25", "--seed", "1")
    assert r.returncode == 0, r.stderr
    a, attrs, mean, std = _layout(path)
    assert len(a["train/x"]) + len(a["test/x"]) == 1797 and len(a["test/x"]) == 449
    assert a["train/x"].shape[1] == 64 and list(attrs["feature_shape"]) == [1, 8, 8]
    assert attrs["n_classes"] == 10 and attrs["source"] == "digits"
    # standardised with training statistics only: train columns have mean 0 and std 1 (or are constant)
    assert np.allclose(a["train/x"].mean(axis=0), 0, atol=1e-5)
    assert np.all((np.abs(a["train/x"].std(axis=0) - 1) < 1e-4) | (std == 1))
    assert not np.allclose(a["test/x"].mean(axis=0), 0, atol=1e-5)
    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(np.float32)
    restored = np.concatenate([a["train/x"], a["test/x"]]) * std + mean
    assert np.allclose(np.sort(restored.sum(axis=1)), np.sort(raw.sum(axis=1)), atol=1e-2)


def test_prepare_is_seeded(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare("synthetic", str(tmp_path / f"{name}.h5"), samples=300, features=5, classes=3, seed=seed)
    sums = [h5py.File(tmp_path / f"{n}.h5", "r").attrs["checksum"] for n in "abc"]
    assert sums[0] == sums[1] != sums[2]


def test_synthetic_is_learnable(tmp_path):
    """A softmax model on the synthetic task beats chance by far."""
    path = str(tmp_path / "s.h5")
    prepare("synthetic", path, samples=3000, features=10, classes=3)
    r = mpirun(2, "train", "--quiet", "--out", tmp_path / "o", "--set", f"data.path={path}",
               "--set", "model.hidden=[32]", "--set", "train.epochs=20")
    assert r.returncode == 0, r.stderr
    import json

    assert json.load(open(tmp_path / "o" / "summary.json"))["test_accuracy"] > 0.8


def test_prepare_npz_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 2, 3)), rng.integers(0, 3, 50)
    xt, yt = rng.standard_normal((10, 2, 3)), rng.integers(0, 3, 10)
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=xt, y_test=yt)
    prepare("npz:" + str(tmp_path / "a.npz"), str(tmp_path / "a.h5"))
    a, attrs, mean, std = _layout(str(tmp_path / "a.h5"))
    assert a["train/x"].shape == (50, 6) and a["test/x"].shape == (10, 6) and list(attrs["feature_shape"]) == [2, 3]
    assert np.allclose(np.sort(a["test/x"] * std + mean, axis=0), np.sort(xt.reshape(10, 6), axis=0), atol=1e-5)

    table = np.column_stack([rng.integers(0, 4, 40), rng.standard_normal((40, 3))])
    with open(tmp_path / "t.csv", "w") as f:
        f.write("label,a,b,c\n")
        np.savetxt(f, table, delimiter=",")
    prepare("csv:" + str(tmp_path / "t.csv"), str(tmp_path / "t.h5"), label_column="label", test_fraction=0.25)
    a, attrs, _, _ = _layout(str(tmp_path / "t.h5"))
    assert a["train/x"].shape == (30, 3) and len(a["test/y"]) == 10
    assert sorted(np.concatenate([a["train/y"], a["test/y"]])) == sorted(table[:, 0].astype(int))


def test_prepare_rejects_bad_sources(tmp_path):
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((5, 2)))
    np.savez(tmp_path / "nan.npz", x=np.full((5, 2), np.nan), y=np.zeros(5))
    np.savez(tmp_path / "neg.npz", x=np.zeros((5, 2)), y=-np.ones(5, np.int64))  # float y: regression targets
    for source, message in (("npz:" + str(tmp_path / "nolabels.npz"), "missing array(s) y"),
                            ("npz:" + str(tmp_path / "nan.npz"), "features must be finite"),
                            ("npz:" + str(tmp_path / "neg.npz"), "labels must be integers ≥ 0"),
                            ("csv:" + str(tmp_path / "none.csv"), "cannot read"),
                            ("imagenet", "expected one of")):
        with pytest.raises(MpitrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
            prepare(source, str(tmp_path / "out.h5"))
    assert not os.path.exists(tmp_path / "out.h5")


def test_each_rank_reads_only_its_hyperslab(tmp_path):
    """On a 160 MB training set, 4 ranks each grow by about a quarter of it, and their rows tile it."""
    path = str(tmp_path / "big.h5")
    n, d = 160_000, 256
    with h5py.File(path, "w") as f:
        x = f.create_dataset("train/x", (n, d), np.float32, chunks=(1024, d))
        for i in range(0, n, 32_000):
            x[i:i + 32_000] = 1.0
        f["train/y"] = np.zeros(n, np.int64)
        f["test/x"] = np.zeros((10, d), np.float32)
        f["test/y"] = np.zeros(10, np.int64)
        f.attrs["n_classes"] = 2
    r = mpirun(4, os.path.join(ROOT, "tests", "mpi_probe.py"), "memory", path, module=False)
    assert r.returncode == 0, r.stderr
    rows = sorted(tuple(map(int, line.split())) for line in r.stdout.split("\n") if line.strip())
    assert [row[0] for row in rows] == [0, 1, 2, 3]
    assert rows[0][1] == 0 and rows[-1][2] == n
    assert all(a[2] == b[1] for a, b in zip(rows, rows[1:]))
    total = n * d * 4
    for rank, lo, hi, growth in rows:
        assert hi - lo == n // 4
        assert growth < 0.45 * total, f"rank {rank} grew by {growth / 1e6:.0f} MB of a {total / 1e6:.0f} MB set"


def _write(path, text, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:  # newline="": keep \r\n as written
        f.write(text)
    return str(path)


LABELLED = [[1, 0.5, -2.0], [0, 1.5, 3.0], [2, -1.0, 4.0]]  # label, a, b


@pytest.mark.parametrize("text, label_column", [
    ("\ufeff1,0.5,-2\n0,1.5,3\n2,-1,4\n", "0"),                      # BOM, no header: 3 data rows
    ("\ufefflabel,a,b\n1,0.5,-2\n0,1.5,3\n2,-1,4\n", "label"),       # BOM before a header name
    ('"label","a","b"\n"1","0.5","-2"\n"0","1.5","3"\n"2","-1","4"\n', "label"),  # R's write.csv
    ('"", "label", "a", "b"\n"1", 1, 0.5, -2\n"2", 0, 1.5, 3\n"3", 2, -1, 4\n', "label"),  # + row names
    ("label,a,b\r\n1,0.5,-2\r\n0,1.5,3\r\n2,-1,4\r\n", "label"),     # CRLF
    (" label , a ,b\n 1 , 0.5 ,-2\n0,  1.5, \"3\" \n2, \"-1\",4\n", "label"),  # spaces around cells
    ("label,a,b\n1,0.5,-2\n0,1.5,3\n2,-1,4\n\n  \n\r\n", "label"),   # blank trailing lines
    ("\n1,0.5,-2\n0,1.5,3\n\n2,-1,4", "0"),                          # blank lines, no final newline
])
def test_csv_dialects(tmp_path, text, label_column):
    from mpitrain.data.prepare import load_source

    x, y, _, _ = load_source("csv:" + _write(tmp_path / "t.csv", text), label_column=label_column)
    table = np.array(LABELLED)
    if x.shape[1] == 3:  # the row-names column is a feature like any other
        x = x[:, 1:]
    assert np.array_equal(y, table[:, 0]) and np.array_equal(x, table[:, 1:])


@pytest.mark.parametrize("text, label, message", [
    ("label,a,b\n1,0.5,-2\n0,secret,3\n", "label", r"t.csv: line 3, column 2 \(a\) is not a number"),
    ("1,0.5,-2\n0,1.5,secret\n", None, r"t.csv: line 2, column 3 is not a number"),
    ('label,a,b\n1,0.5,-2\n0,"secret value",3\n', "label", r"t.csv: line 3, column 2 \(a\) is not a number"),
    ("label,a,b\n1,,-2\n", "label", r"t.csv: line 2, column 2 \(a\) is empty; expected a number"),
    ("label,a,b\n1,0.5,-2\n0,1.5\n", "label", r"t.csv: line 3 has 2 columns; expected 3"),
    ("label,a,b\n1,0.5,-2\n0,1.5,3,4\n", "label", r"t.csv: line 3 has 4 columns; expected 3"),
    ("label,a,b\n1,0.5\n0,1.5\n", "label", r"t.csv: line 2 has 2 columns; expected 3"),
    ("label,a,b\n1,0.5,-2\n\n  \n0,1.5,3,\n", "label", r"t.csv: line 5 has 4 columns; expected 3"),
    ("", None, r"t.csv: empty file"),
    ("\n \n", None, r"t.csv: empty file"),
    ("label,a,b\n", "label", r"t.csv: a header row but no data rows"),
    ("label\n1\n0\n", "label", r"t.csv: 1 column; expected a label column and at least one feature column"),
    ("3\n1\n0\n", None, r"t.csv: 1 column; expected a label column and at least one feature column"),
    ("1,0.5\n0,1.5\n", "label",
     r"t.csv: no column named 'label' \(no header row, so --label-column must be a column index, 0…1\)"),
    ("label,a,label\n1,0.5,0\n", "label", r"t.csv: column name 'label' appears 2 times in the header"),
    ("label,a,b\n1,0.5,-2\n", "3", r"t.csv: label column 3 is out of range for 3 columns"),
    ("label,a\n1,2\n0," + "x" * 200_000 + "\n", "label", r"t.csv: line 3: field larger than field limit"),
])
def test_csv_errors_name_line_and_column(tmp_path, text, label, message):
    """Bad cells are located by line (1-based, as an editor shows it) and column, never echoed."""
    path = _write(tmp_path / "t.csv", text)
    with pytest.raises(MpitrainError, match=message) as info:
        prepare("csv:" + path, str(tmp_path / "t.h5"), label_column=label)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "t.h5")


def test_csv_not_utf8(tmp_path):
    path = _write(tmp_path / "t.csv", "label,a\n1,0.5\n0,\xe9\n", encoding="latin-1")
    with pytest.raises(MpitrainError, match=r"t.csv: not UTF-8 text"):
        prepare("csv:" + path, str(tmp_path / "t.h5"), label_column="label")


def test_csv_common_exports_take_the_fast_path(tmp_path, monkeypatch):
    """Excel (BOM, CRLF), R (quoted header and row names) and pandas (unnamed index) files are parsed by
    np.loadtxt; the cell-by-cell reader (about 2× slower on 50k × 100) is left for odd files."""
    from mpitrain.data import prepare as module

    def slow(*args):
        raise AssertionError("cell-by-cell reader used")

    monkeypatch.setattr(module, "_csv_table", slow)
    rng = np.random.default_rng(0)
    table = np.column_stack([rng.integers(0, 10, 2000), rng.standard_normal((2000, 20))])
    body = "\n".join(",".join(f"{v:.8g}" for v in row) for row in table)
    header = ",".join(["label"] + [f"f{i}" for i in range(20)])
    quoted = ",".join(f'"{name}"' for name in ['""', "label"] + [f"f{i}" for i in range(20)])
    for text in ("\ufeff" + header + "\r\n" + body.replace("\n", "\r\n") + "\r\n",
                 quoted + "\n" + "\n".join(f'"{i + 1}",{line}' for i, line in enumerate(body.split("\n"))),
                 "," + header + "\n" + "\n".join(f"{i},{line}" for i, line in enumerate(body.split("\n")))):
        x, y, _, _ = module.load_source("csv:" + _write(tmp_path / "t.csv", text), label_column="label")
        assert np.array_equal(y, table[:, 0]) and np.allclose(x[:, -20:], table[:, 1:], rtol=1e-7)
    assert x.shape == (2000, 21) and np.array_equal(x[:, 0], np.arange(2000))


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((5, 0)), y=np.zeros(5)), r"x: shape \(5, 0\) has no features"),
    (dict(x=np.zeros((5, 3, 0)), y=np.zeros(5)), r"x: shape \(5, 3, 0\) has no features"),
    (dict(x=np.zeros((0, 3)), y=np.zeros(0)), r"x: shape \(0, 3\) has no samples"),
    (dict(x=np.zeros(5), y=np.zeros(5)), r"x: expected samples × features .*got shape \(5,\)"),
    (dict(x=np.float64(1.0), y=np.zeros(1)), r"x: expected samples × features .*got shape \(\)"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5), x_test=np.zeros((0, 2)), y_test=np.zeros(0)),
     r"x_test: shape \(0, 2\) has no samples"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5), x_test=np.zeros((3, 0)), y_test=np.zeros(3)),
     r"x_test: shape \(3, 0\) has no features"),
    (dict(x=np.zeros((5, 2)), y=np.zeros((5, 1), int)), r"y: expected 5 labels \(one per sample\), got shape \(5, 1\)"),
    (dict(x=np.zeros((5, 2)), y=np.array(list("abcde"), "S")),  # bytes; a unicode y names classes
     r"y: labels must be integers or class names \(a unicode array\), got dtype \|S1"),
    (dict(x=np.zeros((5, 2), complex), y=np.zeros(5)), r"x: features must be real numbers, got dtype complex128"),
    (dict(x=np.zeros((5, 2), "m8[s]"), y=np.zeros(5)), r"x: features must be real numbers, got dtype timedelta64"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5, complex)),
     r"y: labels must be integers or class names \(a unicode array\), got dtype complex128"),
])
def test_degenerate_npz_is_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(MpitrainError, match=message):
        prepare("npz:" + str(tmp_path / "a.npz"), str(tmp_path / "a.h5"))
    assert not os.path.exists(tmp_path / "a.h5")


def test_degenerate_sources_from_the_command_line(tmp_path):
    """Zero feature columns used to end in a ZeroDivisionError traceback (the chunk size)."""
    path = _write(tmp_path / "labels.csv", "label\n1\n0\n2\n1\n0\n")
    r = mpirun(1, "prepare", "--source", f"csv:{path}", "--out", tmp_path / "o.h5")
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: {path}: 1 column; expected a label column and at least one feature column"]


@pytest.mark.parametrize("arrays, message", [
    (dict(x_test=np.zeros((4, 3, 2)), y_test=np.zeros(4)),
     r"x_test samples have shape \(3, 2\), x samples \(2, 3\); expected the same"),
    (dict(x_test=np.zeros((4, 6)), y_test=np.zeros(4)), r"x_test samples have shape \(6,\), x samples \(2, 3\)"),
    (dict(x_test=np.zeros((4, 2, 4)), y_test=np.zeros(4)), r"x_test samples have shape \(2, 4\), x samples \(2, 3\)"),
    (dict(x_test=np.zeros((4, 2, 3)), y_test=np.zeros(5, int)), r"y_test: expected 4 labels \(one per sample\), got shape \(5,\)"),
    (dict(x_test=np.zeros((4, 2, 3)), y_test=np.full(4, 0.5)),
     r"y_test: dtype float64, but y is integer \(class labels\); expected the same kind"),
    (dict(x_test=np.zeros((4, 2, 3), complex), y_test=np.zeros(4)), r"x_test: features must be real numbers"),
    (dict(x_test=np.full((4, 2, 3), np.inf), y_test=np.zeros(4)), r"x_test: features must be finite"),
    (dict(x_test=np.zeros((4, 2, 3))), r"x_test and y_test must be given together"),
    (dict(x_tset=np.zeros((4, 2, 3)), y_test=np.zeros(4)), r"unknown array\(s\) x_tset; expected x, y"),
])
def test_npz_test_split_must_match(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", x=np.zeros((6, 2, 3)), y=np.arange(6) % 2, **arrays)
    with pytest.raises(MpitrainError, match=message):
        prepare("npz:" + str(tmp_path / "a.npz"), str(tmp_path / "a.h5"))


def test_requested_class_count_is_honoured(tmp_path):
    def n_classes(path):
        with h5py.File(path, "r") as f:
            return int(f.attrs["n_classes"])

    out = str(tmp_path / "o.h5")
    line = prepare("synthetic", out, samples=200, features=4, classes=40)
    assert n_classes(out) == 40 and "40 classes" in line
    np.savez(tmp_path / "a.npz", x=np.zeros((6, 2)), y=np.arange(6) % 3)
    npz = "npz:" + str(tmp_path / "a.npz")
    prepare(npz, out)
    assert n_classes(out) == 3  # no --classes: the largest label + 1
    prepare(npz, out, classes=5)
    assert n_classes(out) == 5
    for classes, message in ((2, r"a.npz y: 2 label\(s\) ≥ --classes 2; expected 0…1"),
                             (1, r"--classes 1: expected ≥ 2"), (0, r"--classes 0: expected ≥ 2")):
        with pytest.raises(MpitrainError, match=message):
            prepare(npz, out, classes=classes)
    np.savez(tmp_path / "t.npz", x=np.zeros((6, 2)), y=np.arange(6) % 3, x_test=np.zeros((2, 2)), y_test=[0, 4])
    with pytest.raises(MpitrainError, match=r"t.npz y_test: 1 label\(s\) ≥ --classes 3; expected 0…2"):
        prepare("npz:" + str(tmp_path / "t.npz"), out, classes=3)
    np.savez(tmp_path / "one.npz", x=np.zeros((6, 2)), y=np.zeros(6, int))
    with pytest.raises(MpitrainError, match=r"one.npz: every label is 0, so the file would have 1 class; "
                                            r"expected ≥ 2 \(or pass --classes\)"):
        prepare("npz:" + str(tmp_path / "one.npz"), out)
    _write(tmp_path / "one.csv", "label,a\n0,1\n0,2\n0,3\n")
    with pytest.raises(MpitrainError, match=r"every label is 0"):
        prepare("csv:" + str(tmp_path / "one.csv"), out, label_column="label")


def test_classes_on_the_command_line(tmp_path):
    """--classes defaults to None so that npz/csv count their labels; synthetic then gets 10."""
    out = tmp_path / "o.h5"
    r = mpirun(1, "prepare", "--source", "synthetic", "--samples", 300, "--features", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    assert h5py.File(out, "r").attrs["n_classes"] == 10
    path = _write(tmp_path / "t.csv", "label,a\n0,1\n1,2\n0,3\n1,4\n2,5\n")
    r = mpirun(1, "prepare", "--source", f"csv:{path}", "--label-column", "label", "--out", out)
    assert r.returncode == 0, r.stderr
    assert h5py.File(out, "r").attrs["n_classes"] == 3
    r = mpirun(1, "prepare", "--source", f"csv:{path}", "--label-column", "label", "--classes", 2, "--out", out)
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: csv:{path} y: 1 label(s) ≥ --classes 2; expected 0…1"]


def test_channels_last_images_are_stored_channels_first_from_every_source(tmp_path):
    """(N, H, W, C) with C in 1, 3, 4 (numpy/PIL/Keras) is moved to (C, H, W), said in a line, the same from
    npz:PATH, npz:DIR and npy:DIR; --layout decides otherwise or where the shape cannot."""
    rng = np.random.default_rng(0)
    x, xt = rng.integers(0, 256, (30, 6, 5, 3), np.uint8), rng.integers(0, 256, (6, 6, 5, 3), np.uint8)
    y, yt = np.arange(30) % 3, np.arange(6) % 3
    os.makedirs(tmp_path / "npy")
    os.makedirs(tmp_path / "npzs")
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=xt, y_test=yt)
    np.savez(tmp_path / "npzs" / "0.npz", x=x, y=y, x_test=xt, y_test=yt)
    for name, a in (("x", x), ("y", y), ("x_test", xt), ("y_test", yt)):
        np.save(tmp_path / "npy" / f"{name}.npy", a)
    sums = set()
    for source in (f"npz:{tmp_path / 'a.npz'}", f"npz:{tmp_path / 'npzs'}", f"npy:{tmp_path / 'npy'}"):
        lines = prepare(source, str(tmp_path / "o.h5")).splitlines()
        assert lines[0] == (f"layout: {source} x samples (6, 5, 3) channels last, stored as (3, 6, 5) "
                            f"(by the shape; --layout nchw if not)")
        a, attrs, mean, std = _layout(str(tmp_path / "o.h5"))
        assert list(attrs["feature_shape"]) == [3, 6, 5]
        np.testing.assert_allclose(a["test/x"] * std + mean, xt.transpose(0, 3, 1, 2).reshape(6, 90), atol=1e-3)
        sums.add(attrs["checksum"])
    assert len(sums) == 1
    npz = f"npz:{tmp_path / 'a.npz'}"
    line = prepare(npz, str(tmp_path / "o.h5"), layout="nchw").splitlines()[0]
    assert line == f"layout: {npz} x samples (6, 5, 3) channels first, stored as given"
    assert list(_layout(str(tmp_path / "o.h5"))[1]["feature_shape"]) == [6, 5, 3]
    np.savez(tmp_path / "b.npz", x=x.reshape(30, 30, 3), y=y)  # (L, C) signals: only --layout nhwc moves them
    assert prepare(f"npz:{tmp_path / 'b.npz'}", str(tmp_path / "b.h5")).startswith(f"{tmp_path / 'b.h5'}: ")
    assert list(_layout(str(tmp_path / "b.h5"))[1]["feature_shape"]) == [30, 3]
    prepare(f"npz:{tmp_path / 'b.npz'}", str(tmp_path / "b.h5"), layout="nhwc")
    assert list(_layout(str(tmp_path / "b.h5"))[1]["feature_shape"]) == [3, 30]
    np.savez(tmp_path / "c.npz", x=np.zeros((6, 3, 5, 4)), y=np.arange(6) % 2)
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 5)), y=np.arange(6) % 2)
    for source, layout, message in (
            ("c", None, r"c.npz x: samples of shape \(3, 5, 4\) may have their channels first or last; pass "
                        r"--layout nchw \(C, H, W\) or --layout nhwc \(H, W, C\)"),
            ("d", "nhwc", r"--layout nhwc: npz:.*d.npz x samples have shape \(5,\), no channel axis")):
        with pytest.raises(MpitrainError, match=message):
            prepare(f"npz:{tmp_path / source}.npz", str(tmp_path / f"{source}.h5"), layout=layout)
    assert not os.path.exists(tmp_path / "c.h5") and not os.path.exists(tmp_path / "d.h5")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_each_clients_local_test_split_is_a_random_sample_of_it(tmp_path, scheme):
    """The tail of a client's rows is its local test split: under shards it used to be the end of the
    client's last label-sorted shard, one label."""
    out = str(tmp_path / "p.h5")
    prepare("digits", out, partition=dict(scheme=scheme, clients=10, seed=0, test_fraction=0.25))
    with h5py.File(out, "r") as f:
        y, offsets, n_train = f["partition/y"][...], f["partition/offsets"][...], f["partition/n_train"][...]
    for k in range(10):
        mine = y[offsets[k]:offsets[k + 1]]
        labels, counts = np.unique(mine, return_counts=True)
        common = labels[counts >= 20]  # present in a random quarter with probability > 0.996
        assert set(common) <= set(mine[n_train[k]:]), (k, common, mine[n_train[k]:])


@pytest.mark.parametrize("args, message", [
    ("--partition shards --shards-per-client 0 --clients 10",
     "--shards-per-client 0: expected 1 … 143 (10 clients share 1438 samples)"),
    ("--partition shards --shards-per-client 200 --clients 10",
     "--shards-per-client 200: expected 1 … 143 (10 clients share 1438 samples)"),
    ("--partition iid --clients 0", "--clients 0: expected 1 … 719 (2 samples per client at least)"),
    ("--partition dirichlet --alpha nan", "--alpha nan: expected > 0 and finite"),
    ("--partition iid --alpha 1", "--alpha: only for --partition dirichlet or quantity, not iid"),
    ("--partition dirichlet --shards-per-client 3",
     "--shards-per-client: only for --partition shards, not dirichlet"),
    ("--partition iid --client-test-fraction 1", "--client-test-fraction 1.0: expected a number in [0, 1)"),
    ("--clients 4 --alpha 0.1", "prepare: --clients, --alpha: only with --partition"),
    ("--seed -1", "--seed -1: expected an integer ≥ 0"),
    ("--test-fraction 1", "--test-fraction 1.0: expected a number in [0, 1)"),
    ("--validation-fraction -0.1", "--validation-fraction -0.1: expected a number in [0, 1)"),
    ("--samples 100", "--samples: only for the synthetic source, not 'digits'"),
    ("--label-column 0", "--label-column: only for a csv:PATH source, not 'digits'"),
    ("--layout nhwc", "--layout: only for npz:PATH, npz:DIR and npy:DIR sources, not 'digits'"),
    ("--image-size 8 8", "--image-size: only for an images:DIR source, not 'digits'"),
    ("--classes 1", "--classes 1: expected ≥ 2"),
])
def test_every_prepare_option_is_checked(tmp_path, args, message):
    """One line for each option that is out of range or has no effect where it is given; no file."""
    from mpitrain.cli import _parser, _prepare

    out = tmp_path / "d" / "o.h5"
    with pytest.raises(MpitrainError) as info:
        _prepare(_parser().parse_args(["prepare", "--source", "digits", "--out", str(out), *args.split()]), prepare)
    assert str(info.value) == message and not os.path.exists(out)


def test_prepare_option_errors_from_the_command_line(tmp_path):
    """The traceback of issue #23 (numpy's `number sections must be larger than 0`) is one line, and
    neither a new file nor a change to the old one is left."""
    out = tmp_path / "o.h5"
    r = mpirun(1, "prepare", "--source", "synthetic", "--samples", 100, "--features", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    before = h5py.File(out, "r").attrs["checksum"]
    r = mpirun(1, "prepare", "--source", "digits", "--out", out, "--partition", "shards", "--shards-per-client", 0,
               "--clients", 10)
    assert r.returncode == 2 and r.error_lines() == [
        "mpitrain: error: --shards-per-client 0: expected 1 … 143 (10 clients share 1438 samples)"]
    assert h5py.File(out, "r").attrs["checksum"] == before and os.listdir(tmp_path) == ["o.h5"]
    for args, message in (([], "prepare: --samples: only with --source (re-partitioning"),
                          (["--source", "synthetic", "--samples", 100, "--classes", 101], "--classes ≤ --samples")):
        r = mpirun(1, "prepare", "--out", out, "--partition", "iid", "--samples", 100, *args)
        assert r.returncode == 2 and len(r.error_lines()) == 1 and message in r.stderr
