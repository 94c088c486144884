"""bench scaling (real mpiexec per point) and bench model on tiny sizes: the files parse, the numbers are
positive and consistent with each other, the fit recovers a known α and β, predictions follow the formula."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import launch, mpirun, saved

TINY = ["--features", 16, "--hidden", 8, "--classes", 3, "--steps", 3, "--warmup", 1, "--ranks", "1,2",
        "--timeout", 120]
N_PARAMS = (16 + 1) * 8 + (8 + 1) * 3
ALPHA, BETA = 2.5e-6, 3.1e-10  # s, s/byte: the fake allreduce timings follow the ring model exactly


def _mpitrain(*args):
    return launch([sys.executable, "-m", "mpitrain", *map(str, args)], timeout=180)


def _check_plots(out, mode, stdout):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped (pip install matplotlib)" in stdout
    else:
        for name in ("speedup", "efficiency", "time", "breakdown"):
            with open(out / f"scaling-{mode}-{name}.png", "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_points(rows):
    assert [r["ranks"] for r in rows] == [1, 2]
    for r in rows:
        assert r["n_params"] == N_PARAMS and r["allreduce_bytes"] == 4 * (N_PARAMS + 4)
        assert min(r["data_ms"], r["compute_ms"], r["step_ms"], r["samples_per_s"]) > 0 and r["allreduce_ms"] >= 0
        assert r["samples_per_s"] == pytest.approx(r["global_batch"] / r["step_ms"] * 1e3)


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    out = tmp_path_factory.mktemp("weak")
    r = _mpitrain("bench", "scaling", "--mode", "weak", "--batch-per-rank", 4, *TINY, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout, *saved(out, "scaling")


def test_weak_scaling(weak):
    out, stdout, _, rows = weak
    _check_points(rows)
    assert [(r["global_batch"], r["local_batch"]) for r in rows] == [(4, 4), (8, 4)]
    t1 = rows[0]["step_ms"]
    for r in rows:
        assert r["efficiency"] == t1 / r["step_ms"]
        assert r["speedup"] == r["samples_per_s"] / rows[0]["samples_per_s"]
    assert "efficiency" in stdout
    _check_plots(out, "weak", stdout)


def test_strong_scaling_under_mpirun_one_rank(tmp_path):
    r = mpirun(1, "bench", "scaling", "--mode", "strong", "--global-batch", 5, *TINY, "--out", tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = saved(tmp_path, "scaling")
    _check_points(rows)
    assert [(r["global_batch"], r["local_batch"]) for r in rows] == [(5, 5), (5, 3)]  # 5 = 2 + 3 on 2 ranks
    for row in rows:
        assert row["speedup"] == rows[0]["step_ms"] / row["step_ms"]
        assert row["efficiency"] == row["speedup"] / row["ranks"]
    _check_plots(tmp_path, "strong", r.stdout)


def test_scaling_refuses_to_run_under_several_ranks(tmp_path):
    r = mpirun(2, "bench", "scaling", *TINY, "--out", tmp_path, timeout=120)
    assert r.returncode == 2 and "launch it as one process" in r.stderr
    assert not os.listdir(tmp_path)


def _fake_allreduce(path, ranks):
    """A saved `bench allreduce` result whose mpitrain timings are exactly the ring model's (the mpi4py
    rows are off by 2×, so fitting them instead would show)."""
    rows = []
    for p in ranks:
        for n in (4 * 4 ** k for k in range(12)):
            t = 2 * (p - 1) * ALPHA + 2 * (p - 1) / p * n * BETA
            rows += [{"bytes": n, "path": "mpi4py", "ranks": p, "avg_us": 2e6 * t},
                     {"bytes": n, "path": "mpitrain", "ranks": p, "avg_us": 1e6 * t}]
    path.write_text(json.dumps({"bench": "allreduce", "params": {}, "results": rows}))
    return path


@pytest.mark.parametrize("ranks", [(2,), (2, 4, 8)])
def test_fit_recovers_alpha_beta(tmp_path, ranks):
    from mpitrain.bench.model import fit_ring

    with open(_fake_allreduce(tmp_path / "ar.json", ranks), encoding="utf-8") as f:
        rows = [r for r in json.load(f)["results"] if r["path"] == "mpitrain"]
    alpha, beta = fit_ring(rows)
    assert alpha == pytest.approx(ALPHA, rel=1e-6) and beta == pytest.approx(BETA, rel=1e-6)


def _check_prediction(rows, ranks, work_ms, batch, n):
    assert [(r["model"], r["ranks"]) for r in rows] == [(m, p) for m in ("network", "fitted") for p in ranks]
    for r in rows:
        a, b, p = r["alpha_us"] * 1e-6, r["beta_ns_per_byte"] * 1e-9, r["ranks"]
        t_ms = (2 * (p - 1) * a + 2 * (p - 1) / p * n * b) * 1e3
        assert r["allreduce_bytes"] == n and r["work_ms"] == pytest.approx(work_ms)
        assert r["allreduce_ms"] == pytest.approx(t_ms) and r["step_ms"] == pytest.approx(work_ms + t_ms)
        assert r["samples_per_s"] == pytest.approx(p * batch / (work_ms + t_ms) * 1e3)
        assert r["efficiency"] == pytest.approx(work_ms / (work_ms + t_ms))


def test_model_from_allreduce_json(tmp_path):
    fake = _fake_allreduce(tmp_path / "ar.json", (2,))
    r = _mpitrain("bench", "model", "--from", fake, "--compute-ms", 7.5, "--batch-per-rank", 32, "--features", 16,
                  "--hidden", 8, "--classes", 3, "--network-gbps", 25, "--latency-us", 2, "--ranks", "64,1024",
                  "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MODEL (not measured)" in r.stdout
    _, rows = saved(tmp_path, "model")
    _check_prediction(rows, [64, 1024], 7.5, 32, 4 * (N_PARAMS + 4))
    for row in rows:
        if row["model"] == "network":  # α = latency, β = 1/bandwidth = 8 bits / 25 Gbit/s
            assert row["alpha_us"] == 2 and row["beta_ns_per_byte"] == pytest.approx(8 / 25)
        else:
            assert row["alpha_us"] == pytest.approx(ALPHA * 1e6, rel=1e-6)
            assert row["beta_ns_per_byte"] == pytest.approx(BETA * 1e9, rel=1e-6)


def test_model_from_scaling_json(weak, tmp_path):
    _, _, scaling_json, points = weak
    fake = _fake_allreduce(tmp_path / "ar.json", (2,))
    r = _mpitrain("bench", "model", "--from", fake, "--scaling", scaling_json, "--ranks", "64", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = saved(tmp_path, "model")
    base = points[0]
    _check_prediction(rows, [64], base["compute_ms"] + base["data_ms"], base["local_batch"], base["allreduce_bytes"])


def test_model_predicts_each_comm_mode(tmp_path):
    """Each comm mode's communication time follows its formula (module docstring of bench/model.py)."""
    fake = _fake_allreduce(tmp_path / "ar.json", (2,))
    r = _mpitrain("bench", "model", "--from", fake, "--compute-ms", 5, "--features", 16, "--hidden", 8,
                  "--classes", 3, "--ranks", "64", "--ranks-per-node", 8, "--topk-ratio", 0.1, "--local-steps", 4,
                  "--comm", "plain,fp16,topk,local_sgd,hierarchical,overlap,sharded", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = saved(tmp_path, "model")
    net = {row["comm"]: row for row in rows if row["model"] == "network"}
    n, p, a, b = 4 * (N_PARAMS + 4), 64, 1e-6, 8 / 100e9

    def ring(nbytes, ranks):
        return (2 * (ranks - 1) * a + 2 * (ranks - 1) / ranks * nbytes * b) * 1e3

    assert net["plain"]["allreduce_ms"] == pytest.approx(ring(n, p))
    assert net["sharded"]["allreduce_ms"] == pytest.approx(ring(n, p))
    assert net["fp16"]["allreduce_ms"] == pytest.approx(ring(n / 2, p))
    assert net["local_sgd"]["allreduce_ms"] == pytest.approx(ring(n, p) / 4)
    k = round(0.1 * n / 4)
    assert net["topk"]["allreduce_ms"] == pytest.approx(((p - 1) * a + (p - 1) * 8 * k * b) * 1e3)
    inside = 2 * (7 * ALPHA + 7 / 8 * n * BETA) * 1e3  # fitted α, β inside a node of 8
    assert net["hierarchical"]["allreduce_ms"] == pytest.approx(inside + ring(n, 8))
    assert net["overlap"]["step_ms"] == pytest.approx(max(5, net["overlap"]["allreduce_ms"]))
    assert net["plain"]["step_ms"] == pytest.approx(5 + net["plain"]["allreduce_ms"])
    bad = _mpitrain("bench", "model", "--from", fake, "--compute-ms", 5, "--comm", "zero", "--out", tmp_path)
    assert bad.returncode == 2 and "--comm zero: unknown mode(s) zero" in bad.stderr


def test_scaling_measures_every_comm_mode_in_one_launch(tmp_path):
    modes = ["plain", "overlap", "fp16", "topk", "sharded", "local_sgd", "fsdp"]
    r = _mpitrain("bench", "scaling", "--batch-per-rank", 4, *TINY, "--comm", ",".join(modes), "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = saved(tmp_path, "scaling")
    assert [(x["ranks"], x["comm"]) for x in rows] == [(p, m) for p in (1, 2) for m in modes]
    two = {x["comm"]: x for x in rows if x["ranks"] == 2}
    plain = two["plain"]["comm_bytes"]
    assert plain == 4 * (N_PARAMS + 4)  # 2(p−1)/p · n with p = 2
    assert two["fp16"]["comm_bytes"] < 0.6 * plain and two["local_sgd"]["comm_bytes"] < plain
    assert two["sharded"]["comm_bytes"] == pytest.approx(plain, rel=0.01)
    assert all(x["comm_bytes"] == 0 for x in rows if x["ranks"] == 1)
    # memory per rank from the live buffers (momentum: one slot); fsdp's shards are ⌈n/2⌉ floats
    whole, half = 4 * N_PARAMS, 4 * -(-N_PARAMS // 2)
    mem = {m: (two[m]["param_bytes_per_rank"], two[m]["grad_bytes_per_rank"], two[m]["optimizer_state_bytes_per_rank"])
           for m in ("plain", "sharded", "fsdp")}
    assert mem == {"plain": (whole, whole, whole), "sharded": (whole, whole, half), "fsdp": (half, half, half)}
    assert all(x["peak_rss_bytes"] > 0 for x in rows)
    assert two["fsdp"]["allgather_ms"] > 0 and two["fsdp"]["reduce_scatter_ms"] > 0 and "allgather_ms" not in two["plain"]
    assert "peak_rss_bytes" in r.stdout  # the memory table beside the time table


def test_a_shard_of_the_initial_parameters_is_made_without_the_full_vector():
    """init_params draws a layer's weights in chunks of 2¹⁶ (the first layer here has 3·2¹⁶ + 768): the same
    values as one draw per layer, and any part of them equals that part of the whole."""
    from mpitrain.model import Model, ModelSpec

    model = Model(ModelSpec("mlp", 768, 3, (257, 6)))
    rng = np.random.default_rng(np.random.SeedSequence([7, 0x1417]))
    ref = []
    for n_in, n_out, fan in ((768, 257, 768), (257, 6, 257), (6, 3, 9)):  # relu, relu, then Glorot (in + out)
        limit = np.sqrt(6.0 / fan)
        ref += [rng.uniform(-limit, limit, size=(n_in, n_out)).astype(np.float32).ravel(), np.zeros(n_out, np.float32)]
    full = model.init_params(7)
    assert np.array_equal(full, np.concatenate(ref))
    n = model.n_params
    for part in (slice(0, n), slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n), slice(65530, 65540)):
        assert np.array_equal(model.init_params(7, part), full[part])


def test_model_predicts_fsdp_and_tensor_parallelism(tmp_path):
    """fsdp: ZeRO-3's 3Ψ in 3 collectives per layer; --tensor 2: Megatron's two allreduces per dense layer
    pair on the group's activations, an odd last layer whole, the rest of the gradient over the data group."""
    fake = _fake_allreduce(tmp_path / "ar.json", (2,))
    r = _mpitrain("bench", "model", "--from", fake, "--compute-ms", 5, "--batch-per-rank", 32, "--features", 16,
                  "--hidden", "8,6", "--classes", 3, "--ranks", "64,1024", "--comm", "plain,fsdp", "--tensor", "2,4",
                  "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3(p−1)/p·Ψ" in r.stdout
    _, rows = saved(tmp_path, "model")
    assert {(x["comm"], x["tensor"]) for x in rows} == {("plain", 1), ("fsdp", 1), ("tensor", 2), ("tensor", 4)}
    a, b = 1e-6, 8 / 100e9
    n_params = 17 * 8 + 9 * 6 + 7 * 3  # layers 16→8, 8→6, 6→3

    def ring(nbytes, ranks):
        return 2 * (ranks - 1) * a + 2 * (ranks - 1) / ranks * nbytes * b

    for p in (64, 1024):
        net = {(x["comm"], x["tensor"]): x for x in rows if x["model"] == "network" and x["ranks"] == p}
        assert net["plain", 1]["allreduce_ms"] == pytest.approx(1e3 * ring(4 * n_params + 16, p))
        gathers = 3 * (p - 1) * a + (p - 1) / p * 4 * n_params * b  # 3 layers, each once: (p−1)α + (p−1)/p·n·β
        assert net["fsdp", 1]["allreduce_ms"] == pytest.approx(1e3 * (3 * gathers + ring(16, p)))
        for t in (2, 4):
            # the pair 16→8→6 split over t: forward allreduce of 6 outputs, backward of 16 input gradients per
            # sample of the group's t·32; this rank's parameters: (16·8 + 8 + 8·6)/t + 6 + the last layer 7·3
            acts = ring(4 * t * 32 * 6, t) + ring(4 * t * 32 * 16, t)
            mine = (16 * 8 + 8 + 8 * 6) / t + 6 + 7 * 3
            assert net["tensor", t]["allreduce_ms"] == pytest.approx(1e3 * (acts + ring(4 * (mine + 4), p // t)))
            assert net["tensor", t]["step_ms"] == pytest.approx(5 + net["tensor", t]["allreduce_ms"])
    assert net["fsdp", 1]["allreduce_ms"] > net["plain", 1]["allreduce_ms"]  # 3Ψ against 2Ψ
    bad = _mpitrain("bench", "model", "--from", fake, "--compute-ms", 5, "--ranks", "64,96", "--tensor", "64",
                    "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "64 does not divide 96" in bad.stderr and not (tmp_path / "bad").exists()


def test_largest_brackets_then_bisects():
    from mpitrain.bench.capacity import largest

    for guess, limit in ((100, 1234), (100, 37), (8, 8), (50, 50), (3, 1)):
        width, seen = largest(lambda w: w <= limit, guess, 0)  # exact
        assert width == limit and seen == {w: w <= limit for w in seen} and seen[limit + 1] is False
    assert largest(lambda w: False, 40, 0.01)[0] == 0
    width, seen = largest(lambda w: w <= 1000, 100, 0.25)  # coarse: within a quarter
    assert 800 <= width <= 1000 and min(w for w, ok in seen.items() if not ok) <= 1.25 * width


def test_capacity_under_one_memory_cap_per_rank(tmp_path):
    """A real search under RLIMIT_AS on 2 ranks (--precision 1: bracketing only, to stay fast): each mode's
    width ran and twice it ran out of memory; fsdp, which holds less at every width, fits at least as wide a
    model; each row's bytes per rank are the live buffers' (Adam: fsdp's shards ⌈n/2⌉, plain whole).  The
    ratio itself is the benchmark's to measure (docs/performance.md)."""
    r = _mpitrain("bench", "capacity", "--ranks", 2, "--budget-mb", 24, "--layers", 6, "--features", 16,
                  "--classes", 3, "--batch-per-rank", 4, "--precision", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = saved(tmp_path, "capacity")
    plain, fsdp = rows
    assert (plain["comm"], fsdp["comm"]) == ("plain", "fsdp") and plain["vs_first"] == 1
    for row in rows:
        w = row["width"]
        assert f"{row['comm']} width {w}: fits" in r.stdout
        assert f"{row['comm']} width {2 * w}: out of memory" in r.stdout
        assert row["n_params"] == 17 * w + 5 * (w + 1) * w + (w + 1) * 3
        assert row["address_space_bytes"] <= row["limit_bytes"] == row["base_bytes"] + 24 * 2**20
    assert fsdp["param_bytes_per_rank"] == fsdp["grad_bytes_per_rank"] == 4 * -(-fsdp["n_params"] // 2)
    assert fsdp["optimizer_state_bytes_per_rank"] == 2 * fsdp["param_bytes_per_rank"]
    assert plain["param_bytes_per_rank"] == 4 * plain["n_params"]
    assert fsdp["vs_first"] == fsdp["n_params"] / plain["n_params"] >= 1
