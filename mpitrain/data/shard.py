"""One rank's view of the HDF5 dataset: validate the layout, read only this rank's hyperslab, plan batches.

Batching (the same on any number of ranks).  The n training samples are cut into B = global_batch
contiguous strata of ⌊n/B⌋ or ⌈n/B⌉ samples.  In epoch e, stratum j is visited in the order of a
permutation seeded by (seed, e, j), and global batch s takes the s-th sample of every stratum, so an epoch
has ⌊n/B⌋ steps.  Rank r owns strata [⌊rB/p⌋, ⌊(r+1)B/p⌋) — one contiguous hyperslab of the file, which is
all it ever reads — and contributes exactly those strata's samples to every global batch.  The global
batch is therefore independent of the number of ranks p (p ranks compute exactly the gradient one rank
would, up to float summation order), every rank has ⌊B/p⌋ or ⌈B/p⌉ samples in every step (no rank runs
out of data early), and each batch draws from every part of the file.
"""
import os

import numpy as np

from ..errors import MpitrainError


def _fail(path, what):
    raise MpitrainError(f"{path}: {what}")


class DataFile:
    """An opened, layout-checked dataset file.  Reads nothing but metadata until asked."""

    def __init__(self, path):
        import h5py

        self.path = path
        if not os.path.exists(path):
            _fail(path, "no such file (make one with: python -m mpitrain prepare --source ... --out FILE)")
        try:  # no chunk cache: every read here is a hyperslab read once, so the cache would only hold a
            # second copy of the rows (whole chunks, other ranks' clients included) beyond mpitrain's reach
            self.f = h5py.File(path, "r", rdcc_nbytes=0)
        except OSError:
            _fail(path, "not an HDF5 file (expected one written by python -m mpitrain prepare)")
        for key in ("train/x", "train/y", "test/x", "test/y"):
            if key not in self.f or not isinstance(self.f[key], h5py.Dataset):
                _fail(path, f"missing dataset {key}")
        if "n_classes" not in self.f.attrs:
            _fail(path, "missing attribute n_classes")
        self.n_classes = int(self.f.attrs["n_classes"])
        if self.n_classes < 2:
            _fail(path, f"attribute n_classes = {self.n_classes}: expected ≥ 2")
        self.checksum = str(self.f.attrs.get("checksum", ""))
        self.n_features = None
        for split in ("train", "test"):
            x, y = self.f[f"{split}/x"], self.f[f"{split}/y"]
            if x.ndim != 2 or x.dtype != np.float32:
                _fail(path, f"{split}/x has shape {x.shape} and dtype {x.dtype}: expected float32 samples × features")
            if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
                _fail(path, f"{split}/y has shape {y.shape} and dtype {y.dtype}: expected {x.shape[0]} integer labels")
            if self.n_features not in (None, x.shape[1]):
                _fail(path, f"test/x has {x.shape[1]} features, train/x has {self.n_features}")
            self.n_features = x.shape[1]
        self.n_train, self.n_test = len(self.f["train/y"]), len(self.f["test/y"])
        if self.n_train == 0:
            _fail(path, "train/x is empty")
        # what prepare subtracted and divided by (per feature, or per channel for images): model.h5 keeps it
        self.standardize = ((self.f["standardize/mean"][...], self.f["standardize/std"][...])
                            if "standardize" in self.f else None)
        # the shape of one sample, channels first ((C, H, W), (H, W), (C, L) or (L,)); rows are stored flat
        self.feature_shape = tuple(int(d) for d in self.f.attrs.get("feature_shape", ())) or (self.n_features,)
        if np.prod(self.feature_shape) != self.n_features or min(self.feature_shape) < 1:
            _fail(path, f"attribute feature_shape = {list(self.feature_shape)} does not hold {self.n_features} "
                        "features")

    def read(self, split, lo, hi, rank, keep=None):
        """Rows [lo, hi) of split/x and split/y, checked (finite features, labels in range).  HDF5 reads
        straight into the two arrays returned (no chunk cache; int64 labels need no conversion copy): they
        are the only copies the read makes.  keep(array) is called on each as soon as it is read (fed.erase
        registers them to be zeroed, also when a check fails)."""
        x = self.f[f"{split}/x"][lo:hi]
        y = self.f[f"{split}/y"][lo:hi].astype(np.int64, copy=False)
        if keep is not None:
            keep(x)
            keep(y)
        where = f"{self.path}: {split} rows {lo}..{hi - 1} (rank {rank})"
        if not np.all(np.isfinite(x)):
            raise MpitrainError(f"{where}: features contain NaN or Inf")
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise MpitrainError(f"{where}: labels must lie in 0..{self.n_classes - 1} (n_classes)")
        return np.ascontiguousarray(x), y

    def close(self):
        self.f.close()


def block(n, parts, i):
    """Bounds of part i when n items are cut into `parts` contiguous near-equal parts."""
    return i * n // parts, (i + 1) * n // parts


class TrainShard:
    """This rank's strata of the training split and the batch plan over them (see module docstring)."""

    def __init__(self, data, global_batch, rank, size, seed):
        n, b = data.n_train, global_batch
        if n < size:
            _fail(data.path, f"train has {n} samples, fewer than the {size} ranks")
        if b < size:
            raise MpitrainError(f"train.global_batch = {b} is smaller than the number of ranks ({size}): "
                                "every rank needs at least one sample per step")
        if n < b:
            _fail(data.path, f"train has {n} samples, fewer than train.global_batch = {b}")
        self.seed, self.global_batch = seed, b
        self.strata = range(*block(b, size, rank))
        self.bounds = [j * n // b for j in range(b + 1)]
        self.lo, self.hi = self.bounds[self.strata.start], self.bounds[self.strata.stop]
        self.x, self.y = data.read("train", self.lo, self.hi, rank)
        self.steps_per_epoch = n // b
        self.batch = len(self.strata)
        self.xb = np.empty((self.batch, data.n_features), np.float32)
        self.yb = np.empty(self.batch, np.int64)

    def epoch_order(self, epoch):
        """Local row indices, shape (steps_per_epoch, local batch): row s is this rank's part of batch s."""
        order = np.empty((self.steps_per_epoch, self.batch), np.int64)
        for c, j in enumerate(self.strata):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, j]))
            size = self.bounds[j + 1] - self.bounds[j]
            order[:, c] = rng.permutation(size)[:self.steps_per_epoch] + (self.bounds[j] - self.lo)
        return order

    def batch_at(self, rows):
        """Gather the rows of one step into the preallocated batch buffers."""
        np.take(self.x, rows, axis=0, out=self.xb)
        np.take(self.y, rows, out=self.yb)
        return self.xb, self.yb
