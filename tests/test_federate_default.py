"""`mpirun -n 5 python -m mpitrain federate` with no arguments: the embedded digits, partitioned
Dirichlet(0.5) over 16 clients into a cached file of its own on first use."""
import hashlib
import os

import h5py
import pytest
from conftest import mpirun, summary

LINE = "federate: no data.path given, using the embedded digits partitioned Dirichlet(0.5) over 16 clients: "


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_default_federate_on_partitioned_digits(tmp_path, cache_home):
    env = {"XDG_CACHE_HOME": cache_home}
    cached = os.path.join(cache_home, "mpitrain", "digits-dirichlet16.h5")
    train_file = os.path.join(cache_home, "mpitrain", "digits.h5")
    if not os.path.exists(train_file):  # train's default, made as `train` makes it (another test may have)
        r = mpirun(2, "train", "--quiet", "--set", "train.steps=1", "--out", tmp_path / "t", env=env)
        assert r.returncode == 0, r.stderr
    before = digest(train_file)
    first = os.path.exists(cached)
    out = tmp_path / "cwd"
    os.makedirs(out)
    r = mpirun(5, "federate", env=env, cwd=str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(LINE + cached) == 1  # rank 0 alone says what it chose
    if not first:  # prepared by one rank, once
        assert r.stdout.count(f"{cached}: partition dirichlet over 16 clients") == 1
    with h5py.File(cached, "r") as f:
        g = f["partition"]
        assert (g.attrs["scheme"], int(g.attrs["clients"]), float(g.attrs["alpha"]), int(g.attrs["seed"])) == \
            ("dirichlet", 16, 0.5, 0)
    (run_dir,) = [os.path.join(out, "runs", d) for d in os.listdir(out / "runs")]
    s = summary(run_dir)
    assert s["rounds"] == 50 and s["clients"] == 16 and s["world_size"] == 5
    assert s["data"] == cached and s["test_accuracy"] >= 0.8
    assert f'path = "{cached}"' in open(os.path.join(run_dir, "config.toml"), encoding="utf-8").read()
    # train's file is untouched: no partition, the same bytes
    assert digest(train_file) == before
    with h5py.File(train_file, "r") as f:
        assert "partition" not in f

    # the second time: the cached file is used as it is (nothing prepared again), quiet prints nothing
    stamp = os.stat(cached).st_mtime_ns
    r = mpirun(3, "federate", "--quiet", "--set", "fed.rounds=2", "--out", tmp_path / "again", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and os.stat(cached).st_mtime_ns == stamp


def test_given_data_path_is_kept(tmp_path, cache_home, synth):
    """data.path given (--data, --set or --config) means that file: no default, no line."""
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\npath = "{synth}"\n', encoding="utf-8")
    for how in (["--data", synth], ["--set", f"data.path={synth}"], ["--config", config]):
        r = mpirun(3, "federate", *how, "--out", tmp_path / "r", env={"XDG_CACHE_HOME": cache_home})
        assert r.returncode == 2 and "no partition" in r.stderr, how  # synth.h5 has none
        assert "federate: no data.path given" not in r.stdout


def test_half_partitioned_cache_is_never_left(tmp_path, monkeypatch):
    """A failure (or crash) between prepare and write_partition leaves no file under the cached name."""
    from mpitrain.config import default_federated_data_path
    from mpitrain.data import partition
    from mpitrain.errors import MpitrainError
    from mpitrain.session import _prepare_default

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_federated_data_path()

    def crash(*args, **kwargs):
        raise MpitrainError("crashed while partitioning")

    monkeypatch.setattr(partition, "write_partition", crash)
    with pytest.raises(MpitrainError):
        _prepare_default(0, path)
    assert not os.path.exists(path) and os.listdir(os.path.dirname(path)) == []
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _prepare_default(0, path)
    with h5py.File(path, "r") as f:
        assert "partition" in f and "train/x" in f
    assert os.listdir(os.path.dirname(path)) == ["digits-dirichlet16.h5"]
