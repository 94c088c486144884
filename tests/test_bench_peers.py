"""bench peers on tiny sizes: mpitrain's side always gives its rows; an installed peer (PyTorch, flwr) gives
positive numbers beside them, one that is not installed is skipped with one line saying so (CI installs
neither; a developer machine with `.[peers]` runs both)."""
import glob
import importlib.util
import json
import sys

import pytest

from conftest import launch, mpirun

TINY = ["--ranks", 2, "--batch-per-rank", 8, "--features", 16, "--hidden", 8, "--classes", 3, "--steps", 3,
        "--warmup", 1, "--target", 0.6, "--tta-samples", 1000, "--tta-steps", 200, "--eval-every", 20,
        "--flower-clients", 4, "--rounds", 3, "--fraction", 0.5, "--client-ranks", 2, "--fed-samples", 400,
        "--fed-features", 16, "--fed-hidden", 8, "--timeout", 120]
INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("torch", "flwr")}
SKIP_LINE = {"torch": "PyTorch is not installed: skipping the PyTorch DDP comparison (pip install 'mpitrain[peers]')",
             "flwr": "flwr is not installed: skipping the Flower comparison (pip install 'mpitrain[peers]')"}


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    r = launch([sys.executable, "-m", "mpitrain", "bench", "peers", *map(str, TINY), "--out", str(out)], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = glob.glob(str(out / "peers-*.json"))
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["results"]
    assert glob.glob(str(out / "peers-*.csv"))
    return r.stdout, {row["comparison"]: row for row in rows}


def test_mpitrain_side(peers):
    stdout, rows = peers
    assert list(rows) == ["step throughput", "time to target", "federated round"]
    assert all(row["mpitrain"] > 0 for row in rows.values())
    step, tta, fed = rows.values()
    assert (step["ranks"], step["global_batch"], fed["ranks"], fed["clients"]) == (2, 16, 3, 4)
    assert 0 < tta["steps_to_target"] <= 200 and tta["steps_to_target"] % 20 == 0
    assert "speedup" in stdout


@pytest.mark.parametrize("module, comparisons", [("torch", ["step throughput", "time to target"]),
                                                 ("flwr", ["federated round"])])
def test_peer_rows_or_skip_line(peers, module, comparisons):
    stdout, rows = peers
    for name in comparisons:
        row = rows[name]
        if INSTALLED[module]:
            assert SKIP_LINE[module] not in stdout
            assert row["peer"] > 0
            faster = row["mpitrain"] / row["peer"] if name == "step throughput" else row["peer"] / row["mpitrain"]
            assert row["speedup"] == pytest.approx(faster)
        else:
            assert SKIP_LINE[module] in stdout.splitlines()
            assert row["peer"] is None and row["speedup"] is None
    if INSTALLED[module] and module == "torch":  # same initial parameters, batches and optimizer
        assert rows["time to target"]["peer_steps_to_target"] > 0


def test_refuses_to_run_under_several_ranks(tmp_path):
    r = mpirun(2, "bench", "peers", *TINY, "--out", tmp_path, timeout=120)
    assert r.returncode == 2 and "launch it as one process" in r.stderr
    assert not list(tmp_path.iterdir())
