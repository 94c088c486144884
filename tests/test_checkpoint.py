"""Checkpoints, resume, and faults: bit-exact continuation, corrupted files, signals, killed ranks."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MPIEXEC, mpirun, ok, params, records, snapshot, summary

SYNC = ["model.hidden=[32]", "train.optimizer=adam", "train.lr=0.005", "train.global_batch=60",
        "train.steps=60", "checkpoint.every=20"]


def run(n, command, out, *sets, resume=None, data=None, timeout=300, overwrite=False, quiet=True):
    args = [command, "--out", out] + ["--quiet"] * quiet + (["--resume", resume] if resume else [])
    args += ["--overwrite"] * overwrite
    if data:
        args += ["--set", f"data.path={data}"]
    for s in sets:
        args += ["--set", s]
    return mpirun(n, *args, timeout=timeout)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "checkpoints", "ckpt-*.h5")))


def test_sync_resume_is_bit_exact_and_falls_back_over_a_corrupted_file(tmp_path, synth):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    ok(run(2, "train", full, *SYNC, data=synth))
    ok(run(2, "train", cut, *SYNC, data=synth))
    assert [os.path.basename(p) for p in checkpoints(cut)] == ["ckpt-000000020.h5", "ckpt-000000040.h5",
                                                               "ckpt-000000060.h5"]
    os.remove(os.path.join(cut, "model.h5"))
    newest = checkpoints(cut)[-1]
    with open(newest, "r+b") as f:  # truncate the newest: auto must skip it and take step 40
        f.truncate(os.path.getsize(newest) // 2)
    ok(run(2, "train", cut, *SYNC, resume="auto", data=synth))
    assert summary(cut)["resumed_from_step"] == 40
    assert np.array_equal(params(full), params(cut))
    steps = [r["step"] for r in records(cut) if "train_loss" in r]  # steps 41…60 logged once: the redone ones
    assert steps == [r["step"] for r in records(full) if "train_loss" in r] == sorted(set(steps))
    with open(newest, "r+b") as f:  # the resumed run rewrote it; an explicit path must be good
        f.truncate(os.path.getsize(newest) // 2)
    r = run(2, "train", str(tmp_path / "x"), *SYNC, resume=newest, data=synth, timeout=120)
    assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {newest}: unreadable checkpoint "
                                                     "(a truncated or damaged HDF5 file)"]


def test_resume_on_another_number_of_ranks(tmp_path, synth):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    ok(run(2, "train", full, *SYNC, data=synth))
    ok(run(2, "train", cut, *SYNC, data=synth))
    os.remove(checkpoints(cut)[-1])
    ok(run(3, "train", cut, *SYNC, resume="auto", data=synth))
    a, b = params(full), params(cut)
    assert summary(cut)["resumed_from_step"] == 40 and summary(cut)["world_size"] == 3
    assert np.max(np.abs(a - b)) <= 1e-5 * np.abs(a).max()


def test_federated_fedadam_resume_is_bit_exact(tmp_path):
    data = str(tmp_path / "fed.h5")
    ok(mpirun(1, "prepare", "--source", "synthetic", "--samples", 1500, "--features", 10, "--classes", 3,
              "--out", data, "--partition", "dirichlet", "--clients", 12))
    sets = ["fed.strategy=fedadam", "fed.rounds=6", "fed.fraction=0.5", "model.hidden=[16]", "checkpoint.every=2",
            "fed.target_accuracy=0.4"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    ok(run(4, "federate", full, *sets, data=data))
    ok(run(4, "federate", cut, *sets, data=data))
    os.remove(checkpoints(cut)[-1])
    ok(run(4, "federate", cut, *sets, resume="auto", data=data))
    assert np.array_equal(params(full), params(cut))
    reached = summary(full)["rounds_to_target"]  # carried by the checkpoint when reached before it
    assert reached is not None and reached <= 4 and summary(cut)["rounds_to_target"] == reached
    other = [*sets, "fed.strategy=fedyogi"]  # same state vectors (m, v), other meaning: refused
    r = run(4, "federate", str(tmp_path / "y"), *other, resume=checkpoints(cut)[0], data=data, timeout=120)
    assert r.returncode == 2 and "fed.strategy = fedadam run; this run has fedyogi" in r.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path, synth):
    out = str(tmp_path / "a")
    ok(run(2, "train", out, *SYNC, data=synth))
    r = run(2, "train", str(tmp_path / "b"), *SYNC, "model.hidden=[8]", resume=checkpoints(out)[0],
            data=synth, timeout=120)
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert "checkpoint of another model or dataset (hidden" in line


def _rank_pids(marker):
    """PIDs of the Python ranks whose command line contains marker."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"python") or (cmd and b"python" in os.path.basename(cmd[0])):
                if marker.encode() in b" ".join(cmd) and b"mpiexec" not in cmd[0]:
                    pids.append(int(d))
    return sorted(pids)


def _start(out, data, *sets):
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "mpitrain", "train", "--quiet", "--out", out,
           "--set", f"data.path={data}", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) or len(_rank_pids(out)) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    return proc


LONG = ["model.hidden=[64]", "train.steps=200000", "train.global_batch=30", "train.optimizer=momentum",
        "train.schedule=constant"]  # constant lr: a shorter reference run sees the same lr at every step


def test_sigusr1_on_one_rank_checkpoints_and_exits_75(tmp_path, synth):
    out = str(tmp_path / "sig")
    proc = _start(out, synth, *LONG)
    os.kill(_rank_pids(out)[1], signal.SIGUSR1)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 75, err
    (ckpt,) = checkpoints(out)
    step = int(os.path.basename(ckpt)[5:14])
    assert 0 < step < 200000 and not os.path.exists(os.path.join(out, "summary.json"))
    # resuming with the final step set to the checkpoint + 10 equals an uninterrupted run of that length
    done = [*LONG[:1], f"train.steps={step + 10}", *LONG[2:]]
    ok(run(3, "train", out, *done, resume="auto", data=synth))
    ok(run(3, "train", str(tmp_path / "ref"), *done, data=synth))
    assert summary(out)["resumed_from_step"] == step
    assert np.array_equal(params(out), params(str(tmp_path / "ref")))


def test_sigkill_of_one_rank_ends_the_job_and_resume_completes(tmp_path, synth):
    out = str(tmp_path / "kill")
    proc = _start(out, synth, *LONG, "checkpoint.every=50")
    while not checkpoints(out):
        time.sleep(0.2)
    t = time.time()
    os.kill(_rank_pids(out)[2], signal.SIGKILL)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job did not end within 30 s of a rank being killed")
    assert proc.returncode != 0 and time.time() - t < 30
    step = int(os.path.basename(checkpoints(out)[-1])[5:14])
    ok(run(3, "train", out, LONG[0], f"train.steps={step + 5}", *LONG[2:], resume="auto", data=synth))
    assert summary(out)["resumed_from_step"] == step and summary(out)["steps"] == step + 5


def test_non_finite_loss_stops_with_the_step(tmp_path, synth):
    r = run(2, "train", str(tmp_path / "nan"), "train.optimizer=sgd", "train.lr=1e30", "train.steps=50",
            data=synth, timeout=120)
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: step ") and "the loss is not finite; stopping before" in line


def test_ranks_with_different_configs_are_refused(tmp_path, synth):
    base = [sys.executable, "-m", "mpitrain", "train", "--quiet", "--set", f"data.path={synth}"]
    from conftest import launch

    r = launch([MPIEXEC, "-n", "2", *base, "--set", "train.lr=0.1", ":", "-n", "1", *base, "--set", "train.lr=0.2"],
               timeout=120, cwd=str(tmp_path))
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert "ranks 2 differ from rank 0" in line


def test_singletons_under_slurm_are_refused(tmp_path, synth):
    r = mpirun(1, "train", "--quiet", "--set", f"data.path={synth}", env={"SLURM_STEP_NUM_TASKS": "4"},
               timeout=120, cwd=str(tmp_path))
    assert r.returncode == 2 and "the ranks started as singletons" in r.stderr


def test_overwrite_starts_afresh_and_a_resume_cannot_shorten_a_run(tmp_path, synth):
    """A 60-step run's checkpoints (20, 40, 60), then a 20-step run with another seed into the same --out
    with --overwrite: the earlier run's files and checkpoints go first, so none of them is ever resumed; a
    checkpoint past the run's end, or of another optimizer or global batch, is one line, the folder untouched."""
    out = str(tmp_path / "o")
    ok(run(1, "train", out, *SYNC, data=synth))
    short = [*SYNC, "train.steps=20", "checkpoint.every=10", "train.seed=7"]
    ok(run(1, "train", out, *short, data=synth, overwrite=True))
    assert [os.path.basename(p) for p in checkpoints(out)] == ["ckpt-000000010.h5", "ckpt-000000020.h5"]
    assert [r["step"] for r in records(out) if "train_loss" in r] == [10, 20]  # none of the 60-step run
    before = snapshot(out)
    last = checkpoints(out)[-1]
    for sets, needle in (
            (["train.steps=10"], f"{last}: the checkpoint of step 20 lies past this run's last (10); a resume "
                                 "continues a run and cannot take back steps done: raise train.steps to continue "
                                 "it, or leave out --resume to start afresh"),
            (["train.optimizer=momentum"], "train.optimizer = adam run; this run has momentum"),
            (["train.global_batch=30"], "train.global_batch = 60 run; this run has 30")):
        refused(run(1, "train", out, *short, *sets, resume="auto", data=synth, timeout=120), needle)
    assert snapshot(out) == before


def test_stop_requested_in_the_last_step_ends_the_run(tmp_path, synth):
    """The stop flag set from the first step on, in a 1-step run: the run finishes (model.h5, summary,
    exit 0) instead of exiting 75 with nothing for the requeued job to do."""
    out = str(tmp_path / "o")
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_probe.py")
    r = mpirun(2, probe, "stop-at-end", synth, out, module=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert summary(out)["steps"] == 1 and os.path.exists(os.path.join(out, "model.h5"))


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory):
    """digits partitioned IID over 8 clients."""
    data = str(tmp_path_factory.mktemp("fed") / "d8.h5")
    ok(mpirun(1, "prepare", "--source", "digits", "--out", data, "--partition", "iid", "--clients", 8))
    return data


FED = ["model.kind=softmax", "fed.rounds=2", "fed.local_epochs=1", "fed.fraction=0.5", "checkpoint.every=1"]


def refused(r, needle):
    assert r.returncode == 2, r.stderr
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: ") and needle in line, line
    return line


def test_resume_refuses_every_checkpoint_of_another_meaning(tmp_path, fed_data, synth):
    """The run kind, the server strategy, the partition and every input of the privacy accountant are
    compared on resume; a checkpoint that differs in one, or lacks it, is one line and exit 2 (before:
    a wrong ε, rounds that never ran, or KeyError tracebacks)."""
    dp, plain, trained = str(tmp_path / "dp"), str(tmp_path / "plain"), str(tmp_path / "train")
    ok(run(2, "federate", dp, *FED, "fed.dp.noise_multiplier=0.3", data=fed_data))
    longer = [*FED, "fed.rounds=4"]
    refused(run(2, "federate", dp, *longer, "fed.dp.noise_multiplier=5", resume="auto", data=fed_data),
            "is of a fed.dp.noise_multiplier = 0.3 run; this run has 5.0")
    refused(run(2, "federate", dp, *longer, "fed.dp.noise_multiplier=0.3", "fed.fraction=0.75", resume="auto",
                data=fed_data), "is of a fed.fraction = 0.5 run; this run has 0.75")
    refused(run(2, "train", dp, "model.kind=softmax", resume="auto", data=fed_data),
            "is of a run = federate run; this run has train")
    ok(run(2, "federate", plain, *FED, data=fed_data))
    refused(run(2, "federate", plain, *longer, "fed.dp.noise_multiplier=1", resume="auto", data=fed_data),
            "is of a fed.dp.noise_multiplier = 0.0 run; this run has 1.0")
    r = ok(run(1, "train", trained, "model.kind=softmax", "train.steps=4", "checkpoint.every=2", data=fed_data,
               quiet=False))
    assert f"{fed_data} holds a federated partition of 8 clients: train pools every client's rows" in r.stdout
    refused(run(2, "federate", trained, *longer, "fed.strategy=fedadam", resume="auto", data=fed_data),
            "is of a run = train run; this run has federate")
    other = str(tmp_path / "repartitioned.h5")
    shutil.copy(fed_data, other)
    ok(mpirun(1, "prepare", "--out", other, "--partition", "iid", "--clients", 8, "--seed", 1))
    refused(run(2, "federate", str(tmp_path / "o"), *longer, resume=checkpoints(plain)[-1], data=other),
            "is of a partition = ")
    last = checkpoints(plain)[-1]  # an explicit path past the run's end: the file is named, not the folder
    line = refused(run(2, "federate", str(tmp_path / "p"), *FED, "fed.rounds=1", resume=last, data=fed_data),
                   "lies past this run's last (1); a resume continues a run and cannot take back rounds done: "
                   "raise fed.rounds to continue it")
    assert line.startswith(f"mpitrain: error: {last}: ")
    refused(run(2, "federate", plain, *longer, "fed.target_accuracy=0.5", resume="auto", data=fed_data),
            "is of a fed.target_accuracy = 0.95 run; this run has 0.5")  # rounds_to_target is of the first


DP = ["model.kind=softmax", "fed.rounds=5", "fed.local_epochs=1", "fed.fraction=0.2", "fed.dp.noise_multiplier=1.1"]


def test_a_resume_that_cannot_continue_is_refused_and_a_finished_one_left_alone(tmp_path, fed_data):
    """5 DP rounds (ε = 3.839 at q = 0.2, z = 1.1, δ = 1e-5) resumed with fed.dp.target_epsilon = 3: those
    rounds are spent, so the resume is one line naming the ε spent, and the run stays as it was (before: no
    round ran, and summary.json said ε = 2.923, 2 rounds, stopped at the target).  Resumed as it was set up it
    is complete: one line, exit 0, every file untouched; started again without --resume: refused."""
    out = str(tmp_path / "dp")
    r = ok(run(2, "federate", out, *DP, data=fed_data, quiet=False))
    assert "rounds to 0.95: not reached" in r.stdout.splitlines()[-1]
    assert summary(out)["epsilon"] == pytest.approx(3.839, abs=5e-4) and summary(out)["rounds"] == 5
    before = snapshot(out)
    last = checkpoints(out)[-1]
    line = refused(run(2, "federate", out, *DP, "fed.dp.target_epsilon=3", resume="auto", data=fed_data),
                   "fed.dp.target_epsilon = 3 allows 2 round(s), and the 5 done have spent ε = 3.8390 at δ = 1e-05: "
                   "set it to 3.8391 or more")
    assert line.startswith(f"mpitrain: error: {last}: the checkpoint of round 5 lies past this run's last (2)")
    r = ok(run(2, "federate", out, *DP, resume="auto", data=fed_data, quiet=False))
    assert r.stdout.splitlines() == [f"{out}: the run finished at round 5 already; nothing to do, its files are "
                                     "left as they were"]
    refused(run(2, "federate", out, *DP, data=fed_data), f"mpitrain: error: {out}: holds a run (config.toml, ")
    assert snapshot(out) == before


def test_skipped_rounds_count_the_whole_run_after_a_resume(tmp_path, fed_data):
    """Secure aggregation under Poisson sampling skips round 2 (1 client drawn with fed.dp.noise_seed = 1);
    a run resumed after it still counts it (before: only the rounds of the last attempt)."""
    sets = ["model.kind=softmax", "fed.rounds=4", "fed.local_epochs=1", "fed.fraction=0.375", "checkpoint.every=1",
            "fed.dp.noise_multiplier=0.5", "fed.dp.noise_seed=1", "fed.secure_aggregation=true"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    ok(run(3, "federate", full, *sets, data=fed_data))
    assert summary(full)["skipped_rounds"] == 1
    ok(run(3, "federate", cut, *sets, data=fed_data))
    for path in checkpoints(cut)[-2:] + [os.path.join(cut, "summary.json")]:
        os.remove(path)
    ok(run(3, "federate", cut, *sets, resume="auto", data=fed_data))
    assert summary(cut)["resumed_from_round"] == 2 and summary(cut)["skipped_rounds"] == 1
    assert np.array_equal(params(full), params(cut))


def test_resume_says_what_it_was_given_and_what_it_takes(tmp_path, synth):
    """--resume with a run folder continues from that run's newest good checkpoint (documented); a model.h5,
    a file that is not HDF5 or a folder without checkpoints is one line saying what it is and what --resume
    takes (before: "unreadable checkpoint" and "corrupted checkpoint (checksum mismatch)")."""
    pre = str(tmp_path / "pre")
    ok(run(1, "train", pre, *SYNC, data=synth))
    r = ok(run(1, "train", str(tmp_path / "on"), *SYNC, "train.steps=70", resume=pre, data=synth, quiet=False))
    assert f"resuming from {checkpoints(pre)[-1]}" in r.stdout
    assert summary(str(tmp_path / "on"))["resumed_from_step"] == 60
    takes = "(--resume takes auto, a run folder or a ckpt-*.h5 file)"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for given, what in ((os.path.join(pre, "model.h5"), "not a checkpoint: a model file (model.h5), which holds no "
                                                         "optimizer or server state to continue from"),
                        (synth, "not a checkpoint: a data file"),
                        (str(text), "not an HDF5 file, so not a checkpoint"),
                        (str(tmp_path), f"no good checkpoint in {tmp_path}")):
        r = run(1, "train", str(tmp_path / "x"), *SYNC, resume=given, data=synth, timeout=120)
        assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {given}: {what} {takes}"]


def test_ctrl_c_checkpoints_and_exits_75_like_sigterm(tmp_path, synth):
    """SIGINT to mpiexec, as Ctrl-C in a terminal sends it (the ranks run in sessions of their own; hydra passes
    it on to them): every rank stops at the same step after a checkpoint, exit 75, nothing on stderr (before:
    no checkpoint and a KeyboardInterrupt traceback from the ranks; in a terminal also hydra's assertions)."""
    out = str(tmp_path / "int")
    proc = _start(out, synth, *LONG)
    os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 75 and err == "", err
    (ckpt,) = checkpoints(out)
    assert not os.path.exists(os.path.join(out, "summary.json"))
