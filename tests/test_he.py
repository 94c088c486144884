"""Homomorphic encryption of the federated aggregate (fed.encryption = "ckks", TenSEAL): the encode /
aggregate / decode functions in-process (100k parameters), the key distribution and the round under real
mpiexec (a probe at the bottom of this file runs HEAggregator directly), `federate` end to end (accuracy
vs plain, bytes, DP with dropouts, a corrupted ciphertext), refusals and the bench.

Run as a script under mpiexec (`python tests/test_he.py probe OUT ...`) it is the probe.
"""
import glob
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import mpirun, params, summary

pytest.importorskip("tenseal")

HERE = os.path.abspath(__file__)
SOFTMAX = ["model.kind=softmax", "train.optimizer=sgd", "train.lr=0.05", "fed.local_epochs=1", "fed.local_batch=10",
           "fed.fraction=0.5", "checkpoint.every_seconds=0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("he") / "iid8.h5")
    r = mpirun(1, "prepare", "--source", "digits", "--out", p, "--partition", "iid", "--clients", 8)
    assert r.returncode == 0, r.stderr
    return p


def federate(n, data, out, *sets, env=None, ok=True, timeout=300):
    args = ["federate", "--quiet", "--data", data, "--out", out]
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, env=env, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stderr
        return summary(out)
    return r


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if '"round"' in line]


def _contexts():
    from mpitrain.config import HEConfig
    from mpitrain.federated import he

    cfg = HEConfig()
    ctx = he.make_context(cfg)
    return cfg, ctx, he.load_context(he.public_bytes(ctx), cfg.scale_bits), he.load_context(he.secret_bytes(ctx),
                                                                                           cfg.scale_bits)


# --------------------------------------------------------------------------------------------------
# 1. in-process: keys, the encrypted sum, the checks
# --------------------------------------------------------------------------------------------------

def test_public_copy_holds_no_secret_key():
    from mpitrain.federated import he

    cfg, ctx, public, full = _contexts()
    assert ctx.is_private() and full.is_private()
    assert not public.is_private() and public.is_public()
    assert len(he.public_bytes(ctx)) < 1000 < len(he.secret_bytes(ctx))  # parameters only vs the secret key
    with pytest.raises(ValueError):
        public.secret_key()
    blob = he.encrypt(full, np.ones(10), 4096)[0]
    with pytest.raises(ValueError):  # rank 0's context cannot decrypt
        he.decrypt(public, [blob])


def test_decrypted_aggregate_equals_the_plaintext_aggregate_on_100k_parameters():
    """Four client ranks' weighted sums of a 101 770-parameter update, added and scaled by 1/Σω on the
    secret-free context, decrypted with the key: within 1e-5 of the plaintext mean (relative to its
    largest coordinate), the tail slots (loss, samples) within 1e-5 relative."""
    from mpitrain.federated import he

    cfg, ctx, public, full = _contexts()
    n, slots = 101_770, cfg.poly_modulus_degree // 2
    length = n + 2
    rng = np.random.default_rng(0)
    weights = np.array([180.0, 360.0, 179.0, 540.0])  # per rank: Σ n_k of its clients
    vecs = []
    for w in weights:
        v = np.empty(length)
        v[:n] = w * rng.normal(0, 0.02, n)
        v[n:] = (0.4 * w, 2 * w)  # loss, samples
        vecs.append(v)
    uploads = [(r + 1, he.encrypt(full, v, slots)) for r, v in enumerate(vecs)]
    assert all(len(c) == -(-length // slots) for _, c in uploads)
    sizes = he.chunk_sizes(length, slots)
    d, t = weights.sum(), 4 * weights.sum()
    scale = np.full(length, 1 / d)
    scale[n:] = 1 / t
    factors = [float(1 / d)] * (len(sizes) - 1) + [scale[-sizes[-1]:].tolist()]
    acc = he.aggregate(public, uploads, sizes, len(cfg.coeff_mod_bit_sizes) - 1, factors, 0)
    got = he.decrypt(full, [a.serialize() for a in acc])
    exact = np.sum(vecs, axis=0) * scale
    assert got.shape == exact.shape
    assert np.abs(got[:n] - exact[:n]).max() <= 1e-5 * np.abs(exact[:n]).max()
    assert np.allclose(got[n:], exact[n:], rtol=1e-5)
    # bytes: a packed ciphertext per 4096 values, ~14× float32
    up = sum(map(len, uploads[0][1]))
    assert 8 * 4 * n < up < 20 * 4 * n


def test_a_bad_ciphertext_is_one_error_naming_the_client_rank_and_round():
    from mpitrain.errors import MpitrainError
    from mpitrain.federated import he

    cfg, ctx, public, full = _contexts()
    slots, levels = cfg.poly_modulus_degree // 2, len(cfg.coeff_mod_bit_sizes) - 1
    good = he.encrypt(full, np.ones(5000), slots)
    sizes = he.chunk_sizes(5000, slots)
    garbled = bytearray(good[1])
    garbled[len(garbled) // 2:len(garbled) // 2 + 64] = bytes(64)
    short = he.encrypt(full, np.ones(4999), slots)
    other = he.make_context(type(cfg)(poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40], scale_bits=20))
    import tenseal as ts

    scaled = ts.ckks_vector(full, np.ones(904))
    scaled.mul_(1.0)  # one level down: not what a client sends
    cases = {
        "does not deserialise": [good[0], bytes(garbled)],
        "holds 903 values, expected 904": short,
        "has 1 chunks, expected 2": good[:1],
        "(chunk 1) does not deserialise": [good[0], he.encrypt(other, np.ones(904), 2048)[0]],
        "not a fresh ciphertext of this context": [good[0], scaled.serialize()],
    }
    for expected, chunks in cases.items():
        with pytest.raises(MpitrainError) as exc:
            he.aggregate(public, [(1, good), (3, chunks)], sizes, levels, [1.0, 1.0], 6)
        msg = str(exc.value)
        assert "\n" not in msg and "client rank 3 in round 7" in msg and expected in msg, msg
    with pytest.raises(ValueError):
        he.unpack(he.pack([b"abc", b"de"])[:-1])
    assert he.unpack(he.pack([b"abc", b"", b"de"])) == [b"abc", b"", b"de"]


def test_missing_tenseal_is_one_clear_line(monkeypatch):
    from mpitrain.errors import MpitrainError
    from mpitrain.federated import he

    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(MpitrainError, match=r"pip install 'mpitrain\[he\]'"):
        he.tenseal()


REFUSED = {
    "fedadam": (["fed.strategy=fedadam"], "fed.strategy = 'fedadam' with fed.encryption = 'ckks': its server step "
                                          "is not linear"),
    "fedyogi": (["fed.strategy=fedyogi"], "not linear in the aggregate"),
    "fedadagrad": (["fed.strategy=fedadagrad"], "not linear in the aggregate"),
    "robust": (["fed.aggregator=median"], "fed.aggregator = 'median' needs every client's update in plaintext"),
    "secagg": (["fed.secure_aggregation=true"], "with fed.secure_aggregation = true: both hide"),
    "one level": (["fed.he.coeff_mod_bit_sizes=[60, 40]"], "fed.he.coeff_mod_bit_sizes = [60, 40]: expected at "
                                                           "least 3"),
    "insecure moduli": (["fed.he.coeff_mod_bit_sizes=[60, 60, 60, 60]"], "at most 218 bits"),
    "scale": (["fed.he.scale_bits=50"], "fed.he.scale_bits = 50: expected from 20 to 40"),
    "degree": (["fed.he.poly_modulus_degree=5000"], "a power of two"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_combinations(case):
    from mpitrain.config import load
    from mpitrain.errors import MpitrainError

    sets, expected = REFUSED[case]
    with pytest.raises(MpitrainError) as exc:
        load(None, ["fed.encryption=ckks", *sets])
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    for ok in ("fedavg", "fedprox", "fedavgm", "fednova", "fedsgd"):
        load(None, ["fed.encryption=ckks", f"fed.strategy={ok}"])
    with pytest.raises(MpitrainError, match="fed.he.scale_bits has no effect: fed.encryption = 'none'"):
        load(None, ["fed.he.scale_bits=30"])


# --------------------------------------------------------------------------------------------------
# 2. under mpiexec: keys and the round (probe at the bottom of this file)
# --------------------------------------------------------------------------------------------------

def test_key_distribution_and_round_under_mpiexec(tmp_path):
    """4 ranks, 9 clients, a third dropping: rank 0's context is public (no secret key; it received only
    the parameters, < 1 KB, while client ranks got the ~160 KB secret context), the client ranks' are
    private, and the decrypted weighted mean over the survivors equals the plaintext one."""
    out = str(tmp_path / "probe")
    r = mpirun(4, HERE, "probe", out, 3000, 2, 9, 1 / 3, module=False, timeout=300)
    assert r.returncode == 0, r.stderr
    ranks = [json.load(open(f"{out}-rank{k}.json", encoding="utf-8")) for k in range(4)]
    assert ranks[0]["is_private"] is False and ranks[0]["secret_key_error"]
    assert all(x["is_private"] is True for x in ranks[1:])
    assert ranks[0]["setup_bytes"] < 1000 < ranks[1]["secret_bytes"]
    for rnd in range(2):
        with np.load(f"{out}-{rnd}.npz") as z:
            total, exact, weight, exact_weight = z["mean"], z["exact"], z["weight"], z["exact_weight"]
            assert int(z["clients"]) == 6 and float(z["seen"]) == pytest.approx(float(z["exact_seen"]), rel=1e-6)
        assert weight == exact_weight
        assert np.abs(total - exact).max() <= 1e-5 * np.abs(exact).max()


# --------------------------------------------------------------------------------------------------
# 3. federate end to end
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_and_ckks(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("fedhe")
    sets = [*SOFTMAX, "fed.rounds=20"]
    plain = federate(3, digits, str(d / "plain"), *sets)
    enc = federate(3, digits, str(d / "ckks"), *sets, "fed.encryption=ckks")
    return d, plain, enc


def test_fedavg_accuracy_with_encryption_within_half_a_point(plain_and_ckks):
    d, plain, enc = plain_and_ckks
    assert enc["encryption"] == "ckks" and plain["encryption"] == "none"
    assert abs(enc["test_accuracy"] - plain["test_accuracy"]) <= 0.005
    assert plain["test_accuracy"] >= 0.9
    a, b = params(str(d / "plain")), params(str(d / "ckks"))
    assert np.max(np.abs(a - b)) <= 1e-4 * np.abs(a).max()  # CKKS noise ≈ 1e-8 per round


def test_bytes_per_round_in_metrics_and_summary(plain_and_ckks):
    d, plain, enc = plain_and_ckks
    rows = metrics(str(d / "ckks"))
    assert len(rows) == 20 and all(r["bytes"] > 0 for r in rows)
    assert enc["bytes_per_round"] == int(np.mean([r["bytes"] for r in rows]))
    # ciphertexts: at least a packed ciphertext (> 100 KB) per round, far above the 650-parameter Reduce
    assert enc["bytes_per_round"] > max(100_000, 20 * plain["bytes_per_round"])


def test_messages_are_buffers_and_rank0_receives_no_secret_context(digits, tmp_path):
    trace = str(tmp_path / "trace")
    federate(4, digits, str(tmp_path / "o"), *SOFTMAX, "fed.rounds=2", "fed.encryption=ckks",
             env={"MPITRAIN_COMM_TRACE": trace})
    ops = set()
    for path in glob.glob(trace + ".*"):
        for line in open(path, encoding="utf-8"):
            op, dtype, *_ = line.split()
            ops.add((op, dtype))
            assert dtype in ("uint8", "float32", "float64", "int64"), line
    assert ("Scatterv", "uint8") in ops and ("Gatherv", "uint8") in ops and ("Reduce", "float32") not in ops


def test_dp_with_dropouts_matches_secure_aggregation(digits, tmp_path):
    """Distributed DP noise with dropouts: the same noise shares (fed.dp.noise_seed) through CKKS and
    through secure aggregation give the same model up to the two encodings' errors."""
    sets = [*SOFTMAX, "fed.rounds=4", "fed.dp.noise_multiplier=0.5", "fed.dp.clip=1", "fed.dp.sampling=fixed",
            "fed.dp.noise_seed=3", "fed.dropout_rate=0.25"]
    enc = federate(3, digits, str(tmp_path / "ckks"), *sets, "fed.encryption=ckks")
    sec = federate(3, digits, str(tmp_path / "sec"), *sets, "fed.secure_aggregation=true")
    assert enc["epsilon"] == pytest.approx(sec["epsilon"]) and enc["skipped_rounds"] == 0
    rows = metrics(str(tmp_path / "ckks"))
    assert all(r["clients"] == 4 and r["dropped"] == 1 and r["survivors"] == 3 for r in rows)
    a, b = params(str(tmp_path / "ckks")), params(str(tmp_path / "sec"))
    assert np.max(np.abs(a - b)) <= 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("mode, expected", [("garble", "does not deserialise"),
                                            ("size", "values, expected")])
def test_corrupted_ciphertext_stops_the_run_with_one_line(digits, tmp_path, mode, expected):
    out = str(tmp_path / "o")
    r = federate(3, digits, out, *SOFTMAX, "fed.fraction=1", "fed.rounds=4", "fed.encryption=ckks", ok=False,
                 env={"MPITRAIN_HE_CORRUPT": f"2:2:{mode}"}, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: fed.encryption: the ciphertext from client rank 2 in round 2")
    assert expected in line, line
    assert [row["round"] for row in metrics(out)] == [1]  # round 2 was not applied


def test_adaptive_strategy_is_refused_with_one_line(digits, tmp_path):
    r = federate(2, digits, str(tmp_path / "o"), "fed.encryption=ckks", "fed.strategy=fedadam", ok=False, timeout=120)
    assert r.returncode == 2
    (line,) = r.error_lines()
    assert line.startswith("mpitrain: error: fed.strategy = 'fedadam' with fed.encryption = 'ckks'"), line


def test_bench_federated_encryption(tmp_path):
    r = mpirun(3, "-m", "mpitrain.bench.federated", "--encryption", "ckks", "--clients", "12", "--rounds", 2,
               "--samples", 400, "--features", 8, "--hidden", "8", "--out", tmp_path, module=False, timeout=300)
    assert r.returncode == 0, r.stderr
    (path,) = glob.glob(str(tmp_path / "federated-*.json"))
    with open(path, encoding="utf-8") as f:
        (row,) = json.load(f)["results"]
    assert row["he_seconds_per_round"] > 0 and row["secure_seconds_per_round"] > 0
    assert row["he_time_ratio"] == pytest.approx(row["he_seconds_per_round"] / row["seconds_per_round"])
    assert row["he_vs_secure_bytes"] == pytest.approx(row["he_bytes_per_round"] / row["secure_bytes_per_round"])
    assert row["he_bytes_per_round"] > row["bytes_per_round"]


# --------------------------------------------------------------------------------------------------
# the probe: python tests/test_he.py probe OUT N_PARAMS ROUNDS CLIENTS DROPOUT
# --------------------------------------------------------------------------------------------------

def _probe(out, n_params, rounds, clients, dropout):
    """HEAggregator on synthetic client vectors; every rank saves what its context holds, rank 0 the
    decrypted weighted mean and the exact float64 one per round."""
    from mpitrain.comm import Comm
    from mpitrain.config import Config
    from mpitrain.data.shard import block
    from mpitrain.federated import he
    from mpitrain.federated.run import dropouts, sample_clients

    comm = Comm()
    cfg = Config()
    n_train = np.array([20 + 3 * k for k in range(clients)])
    part = SimpleNamespace(clients=clients, n_train=n_train)
    agg = he.HEAggregator(comm, part, n_params, cfg.fed, cfg.train)
    lo, hi = block(clients, comm.size - 1, comm.rank - 1) if comm.rank else (0, 0)
    steps = 3

    def client(k, rnd):
        return np.random.default_rng([k, rnd]).normal(0, 0.05, n_params).astype(np.float32), float(n_train[k])

    for rnd in range(rounds):
        cohort = sample_clients(5, rnd, clients, 1.0, 3)
        active = np.setdiff1d(cohort, dropouts(5, rnd, cohort, dropout))
        agg.begin(rnd, cohort, active)
        for k in active[(active >= lo) & (active < hi)]:
            delta, w = client(int(k), rnd)
            agg.add(int(k), delta, w, steps, 0.5 * w, 2.0 * w)
        res = agg.finish(0.0, 0)
        if comm.rank == 0:
            weight = sum(client(int(k), rnd)[1] for k in active)
            exact = sum(client(int(k), rnd)[1] * client(int(k), rnd)[0].astype(np.float64) for k in active) / weight
            np.savez(f"{out}-{rnd}.npz", mean=res.mean(), exact=exact, weight=res.weight, exact_weight=weight,
                     clients=res.clients, seen=res.seen, exact_seen=2.0 * weight)
    info = {"is_private": bool(agg.ctx.is_private())}
    if comm.rank == 0:
        try:
            agg.ctx.secret_key()
            info["secret_key_error"] = ""
        except ValueError as exc:
            info["secret_key_error"] = str(exc)
        info["setup_bytes"] = int(agg.context_bytes)
    if comm.rank == he.KEY_RANK:
        info["secret_bytes"] = len(he.secret_bytes(agg.ctx))
    with open(f"{out}-rank{comm.rank}.json", "w", encoding="utf-8") as f:
        json.dump(info, f)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "probe":
    o, p, r, c, d = sys.argv[2:7]
    _probe(o, int(p), int(r), int(c), float(d))
