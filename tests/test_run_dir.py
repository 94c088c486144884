"""The run folder: the default one is unique per run, and a live run's folder is locked against another run."""
import fcntl
import json
import os
import re
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import mpirun, summary

from mpitrain.errors import MpitrainError
from mpitrain.report import make_run_dir

TINY = ["--set", "train.steps=5", "--set", "model.hidden=[8]"]
ONE_RANK = SimpleNamespace(rank=0, size=1, bcast_bytes=lambda data: data, agree=lambda fn, *args: fn(*args))


def train(n, synth, *args, **kw):
    return mpirun(n, "train", "--quiet", "--set", f"data.path={synth}", *TINY, *args, **kw)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_runs_started_together_get_their_own_folders(tmp_path, synth):
    results = [None, None]

    def start(i):
        results[i] = train(2, synth, cwd=tmp_path)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    folders = sorted(os.listdir(tmp_path / "runs"))
    assert len(folders) == 2, folders
    for name in folders:
        run_dir = str(tmp_path / "runs" / name)
        assert [r["step"] for r in records(run_dir) if "train_loss" in r] == [5]
        assert "[train]" in open(os.path.join(run_dir, "config.toml"), encoding="utf-8").read()
        assert summary(run_dir)["steps"] == 5


def test_default_folder_takes_the_next_free_name_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-120000")
    claimed = [make_run_dir(ONE_RANK, None) for _ in range(3)]
    assert [path for path, _ in claimed] == [os.path.join("runs", "20260101-120000" + s) for s in ("", "-2", "-3")]
    for _, lock in claimed:
        lock.close()


def test_a_live_runs_folder_is_refused_before_anything_is_written(tmp_path, synth):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w", encoding="utf-8") as held:  # this test process plays the live run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        r = train(2, synth, "--out", out, timeout=120)
        assert r.returncode == 2 and r.error_lines() == [
            f"mpitrain: error: {out}: another run (pid {os.getpid()}) is using this run folder; choose another --out"]
        assert os.listdir(out) == [".lock"]
    r = train(2, synth, "--out", out)  # the lock went with its holder
    assert r.returncode == 0, r.stderr
    assert summary(str(out))["steps"] == 5


def test_a_finished_run_releases_its_folder_for_a_resume_in_the_same_process(tmp_path, synth):
    r = mpirun(2, __file__, "twice", synth, tmp_path / "run", module=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["resumed_from_step", "5"]


def test_make_run_dir_reports_an_unusable_folder_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = str(blocker / "run")
    with pytest.raises(MpitrainError, match="^" + re.escape(f"{out}: cannot create or lock the run folder (")):
        make_run_dir(ONE_RANK, out)


def _twice(data, out):
    """train() twice in one process into one folder, the second resuming: prints its resumed_from_step."""
    from mpitrain.comm import Comm
    from mpitrain.config import load
    from mpitrain.trainer import train as run

    comm = Comm()
    cfg = load(None, [f"data.path={data}", "train.steps=5", "model.hidden=[8]"])
    run(cfg, comm, out, quiet=True)
    s = run(cfg, comm, out, quiet=True, resume="auto")
    if comm.rank == 0:
        print("resumed_from_step", s["resumed_from_step"])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "twice":
    _twice(*sys.argv[2:4])
