"""Secure aggregation and differential privacy: the primitives in-process, the protocol under real mpiexec
(a probe at the bottom of this file runs SecureAggregator directly; `federate` runs end to end), privacy
accounting against dp-accounting, bad input, and bit-exact resume of the privacy state.

Equations: ../shared/reference.md (Bonawitz et al. 2017; DP-FedAvg, McMahan et al. 2018; Andrew et al.
2019).  Run as a script under mpiexec (`python tests/test_privacy.py secagg OUT ...`) it is the probe.
"""
import glob
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import mpirun, params, summary

HERE = os.path.abspath(__file__)
FEDAVG = ["train.optimizer=sgd", "train.lr=0.05", "fed.local_epochs=5", "fed.local_batch=10"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits IID over 4 and 16 clients (cross-silo sized) and over 700 clients (≈2 samples each: many users)."""
    d = tmp_path_factory.mktemp("priv")
    paths = {}
    for clients in (4, 16, 700):
        paths[clients] = str(d / f"iid{clients}.h5")
        r = mpirun(1, "prepare", "--source", "digits", "--out", paths[clients], "--partition", "iid",
                   "--clients", clients)
        assert r.returncode == 0, r.stderr
    return paths


def federate(n, data, out, *sets, env=None, timeout=300, ok=True, resume=None):
    args = ["federate", "--quiet", "--data", data, "--out", out] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, env=env, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stderr
        return summary(out)
    return r


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
# 1. secure aggregation primitives
# --------------------------------------------------------------------------------------------------

def test_prg_is_the_chacha20_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from mpitrain.federated.secagg import PAIR_NONCE, SELF_NONCE, prg

    key = bytes(range(32))
    words = prg(key, 1000)
    ks = Cipher(algorithms.ChaCha20(key, PAIR_NONCE), mode=None).encryptor().update(bytes(4000))
    assert words.dtype == np.uint32 and words.tobytes() == ks
    assert np.array_equal(prg(key, 1000), words)  # deterministic in the key
    assert not np.array_equal(prg(key, 1000, SELF_NONCE), words)  # self masks use another nonce
    assert not np.array_equal(prg(bytes(32), 1000), words)


def test_key_agreement_is_symmetric_and_fresh():
    from mpitrain.federated.secagg import MASK_INFO, SHARE_INFO, agree, keypair

    (a, pa), (b, pb), (_, pc) = keypair(), keypair(), keypair()
    assert agree(a, pb, MASK_INFO) == agree(b, pa, MASK_INFO)
    assert agree(a, pb, MASK_INFO) != agree(a, pb, SHARE_INFO)  # HKDF info separates the two uses
    assert agree(a, pb, MASK_INFO) != agree(a, pc, MASK_INFO)
    assert len({pa, pb, pc}) == 3 and all(len(p) == 32 for p in (pa, pb, pc))


def test_shamir_any_t_shares_and_not_fewer():
    from mpitrain.federated.secagg import P, shamir_reconstruct, shamir_share

    secret = os.urandom(32)
    xs = list(range(1, 8))
    ys = shamir_share(secret, xs, 4)
    pts = list(zip(xs, ys))
    rng = np.random.default_rng(0)
    for _ in range(10):
        pick = [pts[i] for i in rng.choice(7, 4, replace=False)]
        assert shamir_reconstruct(pick, 4) == secret
    assert shamir_reconstruct(pts, 4) == secret  # extra shares are ignored
    # t − 1 shares interpolate to an unrelated field element (any value is as likely): not the secret
    with pytest.raises(ValueError, match="do not interpolate"):
        shamir_reconstruct(pts[:3], 3)
    assert all(0 <= y < P for y in ys)
    with pytest.raises(ValueError):
        shamir_reconstruct(pts[:3], 4)
    # an X25519 private key (32 raw bytes) survives the round trip
    from mpitrain.federated.secagg import keypair, private_bytes, private_key

    sk, pk = keypair()
    raw = private_bytes(sk)
    back = private_key(shamir_reconstruct(list(zip(xs, shamir_share(raw, xs, 5)))[2:], 5))
    assert private_bytes(back) == raw


def test_fixed_point_range_precision_and_unbiased_rounding():
    from mpitrain.federated.secagg import decode, encode, scales_for

    n, bound = 37, np.array([4.0, 4.0, 1000.0, 1.0])
    s = scales_for(bound, n)
    assert np.all(s == np.exp2(np.floor(np.log2(s))))  # powers of two
    assert np.all(n * (bound * s + 1) <= 2 ** 31 - 1) and np.all(n * (bound * 2 * s + 1) > 2 ** 31 - 1)
    rng = np.random.default_rng(1)
    for extreme in (bound, -bound):  # every client at the edge of the range: no overflow
        total = np.zeros(4, np.uint32)
        for _ in range(n):
            total += encode(extreme, s, bound, rng)
        assert np.allclose(decode(total, s), n * extreme, atol=n / s)
    values = rng.uniform(-1, 1, (n, 4)) * bound  # random sums decode within n/scale
    total = np.zeros(4, np.uint32)
    for v in values:
        total += encode(v, s, bound, rng)
    assert np.all(np.abs(decode(total, s) - values.sum(0)) <= n / s)
    clipped = decode(encode(np.array([9.0, -9.0, 5e3, 0.5]), s, bound, rng), s)
    assert np.allclose(clipped, [4.0, -4.0, 1000.0, 0.5], atol=1 / s)
    # stochastic rounding is unbiased: a value a third of a unit above a grid point
    x = np.full(200_000, 1.0 / 3.0) / s[0]
    mean = decode(encode(x, np.full(x.size, s[0]), np.full(x.size, 4.0), rng), np.full(x.size, s[0])).mean()
    assert abs(mean * s[0] - 1 / 3) < 0.005
    # the coordinates' fast path (head) gives the same code as the general one
    v = rng.uniform(-5, 5, 50)
    sc, bd = np.full(50, 2.0 ** 20), np.full(50, 4.0)
    assert np.array_equal(encode(v, sc, bd, np.random.default_rng(3), head=50),
                          encode(v, sc, bd, np.random.default_rng(3)))


def test_mask_graph_is_regular_symmetric_and_logarithmic():
    from mpitrain.federated.secagg import AUTO_COMPLETE, degree, mask_graph, threshold

    assert degree(AUTO_COMPLETE) == AUTO_COMPLETE - 1  # small cohorts: the complete graph
    for n in (16, 64, 256, 1000):
        k = degree(n)
        assert k % 2 == 0 and k <= 3 * math.log2(n) + 2
        g = mask_graph(n, k, seed=5, rnd=2)
        assert all(len(nb) == k and i not in nb for i, nb in enumerate(g))
        assert all(i in g[j] for i, nb in enumerate(g) for j in nb)  # symmetric
        assert mask_graph(n, k, 5, 2)[7].tolist() == g[7].tolist()  # public: the same on every rank
        assert mask_graph(n, k, 5, 3)[7].tolist() != g[7].tolist()  # fresh per round
    assert degree(256) * 256 < 256 * 255 / 8  # key agreements: O(n log n), not n²
    assert threshold(3) == 3 and threshold(12) == 7 and threshold(12, 5) == 5
    assert degree(10, neighbors=4) == 4 and degree(10, neighbors=5) == 6 and degree(10, neighbors=9) == 9


def test_auto_degree_grows_with_the_expected_dropout():
    """With fed.dropout_rate the automatic degree keeps rounds unmaskable (≤ 1e-3 failure by the union
    bound): every one of 100 simulated rounds with that share dropped completes."""
    from mpitrain.federated.secagg import completes, degree, mask_graph, threshold

    assert degree(64, dropout=1 / 3) == 63  # a third of 64 dropping needs the complete graph
    for n, rate in ((256, 0.2), (1000, 0.2)):
        k = degree(n, dropout=rate)
        assert degree(n) < k < n - 1 and k % 2 == 0
        rng = np.random.default_rng(1)
        for rnd in range(100):
            alive = np.setdiff1d(np.arange(n), rng.choice(n, int(rate * n), replace=False))
            assert completes(mask_graph(n, k, 3, rnd), alive, threshold(k), threshold(k))


def test_completes_needs_t_surviving_holders_per_client():
    from mpitrain.federated.secagg import completes, mask_graph

    g = mask_graph(6, 5, 0, 0)  # complete: every secret is held by all 6
    assert completes(g, [0, 1, 2, 3], t=4, n_min=4)  # 2 of 6 dropped: 4 holders left
    assert not completes(g, [0, 1, 2], t=4, n_min=3)
    assert not completes(g, [0, 1, 2, 3], t=3, n_min=5)  # DP: too few survivors carry the noise


def test_holder_and_server_refuse_both_kinds_of_share():
    from mpitrain.errors import MpitrainError
    from mpitrain.federated.secagg import B, SK, Holder, ShareStore

    h = Holder()
    h.shares[3] = (11, 22)
    assert h.reveal(3, B) == 22 and h.reveal(3, B) == 22
    with pytest.raises(MpitrainError, match="both kinds"):
        h.reveal(3, SK)
    store = ShareStore(t=2)
    store.add(5, SK, 1, 7)
    store.add(5, SK, 2, 9)
    with pytest.raises(MpitrainError, match="both kinds"):
        store.add(5, B, 3, 1)
    with pytest.raises(MpitrainError, match="0 of 2 shares"):
        store.reconstruct(5, B)


def _chi2_bytes(vec):
    from scipy.stats import chisquare

    counts = np.bincount(np.frombuffer(np.ascontiguousarray(vec).tobytes(), np.uint8), minlength=256)
    return chisquare(counts).pvalue


def _ks_uniform(vec):
    from scipy.stats import kstest

    return kstest(vec.astype(np.float64) / 2.0 ** 32, "uniform").pvalue


def test_one_masked_vector_is_indistinguishable_from_uniform():
    """y_u = x_u + PRG(b_u) ± PRG(s_uv): its bytes pass uniformity tests; x_u alone fails them."""
    from mpitrain.federated.secagg import MASK_INFO, SELF_NONCE, agree, encode, keypair, prg, scales_for

    L = 50_000
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, L)
    s, bd = scales_for(np.full(L, 4.0), 10), np.full(L, 4.0)
    code = encode(x, s, bd, rng)
    (a, _), (_, pb) = keypair(), keypair()
    y = code + prg(os.urandom(32), L, SELF_NONCE) + prg(agree(a, pb, MASK_INFO), L)
    assert _chi2_bytes(y) > 1e-4 and _ks_uniform(y) > 1e-4
    assert _chi2_bytes(code) < 1e-12 and _ks_uniform(code) < 1e-12


# --------------------------------------------------------------------------------------------------
# 2. the protocol under mpiexec (probe at the bottom of this file)
# --------------------------------------------------------------------------------------------------

def _probe(tmp_path, ranks, clients, n_params, rounds, dropout, neighbors=0, fraction=1.0):
    out = str(tmp_path / "probe")
    r = mpirun(ranks, HERE, "secagg", out, clients, n_params, rounds, dropout, neighbors, fraction, module=False,
               env={"MPITRAIN_SECAGG_DUMP": out + "-dump"}, timeout=300)
    assert r.returncode == 0, r.stderr
    got = []
    for rnd in range(rounds):
        with np.load(f"{out}-{rnd}.npz") as z:
            res = {k: z[k] for k in z.files}
        with np.load(f"{out}-dump-{rnd}.npz") as z:
            res["received"] = np.split(z["masked"], np.cumsum(z["counts"])[:-1])
        got.append(res)
    return got


@pytest.mark.parametrize("case", ["complete graph, a third drop", "sparse graph, a fifth drop"])
def test_secure_sum_decodes_exactly_with_dropouts_and_rank0_sees_uniform_bytes(tmp_path, case):
    if case.startswith("complete"):
        rounds = _probe(tmp_path, 4, clients=9, n_params=20_000, rounds=3, dropout=1 / 3)
    else:
        rounds = _probe(tmp_path, 4, clients=40, n_params=20_000, rounds=2, dropout=0.2, neighbors=16)
    for res in rounds:
        n, alive = int(res["cohort"]), res["alive"]
        assert int(res["skipped"]) == 0
        if case.startswith("complete"):
            assert len(alive) == n - n // 3  # a third dropped after sharing keys
        else:
            assert len(alive) == n - n // 5 and int(res["neighbors"]) == 16  # each masks with 16 of 39 others
        # the masked aggregate decodes to the plain aggregate within the quantization error n/2^f
        assert np.abs(res["total"] - res["exact"]).max() <= len(alive) / res["scale"]
        assert res["clipped"] == res["exact_clipped"] > 0  # the survivors' clipped coordinates, counted exactly
        assert res["weight"] == res["exact_weight"] and res["clients"] == len(alive)
        # rank 0 holds one kind of share per client: b-shares of survivors, key shares of the dropped
        kinds = dict(zip(res["store_owner"].tolist(), res["store_kind"].tolist()))
        assert sorted(kinds) == list(range(n))
        assert all(kinds[u] == (1 if u in alive else 0) for u in range(n))
        # every vector rank 0 received (one per client rank with survivors) looks uniform
        received = [v for v in res["received"] if v.size]
        assert len(received) >= 2
        for v in received:
            assert _chi2_bytes(v) > 1e-4 and _ks_uniform(v) > 1e-4
    assert not np.array_equal(rounds[0]["received"][1][:100], rounds[1]["received"][1][:100])  # fresh masks


def test_sparse_round_with_too_many_dropped_neighbours_is_abandoned(tmp_path):
    """Neighbourhoods of 9 with threshold 5 and a third of the cohort dropping: some client keeps fewer
    than 5 surviving holders, so nothing is unmasked (rank 0 gets no share at all) and the round is
    skipped rather than decoded wrongly."""
    (res,) = _probe(tmp_path, 4, clients=40, n_params=1000, rounds=1, dropout=1 / 3, neighbors=8)
    assert int(res["skipped"]) == 1 and res["store_owner"].size == 0


@pytest.fixture(scope="module")
def plain_and_secure(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    sets = [*FEDAVG, "fed.fraction=0.25", "fed.rounds=20"]
    plain = federate(3, digits[16], str(d / "plain"), *sets)
    secure = federate(3, digits[16], str(d / "secure"), *sets, "fed.secure_aggregation=true")
    return d, plain, secure


def test_fedavg_accuracy_with_secure_aggregation_within_one_point(plain_and_secure):
    d, plain, secure = plain_and_secure
    assert secure["secure_aggregation"] and not plain["secure_aggregation"]
    assert abs(secure["test_accuracy"] - plain["test_accuracy"]) <= 0.01
    assert plain["test_accuracy"] >= 0.95
    # fixed point only: the models agree to the documented quantization error (≪ the weights' scale)
    a, b = params(str(d / "plain")), params(str(d / "secure"))
    assert np.max(np.abs(a - b)) <= 1e-3 * np.abs(a).max()


def test_round_completes_with_a_third_of_the_cohort_dropping(digits, tmp_path):
    s = federate(3, digits[16], str(tmp_path / "o"), *FEDAVG, "fed.fraction=0.5", "fed.rounds=8",
                 "fed.secure_aggregation=true", "fed.dropout_rate=0.34")
    assert s["skipped_rounds"] == 0 and s["test_accuracy"] >= 0.9
    m = [r for r in metrics(str(tmp_path / "o")) if "round" in r]
    assert all(r["clients"] == 8 and r["dropped"] == 2 and r["survivors"] == 6 for r in m)


def test_secure_aggregation_messages(digits, tmp_path):
    """What crosses ranks with secure aggregation: the model, uint32 masked sums of the model's size
    (+ 5 stats and the clipped count), uint8 buffers of public keys (64 bytes each), encrypted share records
    (156 bytes) and revealed shares (75 bytes), and a few integers; never samples or labels."""
    trace = str(tmp_path / "trace")
    s = federate(4, digits[16], str(tmp_path / "o"), *FEDAVG, "fed.fraction=0.5", "fed.rounds=2",
                 "fed.secure_aggregation=true", "fed.dropout_rate=0.25", env={"MPITRAIN_COMM_TRACE": trace})
    n = s["n_params"]
    seen = set()
    for path in glob.glob(trace + ".*"):
        for line in open(path, encoding="utf-8"):
            op, dtype, shape, nbytes = line.split()
            count = int(np.prod([int(x) for x in shape.split("x")]))
            seen.add((op, dtype))
            ok = ((dtype == "float32" and count in (n, n + 3)) or (dtype == "uint32" and count in (0, n + 6))
                  or (dtype == "uint8" and (count % 64 == 0 or count % 156 == 0 or count % 75 == 0))
                  or (dtype in ("int64", "float64") and count <= 20))
            assert ok, line
    assert ("Gatherv", "uint32") in seen and ("Scatterv", "uint8") in seen and ("Reduce", "float32") not in seen


# --------------------------------------------------------------------------------------------------
# 3. differential privacy: clipping, noise, DP-SGD, accounting
# --------------------------------------------------------------------------------------------------

def _dp(**kw):
    from mpitrain.config import Config
    from mpitrain.federated.dp import ClientDP

    cfg = Config()
    cfg.fed.fraction = kw.pop("fraction", 0.1)
    for k, v in kw.items():
        setattr(cfg.fed.dp, k, v)
    cfg.validate()
    return ClientDP(cfg.fed, 1000, 100, kw.get("secure", False), 0)


def test_clip_to_l2_norm():
    from mpitrain.federated.dp import clip_norm

    d = np.array([3.0, 4.0], np.float32)
    c, below = clip_norm(d, 1.0)
    assert not below and np.allclose(c, [0.6, 0.8]) and c.dtype == np.float32
    c, below = clip_norm(d, 5.0)
    assert below and c is d  # norm ≤ C (the ≤ matters for adaptive clipping): unchanged
    c, below = clip_norm(d, 4.999)
    assert not below and np.linalg.norm(c) == pytest.approx(4.999, rel=1e-6)


def test_server_noise_std_and_fixed_denominator():
    from mpitrain.federated.aggregation import Result

    dp = _dp(noise_multiplier=1.3, clip=0.7, noise_seed=4)
    assert dp.m == 100  # Poisson: q·K expected clients, the fixed denominator
    draws = []
    for rnd in range(400):
        res = Result(np.zeros(500, np.float32), weight=97.0)
        dp.server(res, rnd)
        assert res.denominator == 100
        draws.append(res.mean())
    std = np.std(np.concatenate(draws))
    assert std == pytest.approx(1.3 * 0.7 / 100, rel=0.05)  # N(0, (zS/m)²) on the average
    a, b = Result(np.zeros(5, np.float32)), Result(np.zeros(5, np.float32))
    dp.server(a, 7)
    dp.server(b, 7)
    assert np.array_equal(a.total, b.total)  # a function of (key, round): resumes reproduce it


def test_distributed_noise_shares_sum_to_the_central_noise():
    dp = _dp(noise_multiplier=1.0, clip=2.0, noise_seed=1, secure=True)
    n = 12
    n_min = dp.n_min(n)
    assert n_min == 8
    sums = np.zeros((300, 200))
    for rnd in range(300):
        for k in range(n_min):  # the fewest survivors a round may unmask with
            sums[rnd] += dp.share_noise(dp.key, k, rnd, n, 200, 200)
    assert np.std(sums) == pytest.approx(1.0 * 2.0, rel=0.05)


def test_adaptive_clipping_update():
    from mpitrain.federated.aggregation import Result

    dp = _dp(noise_multiplier=0.5, clip=1.0, adaptive=True, target_quantile=0.5, clip_lr=0.2,
             count_stddev=5.0, noise_seed=0)
    assert dp.z_delta == pytest.approx((0.5 ** -2 - 10.0 ** -2) ** -0.5)  # Andrew et al.: z_Δ from z, σ_b
    dp.secure = True  # no server noise: check the equation itself
    res = Result(np.zeros(3), below=80 - 0.5 * 100)  # 80 of m = 100 updates had norm ≤ C
    b_bar = dp.server(res, 0)
    assert b_bar == pytest.approx(0.8)
    assert dp.clip == pytest.approx(math.exp(-0.2 * (0.8 - 0.5)))  # too many below C: C shrinks
    from mpitrain.errors import MpitrainError

    with pytest.raises(MpitrainError, match="count_stddev"):
        _dp(noise_multiplier=2.0, adaptive=True, count_stddev=0.5)


DPSGD_MODELS = {
    "mlp": ("mlp", 6, (5, 4), (), ()),
    "cnn": ("layers", 2 * 5 * 6, (), ("conv2d 3 3 same stride=2", "relu", "conv2d 4 2 valid", "tanh", "flatten",
                                      "dense 3"), (2, 5, 6)),
    "conv1d": ("layers", 12, (), ("conv1d 3 3 same", "relu", "maxpool1d 2", "flatten", "dense 3"), (12,)),
}


def _dpsgd_setup(clip=0.5, sigma=0.0, kind="mlp"):
    from mpitrain.config import DPSGDConfig
    from mpitrain.federated.dp import DPSGD
    from mpitrain.kernels import cpu
    from mpitrain.model import Model, ModelSpec

    name, n_in, hidden, layers, shape = DPSGD_MODELS[kind]
    model = Model(ModelSpec(name, n_in, 3, hidden, layers=layers, feature_shape=shape))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, n_in)).astype(np.float32) * 3
    y = rng.integers(0, 3, 9).astype(np.int64)
    w = model.init_params(1)
    dpsgd = DPSGD(model, cpu, DPSGDConfig(noise_multiplier=sigma, clip=clip), bytes(32))
    dpsgd.start(0, 0)
    return model, x, y, w, dpsgd


@pytest.mark.parametrize("kind", list(DPSGD_MODELS))
def test_dpsgd_per_example_clipping_matches_explicit_per_example_gradients(kind):
    """Dense layers' norms from ‖a_i‖·‖dz_i‖, conv layers' from per-example im2col rows (no Python loop over
    examples), against one loss_grad per example."""
    model, x, y, w, dpsgd = _dpsgd_setup(kind=kind)
    grads = []
    for i in range(len(x)):
        g = np.zeros(model.n_params, np.float32)
        model.loss_grad(w, g, x[i:i + 1], y[i:i + 1])
        grads.append(g.astype(np.float64))
    norms = [np.linalg.norm(g) for g in grads]
    dpsgd.clip = clip = float(np.median(norms))  # some examples clipped, some not
    expected = sum(g * min(1.0, clip / norm) for g, norm in zip(grads, norms))
    grad = np.zeros(model.n_params, np.float32)
    loss, correct = dpsgd.loss_grad(w, grad, x, y)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    l2, c2 = model.score(w, x, y)
    assert loss == pytest.approx(l2, rel=1e-5) and correct == c2


def test_dpsgd_noise_std_and_poisson_batches():
    model, x, y, w, dpsgd = _dpsgd_setup(clip=0.5, sigma=1.2)
    grad = np.zeros(model.n_params, np.float32)
    draws = []
    for _ in range(300):
        dpsgd.loss_grad(w, grad, x[:0], y[:0])  # an empty Poisson batch: noise only
        draws.append(grad.copy())
    assert np.std(draws) == pytest.approx(1.2 * 0.5, rel=0.05)
    sizes = [len(dpsgd.batch(1000, 50)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05) and np.std(sizes) > 3  # Poisson, not fixed


def _direct_epsilon(q, z, rounds, delta):
    import dp_accounting as dpa
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


def test_accountant_equals_dp_accounting():
    import dp_accounting as dpa
    from dp_accounting import rdp

    from mpitrain.federated.dp import Accountant, client_event

    acc = Accountant(*client_event("poisson", 700, 0.2, 1.5), 1e-5)
    for rounds in (1, 7, 50):
        assert acc.epsilon(rounds) == pytest.approx(_direct_epsilon(0.2, 1.5, rounds, 1e-5), abs=1e-6)
    wor = Accountant(*client_event("fixed", 100, 10, 2.0), 1e-5)
    direct = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    direct.compose(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(1.0)), 30)
    assert wor.epsilon(30) == pytest.approx(direct.get_epsilon(1e-5), abs=1e-6)
    t = acc.max_rounds(3.0, 1000)
    assert acc.epsilon(t) <= 3.0 < acc.epsilon(t + 1)


# --------------------------------------------------------------------------------------------------
# 4. differential privacy under mpiexec
# --------------------------------------------------------------------------------------------------

DP_DIGITS = ["model.kind=softmax", "fed.fraction=0.2", "train.optimizer=sgd", "train.lr=0.1",
             "fed.local_epochs=5", "fed.strategy=fedavgm", "fed.server_lr=0.3", "fed.dp.clip=0.5",
             "fed.eval_every=10"]


def test_dp_digits_reaches_the_stated_accuracy_at_the_stated_epsilon(digits, tmp_path):
    """README's privacy/accuracy table: 700 clients (≈2 digits each), q = 0.2, z = 2, 50 rounds:
    ε = 3.85 at δ = 1e-5 (dp-accounting, Poisson RDP), test accuracy ≥ 0.90 (no DP: 0.958)."""
    out = str(tmp_path / "dp")
    s = federate(3, digits[700], out, *DP_DIGITS, "fed.rounds=50", "fed.dp.noise_multiplier=2.0",
                 "fed.dp.noise_seed=1")
    eps = _direct_epsilon(0.2, 2.0, 50, 1e-5)
    assert s["epsilon"] == pytest.approx(eps, abs=1e-6) and s["epsilon"] == pytest.approx(3.85, abs=0.01)
    assert s["test_accuracy"] >= 0.90, s
    for r in metrics(out):  # every round reports its ε
        assert r["epsilon"] == pytest.approx(_direct_epsilon(0.2, 2.0, r["round"], 1e-5), abs=1e-6)
    assert s["weighting"] == "uniform" and s["expected_cohort"] == pytest.approx(140)


def test_target_epsilon_stops_early_and_fixed_sampling_accounting(digits, tmp_path):
    out = str(tmp_path / "t")
    s = federate(3, digits[700], out, *DP_DIGITS, "fed.rounds=40", "fed.dp.noise_multiplier=1.0",
                 "fed.dp.target_epsilon=4.0", "fed.dp.noise_seed=2")
    assert s["stopped_at_target_epsilon"] and s["rounds"] < 40 and s["epsilon"] <= 4.0
    assert _direct_epsilon(0.2, 1.0, s["rounds"] + 1, 1e-5) > 4.0  # one more round would exceed it
    assert len(metrics(out)) == s["rounds"]
    import dp_accounting as dpa
    from dp_accounting import rdp

    out = str(tmp_path / "f")
    s = federate(3, digits[16], out, *FEDAVG, "fed.fraction=0.5", "fed.rounds=3", "fed.dp.noise_multiplier=1.0",
                 "fed.dp.sampling=fixed")
    direct = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    direct.compose(dpa.SampledWithoutReplacementDpEvent(16, 8, dpa.GaussianDpEvent(0.5)), 3)
    assert s["epsilon"] == pytest.approx(direct.get_epsilon(1e-5), abs=1e-6)
    assert all(r["clients"] == 8 for r in metrics(out))


def test_dp_with_secure_aggregation_adaptive_clipping_and_dropouts(digits, tmp_path):
    out = str(tmp_path / "o")
    s = federate(3, digits[16], out, *FEDAVG, "fed.fraction=0.5", "fed.rounds=10", "fed.secure_aggregation=true",
                 "fed.dropout_rate=0.25", "fed.dp.noise_multiplier=0.3", "fed.dp.clip=0.2", "fed.dp.adaptive=true",
                 "fed.dp.count_stddev=1.0", "fed.dp.noise_seed=3")
    m = metrics(out)
    assert s["test_accuracy"] >= 0.8 and s["skipped_rounds"] == 0
    clips = [r["clip"] for r in m]
    assert clips[-1] > 0.2 and len(set(clips)) == len(clips)  # the clip norm adapts every round
    assert s["epsilon"] == pytest.approx(_direct_epsilon(0.5, 0.3, 10, 1e-5), abs=1e-6)


def test_dpsgd_record_level_epsilon_and_accuracy(digits, tmp_path):
    """Cross-silo: 4 clients of ≈ 290 digits, every client every round, DP-SGD with σ = 3, C = 1, Poisson
    batches of 32, 30 rounds of one local epoch: record-level ε = 2.89 at δ = 1e-5 (the worst client, as
    dp-accounting computes it), test accuracy ≥ 0.88 (README table)."""
    out = str(tmp_path / "o")
    s = federate(3, digits[4], out, "train.optimizer=sgd", "train.lr=0.2", "model.kind=softmax", "fed.fraction=1",
                 "fed.rounds=30", "fed.local_epochs=1", "fed.local_batch=32", "fed.dpsgd.noise_multiplier=3.0",
                 "fed.dpsgd.clip=1.0", "fed.dp.noise_seed=5", "fed.eval_every=10")
    import dp_accounting as dpa
    import h5py
    from dp_accounting import rdp

    with h5py.File(digits[4], "r") as f:
        sizes = np.unique(f["partition/n_train"][...])
    eps = []
    for n in sizes:  # the worst client: q = B/n per step, ⌈n/B⌉ steps a round, every round
        acc = rdp.RdpAccountant()
        acc.compose(dpa.PoissonSampledDpEvent(32 / n, dpa.GaussianDpEvent(3.0)), 30 * -(-int(n) // 32))
        eps.append(acc.get_epsilon(1e-5))
    assert s["record_epsilon"] == pytest.approx(max(eps), abs=1e-6)
    assert s["record_epsilon"] == pytest.approx(2.89, abs=0.01)
    assert s["test_accuracy"] >= 0.88 and "epsilon" not in s
    assert [r["record_epsilon"] for r in metrics(out)][-1] == s["record_epsilon"]


def test_secure_dp_resume_is_bit_exact(digits, tmp_path):
    """Secure aggregation + distributed DP noise + dropouts, reproducible noise (fed.dp.noise_seed): 6 rounds
    in one go and 4 + resume + 2 give identical parameters and ε."""
    sets = [*FEDAVG, "fed.fraction=0.5", "fed.rounds=6", "checkpoint.every=2", "fed.dp.noise_multiplier=0.5",
            "fed.dp.clip=0.3", "fed.secure_aggregation=true", "fed.dropout_rate=0.2", "fed.dp.noise_seed=9"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    federate(3, digits[16], full, *sets)
    federate(3, digits[16], cut, *sets)
    os.remove(sorted(glob.glob(os.path.join(cut, "checkpoints", "ckpt-*.h5")))[-1])
    s = federate(3, digits[16], cut, *sets, resume="auto")
    assert s["resumed_from_round"] == 4
    assert np.array_equal(params(full), params(cut))
    a, b = metrics(full), metrics(cut)
    assert [r["epsilon"] for r in a] == [r["epsilon"] for r in b[:4] + b[-2:]]


def test_central_resume_continues_the_interrupted_run_bit_exactly(digits, tmp_path):
    sets = [*FEDAVG, "fed.fraction=0.5", "fed.rounds=6", "checkpoint.every=2", "fed.dp.noise_multiplier=0.5",
            "fed.dp.clip=0.3", "fed.dp.adaptive=true", "fed.dp.count_stddev=1.0"]
    run = str(tmp_path / "run")
    federate(3, digits[16], run, *sets)
    final = params(run)
    clips = [r["clip"] for r in metrics(run)]
    os.remove(sorted(glob.glob(os.path.join(run, "checkpoints", "ckpt-*.h5")))[-1])
    os.remove(os.path.join(run, "model.h5"))
    s = federate(3, digits[16], run, *sets, resume="auto")
    assert s["resumed_from_round"] == 4
    assert np.array_equal(params(run), final)  # secret noise key and adaptive clip restored from round 4
    assert [r["clip"] for r in metrics(run)][-2:] == clips[-2:]
    import h5py

    with h5py.File(sorted(glob.glob(os.path.join(run, "checkpoints", "ckpt-*.h5")))[-1], "r") as f:
        assert f["dp/clip"][0] == clips[-1] and f["dp/noise_key"].shape == (32,)


# --------------------------------------------------------------------------------------------------
# 5. configuration and bad input
# --------------------------------------------------------------------------------------------------

def test_nested_sections_in_toml_and_set(tmp_path):
    from mpitrain import config
    from mpitrain.errors import MpitrainError

    path = tmp_path / "c.toml"
    path.write_text("[fed]\nsecure_aggregation = true\n\n[fed.dp]\nnoise_multiplier = 1.5\nclip = 2\n\n"
                    "[fed.secagg]\nneighbors = 6\n", encoding="utf-8")
    cfg = config.load(str(path), ["fed.dp.clip=0.25", "fed.secagg.threshold=4"])
    assert cfg.fed.secure_aggregation and cfg.fed.dp.noise_multiplier == 1.5 and cfg.fed.dp.clip == 0.25
    assert cfg.fed.secagg.neighbors == 6 and cfg.fed.secagg.threshold == 4
    back = tmp_path / "back.toml"
    back.write_text(config.to_toml(cfg), encoding="utf-8")
    assert config.load(str(back)) == cfg and "[fed.dp]" in config.to_toml(cfg)
    for bad, needle in (("fed.dp.clipp=1", "unknown key fed.dp.clipp"), ("fed.dq.clip=1", "unknown section [fed.dq]"),
                        ("fed.dp.clip=x", "fed.dp.clip = 'x': expected a number"),
                        ("fed.dp=1", "fed.dp is a section"), ("fed.dp.clip=0", "fed.dp.clip = 0.0: expected > 0"),
                        ("fed.dp.sampling=random", "fed.dp.sampling = 'random'")):
        with pytest.raises(MpitrainError, match=None) as e:
            config.load(overrides=[bad])
        assert needle in str(e.value), (bad, str(e.value))
    path.write_text("[fed.dp]\nclip = -1\n", encoding="utf-8")
    with pytest.raises(MpitrainError, match=r"fed\.dp\.clip = -1\.0"):
        config.load(str(path))


def test_privacy_settings_that_would_do_nothing_are_refused():
    """fed.dp.* while client-level DP is off, fed.dpsgd.* while DP-SGD is off, fed.secagg.* while secure
    aggregation is off, fed.robust.* under the mean, an odd mask-graph degree (it was silently rounded up):
    one line each; the same keys with their layer on load fine."""
    from mpitrain import config
    from mpitrain.errors import MpitrainError

    for sets, needle in ((["fed.dp.clip=0.5"], "fed.dp.clip has no effect: client-level differential privacy is off"),
                         (["fed.dp.sampling=fixed", "fed.dp.delta=1e-6"], "fed.dp.delta has no effect"),
                         (["fed.dpsgd.clip=2"], "fed.dpsgd.clip has no effect: record-level DP-SGD is off"),
                         (["fed.dp.noise_seed=3"], "fed.dp.noise_seed has no effect"),
                         (["fed.dp.clip_only=true", "fed.dp.noise_multiplier=1"], "fed.dp.clip_only = true clips "
                                                                                  "without noise"),
                         (["fed.secagg.neighbors=5"], "fed.secagg.neighbors = 5: expected an even number"),
                         (["fed.secagg.neighbors=6"], "fed.secagg.neighbors has no effect: secure aggregation is off"),
                         (["fed.robust.fraction=0.1"], "fed.robust.fraction has no effect: fed.aggregator = 'mean'"),
                         (["fed.dp.noise_multiplier=1", "fed.dp.count_stddev=2"],
                          "fed.dp.count_stddev has no effect: fed.dp.adaptive = false")):
        with pytest.raises(MpitrainError) as e:
            config.load(overrides=sets)
        assert needle in str(e.value), (sets, str(e.value))
    for sets in (["fed.dp.clip=0.5", "fed.dp.noise_multiplier=1"], ["fed.dp.clip=0.5", "fed.dp.clip_only=true"],
                 ["fed.dpsgd.clip=2", "fed.dpsgd.noise_multiplier=1", "fed.dp.noise_seed=3"],
                 ["fed.secagg.neighbors=6", "fed.secure_aggregation=true"],
                 ["fed.robust.fraction=0.1", "fed.aggregator=trimmed_mean"]):
        config.load(overrides=sets)


def test_clipping_only_clips_without_noise(digits, tmp_path):
    """fed.dp.clip_only: a clip of 1e-6 keeps the model at its initialisation (without it the same run
    moves it), no ε is reported."""
    from mpitrain.model import Model, ModelSpec

    sets = ["model.kind=softmax", "fed.rounds=2", "fed.local_epochs=1", "fed.fraction=0.25"]
    clipped = federate(3, digits[16], str(tmp_path / "c"), *sets, "fed.dp.clip_only=true", "fed.dp.clip=1e-6")
    federate(3, digits[16], str(tmp_path / "p"), *sets)
    init = Model(ModelSpec("softmax", 64, 10)).init_params(0)
    assert np.max(np.abs(params(str(tmp_path / "c")) - init)) < 1e-5
    assert np.max(np.abs(params(str(tmp_path / "p")) - init)) > 1e-2
    assert clipped["epsilon"] is None and clipped["noise_multiplier"] == 0.0


def test_secure_aggregation_clips_each_coordinate_of_the_update_before_weighting():
    """fed.secagg.clip_range R bounds every coordinate of Δ_k (README), not of ω_k·Δ_k."""
    from types import SimpleNamespace

    from mpitrain.comm import Comm
    from mpitrain.config import SecAggConfig
    from mpitrain.federated.secagg import SecureAggregator

    agg = SecureAggregator(Comm(), SimpleNamespace(clients=4), 3, "fedavg", SecAggConfig(), 0,
                           lambda n: np.full(3 + 5, 100.0), clip=2.0)
    v = agg.contribution(0, np.float32([5.0, -1.0, -3.0]), 10.0, 4, 0.5, 10.0)
    assert np.array_equal(v[:3], [20.0, -10.0, -20.0]) and np.array_equal(v[3:8], [10.0, 40.0, 0.5, 10.0, 1.0])
    assert v[8] == 2  # the count of clipped coordinates: the last slot of the masked vector


def test_secure_aggregation_reports_clipped_coordinates(digits, tmp_path):
    """A clip range below the updates' coordinates: metrics.jsonl counts the clipped ones per round,
    summary.json in all, and the run warns once; at the default range nothing is clipped on digits."""
    sets = ["model.kind=softmax", "fed.rounds=2", "fed.local_epochs=1", "fed.fraction=0.25",
            "fed.secure_aggregation=true"]
    out = str(tmp_path / "small")
    r = mpirun(3, "federate", "--data", digits[16], "--out", out, *[a for s in sets + ["fed.secagg.clip_range=1e-4"]
                                                                   for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "clipped" in warned[0] and "fed.secagg.clip_range = ±0.0001" in warned[0], r.stdout
    per_round = [m["clipped"] for m in metrics(out) if "round" in m]
    assert len(per_round) == 2 and all(0 < c <= 4 * 650 for c in per_round)  # ≤ 4 clients × 650 parameters
    assert summary(out)["clipped_coordinates"] == sum(per_round)
    s = federate(3, digits[16], str(tmp_path / "default"), *sets)
    assert s["clipped_coordinates"] == 0


BAD = {
    "secagg with 2 sampled clients": (["fed.secure_aggregation=true", "fed.fraction=0.1"],
                                      "needs at least 3 sampled clients per round"),
    "threshold above the cohort": (["fed.secure_aggregation=true", "fed.fraction=0.25", "fed.secagg.threshold=5"],
                                   "fed.secagg.threshold = 5: expected ≤ 4"),
    "dp with a non-positive clip": (["fed.dp.noise_multiplier=1", "fed.dp.clip=0"], "fed.dp.clip = 0.0: expected > 0"),
    "robust with secagg": (["fed.secure_aggregation=true", "fed.aggregator=median"],
                           "fed.aggregator = 'median' needs every client's update at the server"),
    "robust with dp": (["fed.dp.noise_multiplier=1", "fed.aggregator=krum"], "fed.aggregator = 'krum' with fed.dp"),
    "krum on too few clients": (["fed.aggregator=krum", "fed.fraction=0.25"], "Krum needs n ≥ 2f + 3"),
    "fednova with dp": (["fed.dp.noise_multiplier=1", "fed.strategy=fednova"], "fed.strategy = 'fednova' with fed.dp"),
    "target epsilon below one round": (["fed.dp.noise_multiplier=0.5", "fed.dp.target_epsilon=0.01"],
                                       "fed.dp.target_epsilon = 0.01: one round already spends ε ="),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_privacy_input_is_one_clear_line(digits, tmp_path, case):
    sets, expected = BAD[case]
    r = federate(3, digits[16], str(tmp_path / "o"), *sets, ok=False, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: ") and expected in line, line


def test_ckks_refuses_an_update_beyond_its_range(digits, tmp_path):
    """CKKS's sibling of the clip: a mean beyond ±2^(first prime − scale − 1) would decrypt wrapped around
    (a wrong model, silently); clients count such coordinates before encrypting and the round stops."""
    pytest.importorskip("tenseal")
    r = federate(3, digits[16], str(tmp_path / "o"), "model.kind=softmax", "fed.fraction=0.25", "train.lr=1e4",
                 "fed.encryption=ckks", "fed.he.coeff_mod_bit_sizes=[30, 20, 30]", "fed.he.scale_bits=20",
                 ok=False, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.error_lines()
    assert "fed.encryption: round 1: " in line and "beyond CKKS's range ±2^9" in line, line


def test_bench_federated_secure_aggregation(tmp_path):
    """`mpiexec -n 3 python -m mpitrain.bench.federated --secure-aggregation`: both runs per client count,
    saved as JSON/CSV (the same rows `bench federated --secure-aggregation` prints)."""
    r = mpirun(3, "-m", "mpitrain.bench.federated", "--secure-aggregation", "--clients", "12,16", "--rounds", 2,
               "--samples", 400, "--features", 8, "--hidden", "8", "--out", tmp_path, module=False, timeout=300)
    assert r.returncode == 0, r.stderr
    (path,) = glob.glob(str(tmp_path / "federated-*.json"))
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["results"]
    assert [row["clients"] for row in rows] == [12, 16]
    for row in rows:
        assert row["secure_seconds_per_round"] > 0 and row["seconds_per_round"] > 0
        assert row["time_ratio"] == pytest.approx(row["secure_seconds_per_round"] / row["seconds_per_round"])
        assert row["secure_bytes_per_round"] > 0 and row["n_params"] == 8 * 9 + 9 * 10


# --------------------------------------------------------------------------------------------------
# the probe: python tests/test_privacy.py secagg OUT CLIENTS N_PARAMS ROUNDS DROPOUT NEIGHBORS FRACTION
# --------------------------------------------------------------------------------------------------

def _probe_secagg(out, clients, n_params, rounds, dropout, neighbors, fraction):
    """SecureAggregator on synthetic client vectors: every round rank 0 saves the decoded sum, the exact
    float64 sum of the survivors' contributions and which kind of share it holds for each client."""
    from mpitrain.comm import Comm
    from mpitrain.config import SecAggConfig
    from mpitrain.data.shard import block
    from mpitrain.federated.run import dropouts, sample_clients
    from mpitrain.federated.secagg import SecureAggregator

    comm = Comm()
    R, w_max, steps = 4.0, 8.0, 3

    def bounds(n):
        return np.array([w_max * R] * n_params + [w_max, w_max * steps, 64 * 100, 100, 1])

    agg = SecureAggregator(comm, SimpleNamespace(clients=clients), n_params, "fedavg",
                           SecAggConfig(neighbors=neighbors), 11, bounds, clip=0.999 * R)
    lo, hi = block(clients, comm.size - 1, comm.rank - 1) if comm.rank else (0, 0)

    def client(k, rnd):  # about 0.1 % of the coordinates beyond the clip 0.999·R
        rng = np.random.default_rng([k, rnd])
        return rng.uniform(-R, R, n_params).astype(np.float32), float(1 + k % 8)

    for rnd in range(rounds):
        cohort = sample_clients(11, rnd, clients, fraction, 3)
        active = np.setdiff1d(cohort, dropouts(11, rnd, cohort, dropout))
        agg.begin(rnd, cohort, active)
        for k in active[(active >= lo) & (active < hi)]:
            delta, w = client(int(k), rnd)
            agg.add(int(k), delta, w, steps, 0.5, 10.0)
        res = agg.finish(0.0, 0)
        if comm.rank == 0:
            deltas = [client(int(k), rnd)[0].astype(np.float64) for k in active]
            exact = sum(client(int(k), rnd)[1] * np.clip(d, -agg.clip, agg.clip) for k, d in zip(active, deltas))
            exact_clipped = sum(int(np.sum(np.abs(d) > agg.clip)) for d in deltas)
            weight = sum(client(int(k), rnd)[1] for k in active)
            kinds = agg.store.kind if agg.store is not None else {}
            np.savez(f"{out}-{rnd}.npz", total=res.total, exact=exact, weight=res.weight, exact_weight=weight,
                     clipped=res.metrics.get("clipped", -1), exact_clipped=exact_clipped,
                     clients=res.clients, skipped=res.skipped, cohort=len(cohort),
                     alive=np.array([agg.index[int(k)] for k in active]), scale=agg.scales[0],
                     neighbors=agg.k, store_owner=np.array(sorted(kinds), np.int64),
                     store_kind=np.array([kinds[u] for u in sorted(kinds)], np.int64))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "secagg":
    o, c, p, r, d, nb, fr = sys.argv[2:9]
    _probe_secagg(o, int(c), int(p), int(r), float(d), int(nb), float(fr))
