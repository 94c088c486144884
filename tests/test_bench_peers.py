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
        "--fed-features", 16, "--fed-hidden", 8, "--timeout", 120,
        "--cnn", '["conv2d 2 3 same", "relu", "maxpool2d 2", "flatten", "dense 3"]', "--cnn-input-shape", "1,8,8"]
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
    assert list(rows) == ["step throughput", "time to target", "federated round", "CNN step throughput"]
    assert all(row["mpitrain"] > 0 for row in rows.values())
    step, tta, fed, cnn = rows.values()
    assert (step["ranks"], step["global_batch"], fed["ranks"], fed["clients"]) == (2, 16, 3, 4)
    assert (cnn["ranks"], cnn["global_batch"], cnn["n_params"], cnn["threads"]) == (2, 16, 20 + 33 * 3, 1)
    assert cnn["mpitrain"] == pytest.approx(16 / cnn["step_ms"] * 1e3)
    assert 0 < cnn["compute_ms"] <= cnn["step_ms"] and cnn["allreduce_ms"] > 0
    assert 0 < tta["steps_to_target"] <= 200 and tta["steps_to_target"] % 20 == 0
    assert "speedup" in stdout


@pytest.mark.parametrize("module, comparisons", [("torch", ["step throughput", "time to target", "CNN step throughput"]),
                                                 ("flwr", ["federated round"])])
def test_peer_rows_or_skip_line(peers, module, comparisons):
    stdout, rows = peers
    for name in comparisons:
        row = rows[name]
        if INSTALLED[module]:
            assert SKIP_LINE[module] not in stdout
            assert row["peer"] > 0
            faster = row["mpitrain"] / row["peer"] if "throughput" in name else row["peer"] / row["mpitrain"]
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


def test_cnn_only_and_lenet5_target(tmp_path):
    """--compare cnn runs only the CNN comparison; a LeNet-5 row on 2 ranks carries the issue's target."""
    r = launch([sys.executable, "-m", "mpitrain", "bench", "peers", "--compare", "cnn", "--ranks", "2",
                "--batch-per-rank", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = glob.glob(str(tmp_path / "peers-*.json"))
    with open(path, encoding="utf-8") as f:
        (row,) = json.load(f)["results"]
    assert (row["comparison"], row["model"], row["n_params"], row["target"]) == ("CNN step throughput", "lenet5",
                                                                                 61706, "≥ 1.5× at 2 ranks")
    assert row["mpitrain"] > 0 and (row["peer"] is not None and row["peer"] > 0) == INSTALLED["torch"]
    assert "MLP" not in r.stdout and "flwr" not in r.stdout


@pytest.mark.parametrize("args, words", [(["--compare", "cnn,gpu"], "--compare cnn,gpu: expected some of"),
                                         (["--cnn", "mlp"], "--cnn mlp: the CNN comparison takes"),
                                         (["--cnn", "[1]"], "--model [1]: expected mlp")])
def test_refuses_bad_comparisons(tmp_path, args, words):
    r = mpirun(1, "bench", "peers", *args, "--out", tmp_path, timeout=60)
    assert r.returncode == 2 and words in r.stderr and len(r.error_lines()) == 1, r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not INSTALLED["torch"], reason="PyTorch is not installed")
def test_torch_ddp_cnn_refuses_time_to_target(tmp_path):
    r = launch([sys.executable, "-m", "mpitrain.bench.peers.torch_ddp", "--model", "lenet5", "--data",
                str(tmp_path / "d.h5")], timeout=60)
    assert r.returncode == 2 and "--model mlp only" in r.stderr
