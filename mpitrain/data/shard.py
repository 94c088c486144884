"""One rank's view of the HDF5 dataset: validate the layout, read only this rank's hyperslab, plan batches.

Batching (the same on any number of ranks).  The n training samples are cut into B = global_batch
contiguous strata of ⌊n/B⌋ or ⌈n/B⌉ samples.  In epoch e, stratum j is visited in the order of a
permutation seeded by (seed, e, j), and global batch s takes the s-th sample of every stratum, so an epoch
has ⌊n/B⌋ steps.  Rank r owns strata [⌊rB/p⌋, ⌊(r+1)B/p⌋) — one contiguous hyperslab of the file, which is
all it ever reads — and contributes exactly those strata's samples to every global batch.  The global
batch is therefore independent of the number of ranks p (p ranks compute exactly the gradient one rank
would, up to float summation order), every rank has ⌊B/p⌋ or ⌈B/p⌉ samples in every step (no rank runs
out of data early), and each batch draws from every part of the file.

Stream plan (data.stream, or automatic when the largest rank's part exceeds data.memory_mb).  The same
strata and ranks, but a rank never holds its whole part: each stratum is cut into blocks of K contiguous
rows (the last one shorter), and in epoch e the full blocks of stratum j are visited in the order of a
permutation seeded by (seed, e, j), the short block last.  Consecutive groups of W blocks form windows; the
rows of window w are shuffled by a permutation seeded by (seed, e, j, w), and stratum j's samples are
visited in that order, one per step.  Every window but an epoch's last holds exactly W·K rows of every
stratum, so all strata and all ranks change window at the same step: steps [w·W·K, (w+1)·W·K) read window w
of every local stratum.  A rank holds two windows (the current one and the next, which its reader process
(reader.py) reads while the steps compute), i.e. 2·(B/p)·W·K rows.  K and W depend on the configuration and
the file (data.block_rows, data.window_blocks, data.memory_mb, the global batch, the row size and the file's
chunk rows), never on p, so p ranks still compute what one rank would.
"""
import os

import numpy as np

from ..errors import MpitrainError
from .reader import Blocks


def _fail(path, what):
    raise MpitrainError(f"{path}: {what}")


class DataFile:
    """An opened, layout-checked dataset file.  Reads nothing but metadata until asked."""

    def __init__(self, path, cache=(0, 521)):
        """cache: h5py's chunk cache (rdcc_nbytes, rdcc_nslots), none by default: every read here is a
        hyperslab read once, so a cache would only hold a second copy of the rows (whole chunks, other ranks'
        clients included) beyond mpitrain's reach.  The stream reader process gives it a window's bytes."""
        import h5py

        self.path = path
        if not os.path.exists(path):
            _fail(path, "no such file (make one with: python -m mpitrain prepare --source ... --out FILE)")
        try:
            self.f = h5py.File(path, "r", rdcc_nbytes=cache[0], rdcc_nslots=cache[1])
        except OSError:
            _fail(path, "not an HDF5 file (expected one written by python -m mpitrain prepare)")
        self.task = str(self.f.attrs.get("task", "classify"))
        if self.task == "lm":  # a token stream: its own layout and attributes (data/text.py)
            from .text import open_tokens

            open_tokens(self)
            return
        if self.task not in ("classify", "regress"):
            _fail(path, f"attribute task = {self.task!r}: expected classify, regress or lm")
        regress = self.task == "regress"
        for key in ("train/x", "train/y", "test/x", "test/y") + (("target/mean", "target/std") if regress else ()):
            if key not in self.f or not isinstance(self.f[key], h5py.Dataset):
                _fail(path, f"missing dataset {key}")
        count = "n_targets" if regress else "n_classes"
        if count not in self.f.attrs:
            _fail(path, f"missing attribute {count}")
        n = int(self.f.attrs[count])
        if n < (1 if regress else 2):
            _fail(path, f"attribute {count} = {n}: expected ≥ {1 if regress else 2}")
        # a sample's y: an int64 label (n_classes classes), or n_targets float32 targets (regression)
        self.n_classes, self.n_targets = (None, n) if regress else (n, None)
        self.y_shape, self.y_dtype = ((n,), np.float32) if regress else ((), np.int64)
        # what prepare subtracted from the targets and divided them by: model.h5 keeps it (None: labels)
        self.targets = (self.f["target/mean"][...], self.f["target/std"][...]) if regress else None
        if regress and any(v.shape != (n,) for v in self.targets):
            _fail(path, f"target/mean, target/std have shapes {self.targets[0].shape}, {self.targets[1].shape}: "
                        f"expected ({n},) (n_targets)")
        self.checksum = str(self.f.attrs.get("checksum", ""))
        self.n_features = None
        self.splits = ("train", "test", "val") if "val" in self.f else ("train", "test")  # val/: optional
        for split in self.splits:
            x, y = self.f[f"{split}/x"], self.f[f"{split}/y"]
            if x.ndim != 2 or x.dtype != np.float32:
                _fail(path, f"{split}/x has shape {x.shape} and dtype {x.dtype}: expected float32 samples × features")
            if regress and (y.shape != (x.shape[0], n) or y.dtype != np.float32):
                _fail(path, f"{split}/y has shape {y.shape} and dtype {y.dtype}: expected float32 {x.shape[0]} "
                            f"samples × {n} targets")
            if not regress and (y.shape != (x.shape[0],) or y.dtype.kind not in "iu"):
                _fail(path, f"{split}/y has shape {y.shape} and dtype {y.dtype}: expected {x.shape[0]} integer labels")
            if self.n_features not in (None, x.shape[1]):
                _fail(path, f"{split}/x has {x.shape[1]} features, train/x has {self.n_features}")
            self.n_features = x.shape[1]
        self.row_bytes = 4 * self.n_features + np.dtype(self.y_dtype).itemsize * int(np.prod(self.y_shape))  # x, y
        self.n_train, self.n_test = len(self.f["train/y"]), len(self.f["test/y"])
        self.n_val = len(self.f["val/y"]) if "val" in self.splits else 0
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

    @property
    def n_out(self):
        """A model's outputs for this file: its classes, its targets (regression) or its vocabulary (lm)."""
        return self.n_targets if self.task == "regress" else self.n_classes
    @staticmethod
    def as_model(x):
        """Rows as read, restandardised by adopt()."""
        return x

    def adopt(self, stats):
        """Read rows standardised as a model's training rows were (train.init): with its (mean, std) in place
        of the file's own, which model.h5 then keeps.  None (a model of raw rows) leaves the file's."""
        from ..evaluate import as_trained

        if stats is not None:
            own, self.standardize = self.standardize, stats
            self.as_model = lambda x: as_trained(x, own, stats)

    def read(self, split, lo, hi, rank, keep=None):
        """Rows [lo, hi) of split/x and split/y, checked (finite features, labels in range, finite targets).
        HDF5 reads straight into the two arrays returned (no chunk cache; int64 labels and float32 targets need
        no conversion copy): they are the only copies the read makes.  keep(array) is called on each as soon as
        it is read (fed.erase registers them to be zeroed, also when a check fails)."""
        try:
            x = self.f[f"{split}/x"][lo:hi]
            y = self.f[f"{split}/y"][lo:hi].astype(self.y_dtype, copy=False)
        except MemoryError:  # the in-memory plan holds a rank's whole part
            mib = (hi - lo) * self.row_bytes / 2**20
            raise MpitrainError(f"{self.path}: {split} rows {lo}..{hi - 1} ({mib:.0f} MiB) do not fit in the "
                                f"memory of rank {rank}; set data.stream = true to read them block by block") from None
        if keep is not None:
            keep(x)
            keep(y)
        self.check(x, y, split, lo, rank)
        return self.as_model(np.ascontiguousarray(x)), y

    def fine(self, x, y):
        """Whether rows pass check (quickly: without naming a row)."""
        if self.n_targets:
            return bool(np.isfinite(x).all() and np.isfinite(y).all())
        return bool(np.isfinite(x).all() and (y >= 0).all() and (y < self.n_classes).all())

    def check(self, x, y, split, lo, rank):
        """Rows lo… of split as read: finite features, labels in 0..n_classes-1 or finite targets, or one line
        naming them."""
        bad = ~np.isfinite(x).all(axis=1)
        what = "features contain NaN or Inf"
        if not bad.any() and len(y) and self.n_targets:
            bad, what = ~np.isfinite(y).all(axis=1), "targets contain NaN or Inf"
        elif not bad.any() and len(y):
            bad, what = (y < 0) | (y >= self.n_classes), f"labels must lie in 0..{self.n_classes - 1} (n_classes)"
        if bad.any():
            first = lo + int(np.argmax(bad))
            raise MpitrainError(f"{self.path}: {split} rows {lo}..{lo + len(y) - 1} (rank {rank}): {what} "
                                f"(first at row {first})")

    def close(self):
        self.f.close()


def block(n, parts, i):
    """Bounds of part i when n items are cut into `parts` contiguous near-equal parts."""
    return i * n // parts, (i + 1) * n // parts


class TrainShard:
    """This rank's strata of the training split and the batch plan over them (see module docstring)."""

    streams = False
    reader_rss = 0  # the peak resident memory of a stream reader process, once closed
    note = None  # a line for the run's log about how the data is read

    def __init__(self, data, global_batch, rank, size, seed):
        self._strata(data, global_batch, rank, size, seed)
        self.x, self.y = data.read("train", self.lo, self.hi, rank)
        self.xb = np.empty((self.batch, data.n_features), np.float32)
        self.yb = np.empty((self.batch, *data.y_shape), data.y_dtype)
        self.order = (None, None)  # (epoch, its order)

    def _strata(self, data, global_batch, rank, size, seed, n=None, what="samples"):
        """The strata of n samples (default: the training rows; a TokenShard's windows), named `what`."""
        n, b = data.n_train if n is None else n, global_batch
        if n < size:
            _fail(data.path, f"train has {n} {what}, fewer than the {size} ranks")
        if b < size:
            raise MpitrainError(f"train.global_batch = {b} is smaller than the number of ranks ({size}): "
                                "every rank needs at least one sample per step")
        if n < b:
            _fail(data.path, f"train has {n} {what}, fewer than train.global_batch = {b}")
        self.seed, self.global_batch = seed, b
        self.strata = range(*block(b, size, rank))
        self.bounds = [j * n // b for j in range(b + 1)]
        self.lo, self.hi = self.bounds[self.strata.start], self.bounds[self.strata.stop]
        self.steps_per_epoch = n // b
        self.batch = len(self.strata)

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
        np.take(self.y, rows, axis=0, out=self.yb)
        return self.xb, self.yb

    def get(self, epoch, s):
        """This rank's part of global batch s of `epoch`, in the batch buffers."""
        if self.order[0] != epoch:
            self.order = epoch, self.epoch_order(epoch)
        return self.batch_at(self.order[1][s])

    def close(self):
        pass


def block_rows(data, split, memory_mb, strata, window, given):
    """K: data.block_rows, or the file's chunk rows, less where two windows of `strata` strata would
    exceed half of memory_mb (the chunk cache takes up to another window)."""
    row = data.row_bytes
    chunks = data.f[f"{split}/x"].chunks
    fit = int(memory_mb * 2**20 // (4 * window * strata * row))
    return given or max(1, min(chunks[0] if chunks else max(1, 2**20 // row), fit))


class StreamShard(TrainShard):
    """This rank's strata read window by window with bounded memory (the stream plan, module docstring).
    The switch to a window is agreed across ranks, so a bad block stops every rank at once, before its rows
    reach a gradient."""

    streams = True

    def __init__(self, data, global_batch, rank, size, seed, comm, memory_mb, window_blocks, given_rows):
        self._strata(data, global_batch, rank, size, seed)
        self.comm = comm
        # K from the global batch, never from p: the plan is the same on any number of ranks
        k = block_rows(data, "train", memory_mb, global_batch, window_blocks, given_rows)
        self.blocks = Blocks(data, "train", len(self.strata), k, window_blocks, rank)
        self.blocks.start(self.bounds, self.strata, self.steps_per_epoch, (seed,))
        self.blocks.submit(0, 0)  # the first window is read while the run sets up (a resumed run waits for it)
        self.span = self.blocks.span  # steps per window
        dx = data.f["train/x"]
        if dx.compression and dx.chunks and k < dx.chunks[0]:
            need = 4 * window_blocks * global_batch * dx.chunks[0] * data.row_bytes / 2**20
            self.note = (f"note: {data.path}: train/x is {dx.compression}-compressed in chunks of {dx.chunks[0]} "
                         f"rows and the stream reads blocks of {k}, so each chunk is decompressed up to "
                         f"{-(-dx.chunks[0] // k)} times an epoch; data.memory_mb ≥ {need:.0f} reads whole chunks "
                         "(or store the file uncompressed, or in smaller chunks)")
        self.xb = np.empty((self.batch, data.n_features), np.float32)
        self.yb = np.empty((self.batch, *data.y_shape), data.y_dtype)
        self.as_model = data.as_model  # the reader process reads the file's rows: restandardised per batch

    def _take(self, epoch, w):
        self.blocks.take(epoch, w)
        self.blocks.prefetch()

    def get(self, epoch, s):
        w = s // self.span
        if self.blocks.current is None or self.blocks.current[:2] != (epoch, w):
            self.comm.agree(self._take, epoch, w)  # every rank changes window at the same step
        _, _, x, y, rows = self.blocks.current
        np.take(x, rows[s - w * self.span], axis=0, out=self.xb)
        np.take(y, rows[s - w * self.span], axis=0, out=self.yb)
        return self.as_model(self.xb), self.yb

    def close(self):
        self.blocks.close()
        self.reader_rss = self.blocks.peak_rss


class ClientRows:
    """A federated client's training rows (partition/x) as local batches: batch positions [lo, hi) of
    local epoch e.  In memory: a permutation per epoch drawn from one generator seeded by key (as before
    streaming existed); streamed (blocks given): the stream plan of the client's one stratum, seeded by key.
    flip: labels become flip − label (the label-flipping attacker)."""

    def __init__(self, key, x=None, y=None, blocks=None, lo=0, n=0, flip=None):
        self.blocks, self.flip = blocks, flip
        if blocks is None:
            self.x, self.y, self.n = x, y, len(x)
            self.rng, self.epoch = np.random.default_rng(np.random.SeedSequence(key)), None
        else:
            self.n = n
            blocks.start([lo, lo + n], range(1), n, key)

    def batch(self, epoch, lo, hi, xb, yb):
        """Batch positions [lo, hi) of local epoch `epoch`, gathered into the caller's reused buffers xb, yb
        (at least hi − lo rows; the views of their first hi − lo rows are returned)."""
        xb, yb = xb[:hi - lo], yb[:hi - lo]
        if self.blocks is None:
            if epoch != self.epoch:
                self.epoch, self.order = epoch, self.rng.permutation(self.n)
            np.take(self.x, self.order[lo:hi], axis=0, out=xb, mode="clip")  # "raise" gathers into a hidden copy
            np.take(self.y, self.order[lo:hi], out=yb, mode="clip")
        else:
            b, at = self.blocks, 0
            for w in range(lo // b.span, (hi - 1) // b.span + 1):  # a batch may span windows
                if b.current is None or b.current[:2] != (epoch, w):
                    b.take(epoch, w)
                _, _, wx, wy, rows = b.current
                r = rows[max(lo - w * b.span, 0):hi - w * b.span, 0]
                np.take(wx, r, axis=0, out=xb[at:at + len(r)], mode="clip")  # the window's buffer is then free
                np.take(wy, r, out=yb[at:at + len(r)], mode="clip")
                at += len(r)
                if b.next is None:
                    b.prefetch()
        if self.flip is not None:
            np.subtract(self.flip, yb, out=yb)
        return xb, yb


def open_shard(comm, data, cfg, global_batch, seed, rank, p, block_size=None):
    """This rank's shard, rank of the p ranks that split the global batch (the data group): in memory, or
    streamed when cfg.stream (data.stream) is set or the largest rank's part exceeds cfg.memory_mb (0: never
    automatically); a token file's windows of block_size + 1 tokens (text.token_shard).  Every rank computes
    the same decision; errors are agreed over comm (the world)."""
    if data.task == "lm":
        from .text import token_shard

        return comm.agree(token_shard, data, cfg, global_batch, seed, rank, p, block_size)
    n, b = data.n_train, global_batch
    rows = max((block(b, p, r)[1] * n // b - block(b, p, r)[0] * n // b for r in range(p)) if n >= b >= p else [0])
    if cfg.stream or (cfg.memory_mb > 0 and rows * data.row_bytes > cfg.memory_mb * 2**20):
        return comm.agree(StreamShard, data, b, rank, p, seed, comm, cfg.memory_mb, cfg.window_blocks,
                          cfg.block_rows)
    return comm.agree(TrainShard, data, b, rank, p, seed)
