"""What rank 0 tells the user and writes into the run directory; a no-op on every other rank."""
import json
import os
import sys
import time

from .checkpoint import atomic_write


def make_run_dir(comm, out):
    """The run directory (default runs/<timestamp>, named by rank 0 and shared with the others)."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S").encode() if comm.rank == 0 else b""
        out = os.path.join("runs", comm.bcast_bytes(stamp).decode())
    if comm.rank == 0:
        os.makedirs(out, exist_ok=True)
    return out


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


class RunLog:
    """metrics.jsonl (one JSON object per line) plus progress: a tqdm bar on a terminal, plain lines
    otherwise (one per test evaluation)."""

    def __init__(self, comm, out_dir, total_steps, quiet=False):
        self.active = comm.rank == 0
        self.quiet = quiet
        self.out_dir = out_dir
        self.bar = None
        if not self.active:
            return
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def record(self, **fields):
        if self.active:
            self.metrics.write(json.dumps(fields) + "\n")
            self.metrics.flush()

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
        """Close the outputs; write summary.json unless summary is None (a run stopped early)."""
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.metrics.close()
            if summary is not None:
                write_json(os.path.join(self.out_dir, "summary.json"), summary)
