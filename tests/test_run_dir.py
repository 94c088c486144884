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

from conftest import mpirun, snapshot, summary

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


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, synth):
    """train --out A twice used to overwrite model.h5, summary and metrics and delete the checkpoints; now
    the second is one line and the folder is untouched, --overwrite replaces the whole run (none of its
    checkpoints stays behind to be resumed), and the Python API does the same."""
    out = tmp_path / "a"
    assert train(1, synth, "--out", out, "--set", "checkpoint.every=2").returncode == 0
    before = snapshot(out)
    r = train(1, synth, "--out", out, timeout=120)
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: {out}: holds a run (config.toml, metrics.jsonl, summary.json, model.h5, 3 checkpoint(s) "
        f"in {out}/checkpoints); continue it with --resume auto, replace it with --overwrite, or choose another --out"]
    assert snapshot(out) == before
    r = train(1, synth, "--out", out, "--overwrite", "--set", "train.steps=3")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out / "checkpoints") == ["ckpt-000000003.h5"] and summary(str(out))["steps"] == 3
    r = mpirun(1, __file__, "api", synth, out, module=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{out}: holds a run (config.toml, metrics.jsonl, summary.json, model.h5, 1 "
                                     f"checkpoint(s) in {out}/checkpoints); continue it with --resume auto, replace "
                                     "it with --overwrite, or choose another --out", "overwritten 5"]


def test_resume_auto_needs_out_and_says_when_it_starts_fresh(tmp_path, synth):
    """--resume auto without --out wrote a new runs/<timestamp> folder, where no checkpoint can be, and started
    afresh without a word; a mistyped --out did the same.  Now the first is one line and the second says so.
    The console and metrics.jsonl name the same epoch for a step (the console said one more)."""
    r = mpirun(1, "train", "--set", f"data.path={synth}", *TINY, "--resume", "auto", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.error_lines() == [
        "mpitrain: error: --resume auto without --out: auto continues the run in the folder --out names (a new "
        "runs/<timestamp> folder holds no checkpoint); give --out"]
    assert os.listdir(tmp_path) == []
    r = mpirun(1, "train", "--set", f"data.path={synth}", *TINY, "--resume", "auto", "--overwrite", cwd=tmp_path,
               timeout=120)
    assert r.returncode == 2 and "a run either continues or starts afresh" in r.stderr
    out = tmp_path / "typo"
    r = mpirun(1, "train", "--set", f"data.path={synth}", "--set", "model.hidden=[8]", "--set", "train.steps=20",
               "--set", "train.eval_every=10", "--out", out, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"no checkpoint in {out}/checkpoints: starting fresh"
    printed = {int(m[1]): int(m[2]) for m in (re.match(r"step (\d+)/20  epoch (\d+) ", line) for line in lines) if m}
    logged = {r["step"]: r["epoch"] for r in records(str(out)) if "test_loss" in r}
    assert printed == logged == {10: 1, 20: 2}  # 15 steps an epoch (960 samples, batch 64)


def test_resuming_a_finished_run_leaves_it_as_it_was(tmp_path, synth):
    """A finished run resumed (a requeued SLURM job) rewrote summary.json with steps 6…5, 0 samples/s and no
    train loss; now it says so in one line, exit 0, and touches nothing.  Where the run ended after its last
    checkpoint but before summary.json, the resume completes it with the checkpoint's train loss."""
    out = tmp_path / "done"
    assert train(2, synth, "--out", out).returncode == 0
    full = summary(str(out))
    before = snapshot(out)
    r = mpirun(2, "train", "--set", f"data.path={synth}", *TINY, "--out", out, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{out}: the run finished at step 5 already; nothing to do, its files are "
                                     "left as they were"]
    assert snapshot(out) == before
    os.remove(out / "summary.json")
    assert train(2, synth, "--out", out, "--resume", "auto").returncode == 0
    s = summary(str(out))
    assert (s["steps"], s["resumed_from_step"], s["samples_per_second"]) == (5, 5, None)
    assert (s["train_loss"], s["train_accuracy"], s["test_accuracy"]) == \
        (full["train_loss"], full["train_accuracy"], full["test_accuracy"])


def _api(data, out):
    """mpitrain.train into a folder holding a run: the error, then the same with overwrite=True."""
    import mpitrain

    overrides = {"data.path": data, "train.steps": 5, "model.hidden": [8]}
    try:
        mpitrain.train(overrides=overrides, out=out)
    except mpitrain.MpitrainError as exc:
        print(exc)
    print("overwritten", mpitrain.train(overrides=overrides, out=out, overwrite=True)["steps"])


def _twice(data, out):
    """train() twice in one process into one folder, the second continuing to step 8: prints its
    resumed_from_step."""
    from mpitrain.comm import Comm
    from mpitrain.config import load
    from mpitrain.trainer import train as run

    comm = Comm()
    sets = [f"data.path={data}", "train.steps=5", "model.hidden=[8]"]
    run(load(None, sets), comm, out, quiet=True)
    s = run(load(None, [*sets, "train.steps=8"]), comm, out, quiet=True, resume="auto")
    if comm.rank == 0:
        print("resumed_from_step", s["resumed_from_step"])


if __name__ == "__main__" and len(sys.argv) > 1:
    {"twice": _twice, "api": _api}[sys.argv[1]](*sys.argv[2:4])
