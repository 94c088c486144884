"""Shared fixtures: real `mpiexec` launches (the MPICH wheel's, next to this Python) with timeouts, and
small real HDF5 datasets made by `mpitrain prepare`."""
import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
TIMEOUT = 300


class Result:
    def __init__(self, returncode, stdout, stderr, seconds):
        self.returncode, self.stdout, self.stderr, self.seconds = returncode, stdout, stderr, seconds

    def error_lines(self):
        return [line for line in self.stderr.splitlines() if line.strip()]


def launch(cmd, timeout=TIMEOUT, env=None, cwd=None):
    """Run cmd in its own process group; on timeout kill the whole group (mpiexec and every rank)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}")
    return Result(proc.returncode, out, err, time.perf_counter() - t)


def mpirun(n, *args, module=True, **kw):
    """`mpiexec -n N python -m mpitrain ARGS` (or `python SCRIPT ARGS` with module=False)."""
    py = [sys.executable, "-m", "mpitrain"] if module else [sys.executable]
    return launch([MPIEXEC, "-n", str(n), *py, *map(str, args)], **kw)


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory):
    """A private XDG cache: the embedded default dataset is prepared there on first use."""
    return str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small learnable dataset: 1200 samples, 12 features, 4 classes."""
    path = tmp_path_factory.mktemp("data") / "synth.h5"
    from mpitrain.data.prepare import prepare

    prepare("synthetic", str(path), samples=1200, features=12, classes=4, seed=3)
    return str(path)


def summary(out_dir):
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def params(out_dir):
    with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
        return np.asarray(f["params"][...])


def saved(out, name):
    """(path, rows) of the one `bench NAME` result in the folder out; its CSV has the same rows."""
    (path,) = glob.glob(os.path.join(str(out), f"{name}-*.json"))
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    with open(path[:-5] + ".csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(doc["results"])
    return path, doc["results"]


def central_diff(f, a, eps=1e-6):
    """d f() / d a by central differences, perturbing a in place (the gradient checks' reference)."""
    g = np.zeros_like(a, dtype=np.float64)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def snapshot(out):
    """{path: (bytes, mtime)} of every file under out but the lock (each run that claims the folder writes its
    pid there): what a refused or finished run must leave alone."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in set(names) - {".lock"}:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[path] = (f.read(), os.stat(path).st_mtime_ns)
    return found


def ok(r):
    """r, a launch that must have succeeded (its stderr as the failure's message)."""
    assert r.returncode == 0, r.stderr
    return r


def records(out):
    """The run's metrics.jsonl as a list of dicts."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
