"""Federated rounds launched with real mpiexec: accuracy, isolation, determinism, scale, bad input."""
import glob
import os

import numpy as np
import pytest

from conftest import mpirun, params, summary

FEDAVG = ["train.optimizer=sgd", "train.lr=0.05", "fed.local_epochs=5", "fed.local_batch=10",
          "fed.fraction=0.25", "fed.target_accuracy=0.9"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits with a Dirichlet(0.5) and an IID partition over 16 clients (two files)."""
    d = tmp_path_factory.mktemp("fed")
    paths = {}
    for scheme in ("dirichlet", "iid"):
        paths[scheme] = str(d / f"{scheme}.h5")
        r = mpirun(1, "prepare", "--source", "digits", "--out", paths[scheme], "--partition", scheme,
                   "--clients", 16, *(["--alpha", 0.5] if scheme == "dirichlet" else []))
        assert r.returncode == 0, r.stderr
    return paths


def federate(n, data, out, *sets, env=None, timeout=300):
    args = ["federate", "--quiet", "--data", data, "--out", out]
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return summary(out)


def test_fedavg_dirichlet_and_iid_accuracy(tmp_path, digits):
    non_iid = federate(5, digits["dirichlet"], str(tmp_path / "d"), *FEDAVG, "fed.rounds=50", "fed.erase=false")
    iid = federate(5, digits["iid"], str(tmp_path / "i"), *FEDAVG, "fed.rounds=20")
    assert non_iid["test_accuracy"] >= 0.93
    assert iid["test_accuracy"] >= 0.95
    assert 0 < non_iid["worst_client_accuracy"] <= non_iid["federated_accuracy"] <= 1  # without erase only
    assert iid["worst_client_accuracy"] is None and iid["erase"]  # fed.erase (default): one client's value


def test_fedavg_needs_fewer_rounds_than_fedsgd(tmp_path, digits):
    avg = federate(5, digits["iid"], str(tmp_path / "a"), *FEDAVG, "fed.rounds=40")
    sgd = federate(5, digits["iid"], str(tmp_path / "s"), *[s for s in FEDAVG if not s.startswith("fed.local_")],
                   "fed.rounds=40", "fed.strategy=fedsgd", "train.lr=0.5")  # one full-batch step: no local_*
    assert avg["rounds_to_target"] is not None
    assert sgd["rounds_to_target"] is None or sgd["rounds_to_target"] > avg["rounds_to_target"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova"])
def test_every_strategy_learns(tmp_path, digits, strategy):
    s = federate(3, digits["dirichlet"], str(tmp_path / strategy), *FEDAVG, "fed.rounds=15",
                 f"fed.strategy={strategy}", "fed.server_lr=0.5" if strategy == "fedavgm" else "fed.tau=0.001")
    assert s["test_accuracy"] >= 0.85, s


def test_same_seed_same_model_and_rank_count_invariance(tmp_path, digits):
    sets = [*FEDAVG, "fed.rounds=5", "model.hidden=[32]"]
    federate(5, digits["dirichlet"], str(tmp_path / "a"), *sets)
    federate(5, digits["dirichlet"], str(tmp_path / "b"), *sets)
    federate(3, digits["dirichlet"], str(tmp_path / "c"), *sets)
    a, b, c = params(str(tmp_path / "a")), params(str(tmp_path / "b")), params(str(tmp_path / "c"))
    assert np.array_equal(a, b)
    assert np.max(np.abs(a - c)) <= 1e-5 * np.abs(a).max()


def test_only_model_sized_vectors_and_scalars_cross_ranks(tmp_path, digits):
    """Every message any rank sends (traced by the comm layer) is the model (plus 3 flags on the way out,
    7 sums on the way back) or a handful of scalars: never samples or labels."""
    trace = str(tmp_path / "trace")
    s = federate(4, digits["dirichlet"], str(tmp_path / "o"), *FEDAVG, "fed.rounds=3",
                 env={"MPITRAIN_COMM_TRACE": trace})
    n = s["n_params"]
    files = glob.glob(trace + ".*")
    assert len(files) == 4
    seen = set()
    for path in files:
        for line in open(path, encoding="utf-8"):
            op, dtype, shape, nbytes = line.split()
            seen.add((op, dtype, shape))
            count = int(np.prod([int(d) for d in shape.split("x")]))
            assert (dtype == "float32" and count in (n, n + 3, n + 7)) or (dtype in ("float64", "int64") and count <= 4), line
    assert ("Reduce", "float32", str(n + 7)) in seen and ("Bcast", "float32", str(n + 3)) in seen


def test_thousand_virtual_clients_on_eight_client_ranks(tmp_path):
    data = str(tmp_path / "k.h5")
    r = mpirun(1, "prepare", "--source", "synthetic", "--samples", 6000, "--features", 16, "--classes", 4,
               "--out", data, "--partition", "iid", "--clients", 1000)
    assert r.returncode == 0, r.stderr
    s = federate(9, data, str(tmp_path / "o"), "fed.fraction=0.05", "fed.rounds=5", "model.hidden=[16]",
                 timeout=600)
    assert s["clients"] == 1000 and s["world_size"] == 9 and s["rounds"] == 5


@pytest.mark.parametrize("case", ["no partition", "too many ranks", "fraction", "one rank", "strategy"])
def test_bad_federated_input(tmp_path, digits, case):
    data, ranks, sets = digits["iid"], 3, []
    if case == "no partition":
        data = str(tmp_path / "plain.h5")
        assert mpirun(1, "prepare", "--source", "digits", "--out", data).returncode == 0
    elif case == "too many ranks":
        ranks = 18
    elif case == "fraction":
        sets = ["fed.fraction=1.5"]
    elif case == "strategy":
        sets = ["fed.strategy=fedbest"]
    else:
        ranks = 1
    args = ["federate", "--quiet", "--data", data]
    for s in sets:
        args += ["--set", s]
    r = mpirun(ranks, *args, timeout=120)
    expected = {"no partition": "no partition", "too many ranks": "17 client ranks but only 16 clients",
                "fraction": "fed.fraction = 1.5: expected in (0, 1]", "one rank": "at least 2 ranks",
                "strategy": "fed.strategy = 'fedbest'"}[case]
    assert r.returncode == 2, r.stderr
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: ") and expected in line


def test_empty_client_is_refused(tmp_path, digits):
    import shutil

    import h5py

    data = str(tmp_path / "e.h5")
    shutil.copy(digits["iid"], data)
    with h5py.File(data, "r+") as f:
        f["partition/n_train"][3] = 0
    r = mpirun(3, "federate", "--quiet", "--data", data, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 2 and "client 3 has no training samples" in r.stderr
    assert os.path.exists(data) and not os.path.exists(os.path.join(tmp_path, "runs"))


def test_round_is_the_sample_weighted_mean_of_client_models(tmp_path):
    """Two clients of 10 and 1000 training samples, one FedAvg round under mpiexec: the new global model
    is Σ n_k x_k / Σ n_k of the client models, trained here in-process by the same Client code."""
    import h5py

    from mpitrain.config import Config
    from mpitrain.data.prepare import prepare
    from mpitrain.federated.run import Client
    from mpitrain.kernels import cpu
    from mpitrain.model import Model, ModelSpec

    data = str(tmp_path / "two.h5")
    prepare("synthetic", data, samples=2000, features=8, classes=3)
    with h5py.File(data, "r+") as f:
        f["partition/x"], f["partition/y"] = f["train/x"][:1262], f["train/y"][:1262]
        f["partition/offsets"] = np.array([0, 12, 1262])
        f["partition/n_train"] = np.array([10, 1000])
    sets = ["model.hidden=[8]", "fed.rounds=1", "fed.fraction=1", "fed.local_epochs=2", "train.optimizer=sgd",
            "train.lr=0.1"]
    federate(3, data, str(tmp_path / "o"), *sets)
    cfg = Config()
    cfg.model.hidden, cfg.fed.local_epochs, cfg.train.optimizer, cfg.train.lr = [8], 2, "sgd", 0.1
    model = Model(ModelSpec("mlp", 8, 3, (8,)))
    start = model.init_params(cfg.train.seed)
    client = Client(model, cpu, cfg.train, cfg.fed)
    with h5py.File(data, "r") as f:
        x, y = f["partition/x"][...], f["partition/y"][...]
    models = [start + client.train(k, 0, x[a:a + n], y[a:a + n], start)[0]
              for k, (a, n) in enumerate(((0, 10), (12, 1000)))]
    expected = np.average(models, axis=0, weights=[10, 1000])
    got = params(str(tmp_path / "o"))
    assert np.max(np.abs(got - expected)) <= 1e-6 * np.abs(expected).max()
    assert np.max(np.abs(got - np.mean(models, axis=0))) > 1e-3  # the weighting matters here


@pytest.mark.parametrize("layer", [[], ["fed.secure_aggregation=true"], ["fed.aggregator=median"],
                                   ["fed.dp.noise_multiplier=1"]], ids=["plain", "secure", "median", "dp"])
def test_a_diverging_run_stops_at_its_first_non_finite_round_on_every_aggregation_path(tmp_path, digits, layer):
    """Before: the plain path ran every round on NaN and then failed to checkpoint; secure aggregation
    encoded NaN as 0 and 'succeeded'.  Now every path stops with train's one line, writing nothing more."""
    out = str(tmp_path / "nan")
    args = ["federate", "--quiet", "--data", digits["iid"], "--out", out]
    for s in ["train.optimizer=sgd", "train.lr=1e30", "fed.local_epochs=1", "fed.fraction=0.25", "fed.rounds=4",
              "checkpoint.every=1", *layer]:
        args += ["--set", s]
    r = mpirun(3, *args, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert line.startswith("mpitrain: error: round ") and "the loss or a client update is not finite; " \
        "stopping before it reaches a checkpoint" in line, line
    failed = int(line.split("round ")[1].split(":")[0])
    saved = [int(os.path.basename(p)[5:14]) for p in glob.glob(os.path.join(out, "checkpoints", "ckpt-*.h5"))]
    assert all(i < failed for i in saved)
    assert not os.path.exists(os.path.join(out, "summary.json")) and not os.path.exists(os.path.join(out, "model.h5"))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        assert "NaN" not in f.read()


def test_federated_evaluation_without_local_test_splits_is_null(tmp_path):
    data = str(tmp_path / "d.h5")
    r = mpirun(1, "prepare", "--source", "digits", "--out", data, "--partition", "iid", "--clients", 4,
               "--client-test-fraction", 0)
    assert r.returncode == 0, r.stderr
    s = federate(2, data, str(tmp_path / "o"), "model.kind=softmax", "fed.rounds=1", "fed.local_epochs=1")
    assert s["federated_accuracy"] is None and s["worst_client_accuracy"] is None and s["test_accuracy"] > 0.5
