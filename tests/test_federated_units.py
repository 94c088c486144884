"""In-process unit tests of the federated pieces (no mpiexec): server strategies against hand-computed
numbers, FedProx's proximal gradient, weighted aggregation, client partitions, the partition file,
client sampling and local client training (federated rounds themselves run under mpiexec in
test_federated.py).

Equations: ../shared/reference.md (FedAvg, FedProx, FedAvgM, FedOpt = Reddi et al. Alg. 2, FedNova).
"""
import math
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from mpitrain.config import Config
from mpitrain.data.partition import SCHEMES, split_clients, write_partition
from mpitrain.data.prepare import prepare
from mpitrain.data.shard import DataFile
from mpitrain.errors import MpitrainError
from mpitrain.federated.aggregation import N_STATS, MeanAggregator
from mpitrain.federated.robust import GatherAggregator
from mpitrain.federated.run import Client, Partition, sample_clients
from mpitrain.federated.strategies import (DEFAULT_SERVER_LR, STRATEGIES, check, init_state,
                                           server_update, step_norm)
from mpitrain.kernels import cpu
from mpitrain.model import Model, ModelSpec
from mpitrain.optim import Optimizer
from mpitrain.trainer import Stepper

f32 = np.float32
RTOL, ATOL = 2e-6, 1e-7  # float32 state and parameters against float64 hand computations


def vec(*values):
    return np.array(values, f32)


def rounds(strategy, x0, deltas, **kw):
    """Apply server_update over successive rounds; returns [(x, state copies)] after each round."""
    x = vec(*x0)
    state = init_state(strategy, len(x))
    out = []
    for d in deltas:
        ret = server_update(strategy, x, vec(*d), state, **kw)
        assert ret is x  # updated in place
        out.append((x.copy(), {k: v.copy() for k, v in state.items()}))
    return out


def close(got, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# 1. server strategies
# --------------------------------------------------------------------------------------------------

X0 = (1.0, -2.0, 0.5)
D = ((0.2, -0.4, 1.0), (-0.6, 0.2, 0.0), (0.1, 0.1, -2.0))


def test_strategy_names_and_default_server_lr():
    assert set(STRATEGIES) == {"fedsgd", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                               "fednova"}
    # Reddi et al.: η 0.1 for Adam/Adagrad, 0.01 for Yogi; the others default to 1 in federate
    assert DEFAULT_SERVER_LR == {"fedadam": 0.1, "fedadagrad": 0.1, "fedyogi": 0.01}


def test_init_state_slots():
    n = 7
    expected = {"fedsgd": set(), "fedavg": set(), "fedprox": set(), "fednova": set(), "fedavgm": {"v"},
                "fedadam": {"m", "v"}, "fedyogi": {"m", "v"}, "fedadagrad": {"m", "v"}}
    for strategy in STRATEGIES:
        state = init_state(strategy, n)
        assert set(state) == expected[strategy], strategy
        for v in state.values():
            assert v.shape == (n,) and v.dtype == np.float32 and not v.any()
        if len(state) == 2:  # m and v are separate buffers
            assert not np.shares_memory(state["m"], state["v"])


def test_check_accepts_every_strategy_and_names_the_key():
    for strategy in STRATEGIES:
        check(strategy)
    for bad in ("fedadamw", "FedAvg", "", "scaffold"):
        with pytest.raises(MpitrainError) as e:
            check(bad)
        msg = str(e.value)
        assert "fed.strategy" in msg and repr(bad) in msg and "fedavg" in msg and "fednova" in msg


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedsgd"])
def test_plain_average_strategies(strategy):
    # x ← x + η Δ̄ with η = 0.5
    got = rounds(strategy, X0, D, lr=0.5)
    expected = [(1.1, -2.2, 1.0), (0.8, -2.1, 1.0), (0.85, -2.05, 0.0)]
    for (x, state), e in zip(got, expected):
        close(x, e)
        assert state == {}
    # η = 1: the new model is the average of the client models
    (x, _), = rounds(strategy, X0, D[:1], lr=1.0)
    close(x, (1.2, -2.4, 1.5))


def test_fedavgm():
    # v ← βv + Δ̄; x ← x + η v   (β 0.9, η 0.5)
    got = rounds("fedavgm", X0, D, lr=0.5, momentum=0.9)
    v = [(0.2, -0.4, 1.0),
         (0.9 * 0.2 - 0.6, 0.9 * -0.4 + 0.2, 0.9 * 1.0),  # (-0.42, -0.16, 0.9)
         (0.9 * -0.42 + 0.1, 0.9 * -0.16 + 0.1, 0.9 * 0.9 - 2.0)]  # (-0.278, -0.044, -1.19)
    x = [(1.1, -2.2, 1.0), (0.89, -2.28, 1.45), (0.751, -2.302, 0.855)]
    for (gx, gs), ev, ex in zip(got, v, x):
        close(gs["v"], ev)
        close(gx, ex)
    # momentum 0 is FedAvg
    plain = rounds("fedavg", X0, D, lr=0.5)
    for (a, _), (b, _) in zip(rounds("fedavgm", X0, D, lr=0.5, momentum=0.0), plain):
        close(a, b)


# FedOpt, Reddi et al. Alg. 2 with β1 0.9, β2 0.99, η 0.1.  τ = 0 keeps the hand numbers exact.
X0_OPT = (1.0, -2.0, 0.5)


def test_fedadagrad():
    d = ((2.0, -1.0, 0.5), (2.0, -1.0, 0.5), (0.0, 3.0, -0.5))
    got = rounds("fedadagrad", X0_OPT, d, lr=0.1, beta1=0.9, tau=0.0)
    # round 1: m = 0.1Δ = (0.2, -0.1, 0.05); v = Δ² = (4, 1, 0.25); m/√v = (0.1, -0.1, 0.1)
    m1, v1, x1 = (0.2, -0.1, 0.05), (4.0, 1.0, 0.25), (1.01, -2.01, 0.51)
    # round 2: m = 0.9 m + 0.1Δ = (0.38, -0.19, 0.095); v += Δ² → (8, 2, 0.5); m/√v = ±0.19/√2
    m2, v2 = (0.38, -0.19, 0.095), (8.0, 2.0, 0.5)
    s = 0.19 / math.sqrt(2)
    x2 = (1.01 + 0.1 * s, -2.01 - 0.1 * s, 0.51 + 0.1 * s)
    # round 3: m = (0.342, 0.129, 0.0355); v = (8, 11, 0.75)  (the adagrad sum never forgets)
    m3, v3 = (0.342, 0.129, 0.0355), (8.0, 11.0, 0.75)
    x3 = tuple(a + 0.1 * m / math.sqrt(v) for a, m, v in zip(x2, m3, v3))
    for (gx, gs), em, ev, ex in zip(got, (m1, m2, m3), (v1, v2, v3), (x1, x2, x3)):
        close(gs["m"], em)
        close(gs["v"], ev)
        close(gx, ex)


D_OPT = ((2.0, -1.0, 0.5), (0.1, -1.0, 0.0), (1.0, 0.5, -0.5))
M_OPT = ((0.2, -0.1, 0.05), (0.19, -0.19, 0.045), (0.271, -0.121, -0.0095))


def _check_opt(got, v_expected):
    x = np.array(X0_OPT)
    for (gx, gs), em, ev in zip(got, M_OPT, v_expected):
        x = x + 0.1 * np.array(em) / np.sqrt(ev)
        close(gs["m"], em)
        close(gs["v"], ev)
        close(gx, x)


def test_fedadam():
    got = rounds("fedadam", X0_OPT, D_OPT, lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)
    # v ← 0.99 v + 0.01 Δ²
    v = ((0.04, 0.01, 0.0025),
         (0.99 * 0.04 + 0.01 * 0.01, 0.99 * 0.01 + 0.01 * 1.0, 0.99 * 0.0025),  # (0.0397, 0.0199, 0.002475)
         (0.99 * 0.0397 + 0.01, 0.99 * 0.0199 + 0.0025, 0.99 * 0.002475 + 0.0025))
    _check_opt(got, v)
    close(got[0][0], (1.1, -2.1, 0.6))  # round 1: m/√v = sign(Δ)


def test_fedyogi():
    got = rounds("fedyogi", X0_OPT, D_OPT, lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)
    # v ← v − 0.01 Δ² sign(v − Δ²)
    # round 1: sign(0 − Δ²) = −1 → v = 0.01 Δ² (as Adam)
    # round 2: Δ² = (0.01, 1, 0); v − Δ² = (0.03, −0.99, 0.0025) → signs (+, −, +):
    #          v = (0.04 − 0.0001, 0.01 + 0.01, 0.0025 − 0)  — the first coordinate shrinks, unlike Adam's
    # round 3: Δ² = (1, 0.25, 0.25) > v everywhere → v += 0.01 Δ²
    v = ((0.04, 0.01, 0.0025), (0.0399, 0.02, 0.0025), (0.0499, 0.0225, 0.005))
    _check_opt(got, v)
    adam = rounds("fedadam", X0_OPT, D_OPT, lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)
    assert not np.allclose(got[1][1]["v"], adam[1][1]["v"], rtol=1e-4)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_tau_in_the_denominator(strategy):
    # x ← x + η m / (√v + τ), with τ = 1e-3 (the default) and η = 0.1
    (x, state), = rounds(strategy, X0_OPT, D_OPT[:1], lr=0.1)
    v1 = (4.0, 1.0, 0.25) if strategy == "fedadagrad" else (0.04, 0.01, 0.0025)
    expected = [a + 0.1 * m / (math.sqrt(v) + 1e-3) for a, m, v in zip(X0_OPT, M_OPT[0], v1)]
    close(state["v"], v1)
    close(x, expected)
    assert not np.allclose(x, rounds(strategy, X0_OPT, D_OPT[:1], lr=0.1, tau=0.0)[0][0], rtol=1e-6)


def test_fednova_server_update_scales_by_tau_eff():
    x = vec(1.0, -1.0)
    server_update("fednova", x, vec(0.1, -0.0125), {}, 1.0, tau_eff=5.0)
    close(x, (1.5, -1.0625))
    x = vec(1.0, -1.0)
    server_update("fednova", x, vec(0.1, -0.0125), {}, 0.5, tau_eff=5.0)
    close(x, (1.25, -1.03125))


def test_fednova_against_the_reference_equation():
    """Two clients with different sizes n_k and local steps a_k, aggregated as federate does."""
    x = vec(1.0, -1.0)
    sizes, steps = (10.0, 30.0), (2, 6)
    deltas = (vec(0.2, -0.4), vec(0.6, 0.3))  # Δ_k = y_k − x
    n = len(x)
    agg = np.zeros(n + N_STATS + 1, f32)
    for w, a, d in zip(sizes, steps, deltas):
        agg[:n] += (w / a) * d
        agg[n:n + 5] += (w, w * a, 0.0, 0.0, 1)
    tau_eff = agg[n + 1] / agg[n]
    assert tau_eff == pytest.approx(5.0)  # 0.25·2 + 0.75·6
    server_update("fednova", x, agg[:n] / agg[n], {}, 1.0, tau_eff=tau_eff)
    # reference: p = (0.25, 0.75), d_i = (x − y_i)/a_i, x ← x − τ_eff Σ p_i d_i
    x0 = np.array([1.0, -1.0])
    p = np.array(sizes) / sum(sizes)
    d = [(x0 - (x0 + np.asarray(dk, np.float64))) / a for dk, a in zip(deltas, steps)]
    ref = x0 - 5.0 * (p[0] * d[0] + p[1] * d[1])
    close(ref, (1.5, -1.0625))  # = x + 5·(0.1, −0.0125)
    close(x, ref)
    # FedAvg would have moved to x + Σ p_k Δ_k = (1.5, −0.875): FedNova is not FedAvg for unequal a_k
    assert abs(x[1] - (-0.875)) > 0.1


def test_fednova_equals_fedavg_when_local_steps_are_equal():
    rng = np.random.default_rng(5)
    n, sizes = 6, (13.0, 200.0, 7.0)
    deltas = [rng.standard_normal(n).astype(f32) for _ in sizes]
    models = {}
    for strategy in ("fedavg", "fednova"):
        agg = np.zeros(n + N_STATS + 1, f32)
        for w, d in zip(sizes, deltas):
            agg[:n] += (w / 4 if strategy == "fednova" else w) * d
            agg[n:n + 5] += (w, w * 4, 0.0, 0.0, 1)
        x = np.ones(n, f32)
        server_update(strategy, x, agg[:n] / agg[n], {}, 1.0, tau_eff=agg[n + 1] / agg[n])
        models[strategy] = x
    close(models["fednova"], models["fedavg"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 2. FedProx: the proximal term is the gradient of (μ/2)‖w − w_t‖²
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A softmax model (6 features, 3 classes), a batch of 12 samples and parameters away from 0."""
    spec = ModelSpec("softmax", 6, 3)
    model = Model(spec)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 6)).astype(f32)
    y = rng.integers(0, 3, 12).astype(np.int64)
    w = model.init_params(3)
    w += 0.1 * rng.standard_normal(len(w)).astype(f32)
    anchor = (w + 0.3 * rng.standard_normal(len(w))).astype(f32)
    return SimpleNamespace(model=model, x=x, y=y, w=w, anchor=anchor, n=spec.n_params)


def _sgd_step(t, params, prox=None, lr=0.1):
    stepper = Stepper(t.model, Optimizer(cpu, "sgd", t.n, weight_decay=0.0))
    stepper.prox = prox
    p = params.copy()
    stepper(p, t.x, t.y, lr, 1.0 / len(t.x))
    return p


def test_fedprox_step_adds_mu_times_distance(tiny):
    lr, mu = 0.1, 0.7
    anchor = tiny.anchor.copy()
    plain = _sgd_step(tiny, tiny.w, lr=lr)
    prox = _sgd_step(tiny, tiny.w, (mu, anchor), lr=lr)
    np.testing.assert_array_equal(anchor, tiny.anchor)  # the anchor is not touched
    # update_prox = update_plain − lr·μ·(w − w_t)
    close(prox - tiny.w, (plain - tiny.w) - lr * mu * (tiny.w - tiny.anchor), rtol=1e-4, atol=1e-6)
    assert np.abs(prox - plain).max() > 1e-3  # not zero when w ≠ anchor


def test_fedprox_mu_zero_and_w_at_anchor_equal_the_plain_step(tiny):
    plain = _sgd_step(tiny, tiny.w)
    np.testing.assert_array_equal(_sgd_step(tiny, tiny.w, (0.0, tiny.anchor)), plain)
    np.testing.assert_array_equal(_sgd_step(tiny, tiny.w, (0.5, tiny.w.copy())), plain)


def test_fedprox_term_is_the_gradient_of_the_squared_norm(tiny):
    """The prox contribution to the step, divided by lr, is ∇(μ/2)‖w − w_t‖² = μ(w − w_t) (checked by
    central differences in float64), not the gradient of the unsquared μ‖w − w_t‖."""
    lr, mu = 0.05, 0.4
    g_prox = (_sgd_step(tiny, tiny.w, lr=lr) - _sgd_step(tiny, tiny.w, (mu, tiny.anchor), lr=lr)) / lr
    w, a = tiny.w.astype(np.float64), tiny.anchor.astype(np.float64)

    def h(v):
        return 0.5 * mu * np.sum((v - a) ** 2)

    eps = 1e-4
    fd = np.array([(h(w + eps * e) - h(w - eps * e)) / (2 * eps) for e in np.eye(len(w))])
    close(g_prox, fd, rtol=2e-3, atol=2e-5)
    dist = np.linalg.norm(w - a)
    assert abs(dist - 1.0) > 0.2  # so the unsquared norm's gradient is distinguishable
    unsquared = mu * (w - a) / dist
    assert not np.allclose(g_prox, unsquared, rtol=0.05)


def test_fedprox_full_objective_directional_derivative(tiny):
    """End to end: the prox step's gradient is that of mean loss + (μ/2)‖w − w_t‖² (finite differences
    of the model's own loss along a random direction)."""
    lr, mu = 0.05, 1.5
    g = (tiny.w - _sgd_step(tiny, tiny.w, (mu, tiny.anchor), lr=lr)).astype(np.float64) / lr
    u = np.random.default_rng(2).standard_normal(tiny.n)
    u /= np.linalg.norm(u)

    def objective(v):
        loss, _ = tiny.model.score(v.astype(f32), tiny.x, tiny.y)
        return loss / len(tiny.x) + 0.5 * mu * np.sum((v - tiny.anchor.astype(np.float64)) ** 2)

    eps = 1e-2
    w = tiny.w.astype(np.float64)
    fd = (objective(w + eps * u) - objective(w - eps * u)) / (2 * eps)
    assert g @ u == pytest.approx(fd, rel=2e-2, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# 3. weighted aggregation, as federate builds it
# --------------------------------------------------------------------------------------------------

def _aggregate(deltas, weights, steps=None, strategy="fedavg"):
    n = len(deltas[0])
    agg = np.zeros(n + N_STATS + 1, f32)
    for i, (d, w) in enumerate(zip(deltas, weights)):
        a = steps[i] if steps else 1
        agg[:n] += (w / a if strategy == "fednova" else w) * d
        agg[n:n + 5] += (w, w * a, 0.5 * i, 10 * i, 1)
    return agg, n


def test_weighted_aggregate_is_the_sample_weighted_mean():
    rng = np.random.default_rng(0)
    sizes = [10, 1000, 37]
    deltas = [rng.standard_normal(40).astype(f32) * s for s in (5.0, 0.1, 1.0)]
    agg, n = _aggregate(deltas, [float(s) for s in sizes])
    ref = np.average(np.array(deltas, np.float64), axis=0, weights=sizes)
    close(agg[:n] / agg[n], ref, rtol=1e-5, atol=1e-6)
    unweighted = np.mean(np.array(deltas, np.float64), axis=0)
    assert np.abs(agg[:n] / agg[n] - unweighted).max() > 0.1  # the 10-sample client does not count 1/3
    assert agg[n] == 1047 and agg[n + 4] == 3  # Σω and the number of clients


def test_uniform_weighting_is_the_plain_mean():
    rng = np.random.default_rng(1)
    deltas = [rng.standard_normal(25).astype(f32) for _ in range(4)]
    agg, n = _aggregate(deltas, [1.0] * 4)
    close(agg[:n] / agg[n], np.mean(np.array(deltas, np.float64), axis=0), rtol=1e-5, atol=1e-6)


def test_fednova_aggregate_slots():
    rng = np.random.default_rng(2)
    sizes, steps = [10.0, 1000.0], [3, 50]
    deltas = [rng.standard_normal(9).astype(f32) for _ in sizes]
    agg, n = _aggregate(deltas, sizes, steps, "fednova")
    p = np.array(sizes) / sum(sizes)
    close(agg[:n] / agg[n], p[0] * deltas[0] / 3 + p[1] * deltas[1] / 50, rtol=1e-5, atol=1e-7)
    assert agg[n + 1] / agg[n] == pytest.approx(p[0] * 3 + p[1] * 50, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# 4. split_clients
# --------------------------------------------------------------------------------------------------

Y = np.random.default_rng(1).integers(0, 10, 2000)


def _max_label_share(y, parts):
    return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_uses_every_index_once(scheme):
    for clients in (1, 7, 20):
        parts = split_clients(Y, scheme, clients, alpha=0.5, shards_per_client=2, seed=4)
        assert len(parts) == clients
        assert min(len(p) for p in parts) >= 2
        allidx = np.concatenate(parts)
        assert len(allidx) == len(Y)
        np.testing.assert_array_equal(np.sort(allidx), np.arange(len(Y)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_is_seeded(scheme):
    a = split_clients(Y, scheme, 10, alpha=0.5, seed=3)
    b = split_clients(Y, scheme, 10, alpha=0.5, seed=3)
    c = split_clients(Y, scheme, 10, alpha=0.5, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a, c))


def test_small_dirichlet_is_skewed_iid_is_not():
    iid = _max_label_share(Y, split_clients(Y, "iid", 20, seed=0))
    skewed = _max_label_share(Y, split_clients(Y, "dirichlet", 20, alpha=0.1, seed=0))
    flat = _max_label_share(Y, split_clients(Y, "dirichlet", 20, alpha=100.0, seed=0))
    assert iid < 0.25 and flat < 0.25
    assert skewed > 0.5 and skewed > iid + 0.3


def test_iid_sizes_are_even_quantity_sizes_are_not():
    iid = [len(p) for p in split_clients(Y, "iid", 20, seed=0)]
    assert max(iid) - min(iid) <= 1
    q = np.array([len(p) for p in split_clients(Y, "quantity", 20, alpha=0.5, seed=0)])
    assert q.max() >= 5 * q.min() and q.std() / q.mean() > 0.5
    # labels stay roughly iid under quantity skew (large clients only)
    big = [p for p in split_clients(Y, "quantity", 20, alpha=0.5, seed=0) if len(p) >= 150]
    assert big and _max_label_share(Y, big) < 0.25


@pytest.mark.parametrize("shuffled", [False, True])
def test_shards_give_at_most_shards_per_client_labels(shuffled):
    y = np.repeat(np.arange(10), 60)  # 600 samples, label-sorted
    if shuffled:
        y = np.random.default_rng(0).permutation(y)
    for clients, spc in ((10, 2), (6, 5), (15, 4)):  # shard sizes 30, 20, 10 divide 60
        parts = split_clients(y, "shards", clients, shards_per_client=spc, seed=1)
        labels = [len(np.unique(y[p])) for p in parts]
        assert max(labels) <= spc, (clients, spc, labels)
        assert [len(p) for p in parts] == [len(y) // clients] * clients
    iid = split_clients(y, "iid", 10, seed=1)
    assert min(len(np.unique(y[p])) for p in iid) > 2


def test_split_errors():
    y = np.arange(20) % 4
    cases = [dict(scheme="random", clients=2), dict(scheme="iid", clients=11), dict(scheme="iid", clients=0),
             dict(scheme="dirichlet", clients=2, alpha=0.0), dict(scheme="quantity", clients=2, alpha=-1.0),
             dict(scheme="iid", clients=2, alpha=0.0),
             dict(scheme="shards", clients=5, shards_per_client=5)]
    for kw in cases:
        with pytest.raises(MpitrainError):
            split_clients(y, **kw)
    with pytest.raises(MpitrainError, match="random"):
        split_clients(y, "random", 2)
    with pytest.raises(MpitrainError, match="--clients 11"):
        split_clients(y, "iid", 11)
    for scheme in SCHEMES:
        with pytest.raises(MpitrainError, match="--alpha 0.0: expected > 0"):
            split_clients(y, scheme, 2, alpha=0.0)
    # 10 clients over 2 labels with near one-hot Dirichlet draws: impossible to give each 2 samples
    with pytest.raises(MpitrainError, match="alpha"):
        split_clients(np.arange(20) % 2, "dirichlet", 10, alpha=1e-3)
    assert len(split_clients(y, "iid", 10)) == 10  # the largest valid count: 2 samples each


# --------------------------------------------------------------------------------------------------
# 5. write_partition on a real prepared file
# --------------------------------------------------------------------------------------------------

@pytest.fixture()
def synth_file(tmp_path):
    path = str(tmp_path / "s.h5")
    prepare("synthetic", path, samples=600, features=5, classes=4, seed=2)
    return path


def _rows_sorted(a):
    return a[np.lexsort(a.T[::-1])]


def test_write_partition_layout(synth_file):
    with h5py.File(synth_file, "r") as f:
        tx, ty = f["train/x"][...], f["train/y"][...]
        test_x = f["test/x"][...]
    msg = write_partition(synth_file, "dirichlet", 6, alpha=0.5, seed=9, test_fraction=0.25)
    assert "dirichlet" in msg and "6 clients" in msg
    parts = split_clients(ty, "dirichlet", 6, alpha=0.5, seed=9)
    order = np.concatenate(parts)
    sizes = np.array([len(p) for p in parts])
    with h5py.File(synth_file, "r") as f:
        g = f["partition"]
        px, py = g["x"][...], g["y"][...]
        offsets, n_train = g["offsets"][...], g["n_train"][...]
        attrs = dict(g.attrs)
        np.testing.assert_array_equal(f["train/x"][...], tx)  # the train split itself is untouched
        np.testing.assert_array_equal(f["test/x"][...], test_x)
    np.testing.assert_array_equal(px, tx[order])
    np.testing.assert_array_equal(py, ty[order])
    np.testing.assert_array_equal(_rows_sorted(px), _rows_sorted(tx))  # the same multiset of rows
    assert px.dtype == np.float32 and px.shape == tx.shape
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(sizes)]))
    assert offsets[-1] == len(tx) and np.all(np.diff(offsets) >= 2)
    np.testing.assert_array_equal(n_train, [s - int(s * 0.25) for s in sizes])
    assert np.all(n_train >= 1) and np.all(n_train <= np.diff(offsets))
    assert attrs["scheme"] == "dirichlet" and attrs["clients"] == 6 and attrs["alpha"] == 0.5
    assert attrs["shards_per_client"] == 2 and attrs["seed"] == 9 and attrs["test_fraction"] == 0.25
    # client k's rows are one contiguous hyperslab whose labels are that client's labels
    for k in range(6):
        np.testing.assert_array_equal(py[offsets[k]:offsets[k + 1]], ty[parts[k]])


def test_write_partition_replaces_and_keeps_on_error(synth_file, tmp_path):
    write_partition(synth_file, "dirichlet", 6, alpha=0.5, seed=9, test_fraction=0.25)
    msg = write_partition(synth_file, "iid", 4, seed=1, test_fraction=0.0)
    assert "iid" in msg and "4 clients" in msg
    with h5py.File(synth_file, "r") as f:
        g = f["partition"]
        assert g.attrs["scheme"] == "iid" and g.attrs["clients"] == 4 and g.attrs["test_fraction"] == 0.0
        assert len(g["offsets"]) == 5 and len(g["n_train"]) == 4
        np.testing.assert_array_equal(g["n_train"][...], np.diff(g["offsets"][...]))  # no local test split
        assert g["x"].shape == f["train/x"].shape
        assert sorted(g.keys()) == ["n_train", "offsets", "x", "y"]
    # a bad request leaves the existing partition in place
    for kw in (dict(scheme="nope", clients=3), dict(scheme="iid", clients=3, test_fraction=1.0),
               dict(scheme="iid", clients=10 ** 6)):
        with pytest.raises(MpitrainError):
            write_partition(synth_file, **kw)
    with h5py.File(synth_file, "r") as f:
        assert f["partition"].attrs["scheme"] == "iid" and f["partition"].attrs["clients"] == 4
    bogus = tmp_path / "not.h5"
    bogus.write_text("hello")
    with pytest.raises(MpitrainError, match="cannot open"):
        write_partition(str(bogus), "iid", 2)


def test_partition_table_and_hosting(synth_file):
    fake = lambda rank, size: SimpleNamespace(rank=rank, size=size)  # noqa: E731
    data = DataFile(synth_file)
    with pytest.raises(MpitrainError, match="no partition"):
        Partition(data, fake(0, 2))
    data.close()
    write_partition(synth_file, "quantity", 7, alpha=1.0, seed=3)
    data = DataFile(synth_file)
    try:
        hosted = [list(Partition(data, fake(r, 4)).hosted) for r in range(4)]
        assert hosted[0] == []  # rank 0 aggregates only
        assert sorted(sum(hosted, [])) == list(range(7))  # every client hosted exactly once, block-wise
        assert all(h == list(range(h[0], h[-1] + 1)) for h in hosted[1:])
        p = Partition(data, fake(1, 4))
        assert p.clients == 7 and len(p.offsets) == 8 and p.n_train.sum() <= p.offsets[-1]
        with pytest.raises(MpitrainError, match="at least 2 ranks"):
            Partition(data, fake(0, 1))
        with pytest.raises(MpitrainError, match="7 clients"):
            Partition(data, fake(0, 9))
        assert Partition(data, fake(7, 8)).hosted == range(6, 7)
    finally:
        data.close()


# --------------------------------------------------------------------------------------------------
# 6. sample_clients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clients,fraction,min_clients,expected", [
    (100, 0.1, 2, 10), (10, 0.1, 2, 2), (5, 0.5, 1, 2), (3, 0.1, 5, 3), (7, 1.0, 1, 7), (1000, 0.05, 2, 50),
    (10, 0.01, 0, 1), (1, 0.5, 1, 1), (40, 0.25, 12, 12)])
def test_sample_size(clients, fraction, min_clients, expected):
    assert expected == min(clients, max(int(fraction * clients), min_clients, 1))
    for rnd in range(3):
        s = sample_clients(0, rnd, clients, fraction, min_clients)
        assert len(s) == expected
        assert len(np.unique(s)) == expected  # no duplicates
        assert s.min() >= 0 and s.max() < clients


def test_sample_is_deterministic_per_seed_and_round():
    a = [sample_clients(7, r, 100, 0.1, 2) for r in range(6)]
    b = [sample_clients(7, r, 100, 0.1, 2) for r in range(6)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert len({tuple(s) for s in a}) == 6  # every round a different cohort
    assert not np.array_equal(sample_clients(8, 0, 100, 0.1, 2), a[0])  # and per seed
    # every client is drawn eventually, roughly uniformly
    counts = np.bincount(np.concatenate([sample_clients(1, r, 20, 0.25, 1) for r in range(400)]), minlength=20)
    assert counts.min() > 60 and counts.max() < 140  # expectation 100


# --------------------------------------------------------------------------------------------------
# 7. Client.train
# --------------------------------------------------------------------------------------------------

def _cfg(strategy="fedavg", optimizer="sgd", batch=4, epochs=2, steps=0, mu=0.0, lr=0.1, seed=7):
    cfg = Config()
    t, f = cfg.train, cfg.fed
    t.optimizer, t.lr, t.weight_decay, t.seed = optimizer, lr, 0.0, seed
    f.strategy, f.local_batch, f.local_epochs, f.local_steps, f.mu = strategy, batch, epochs, steps, mu
    return cfg


@pytest.fixture(scope="module")
def client_data():
    spec = ModelSpec("softmax", 5, 3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 5)).astype(f32)
    y = rng.integers(0, 3, 10).astype(np.int64)
    model = Model(spec)
    return SimpleNamespace(spec=spec, model=model, x=x, y=y, w0=model.init_params(1))


def _client(d, cfg):
    return Client(d.model, cpu, cfg.train, cfg.fed)


def _grad(d, w):
    g = np.zeros(d.spec.n_params, f32)
    d.model.loss_grad(w, g, d.x, d.y)
    return g.astype(np.float64)


@pytest.mark.parametrize("batch,epochs,steps,expected_steps,expected_seen", [
    (4, 2, 0, 6, 20),    # 2 epochs × ⌈10/4⌉ batches of 4, 4, 2
    (4, 1, 5, 5, 18),    # local_steps wins: 4 + 4 + 2 | 4 + 4
    (50, 3, 0, 3, 30),   # batch capped at n: one full batch per epoch
    (3, 1, 0, 4, 10),
])
def test_client_step_count(client_data, batch, epochs, steps, expected_steps, expected_seen):
    d = client_data
    c = _client(d, _cfg(batch=batch, epochs=epochs, steps=steps))
    w0 = d.w0.copy()
    delta, a, loss, seen = c.train(0, 0, d.x, d.y, w0)
    assert a == expected_steps and c.stepper.opt.t == expected_steps
    assert seen == expected_seen
    assert loss > 0
    np.testing.assert_array_equal(w0, d.w0)  # the global model is not modified
    close(delta, c.params - d.w0)
    assert np.abs(delta).max() > 0


def test_fedsgd_is_one_full_batch_gradient_step(client_data):
    d = client_data
    c = _client(d, _cfg("fedsgd", batch=3, epochs=5, steps=7, lr=0.2))
    delta, a, loss, seen = c.train(2, 3, d.x, d.y, d.w0)
    assert (a, seen) == (1, 10)
    close(delta, -0.2 * _grad(d, d.w0) / 10, rtol=1e-5, atol=1e-7)
    loss0, _ = d.model.score(d.w0, d.x, d.y)
    assert loss == pytest.approx(loss0, rel=1e-5)  # the loss of the global model on all its samples


def test_full_batch_fedavg_and_fedprox_against_manual_gradient_descent(client_data):
    d, lr, mu, n = client_data, 0.3, 0.5, 10
    w0 = d.w0.astype(np.float64)
    w1 = w0 - lr * _grad(d, d.w0) / n
    g1 = _grad(d, w1.astype(f32))
    avg = w1 - lr * g1 / n
    prox = w1 - lr * (g1 / n + mu * (w1 - w0))  # anchored at the global model
    d_avg, *_ = _client(d, _cfg("fedavg", batch=n, epochs=2, mu=mu, lr=lr)).train(0, 0, d.x, d.y, d.w0)
    d_prox, *_ = _client(d, _cfg("fedprox", batch=n, epochs=2, mu=mu, lr=lr)).train(0, 0, d.x, d.y, d.w0)
    close(d_avg, avg - w0, rtol=1e-4, atol=1e-6)
    close(d_prox, prox - w0, rtol=1e-4, atol=1e-6)
    close(d_prox - d_avg, -lr * mu * (w1 - w0), rtol=1e-3, atol=1e-6)
    assert np.abs(d_prox - d_avg).max() > 1e-4
    # mu only matters for fedprox
    d_avg0, *_ = _client(d, _cfg("fedavg", batch=n, epochs=2, mu=0.0, lr=lr)).train(0, 0, d.x, d.y, d.w0)
    np.testing.assert_array_equal(d_avg0, d_avg)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_client_training_is_deterministic_and_fresh_each_time(client_data, optimizer):
    d = client_data
    c = _client(d, _cfg(optimizer=optimizer, batch=3, epochs=2, lr=0.05))
    first, *_ = c.train(4, 2, d.x, d.y, d.w0)
    kept = first.copy()
    other, *_ = c.train(5, 2, d.x[::-1].copy(), d.y[::-1].copy(), d.w0)  # another client in between
    again, *_ = c.train(4, 2, d.x, d.y, d.w0)
    np.testing.assert_array_equal(first, kept)  # a returned Δ is not overwritten by later training
    np.testing.assert_array_equal(again, first)  # optimizer state reset, same batches
    fresh, *_ = _client(d, _cfg(optimizer=optimizer, batch=3, epochs=2, lr=0.05)).train(4, 2, d.x, d.y, d.w0)
    np.testing.assert_array_equal(fresh, first)
    other_round, *_ = c.train(4, 3, d.x, d.y, d.w0)
    other_client, *_ = c.train(6, 2, d.x, d.y, d.w0)
    assert not np.array_equal(other_round, first) and not np.array_equal(other_client, first)
    other_seed, *_ = _client(d, _cfg(optimizer=optimizer, batch=3, epochs=2, lr=0.05, seed=8)).train(
        4, 2, d.x, d.y, d.w0)
    assert not np.array_equal(other_seed, first)


# --------------------------------------------------------------------------------------------------
# 8. FedNova with a local optimizer: a_k = ‖a_k‖₁ (Wang et al. 2020)
# --------------------------------------------------------------------------------------------------

def _coefficients(optimizer, rho, tau, lr=0.1, g=0.5):
    """The coefficient of each local step's gradient in the total displacement, from the real kernel: only
    step j sees the gradient g, the displacement over all τ steps divided by −lr·g."""
    out = []
    for j in range(tau):
        opt, p = Optimizer(cpu, optimizer, 1, momentum=rho), np.zeros(1, f32)
        for s in range(tau):
            opt.update(p, vec(g if s == j else 0.0), lr, 1.0)
        out.append(-float(p[0]) / (lr * g))
    return np.array(out)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1, 2, 7])
def test_step_norm_is_the_sum_of_the_kernels_gradient_coefficients(optimizer, rho, tau):
    cfg = _cfg("fednova", optimizer)
    cfg.train.momentum = rho
    got = step_norm(cfg.fed, cfg.train, tau)
    heavy = (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)  # the paper's closed form for momentum
    closed = {"sgd": tau, "momentum": heavy, "nesterov": tau + rho * heavy}[optimizer]
    assert got == pytest.approx(closed, rel=1e-12)
    assert got == pytest.approx(_coefficients(optimizer, rho, tau).sum(), rel=1e-5)
    # a constant gradient moves the parameters by lr·g·‖a‖₁
    opt, p = Optimizer(cpu, optimizer, 1, momentum=rho), np.zeros(1, f32)
    for _ in range(tau):
        opt.update(p, vec(0.5), 0.1, 1.0)
    assert -float(p[0]) / 0.05 == pytest.approx(got, rel=1e-5)
    if optimizer != "sgd" and rho > 0 and tau > 1:
        assert got > tau
    cfg.fed.strategy = "fedavg"  # the other strategies report the step count
    assert step_norm(cfg.fed, cfg.train, tau) == tau


def test_fednova_refuses_adam():
    from mpitrain import config

    with pytest.raises(MpitrainError, match=r"fed\.strategy = 'fednova' with train\.optimizer = 'adam'"):
        config.load(overrides=["fed.strategy=fednova", "train.optimizer=adam"])
    for opt in ("sgd", "momentum", "nesterov"):
        config.load(overrides=["fed.strategy=fednova", f"train.optimizer={opt}"])
    config.load(overrides=["fed.strategy=fedavg", "train.optimizer=adam"])


class _OneRank:
    """The comm of a run whose only sender is rank 0 itself: Reduce and Gatherv of one buffer."""
    rank, size = 0, 2

    def reduce_sum(self, buf):
        pass

    def gatherv(self, buf):
        return buf.copy(), np.array([len(buf)])


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
@pytest.mark.parametrize("aggregator", ["mean", "gather"])
def test_fednova_round_with_local_momentum_against_the_paper(client_data, optimizer, aggregator):
    """Clients of 4 and 10 samples (2 and 5 local steps of batch 2) train with the local optimizer; their
    updates are aggregated and applied as federate does.  Reference (Wang et al. 2020):
    d_i = (x − y_i)/‖a_i‖₁, τ_eff = Σ p_i ‖a_i‖₁, x ← x − τ_eff Σ p_i d_i, with ‖a_i‖₁ summed from the
    kernel's coefficients."""
    d = client_data
    cfg = _cfg("fednova", optimizer, batch=2, epochs=1, lr=0.2)
    client, n = _client(d, cfg), d.spec.n_params
    agg = (MeanAggregator(_OneRank(), n, "fednova") if aggregator == "mean" else
           GatherAggregator(_OneRank(), n, "fednova", "mean", 0.0, 0.0, "none"))
    sizes = np.array([4.0, 10.0])
    agg.begin(0, np.arange(2), np.arange(2))
    ys, norms = [], []
    for k, m in enumerate(sizes.astype(int)):
        delta, a, loss, seen = client.train(k, 0, d.x[:m], d.y[:m], d.w0)
        agg.add(k, delta, float(m), a, loss, seen)
        ys.append(d.w0.astype(np.float64) + delta)
        norms.append(_coefficients(optimizer, cfg.train.momentum, m // 2).sum())
    res = agg.finish(0.0, 0.0)
    x = d.w0.copy()
    server_update("fednova", x, res.mean().astype(f32, copy=False), {}, 1.0, tau_eff=res.tau_eff())
    x0, p = d.w0.astype(np.float64), sizes / sizes.sum()
    tau_eff = p @ np.array(norms)
    ref = x0 - tau_eff * sum(pi * (x0 - y) / a for pi, y, a in zip(p, ys, norms))
    assert res.tau_eff() == pytest.approx(tau_eff, rel=1e-5)
    close(x, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(ref - x0).max() > 0.05
