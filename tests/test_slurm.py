"""slurm/train.sbatch on a real single-node SLURM (slurmctld, slurmd, munged started by
slurm/local-cluster.sh): a job stopped mid-run by SIGUSR1 checkpoints, requeues itself, resumes, and ends
with exactly the model of an uninterrupted run."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import launch, mpirun, params, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 and subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM running and not root: slurm/local-cluster.sh needs root to install and start it")
    r = launch(["bash", os.path.join(ROOT, "slurm", "local-cluster.sh")], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


def _job_state(job):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "GONE", int(re.search(r"Restarts=(\d+)", out).group(1)) if m else 0


def test_train_sbatch_survives_a_requeue(cluster, tmp_path, synth):
    sets = ["model.hidden=[32]", "train.steps=4000", "train.global_batch=30", "train.log_every=50"]
    args = [a for s in sets for a in ("--set", s)] + ["--set", f"data.path={synth}", "--quiet",
                                                     "--checkpoint-every", "100"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, MPITRAIN_PYTHON=sys.executable, RUN_DIR=str(run_dir))
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=3", f"--chdir={tmp_path}",
                          f"--output={tmp_path}/job.out", os.path.join(ROOT, "slurm", "train.sbatch"), *args],
                         capture_output=True, text=True, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints").exists() or not os.listdir(run_dir / "checkpoints"):
            assert time.time() < deadline, open(tmp_path / "job.out").read()
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        while _job_state(job)[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
            assert time.time() < deadline, open(tmp_path / "job.out").read()
            time.sleep(1)
        state, restarts = _job_state(job)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    log = open(tmp_path / "job.out").read()
    assert state == "COMPLETED" and restarts == 1, log
    assert "requeueing job" in log and "attempt 2" in log
    assert 0 < summary(str(run_dir))["resumed_from_step"] < 4000
    ref = tmp_path / "ref"
    r = mpirun(3, "train", "--out", ref, *args)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(params(str(run_dir)), params(str(ref)))
