"""Bad input: one clear line naming the file/key/rank, exit code 2, no hang, on every launch size.
A rank that crashes mid-training ends the whole job."""
import glob
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from conftest import mpirun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(synth, tmp_path, edit):
    path = str(tmp_path / "bad.h5")
    shutil.copy(synth, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace(key, data):
    def edit(f):
        del f[key]
        f[key] = data
    return edit


def _set_rows(key, rows, value):
    def edit(f):
        d = f[key][...]
        d[rows] = value
        f[key][...] = d
    return edit


CASES = {
    "missing file": (lambda s, t: str(t / "nope.h5"), [], "no such file"),
    "not hdf5": (lambda s, t: (t / "x.h5").write_text("hello") and str(t / "x.h5"), [], "not an HDF5 file"),
    "missing dataset": (lambda s, t: _copy(s, t, lambda f: f.__delitem__("train/y")), [], "missing dataset train/y"),
    "wrong shape": (lambda s, t: _copy(s, t, _replace("train/x", np.zeros((1200, 3, 4), np.float32))), [],
                    "train/x has shape (1200, 3, 4)"),
    "wrong dtype": (lambda s, t: _copy(s, t, _replace("train/x", np.zeros((1200, 12), np.float64))), [],
                    "expected float32"),
    "label count": (lambda s, t: _copy(s, t, _replace("train/y", np.zeros(7, np.int64))), [],
                    "expected 960 integer labels"),
    "nan features": (lambda s, t: _copy(s, t, _set_rows("train/x", slice(950, 955), np.nan)), [],
                     "features contain NaN or Inf"),
    "inf test features": (lambda s, t: _copy(s, t, _set_rows("test/x", 0, np.inf)), [],
                          "test rows 0.."),
    "label out of range": (lambda s, t: _copy(s, t, _set_rows("train/y", 3, 9)), [], "labels must lie in 0..3"),
    "unknown key": (lambda s, t: s, ["train.lrate=0.1"], "unknown key train.lrate"),
    "bad value": (lambda s, t: s, ["train.global_batch=abc"], "train.global_batch = 'abc': expected an integer"),
    "bad choice": (lambda s, t: s, ["train.optimizer=adagrad"], "train.optimizer = 'adagrad'"),
    "batch too large": (lambda s, t: s, ["train.global_batch=5000"], "fewer than train.global_batch = 5000"),
    "empty hidden": (lambda s, t: s, ["model.hidden=[]"], "model.hidden = []"),
}


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(tmp_path, synth, case, ranks):
    make, sets, expected = CASES[case]
    path = make(synth, tmp_path)
    args = ["train", "--quiet", "--out", str(tmp_path / "out"), "--set", f"data.path={path}"]
    for s in sets:
        args += ["--set", s]
    r = mpirun(ranks, *args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.error_lines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mpitrain: error: ") and expected in lines[0], lines[0]
    if case not in ("unknown key", "bad value", "bad choice", "empty hidden"):
        assert (path in lines[0]) or case == "batch too large"
    assert not os.path.exists(tmp_path / "out" / "model.h5")


def test_error_names_the_rank_that_saw_it(tmp_path, synth):
    """Only the last rank's hyperslab has NaN: the one line names that rank."""
    path = _copy(synth, tmp_path, _set_rows("train/x", 959, np.nan))
    r = mpirun(3, "train", "--quiet", "--set", f"data.path={path}", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert "(rank 2)" in line and "train rows 630..959" in line


def test_fewer_samples_than_ranks(tmp_path, synth):
    def two_samples(f):
        _replace("train/x", np.zeros((2, 12), np.float32))(f)
        _replace("train/y", np.zeros(2, np.int64))(f)

    path = _copy(synth, tmp_path, two_samples)
    r = mpirun(3, "train", "--quiet", "--set", f"data.path={path}", "--set", "train.global_batch=1", timeout=120)
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert line == f"mpitrain: error: {path}: train has 2 samples, fewer than the 3 ranks"


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = [1\n")
    r = mpirun(2, "train", "--config", cfg, timeout=120)
    assert r.returncode == 2 and len(r.error_lines()) == 1 and "not valid TOML" in r.stderr


def test_bad_source_for_prepare(tmp_path):
    r = mpirun(2, "prepare", "--source", "mnist", "--out", tmp_path / "x.h5", timeout=120)
    assert r.returncode == 2 and len(r.error_lines()) == 1 and "--source 'mnist'" in r.stderr
    assert not os.listdir(tmp_path)


def test_rank_crash_ends_the_job(tmp_path, synth):
    """Rank 2 raises after a few steps of a very long run: every rank ends within seconds of the failure
    (timed from the raise, so a slow start-up of 4 ranks on a loaded 2-core CI box does not count), exit
    non-zero."""
    r = mpirun(4, os.path.join(ROOT, "tests", "mpi_probe.py"), "raise", synth, str(tmp_path / "o"),
               module=False, timeout=120)
    ended = time.time()
    assert r.returncode != 0
    assert "rank 2 of 4 failed" in r.stderr and "injected failure" in r.stderr
    raised = float(next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("raising at")))
    assert 0 <= ended - raised < 10


def test_slow_rank_waits_for_the_default_dataset(tmp_path):
    """First use of the default dataset on 2 ranks, rank 1 arriving after rank 0 has written it: the job
    finishes (it hung when rank 1's wait depended on whether it still saw the file missing)."""
    probe = os.path.join(ROOT, "tests", "mpi_probe.py")
    r = mpirun(2, probe, "slow-default", str(tmp_path / "o"), module=False, timeout=120,
               env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "o" / "summary.json")


def test_non_finite_state_on_one_rank_ends_every_rank(tmp_path):
    """A checkpoint whose state is not finite on rank 0 only (rank 1's part is): one clear line, every
    rank exits (exit 2), nothing written."""
    probe = os.path.join(ROOT, "tests", "mpi_probe.py")
    r = mpirun(2, probe, "nonfinite-checkpoint", str(tmp_path / "o"), module=False, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "not finite" in r.stderr and "Traceback" not in r.stderr
    assert not glob.glob(str(tmp_path / "o" / "checkpoints" / "ckpt-*.h5"))
