"""[comm] modes of synchronous training: the 16-bit codecs and top-k selection in-process, then real
mpiexec runs: overlap, hierarchical and sharded give the plain path's parameters, compressed modes stay
close, sharded optimizer state is 1/p per rank and its checkpoints resume on other rank counts."""
import functools
import glob
import os

import numpy as np
import pytest
from conftest import mpirun, params, summary

from mpitrain import config
from mpitrain.errors import MpitrainError
from mpitrain.kernels import cpu
from mpitrain.model import Model, ModelSpec
from mpitrain.sync import Overlap, ring_bytes

# --------------------------------------------------------------------------------------------------
# 1. codecs, selection, buckets
# --------------------------------------------------------------------------------------------------

EDGES = [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6.1e-5, 6.09e-5, 5.96e-8,
         2.98e-8, 2.99e-8, 1e-8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11]


def values():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 1, 20000), rng.normal(0, 1e-5, 20000),
                           10.0 ** rng.uniform(-9, 6, 20000) * rng.choice([-1, 1], 20000), EDGES]).astype(np.float32)


def test_fp16_codec_matches_numpy_bit_for_bit():
    x = np.concatenate([values(), np.float32([np.nan, -np.nan])])
    w = np.empty(x.size, np.uint16)
    cpu.encode16(x.view(np.uint32), w, False)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(w, x.astype(np.float16).view(np.uint16))
    back = np.empty_like(x)
    cpu.decode16(w, back.view(np.uint32), False)
    np.testing.assert_array_equal(back, w.view(np.float16).astype(np.float32))


def test_fp16_decode_of_every_half():
    h = np.arange(1 << 16).astype(np.uint16)
    got = np.empty(h.size, np.float32)
    cpu.decode16(h, got.view(np.uint32), False)
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all() and nan.sum() == 2 * 1023


def test_bf16_codec_rounds_to_the_nearest_even():
    x = values()
    w = np.empty(x.size, np.uint16)
    cpu.encode16(x.view(np.uint32), w, True)
    back = np.empty_like(x)
    cpu.decode16(w, back.view(np.uint32), True)
    # the two bfloat16 neighbours of x: truncation and one unit up (away from zero)
    lo = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
    hi = ((x.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32)
    finite = np.isfinite(x) & np.isfinite(hi)
    x64, lo64, hi64 = (a[finite].astype(np.float64) for a in (x, lo, hi))
    d_lo, d_hi = np.abs(x64 - lo64), np.abs(hi64 - x64)
    even_lo = (lo[finite].view(np.uint32) >> 16) % 2 == 0
    want = np.where((d_lo < d_hi) | ((d_lo == d_hi) & even_lo), lo64, hi64)
    np.testing.assert_array_equal(back[finite].astype(np.float64), want)
    assert np.isinf(back[np.isinf(x)]).all()


def test_sum16_adds_in_float32_and_rounds_once():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=1000).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    for bf16 in (False, True):
        wa, wb = np.empty(1000, np.uint16), np.empty(1000, np.uint16)
        cpu.encode16(a.view(np.uint32), wa, bf16)
        cpu.encode16(b.view(np.uint32), wb, bf16)
        fa, fb = np.empty(1000, np.float32), np.empty(1000, np.float32)
        cpu.decode16(wa, fa.view(np.uint32), bf16)
        cpu.decode16(wb, fb.view(np.uint32), bf16)
        want = np.empty(1000, np.uint16)
        cpu.encode16((fa + fb).view(np.uint32), want, bf16)
        cpu.sum16(wa, wb, bf16)
        np.testing.assert_array_equal(wb, want)


def test_topk_selection_keeps_the_residual():
    rng = np.random.default_rng(2)
    acc = rng.normal(size=500).astype(np.float32)
    before = acc.copy()
    idx, val = np.empty(20, np.uint32), np.empty(20, np.float32)
    cpu.topk_select(acc, 20, idx, val)
    np.testing.assert_array_equal(idx, np.sort(np.argsort(-np.abs(before))[:20]))
    np.testing.assert_array_equal(val, before[idx])
    sent = np.zeros(500, np.float32)
    cpu.scatter_add(sent, idx, val)
    np.testing.assert_array_equal(sent + acc, before)  # error feedback: nothing is lost
    assert np.count_nonzero(acc) == 480


class _OneRank:
    rank, size = 0, 1


def test_overlap_buckets_tile_the_gradient_in_backward_order():
    model = Model(ModelSpec("mlp", 30, 5, (40, 20)))
    n = model.n_params
    assert model.starts == [0, 31 * 40, 31 * 40 + 41 * 20]
    small = Overlap(_OneRank(), n, model.starts, bucket_mb=1e-6)  # every layer its own bucket
    assert small.cuts == [(model.starts[2], n), (model.starts[1], model.starts[2]), (0, model.starts[1])]
    one = Overlap(_OneRank(), n, model.starts, bucket_mb=1.0)
    assert one.cuts == [(0, n)]


def test_ring_bytes_convention():
    assert ring_bytes(1000, 4) == 1500 and ring_bytes(1000, 4, "allgather") == 750
    assert ring_bytes(1000, 1) == 0


def test_bad_comm_settings_are_clear_errors():
    with pytest.raises(MpitrainError, match=r"comm.mode = 'zero': expected one of plain, overlap"):
        config.load(overrides=["comm.mode=zero"])
    with pytest.raises(MpitrainError, match=r"comm.topk_ratio = 0.0: expected in \(0, 1\]"):
        config.load(overrides=["comm.topk_ratio=0"])
    with pytest.raises(MpitrainError, match="comm.local_steps = 0"):
        config.load(overrides=["comm.local_steps=0"])


# --------------------------------------------------------------------------------------------------
# 2. training under mpiexec
# --------------------------------------------------------------------------------------------------

BASE = ["model.hidden=[32,16]", "train.global_batch=60", "train.lr=0.05",
        "train.log_every=5", "comm.bucket_mb=0.0001"]


def train(n, out, data, *sets, resume=None, steps=40):
    args = ["train", "--quiet", "--out", out, "--set", f"data.path={data}"]
    args += ["--resume", resume] if resume else []
    for s in (*BASE, f"train.steps={steps}", *sets):
        args += ["--set", s]
    r = mpirun(n, *args, timeout=240)
    assert r.returncode == 0, r.stderr
    return params(out)


def close(a, b, tol):
    return np.max(np.abs(a - b)) <= tol * np.abs(a).max()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth):
    """name → (parameters, summary) of 4-rank runs with momentum and Adam."""
    d = tmp_path_factory.mktemp("sync")
    got = {}
    for opt in ("momentum", "adam"):
        for mode, extra in [("plain", []), ("overlap", []), ("hierarchical", ["comm.group_size=2"]),
                            ("sharded", [])]:
            out = str(d / f"{opt}-{mode}")
            got[opt, mode] = train(4, out, synth, f"train.optimizer={opt}", f"comm.mode={mode}", *extra), summary(out)
    return got


@pytest.mark.parametrize("opt", ["momentum", "adam"])
@pytest.mark.parametrize("mode", ["overlap", "hierarchical", "sharded"])
def test_equivalent_to_the_plain_allreduce(runs, opt, mode):
    plain, p_sum = runs[opt, "plain"]
    got, s = runs[opt, mode]
    assert close(plain, got, 1e-6), np.max(np.abs(plain - got))
    assert s["comm_mode"] == mode and s["world_size"] == 4
    assert s["test_accuracy"] == pytest.approx(p_sum["test_accuracy"], abs=0.01)


def test_sharded_optimizer_state_is_one_pth_per_rank(runs):
    for opt, slots in (("momentum", 1), ("adam", 2)):
        full = runs[opt, "plain"][1]
        shard = runs[opt, "sharded"][1]
        n = full["n_params"]
        assert full["optimizer_state_bytes_per_rank"] == slots * 4 * n
        assert shard["optimizer_state_bytes_per_rank"] == slots * 4 * -(-n // 4)  # ⌈n/p⌉: one shard's rounding
        # Reduce_scatter + Allgather move what one ring Allreduce moves
        assert shard["comm_bytes_per_step"] == pytest.approx(full["comm_bytes_per_step"], rel=1e-3)


def test_compressed_and_local_modes(tmp_path, synth):
    """2 ranks: fp16/bf16 within their rounding of plain, top-k with every entry = plain, local SGD with
    H = 1 = plain (momentum is linear; on 3 ranks with an uneven split), H = 4 trains; bytes per step
    shrink as documented."""
    long = functools.partial(train, steps=200)
    plain = long(2, str(tmp_path / "plain"), synth)
    p_bytes, p_acc = (summary(str(tmp_path / "plain"))[k] for k in ("comm_bytes_per_step", "test_accuracy"))
    assert p_acc > 0.7
    for mode, tol in (("fp16", 0.02), ("bf16", 0.1)):  # relative L2 distance after 200 steps
        got = long(2, str(tmp_path / mode), synth, f"comm.mode={mode}")
        drift = np.linalg.norm(got - plain) / np.linalg.norm(plain)
        assert 0 < drift <= tol, (mode, drift)
        s = summary(str(tmp_path / mode))
        assert s["comm_bytes_per_step"] < 0.51 * p_bytes and s["test_accuracy"] >= p_acc - 0.03
    assert close(plain, long(2, str(tmp_path / "topk1"), synth, "comm.mode=topk", "comm.topk_ratio=1"), 1e-6)
    long(2, str(tmp_path / "topk"), synth, "comm.mode=topk", "comm.topk_ratio=0.05")
    assert summary(str(tmp_path / "topk"))["comm_bytes_per_step"] < 0.15 * p_bytes
    uneven = "train.global_batch=64"  # 21, 21 and 22 samples on 3 ranks: averaging must weight them so
    short = train(3, str(tmp_path / "plain40"), synth, uneven)  # float32 drift grows with the steps
    h1 = train(3, str(tmp_path / "h1"), synth, uneven, "comm.mode=local_sgd", "comm.local_steps=1")
    assert close(short, h1, 1e-5), np.max(np.abs(short - h1))
    local = long(2, str(tmp_path / "h4"), synth, "comm.mode=local_sgd", "comm.local_steps=4")
    s = summary(str(tmp_path / "h4"))
    assert not close(plain, local, 1e-3) and s["test_accuracy"] >= p_acc - 0.05
    assert s["comm_bytes_per_step"] < 0.35 * p_bytes


def test_sharded_checkpoints_resume_on_other_rank_counts(tmp_path, synth):
    """A sharded run's checkpoint holds full vectors: it resumes sharded on 3 ranks and plain on 1."""
    ck = ["train.optimizer=adam", "comm.mode=sharded", "checkpoint.every=20"]
    full = train(2, str(tmp_path / "full"), synth, *ck)
    for n, mode in ((3, "sharded"), (1, "plain")):
        cut = str(tmp_path / f"cut{n}")
        train(2, cut, synth, *ck)
        os.remove(max(glob.glob(os.path.join(cut, "checkpoints", "ckpt-*.h5"))))
        got = train(n, cut, synth, *ck[:-1], f"comm.mode={mode}", resume="auto")
        assert summary(cut)["resumed_from_step"] == 20 and summary(cut)["world_size"] == n
        assert close(full, got, 1e-5), (n, np.max(np.abs(full - got)))


@pytest.mark.parametrize("mode", [["comm.mode=local_sgd", "comm.local_steps=8"],
                                  ["comm.mode=topk", "comm.topk_ratio=0.05"]], ids=["local_sgd", "topk"])
def test_per_rank_state_resumes_bit_exactly(tmp_path, synth, mode):
    """A checkpoint at step 20 holds every rank's own state (local SGD: its momentum; top-k: its residual)
    and local SGD averages on the run's step count (24, 32, 40 after the resume, as without it): the
    resumed run ends where the uninterrupted one does."""
    ck = ["train.optimizer=momentum", *mode, "checkpoint.every=20"]
    full = train(2, str(tmp_path / "full"), synth, *ck)
    cut = str(tmp_path / "cut")
    train(2, cut, synth, *ck)
    os.remove(max(glob.glob(os.path.join(cut, "checkpoints", "ckpt-*.h5"))))
    got = train(2, cut, synth, *ck, resume="auto")
    assert summary(cut)["resumed_from_step"] == 20
    assert np.array_equal(full, got), np.max(np.abs(full - got))
