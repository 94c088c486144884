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
    assert a["train/x"].shape[1] == 64 and list(attrs["feature_shape"]) == [8, 8]
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
    np.savez(tmp_path / "neg.npz", x=np.zeros((5, 2)), y=-np.ones(5))
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
