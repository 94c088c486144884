"""Sources → one HDF5 file (the layout every rank reads its shard from).

Layout: train/x, test/x (float32, samples × features, chunked along samples), train/y, test/y (int64),
standardize/mean, standardize/std (training-split statistics, already applied), and attributes
n_classes, feature_shape, source, checksum (sha256 of the four arrays), format.
"""
import hashlib
import os

import numpy as np

from .. import __version__
from ..errors import MpitrainError

FORMAT = 1
SOURCES = "digits | synthetic | npz:PATH | csv:PATH"


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64), None, None


def _synthetic(samples, features, classes, seed):
    """A learnable task: labels are the argmax of a random two-layer tanh teacher network."""
    if samples < 2 or features < 1 or classes < 2:
        raise MpitrainError("synthetic source: expected --samples ≥ 2, --features ≥ 1, --classes ≥ 2")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E7]))
    x = rng.standard_normal((samples, features), dtype=np.float32)
    hidden = rng.standard_normal((features, 64)).astype(np.float32) * (2.0 / np.sqrt(features))
    head = rng.standard_normal((64, classes)).astype(np.float32)
    y = np.argmax(np.tanh(x @ hidden) @ head, axis=1).astype(np.int64)
    return x, y, None, None


def _npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle a data file
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: cannot read as .npz ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise MpitrainError(f"{path}: missing array(s) {', '.join(missing)}; expected x, y (and optionally x_test, y_test)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise MpitrainError(f"{path}: x_test and y_test must be given together")
    return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")


def _csv(path, label_column):
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip().split(",")
    except OSError as exc:
        raise MpitrainError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        [float(v) for v in first]
        header = None
    except ValueError:
        header = [h.strip() for h in first]
    if label_column is None:
        col = len(first) - 1
    elif header and label_column in header:
        col = header.index(label_column)
    else:
        try:
            col = int(label_column)
        except ValueError:
            raise MpitrainError(f"{path}: no column named {label_column!r} (columns: {', '.join(header or [])})") from None
    if not -len(first) <= col < len(first):
        raise MpitrainError(f"{path}: label column {label_column} is out of range for {len(first)} columns")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1 if header else 0, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise MpitrainError(f"{path}: not a numeric CSV table ({exc})") from None
    col %= table.shape[1]
    return np.delete(table, col, axis=1), table[:, col], None, None


def load_source(source, samples=10000, features=64, classes=10, seed=0, label_column=None):
    kind, _, path = source.partition(":")
    if source == "digits":
        return _digits()
    if source == "synthetic":
        return _synthetic(samples, features, classes, seed)
    if kind in ("npz", "csv") and path:
        return _npz(path) if kind == "npz" else _csv(path, label_column)
    raise MpitrainError(f"--source {source!r}: expected one of {SOURCES}")


def _labels(y, name, n):
    y = np.asarray(y)
    if y.shape != (n,):
        raise MpitrainError(f"{name}: expected {n} labels (one per sample), got shape {y.shape}")
    if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)) or (n and y.min() < 0):
        raise MpitrainError(f"{name}: labels must be integers ≥ 0")
    return y.astype(np.int64)


def _features(x, name):
    x = np.asarray(x)
    if x.ndim < 2 or len(x) == 0:
        raise MpitrainError(f"{name}: expected samples × features, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise MpitrainError(f"{name}: features must be finite numbers")
    return x.reshape(len(x), -1).astype(np.float32)


def prepare(source, out, test_fraction=0.2, seed=0, **source_opts):
    """Write the HDF5 file for `source` to `out` (atomically).  Returns a one-line description."""
    import h5py

    x, y, x_test, y_test = load_source(source, seed=seed, **source_opts)
    feature_shape = np.asarray(x).shape[1:]
    x = _features(x, f"{source} x")
    y = _labels(y, f"{source} y", len(x))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    order = rng.permutation(len(x))
    if x_test is None:
        if not 0 < test_fraction < 1:
            raise MpitrainError(f"--test-fraction {test_fraction}: expected a number in (0, 1)")
        n_test = max(1, int(round(test_fraction * len(x))))
        if n_test >= len(x):
            raise MpitrainError(f"{source}: {len(x)} samples are too few to split off a test set")
        order, test_order = order[n_test:], order[:n_test]
        x_test, y_test = x[test_order], y[test_order]
    else:
        x_test = _features(x_test, f"{source} x_test")
        y_test = _labels(y_test, f"{source} y_test", len(x_test))
        if x_test.shape[1] != x.shape[1]:
            raise MpitrainError(f"{source}: x_test has {x_test.shape[1]} features, x has {x.shape[1]}")
    x, y = x[order], y[order]
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = x.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0  # constant features (e.g. the corners of digits) stay at 0
    x = (x - mean) / std
    x_test = (x_test - mean) / std
    n_classes = int(max(y.max(), y_test.max())) + 1

    digest = hashlib.sha256()
    for a in (x, y, x_test, y_test):
        digest.update(np.ascontiguousarray(a).tobytes())
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for split, xs, ys in (("train", x, y), ("test", x_test, y_test)):
                rows = max(1, min(len(xs), (1 << 20) // (4 * xs.shape[1])))  # ~1 MiB chunks
                f.create_dataset(f"{split}/x", data=xs, chunks=(rows, xs.shape[1]))
                f.create_dataset(f"{split}/y", data=ys, chunks=(min(len(ys), 1 << 17),))
            f["standardize/mean"], f["standardize/std"] = mean, std
            f.attrs.update(n_classes=n_classes, feature_shape=np.array(feature_shape, np.int64),
                           source=source, checksum=digest.hexdigest(), format=FORMAT,
                           created_by=f"mpitrain {__version__}")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return (f"{out}: {len(x)} train + {len(x_test)} test samples, {x.shape[1]} features "
            f"{tuple(feature_shape)}, {n_classes} classes, from {source}")
