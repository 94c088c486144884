"""Robust aggregation and attack simulation: the rules against hand-computed values in-process, and
digits under mpiexec with 20 % sign-flip or scaling attackers (robust rules hold, the plain mean breaks)."""
import glob
import json
import os

import numpy as np
import pytest

from conftest import mpirun, summary
from mpitrain import config
from mpitrain.errors import MpitrainError
from mpitrain.federated.robust import aggregate, attack_update, attackers, krum_scores, nnm

# --------------------------------------------------------------------------------------------------
# 1. the rules
# --------------------------------------------------------------------------------------------------

X = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -500.0]], np.float32)


def test_median_and_trimmed_mean():
    np.testing.assert_allclose(aggregate("median", X), [3.0, 20.0])
    # β = 0.2 of 5 → one value cut at each end, per coordinate
    np.testing.assert_allclose(aggregate("trimmed_mean", X, fraction=0.2), [3.0, 20.0])
    np.testing.assert_allclose(aggregate("trimmed_mean", X, fraction=0.0), X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(aggregate("mean", X, weights=[1, 1, 1, 1, 0]), [2.5, 25.0])


def test_krum_picks_the_most_central_honest_update():
    rng = np.random.default_rng(0)
    honest = rng.normal(1.0, 0.1, (7, 20))
    bad = np.full((2, 20), -10.0)
    x = np.concatenate([honest, bad]).astype(np.float32)
    # scores by hand: sum of squared distances to the n − f − 2 = 9 − 2 − 2 = 5 nearest others
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    expected = [np.sort(np.delete(d[i], i))[:5].sum() for i in range(9)]
    np.testing.assert_allclose(krum_scores(x, 2), expected, rtol=1e-9)
    k = aggregate("krum", x, fraction=0.25)  # f = ⌊0.25·9⌋ = 2
    assert any(np.array_equal(k, h.astype(np.float32).astype(np.float64)) for h in x[:7])
    assert np.argmin(expected) < 7
    m = aggregate("multikrum", x, fraction=0.25)  # mean of the n − f = 7 best: exactly the honest ones
    np.testing.assert_allclose(m, x[:7].astype(np.float64).mean(0), rtol=1e-6)
    with pytest.raises(MpitrainError, match="n ≥ 2f \\+ 3"):
        aggregate("krum", x[:6], fraction=0.4)


def test_nearest_neighbour_mixing():
    x = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    # f = 1: each row → the mean of its n − f = 3 nearest rows, itself included
    np.testing.assert_allclose(nnm(x, 1), [[1.0], [1.0], [1.0], [13 / 3]])
    np.testing.assert_allclose(aggregate("median", x, fraction=0.25, mixing="nnm"), [1.0])
    rng = np.random.default_rng(0)
    honest = rng.normal(1.0, 0.1, (7, 20))
    x = np.concatenate([honest, np.full((2, 20), -10.0)]).astype(np.float32)
    # f = 2: every honest row mixes exactly the 7 honest ones, so Krum returns their mean
    np.testing.assert_allclose(aggregate("krum", x, fraction=0.25, mixing="nnm"), x[:7].astype(np.float64).mean(0),
                               rtol=1e-9)
    with pytest.raises(MpitrainError, match="fed.robust.mixing"):
        config.load(overrides=["fed.robust.mixing=nnm"])  # with fed.aggregator = mean


def test_norm_bound():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]], np.float32)
    np.testing.assert_allclose(aggregate("norm_bound", x, norm_bound=1.0), [(0.6 + 0.3 + 0.6) / 3, (0.8 + 0.4 + 0.8) / 3],
                               rtol=1e-6)
    # bound 0: the round's median norm (5)
    np.testing.assert_allclose(aggregate("norm_bound", x), [(3 + 0.3 + 3) / 3, (4 + 0.4 + 4) / 3], rtol=1e-6)


def test_attackers_and_attacks():
    a = attackers(7, 50, 0.2)
    assert a.sum() == 10 and np.array_equal(a, attackers(7, 50, 0.2)) and not np.array_equal(a, attackers(8, 50, 0.2))
    d = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(attack_update("sign_flip", d, 10.0), [-1.0, 2.0])
    np.testing.assert_array_equal(attack_update("scale", d, 10.0), [-10.0, 20.0])
    assert attack_update("label_flip", d, 10.0) is d  # label flipping acts on the training labels


# --------------------------------------------------------------------------------------------------
# 2. digits under attack (mpiexec)
# --------------------------------------------------------------------------------------------------

ROBUST = ["train.optimizer=sgd", "train.lr=0.05", "fed.local_epochs=5", "fed.local_batch=10", "fed.fraction=1",
          "fed.rounds=60", "fed.eval_every=20"]
RULES = {"median": [], "trimmed_mean": [], "krum": ["fed.robust.mixing=nnm"], "multikrum": []}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """digits IID over 16 clients, all 16 every round, 60 rounds: the clean mean, and the mean and every rule
    under 20 % (3 of 16) sign-flip and scaling attackers (Krum after nearest-neighbour mixing: alone it locks
    onto one client's model, README).  Returns {(attack, rule): test accuracy}."""
    d = tmp_path_factory.mktemp("robust")
    data = str(d / "iid.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", data, "--partition", "iid", "--clients", 16).returncode == 0
    acc = {}
    runs = [("none", "mean")] + [(a, r) for a in ("sign_flip", "scale") for r in ("mean", *RULES)]
    for attack, rule in runs:
        out = str(d / f"{attack}-{rule}")
        args = ["federate", "--quiet", "--data", data, "--out", out]
        for s in [*ROBUST, *RULES.get(rule, []), f"fed.attack={attack}", f"fed.aggregator={rule}",
                  "fed.attack_fraction=0.2"]:
            args += ["--set", s]
        r = mpirun(3, *args, timeout=300)
        if r.returncode == 0:
            s = summary(out)
            acc[attack, rule] = s["test_accuracy"]
            if attack != "none":
                assert s["attackers"] == 3 and s["aggregator"] == rule
        else:  # the plain mean under a scaling attack may diverge to a non-finite model: it failed
            assert rule == "mean" and "not finite" in r.stderr, r.stderr
            acc[attack, rule] = 0.0
    return acc


@pytest.mark.parametrize("attack", ["sign_flip", "scale"])
@pytest.mark.parametrize("rule", RULES)
def test_robust_rules_stay_within_three_points_of_the_clean_run(attacked, attack, rule):
    clean = attacked["none", "mean"]
    assert clean >= 0.97
    assert attacked[attack, rule] >= clean - 0.03, (attack, rule, attacked)


@pytest.mark.parametrize("attack", ["sign_flip", "scale"])
def test_plain_mean_degrades_under_attack(attacked, attack):
    clean = attacked["none", "mean"]
    assert attacked[attack, "mean"] < clean - 0.05, attacked
    assert attacked[attack, "mean"] < min(attacked[attack, r] for r in RULES)


def test_gathered_updates_are_model_sized_rows(tmp_path):
    """Robust rules gather every client's update: each client rank sends [stop, diverged | rows of n + 4] in one
    float32 Gatherv (after an int64 count); nothing else but the model and scalars crosses ranks."""
    data = str(tmp_path / "d.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", data, "--partition", "iid", "--clients", 8).returncode == 0
    trace = str(tmp_path / "trace")
    out = str(tmp_path / "o")
    r = mpirun(3, "federate", "--quiet", "--data", data, "--out", out, "--set", "fed.aggregator=median",
               "--set", "fed.rounds=2", "--set", "fed.fraction=0.5", env={"MPITRAIN_COMM_TRACE": trace})
    assert r.returncode == 0, r.stderr
    n = summary(out)["n_params"]
    gathered = []
    for path in glob.glob(trace + ".*"):
        for line in open(path, encoding="utf-8"):
            op, dtype, shape, _ = line.split()
            count = int(np.prod([int(x) for x in shape.split("x")]))
            if op == "Gatherv":
                assert dtype == "float32" and (count - 2) % (n + 4) == 0, line
                gathered.append((count - 2) // (n + 4))
            else:
                assert (dtype == "float32" and count in (n, n + 3)) or (dtype in ("int64", "float64") and count <= 4), line
    assert sum(gathered) == 2 * 4  # 4 clients a round, 2 rounds
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["clients"] for line in f] == [4, 4]
