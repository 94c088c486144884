"""The bench machinery on tiny sizes: runs, saves JSON/CSV that parse, reports consistent numbers."""

import pytest

from conftest import mpirun, saved


def test_bench_allreduce(tmp_path):
    r = mpirun(3, "bench", "allreduce", "--max-bytes", 1024, "--iters", 5, "--warmup", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "allreduce")[1]
    assert [row["bytes"] for row in rows] == [4, 4, 16, 16, 64, 64, 256, 256, 1024, 1024]
    for row in rows:
        assert row["ranks"] == 3 and 0 < row["min_us"] <= row["avg_us"] <= row["max_us"]
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * 2 / 3)
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / row["avg_us"] / 1e3)


def test_bench_step(tmp_path):
    r = mpirun(1, "bench", "step", "--features", 16, "--hidden", "8", "--classes", 3, "--batches", "4,8",
               "--seconds", 0.02, "--repeats", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "step")[1]
    assert {row["impl"] for row in rows} >= {"mpitrain", "numpy", "floor", "floor_padded"}
    for row in rows:
        assert row["samples_per_s"] > 0 and row["gflops"] > 0
        assert row["gflops"] == pytest.approx(row["samples_per_s"] * (2 * (16 * 8 + 8 * 3) * 3 - 2 * 16 * 8) / 1e9)


def test_bench_checkpoint(tmp_path):
    r = mpirun(1, "bench", "checkpoint", "--sizes", "100,1000", "--repeats", 2, "--dir", tmp_path, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = saved(tmp_path, "checkpoint")[1]
    assert [row["n_params"] for row in rows] == [100, 1000]
    for row in rows:
        assert row["save_s"] > 0 and row["load_s"] > 0
        assert row["overhead_pct_at_default"] == pytest.approx(100 * row["save_s"] / 300)
