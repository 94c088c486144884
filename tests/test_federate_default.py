"""`mpirun -n 5 python -m mpitrain federate` with no arguments: the embedded digits, partitioned once into a
cached file of its own, as train prepares digits."""
import os

import h5py

from conftest import mpirun, summary


def test_federate_with_no_arguments(tmp_path):
    cache = str(tmp_path / "cache")
    r = mpirun(5, "federate", "--set", "fed.rounds=3", "--out", tmp_path / "run", env={"XDG_CACHE_HOME": cache},
               cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = os.path.join(cache, "mpitrain", "digits-dirichlet16.h5")
    assert r.stdout.count("federate: no data.path given, using the embedded digits partitioned Dirichlet(0.5) "
                          f"over 16 clients: {path}") == 1
    with h5py.File(path, "r") as f:
        assert len(f["partition/n_train"]) == 16
    s = summary(str(tmp_path / "run"))
    assert s["clients"] == 16 and s["test_accuracy"] > 0.5
    assert not os.path.exists(os.path.join(cache, "mpitrain", "digits.h5"))  # train's file is not touched
