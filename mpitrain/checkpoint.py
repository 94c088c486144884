"""Atomic HDF5 files: the trained model (model.h5) and checkpoints, each written as temp file → fsync →
os.replace → fsync of the directory, so a crash leaves the old file or the new one, never half of one.

A checkpoint (ckpt-<step or round>.h5) holds named float32 vectors (params, optimizer and server state)
and attributes (counters, model description, config, versions) plus a sha256 over all of it, so a
truncated or corrupted file is detected; `--resume auto` then falls back to the previous good one.
"""
import glob
import hashlib
import os
import time

import numpy as np

from . import __version__
from .errors import MpitrainError
from .model import ModelSpec


def atomic_write(path, write):
    """Call write(tmp_path), then move the finished file into place: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(path, spec, params, standardize=None, state=None, **attrs):
    """standardize: the data file's (mean, std), so a reader can standardise raw inputs as training did;
    state: the model's non-trainable values (BatchNorm running statistics), when it has any."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=params)
            if state is not None and len(state):
                f.create_dataset("state", data=state)
            if standardize is not None:
                f["standardize/mean"], f["standardize/std"] = standardize
            f.attrs.update(spec.attrs())
            f.attrs.update(attrs, mpitrain_version=__version__)

    atomic_write(path, write)


def load_model(path, standardize=False, state=False):
    """(ModelSpec, flat float32 parameters) from a model.h5, then with standardize=True the training data's
    (mean, std) (None when the file has none), then with state=True the state vector (BatchNorm running
    statistics; None when the model has none)."""
    import h5py

    if not os.path.exists(path):
        raise MpitrainError(f"{path}: no such model file")
    try:
        with h5py.File(path, "r") as f:
            if "params" not in f:
                raise MpitrainError(f"{path}: missing dataset params (expected a model.h5 written by mpitrain)")
            missing = [k for k in ("kind", "n_in", "n_out", "hidden", "activation") if k not in f.attrs]
            if missing:
                raise MpitrainError(f"{path}: missing model attribute(s) {', '.join(missing)}")
            spec = ModelSpec.from_attrs(f.attrs)
            params = np.asarray(f["params"][...], np.float32)
            stats = (f["standardize/mean"][...], f["standardize/std"][...]) if "standardize" in f else None
            values = np.asarray(f["state"][...], np.float32) if "state" in f else None
    except OSError:
        raise MpitrainError(f"{path}: not an HDF5 file (expected a model.h5 written by mpitrain)") from None
    if params.shape != (spec.n_params,):
        raise MpitrainError(f"{path}: params has shape {params.shape}, the model described needs ({spec.n_params},)")
    return (spec, params) + ((stats,) if standardize else ()) + ((values,) if state else ())


class Parts:
    """A vector held in parts across ranks (sharded modes): `local` is this rank's part, gather() — every
    rank calls it — returns the whole on rank 0 (None elsewhere).  A checkpoint gathers and writes such
    vectors one at a time, so rank 0 never holds more than one of them whole."""

    def __init__(self, comm, local):
        self.comm, self.local = comm, local

    def gather(self):
        return self.comm.gatherv(self.local)[0]


def _digest(arrays, attrs):
    """sha256 over (name, bytes) of the arrays in name order, then the attributes; arrays may be an
    iterator of (name, array) pairs in name order (a checkpoint being written)."""
    h = hashlib.sha256()
    for name, a in (sorted(arrays.items()) if isinstance(arrays, dict) else arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # the buffer itself, not a copy
        del a  # before the next one is gathered: rank 0 holds one whole vector at a time
    for name in sorted(attrs):
        h.update(f"{name}={np.asarray(attrs[name]).tolist()!r}".encode())
    return h.hexdigest()


def save_checkpoint(directory, index, arrays, attrs, keep=3):
    """Write ckpt-<index>.h5 atomically, then delete all but the newest `keep` checkpoints up to it and
    every one past it: those belong to another timeline (another run in the same folder, or the steps
    after an older checkpoint this run resumed from), and `--resume auto` must not pick them."""
    import h5py

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ckpt-{index:09d}.h5")
    attrs = dict(attrs, index=index, mpitrain_version=__version__)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            def written():  # one array at a time: a Parts is gathered, written, hashed, dropped
                for name in sorted(arrays):
                    a = arrays[name].gather() if isinstance(arrays[name], Parts) else arrays[name]
                    f.create_dataset(name, data=a)
                    yield name, a
                    del a

            f.attrs["checksum"] = _digest(written(), attrs)
            f.attrs.update(attrs)

    atomic_write(path, write)
    names = checkpoints(directory)
    for old in [p for p in names if p > path] + [p for p in names if p <= path][:-keep]:
        os.remove(old)
    return path


RESUME_TAKES = "--resume takes auto, a run folder or a ckpt-*.h5 file"


def checkpoints(directory):
    """The checkpoint files in directory, oldest first (the names are zero-padded: name order = step order)."""
    return sorted(glob.glob(os.path.join(directory, "ckpt-*.h5")))


def load_checkpoint(path):
    """(arrays, attrs) of a checkpoint whose checksum matches; MpitrainError otherwise, saying what the file
    is when it is not a checkpoint (a model.h5, a data file, not HDF5) and what --resume takes."""
    import h5py

    if not os.path.exists(path):
        raise MpitrainError(f"{path}: no such file or folder ({RESUME_TAKES})")
    if not h5py.is_hdf5(path):  # the signature: an HDF5 file cut short still has it
        raise MpitrainError(f"{path}: not an HDF5 file, so not a checkpoint ({RESUME_TAKES})")
    try:
        with h5py.File(path, "r") as f:
            stored = f.attrs.get("checksum")
            if stored is None or "index" not in f.attrs:  # said before reading anything: it may be a large file
                what = ("a model file (model.h5), which holds no optimizer or server state to continue from"
                        if "params" in f and "kind" in f.attrs else "a data file" if "train" in f else
                        "an HDF5 file without a checkpoint's step/round and checksum")
                raise MpitrainError(f"{path}: not a checkpoint: {what} ({RESUME_TAKES})")
            arrays, attrs = {}, {k: v for k, v in f.attrs.items() if k != "checksum"}
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    except (OSError, KeyError, RuntimeError):
        raise MpitrainError(f"{path}: unreadable checkpoint (a truncated or damaged HDF5 file)") from None
    if stored != _digest(arrays, attrs):
        raise MpitrainError(f"{path}: corrupted checkpoint (checksum mismatch)")
    return arrays, attrs


def resolve_resume(resume, directory):
    """(path, arrays, attrs, skipped): the checkpoint to continue from, path None to start afresh.
    `auto` takes the newest good checkpoint in `directory`, a folder (a run folder or a checkpoint folder)
    the newest good one in it (skipped: messages about the corrupted ones passed over); any other value is a
    checkpoint path that must be good."""
    if resume is None:
        return None, None, None, []
    if resume != "auto" and not os.path.isdir(resume):
        return (resume, *load_checkpoint(resume), [])
    folder = directory if resume == "auto" else checkpoint_folder(resume)
    skipped = []
    for path in reversed(checkpoints(folder)):
        try:
            return (path, *load_checkpoint(path), skipped)
        except MpitrainError as exc:
            skipped.append(str(exc))
    if resume != "auto":  # a folder named explicitly must hold one
        raise MpitrainError(f"{resume}: no good checkpoint in {folder}"
                            + (f" ({len(skipped)} damaged)" if skipped else "") + f" ({RESUME_TAKES})")
    return None, None, None, skipped


def checkpoint_folder(folder):
    """The folder whose ckpt-*.h5 a --resume FOLDER means: the run folder's checkpoints/, or the folder itself."""
    inner = os.path.join(folder, "checkpoints")
    return inner if os.path.isdir(inner) else folder


class Saved(dict):
    """A checkpoint's arrays: a name it lacks is one clear error (a checkpoint of another kind of run,
    or of an older mpitrain), not a KeyError traceback."""

    def __init__(self, path, arrays):
        super().__init__(arrays)
        self.path = path

    def __missing__(self, name):
        raise MpitrainError(f"{self.path}: the checkpoint holds no {name}: it was written by another kind of run",
                            agreed=True)


class Checkpointer:
    """When and where a run checkpoints, and resuming from one.  Rank 0 writes; every rank waits at a
    barrier before training continues (no rank runs ahead into a collective while the file is written)."""

    def __init__(self, comm, cfg, out, spec, config_text, data_checksum, meaning):
        """meaning: {setting: value} of every setting that gives the saved state, the privacy accounting
        of the run so far, or a number the run reports about its whole length, its meaning: the run kind,
        train.optimizer / fed.strategy, train.global_batch (what a step and an epoch are), the partition, the
        DP settings the accountants depend on, fed.target_accuracy.  Each is written as an attribute and a
        checkpoint that differs in any of them, or lacks one, is refused on resume."""
        c = cfg.checkpoint
        self.comm, self.every, self.every_seconds, self.keep = comm, c.every, c.every_seconds, c.keep
        self.dir = c.dir or os.path.join(out, "checkpoints")
        self.meaning = {k: str(v) for k, v in meaning.items()}
        self.attrs = {**spec.attrs(), "config": config_text, "data_checksum": data_checksum, **self.meaning}
        self.last = time.monotonic()

    def time_due(self):
        """Rank 0's clock says a checkpoint is due (the loops share this flag in their next collective)."""
        return (self.comm.rank == 0 and self.every_seconds > 0
                and time.monotonic() - self.last >= self.every_seconds)

    def due(self, index, flagged):
        return flagged or (self.every > 0 and index % self.every == 0)

    def save(self, index, arrays, **attrs):
        # decided together: sharded and local-SGD ranks hold different state, and a rank that raised alone
        # would leave the others in the barrier below
        local = [a.local if isinstance(a, Parts) else a for a in arrays.values()]
        if not self.comm.allreduce([all(np.all(np.isfinite(a)) for a in local)], op="min")[0]:
            raise MpitrainError(f"step/round {index}: parameters or state are not finite; "
                                f"not checkpointed (the last good checkpoint stays in {self.dir})", agreed=True)
        if self.comm.rank == 0:
            save_checkpoint(self.dir, index, arrays, {**self.attrs, **attrs}, self.keep)
        else:  # the gathers rank 0 makes while it writes, in its order
            for name in sorted(arrays):
                if isinstance(arrays[name], Parts):
                    arrays[name].gather()
        self.comm.barrier()
        self.last = time.monotonic()

    def resume(self, resume, say):
        """(path, index, arrays, attrs) of the checkpoint to continue from, or None; checked against this run."""
        path, arrays, attrs, skipped = self.comm.agree(resolve_resume, resume, self.dir)
        for message in skipped:
            say(f"skipping {message}")
        if path is None:
            return None
        for key in ("kind", "n_in", "n_out", "hidden", "activation", "layers", "feature_shape", "data_checksum"):
            if key not in attrs or not np.array_equal(attrs[key], self.attrs[key]):
                raise MpitrainError(f"{path}: checkpoint of another model or dataset ({key} = "
                                    f"{attrs.get(key)!r}, this run has {self.attrs[key]!r})", agreed=True)
        for key, mine in self.meaning.items():
            if key not in attrs:  # an older checkpoint did not record it: take the run's setting, and say so
                say(f"{path}: written before checkpoints recorded {key}; taking this run's ({mine})")
                continue
            theirs = str(attrs[key])
            if theirs != mine:
                raise MpitrainError(f"{path}: the checkpoint of step/round {attrs['index']} is of a {key} = "
                                    f"{theirs} run; this run has {mine} (a resume keeps {key}: it gives the "
                                    "saved state, the privacy spent or the numbers reported their meaning)",
                                    agreed=True)
        return path, int(attrs["index"]), Saved(path, arrays), attrs
