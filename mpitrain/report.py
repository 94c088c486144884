"""What rank 0 tells the user and writes into the run directory; a no-op on every other rank."""
import fcntl
import itertools
import json
import os
import sys
import time

from .checkpoint import atomic_write, checkpoints
from .errors import MpitrainError


def make_run_dir(comm, out):
    """(run directory, lock): rank 0 alone creates and locks it (see _lock) and names it to the others,
    whose lock is None.  The default is runs/<timestamp>, or runs/<timestamp>-2, -3, … when other runs
    took that name in the same second."""
    path, lock = comm.agree(_claim, comm.rank, out)
    if out is None:
        path = comm.bcast_bytes(path.encode() if comm.rank == 0 else b"").decode()
    return path, lock


def _claim(rank, out):
    if rank != 0:
        return out, None
    try:
        if out is None:
            path = _new_default()
        else:
            path = out
            os.makedirs(path, exist_ok=True)
        return path, _lock(path)
    except OSError as exc:
        raise MpitrainError(f"{out or 'runs'}: cannot create or lock the run folder ({exc.strerror}); "
                            "choose another --out") from None


def _new_default():
    os.makedirs("runs", exist_ok=True)
    path, _ = first_free(os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), os.mkdir)
    return path


def first_free(base, create):
    """(name, create(name)) for the first of base, base-2, base-3, … that no other run took: create must
    raise FileExistsError atomically (os.mkdir, open(…, "x")), so runs started in the same second get
    names of their own."""
    for n in itertools.count(1):
        path = base if n == 1 else f"{base}-{n}"
        try:
            return path, create(path)
        except FileExistsError:
            continue


def _lock(out):
    """An exclusive flock on out/.lock, which holds the pid, for the run's lifetime: no second live run
    writes into this folder, and the lock dies with its process, so a killed run leaves none behind."""
    f = open(os.path.join(out, ".lock"), "a+", encoding="utf-8")  # a+: the holder's pid stays readable
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"  # "?": the holder has not written it yet
        f.close()
        raise MpitrainError(f"{out}: another run (pid {pid}) is using this run folder; "
                            "choose another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "model.h5")


def held_run(out, ckpt_dir):
    """What of a started or finished run the folder holds: its run files and checkpoints ([] for none)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    ckpts = checkpoints(ckpt_dir)
    return found + ([f"{len(ckpts)} checkpoint(s) in {ckpt_dir}"] if ckpts else [])


def clear_run(out, ckpt_dir):
    """--overwrite: remove the previous run's files and checkpoints, so nothing of it mixes into the new run."""
    for path in [os.path.join(out, name) for name in RUN_FILES] + checkpoints(ckpt_dir):
        if os.path.exists(path):
            os.remove(path)


def read_summary(comm, out):
    """summary.json of the run folder as rank 0 reads it, on every rank; None when there is none."""
    text = b""
    if comm.rank == 0:
        path = os.path.join(out, "summary.json")
        if os.path.exists(path):
            with open(path, "rb") as f:
                text = f.read()
    text = comm.bcast_bytes(text)
    return json.loads(text) if text else None


class RunLog:
    """metrics.jsonl (one JSON object per line) plus progress: a tqdm bar on a terminal, plain lines
    otherwise (one per test evaluation).  Holds the run directory's lock (make_run_dir) until finish or
    release; start opens the outputs once the run is known to go ahead."""

    def __init__(self, comm, out_dir, lock, quiet=False, logs=()):
        self.active = comm.rank == 0
        self.quiet = quiet
        self.out_dir = out_dir
        self.lock = lock
        self.logs = logs  # train.log: further formats of the records (tblog.py)
        self.bar = self.metrics = self.tensorboard = None

    def start(self, index, total):
        """Open metrics.jsonl keeping only the records up to step/round `index`, where the run goes on (later
        ones are of steps it does again, or of an earlier run in the folder), and the bar at index of total."""
        if not self.active:
            return
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            kept = [line for line in lines if _at(line) <= index]
            if kept != lines:
                def write(tmp):
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.writelines(kept)

                atomic_write(path, write)
        self.metrics = open(path, "a", encoding="utf-8")
        if "tensorboard" in self.logs:
            from .tblog import TensorBoard

            self.tensorboard = TensorBoard(self.out_dir, index)
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=index, unit="step", dynamic_ncols=True)

    def record(self, **fields):
        if self.active:
            self.metrics.write(json.dumps(fields) + "\n")
            self.metrics.flush()
            if self.tensorboard is not None:
                self.tensorboard.record(fields)

    def advance(self, steps, **postfix):
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def say(self, text):
        """A line for the user (above the bar when there is one)."""
        if not self.active or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, summary):
        """Close the outputs; write summary.json unless summary is None (a run stopped early); then release
        the folder, last, so that a run resuming in it (also in this process) finds it complete."""
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if summary is not None:
                write_json(os.path.join(self.out_dir, "summary.json"), summary)
        self.release()

    def release(self):
        """Let go of the folder's lock (a run that wrote nothing, or has finished)."""
        if self.lock is not None:
            self.lock.close()


def _at(line):
    """The step or round of a metrics.jsonl line; a line cut short by a crash counts as past every index."""
    try:
        record = json.loads(line)
        return record.get("step", record.get("round", 0))
    except ValueError:
        return float("inf")
