"""The kernels of the transformer and ResNet ops (kernels/ops.py, offered by kernels.cpu): every forward against
a NumPy float64 reference on float32 inputs, every backward against central finite differences of the kernel's
own forward, run in float64 (the kernels are dtype-generic) on tiny shapes."""
import numba
import numpy as np
import pytest

from mpitrain.kernels import backend, cpu, ops
from conftest import central_diff

F32 = dict(rtol=1e-5, atol=1e-5)  # float32 kernels vs float64 references
FD = dict(rtol=1e-6, atol=1e-8)  # float64 kernels vs central differences (h = 1e-6)


def rng_for(*key):
    return np.random.default_rng(np.random.SeedSequence([20240624, *key]))


def garbage(shape):
    """A gradient buffer holding something already: += kernels must add to it, = kernels overwrite it."""
    return np.full(shape, 0.25)


def test_cpu_backend_offers_the_ops():
    k = backend("cpu")
    assert k is cpu
    for name in ops.__all__:
        assert getattr(k, name) is getattr(ops, name)


@pytest.mark.parametrize("threads", [1, 2])
def test_parameter_gradient_sums_do_not_depend_on_threads(threads):
    """The chunked parameter-gradient sums give the same bits on 1 thread and on several."""
    if numba.config.NUMBA_NUM_THREADS < threads:
        pytest.skip("one Numba thread only")
    r = rng_for(0)
    N, C = 300, 8
    x, dout = r.standard_normal((2, N, C)).astype(np.float32)
    w = r.standard_normal(C).astype(np.float32)
    mean, rstd, out = np.empty(N, np.float32), np.empty(N, np.float32), np.empty((N, C), np.float32)
    tokens = r.integers(0, 3, (N // 10, 10)).astype(np.int32)

    def run():
        cpu.layernorm_forward(x, w, w, 1e-5, out, mean, rstd)
        dw, db, dx = np.zeros(C, np.float32), np.zeros(C, np.float32), np.empty_like(x)
        cpu.layernorm_backward(dout, x, w, mean, rstd, dx, dw, db)
        sums = np.empty((2, C))
        cpu.batchnorm_moments(x, sums)
        dwte, dwpe = np.zeros((3, C), np.float32), np.zeros((10, C), np.float32)
        cpu.encoder_backward(dout.reshape(N // 10, 10, C), tokens, dwte, dwpe)
        return dw, db, sums, dwte

    numba.set_num_threads(1)
    one = run()
    numba.set_num_threads(threads)
    try:
        many = run()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(one, many):
        assert np.array_equal(a, b)


def test_exp():
    """The vectorisable exp behind gelu and the attention softmax: float32 to 1e-7 relative over the range it
    takes, clamped outside (never inf or a denormal), NaN kept; float64 to 1e-9."""
    v = np.linspace(-87, 88, 100001, dtype=np.float32)
    got = np.array([ops._exp(a) for a in v])  # float32 arguments: the float32 code
    np.testing.assert_allclose(got, np.exp(v.astype(np.float64)), rtol=1.5e-7)
    special = [ops._exp(np.float32(a)) for a in (np.nan, np.inf, -np.inf, 0.0, -1e30)]
    assert np.isnan(special[0]) and special[1] == ops._exp(np.float32(88)) and special[3] == 1.0
    assert special[2] == special[4] == ops._exp(np.float32(-87)) > 0
    v64 = np.linspace(-30, 30, 1001)
    np.testing.assert_allclose([ops._exp(a) for a in v64], np.exp(v64), rtol=1e-9)


# -- layernorm ---------------------------------------------------------------------------------------------

def layernorm_ref(x, w, b, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)  # biased, as PyTorch normalises
    return (x - mean) / np.sqrt(var + eps) * w + b, mean[:, 0], 1 / np.sqrt(var[:, 0] + eps)


def test_layernorm_forward():
    r = rng_for(1)
    x = (r.standard_normal((6, 10)) * 3 + 1).astype(np.float32)
    w, b = r.standard_normal((2, 10)).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(6, np.float32), np.empty(6, np.float32)
    cpu.layernorm_forward(x, w, b, 1e-5, out, mean, rstd)
    ref, ref_mean, ref_rstd = layernorm_ref(x, w, b, 1e-5)
    np.testing.assert_allclose(out, ref, **F32)
    np.testing.assert_allclose(mean, ref_mean, **F32)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-5)


def test_layernorm_backward():
    r = rng_for(2)
    N, C = 3, 5
    x, R = r.standard_normal((2, N, C))
    w, b = r.standard_normal((2, C))
    out, mean, rstd = np.empty((N, C)), np.empty(N), np.empty(N)

    def loss():
        cpu.layernorm_forward(x, w, b, 1e-5, out, mean, rstd)
        return np.sum(out * R)

    loss()
    dx, dw, db = garbage((N, C)), garbage(C), garbage(C)
    cpu.layernorm_backward(R, x, w, mean, rstd, dx, dw, db)
    np.testing.assert_allclose(dx, central_diff(loss, x), **FD)
    np.testing.assert_allclose(dw - 0.25, central_diff(loss, w), **FD)
    np.testing.assert_allclose(db - 0.25, central_diff(loss, b), **FD)


# -- gelu --------------------------------------------------------------------------------------------------

def gelu_ref(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_forward():
    x = (rng_for(3).standard_normal((2, 3, 7)) * 3).astype(np.float32)
    x[0, 0, :3] = [-20.0, 0.0, 20.0]  # the tails: 0 (to float32's smallest normals) and x
    out = np.empty_like(x)
    cpu.gelu_forward(x, out)
    np.testing.assert_allclose(out, gelu_ref(x), **F32)
    assert abs(out[0, 0, 0]) < 1e-36 and out[0, 0, 1] == 0.0 and out[0, 0, 2] == 20.0


def test_gelu_backward():
    r = rng_for(4)
    x, dout = r.standard_normal((2, 5, 6)) * 2
    x[0] = [-20.0, 0.0, 20.0, -1.0, 1.0, 0.5]
    h = 1e-6
    up, down = np.empty_like(x), np.empty_like(x)
    cpu.gelu_forward(x + h, up)
    cpu.gelu_forward(x - h, down)
    dx = garbage(x.shape)
    cpu.gelu_backward(x, dout, dx)
    np.testing.assert_allclose(dx, (up - down) / (2 * h) * dout, **FD)  # elementwise: all at once
    cpu.gelu_backward(x, dout, dout)  # dx may be dout itself
    np.testing.assert_array_equal(dout, dx)


# -- token and position embedding -------------------------------------------------------------------------

def test_encoder_forward():
    r = rng_for(5)
    V, Tmax, C, B, T = 7, 6, 4, 3, 5
    wte, wpe = r.standard_normal((V, C)).astype(np.float32), r.standard_normal((Tmax, C)).astype(np.float32)
    tokens = r.integers(0, V, (B, T)).astype(np.int32)
    out = np.empty((B, T, C), np.float32)
    cpu.encoder_forward(tokens, wte, wpe, out)
    np.testing.assert_allclose(out, wte.astype(np.float64)[tokens] + wpe[:T], **F32)
    tokens[1, 2] = V
    with pytest.raises(ValueError, match="token"):
        cpu.encoder_forward(tokens, wte, wpe, out)


def test_encoder_backward():
    r = rng_for(6)
    V, Tmax, C, B, T = 4, 5, 3, 3, 4
    wte, wpe = r.standard_normal((V, C)), r.standard_normal((Tmax, C))
    tokens = np.array([[1, 1, 2, 1], [0, 1, 2, 2], [1, 3, 3, 1]], np.int32)  # repeats, in and across rows
    R, out = r.standard_normal((B, T, C)), np.empty((B, T, C))

    def loss():
        cpu.encoder_forward(tokens, wte, wpe, out)
        return np.sum(out * R)

    dwte, dwpe = garbage((V, C)), garbage((Tmax, C))
    cpu.encoder_backward(R, tokens, dwte, dwpe)
    np.testing.assert_allclose(dwte - 0.25, central_diff(loss, wte), **FD)
    np.testing.assert_allclose(dwpe - 0.25, central_diff(loss, wpe), **FD)  # rows ≥ T: no gradient


# -- causal self-attention ---------------------------------------------------------------------------------

def attention_ref(qkv, NH):
    qkv = qkv.astype(np.float64)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))
    for b in range(B):
        for h in range(NH):
            q, k, v = (qkv[b, :, j * C + h * hs:j * C + (h + 1) * hs] for j in range(3))
            s = q @ k.T / np.sqrt(hs)
            s[np.triu_indices(T, 1)] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            att[b, h] = p / p.sum(axis=1, keepdims=True)
            out[b, :, h * hs:(h + 1) * hs] = att[b, h] @ v
    return out, att


@pytest.mark.parametrize("B,T,C,NH", [(2, 5, 12, 3), (1, 1, 4, 1), (3, 4, 8, 1)])
def test_attention_forward(B, T, C, NH):
    qkv = (rng_for(7, T).standard_normal((B, T, 3 * C)) * 2).astype(np.float32)
    out, att = np.full((B, T, C), np.nan, np.float32), np.full((B, NH, T, T), np.nan, np.float32)
    cpu.attention_forward(qkv, NH, out, att)
    ref_out, ref_att = attention_ref(qkv, NH)
    np.testing.assert_allclose(att, ref_att, **F32)
    np.testing.assert_allclose(out, ref_out, **F32)
    assert np.all(att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)


def test_attention_backward():
    r = rng_for(8)
    B, T, C, NH = 2, 3, 4, 2
    qkv, R = r.standard_normal((B, T, 3 * C)), r.standard_normal((B, T, C))
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))

    def loss():
        cpu.attention_forward(qkv, NH, out, att)
        return np.sum(out * R)

    loss()
    dqkv, scratch = garbage(qkv.shape), np.empty_like(att)
    cpu.attention_backward(R, qkv, att, NH, dqkv, scratch)
    np.testing.assert_allclose(dqkv, central_diff(loss, qkv), **FD)


def test_attention_shapes():
    qkv = np.zeros((1, 2, 9), np.float32)
    with pytest.raises(ValueError, match="n_head"):
        cpu.attention_forward(qkv, 2, np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 2, 2), np.float32))
    qkv = rng_for(7).standard_normal((2, 3, 12)).astype(np.float32)
    out, strided = np.empty((2, 3, 4), np.float32), np.zeros((2, 3, 8), np.float32)[:, :, ::2]
    cpu.attention_forward(qkv, 2, out, np.empty((2, 2, 3, 3), np.float32))
    cpu.attention_forward(qkv, 2, strided, np.empty((2, 2, 3, 3), np.float32))  # written through the view
    np.testing.assert_array_equal(strided, out)


# -- dropout -----------------------------------------------------------------------------------------------

def dropout(x, p, seed=1, site=0, step=0, first=0, row_len=None):
    out = np.full_like(x, np.nan)
    cpu.dropout_forward(x, out, p, seed, site, step, first, row_len or x[0].size)
    return out


def test_dropout_forward():
    x = rng_for(9).standard_normal((8, 50, 20)).astype(np.float32) + 5  # no zeros: kept ⇔ out ≠ 0
    np.testing.assert_array_equal(dropout(x, 0.0), x)
    out = dropout(x, 0.3)
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.02  # 8000 draws: 4 standard deviations
    np.testing.assert_allclose(out[kept], x[kept].astype(np.float64) / 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="p must be"):
        dropout(x, 1.0)


def test_dropout_mask_is_keyed_by_global_sample_and_position():
    x = np.ones((8, 6, 5), np.float32)
    whole = dropout(x, 0.5, seed=3, site=2, step=7)
    halves = np.concatenate([dropout(x[:4], 0.5, seed=3, site=2, step=7, first=0),
                             dropout(x[4:], 0.5, seed=3, site=2, step=7, first=4)])
    np.testing.assert_array_equal(whole, halves)  # how ranks split the batch does not matter
    flat_rows = dropout(x.reshape(48, 5), 0.5, seed=3, site=2, step=7, row_len=30)
    np.testing.assert_array_equal(whole.reshape(48, 5), flat_rows)  # only (sample, position) counts
    for other in (dict(seed=4, site=2, step=7), dict(seed=3, site=3, step=7), dict(seed=3, site=2, step=8)):
        changed = dropout(x, 0.5, **other)
        assert 0.3 < np.mean((changed != 0) != (whole != 0)) < 0.7  # an independent-looking mask
    assert 0.3 < np.mean((whole[0] != 0) != (whole[1] != 0)) < 0.7  # samples differ


def test_dropout_backward():
    r = rng_for(10)
    x, dout = r.standard_normal((2, 4, 30)).astype(np.float32) + 5
    out = dropout(x, 0.25, seed=5, site=1, step=2, first=10)
    dx = np.full_like(dout, np.nan)
    cpu.dropout_backward(dout, dx, 0.25, 5, 1, 2, 10, 30)
    np.testing.assert_array_equal(dx != 0, out != 0)  # the forward's mask
    np.testing.assert_array_equal(dx, dropout(dout, 0.25, seed=5, site=1, step=2, first=10))  # a linear map
    cpu.dropout_backward(dout, dout, 0.25, 5, 1, 2, 10, 30)  # dx may be dout itself
    np.testing.assert_array_equal(dout, dx)


# -- groupnorm ---------------------------------------------------------------------------------------------

def groupnorm_ref(x, G, w, b, eps):
    N, S, C = x.shape
    xg = x.astype(np.float64).reshape(N, S, G, C // G)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = xg.var(axis=(1, 3), keepdims=True)
    out = ((xg - mean) / np.sqrt(var + eps)).reshape(N, S, C) * w + b
    return out, mean.reshape(N, G), 1 / np.sqrt(var.reshape(N, G) + eps)


@pytest.mark.parametrize("G", [1, 2, 6])
def test_groupnorm_forward(G):
    r = rng_for(11, G)
    x = (r.standard_normal((3, 10, 6)) * 2 - 1).astype(np.float32)
    w, b = r.standard_normal((2, 6)).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty((3, G), np.float32), np.empty((3, G), np.float32)
    cpu.groupnorm_forward(x, G, w, b, 1e-5, out, mean, rstd)
    ref, ref_mean, ref_rstd = groupnorm_ref(x, G, w, b, 1e-5)
    np.testing.assert_allclose(out, ref, **F32)
    np.testing.assert_allclose(mean, ref_mean, **F32)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of groups"):
        cpu.groupnorm_forward(x, 4, w, b, 1e-5, out, mean, rstd)


def test_groupnorm_backward():
    r = rng_for(12)
    N, S, C, G = 2, 3, 4, 2
    x, R = r.standard_normal((2, N, S, C))
    w, b = r.standard_normal((2, C))
    out, mean, rstd = np.empty((N, S, C)), np.empty((N, G)), np.empty((N, G))

    def loss():
        cpu.groupnorm_forward(x, G, w, b, 1e-5, out, mean, rstd)
        return np.sum(out * R)

    loss()
    dx, dw, db = garbage(x.shape), garbage(C), garbage(C)
    cpu.groupnorm_backward(R, x, w, mean, rstd, G, dx, dw, db)
    np.testing.assert_allclose(dx, central_diff(loss, x), **FD)
    np.testing.assert_allclose(dw - 0.25, central_diff(loss, w), **FD)
    np.testing.assert_allclose(db - 0.25, central_diff(loss, b), **FD)


# -- batchnorm (SyncBatchNorm's passes) ---------------------------------------------------------------------

def batchnorm(x, w, b, eps, parts=1):
    """The model's forward: moments per part (rank), summed (the Allreduce), stats, normalise each part."""
    sums = [np.empty((2, x.shape[1])) for _ in range(parts)]
    chunks = np.array_split(x, parts)
    for c, s in zip(chunks, sums):
        cpu.batchnorm_moments(c, s)
    total = np.sum(sums, axis=0)
    mean, rstd = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], x.dtype)
    var = cpu.batchnorm_stats(total, len(x), eps, mean, rstd)
    out = np.empty_like(x)
    for c, o in zip(chunks, np.array_split(out, parts)):
        cpu.batchnorm_forward(c, mean, rstd, w, b, o)
    return out, mean, rstd, var, total


def test_batchnorm_forward():
    """PyTorch BatchNorm2d in training mode: batch mean and biased variance over samples and positions."""
    r = rng_for(13)
    x = (r.standard_normal((40, 5)) * 3 + 2).astype(np.float32)
    w, b = r.standard_normal((2, 5)).astype(np.float32)
    out, mean, rstd, var, sums = batchnorm(x, w, b, 1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(sums, [x64.sum(0), (x64 ** 2).sum(0)], rtol=1e-12)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-9)
    np.testing.assert_allclose(mean, x64.mean(0), **F32)
    np.testing.assert_allclose(out, (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5) * w + b, **F32)


def test_batchnorm_halves_equal_the_whole():
    r = rng_for(14)
    x = (r.standard_normal((64, 6)) + 1).astype(np.float32)
    w, b = r.standard_normal((2, 6)).astype(np.float32)
    dout = r.standard_normal((64, 6)).astype(np.float32)
    results = []
    for parts in (1, 2):
        out, mean, rstd, _, _ = batchnorm(x, w, b, 1e-5, parts)
        sums = [np.empty((2, 6)) for _ in range(parts)]
        for d, xc, s in zip(np.array_split(dout, parts), np.array_split(x, parts), sums):
            cpu.batchnorm_backward_moments(d, xc, mean, rstd, s)
        total = np.sum(sums, axis=0)
        dx, dw, db = np.empty_like(x), np.zeros(6, np.float32), np.zeros(6, np.float32)
        for d, xc, dxc in zip(np.array_split(dout, parts), np.array_split(x, parts), np.array_split(dx, parts)):
            cpu.batchnorm_backward(d, xc, mean, rstd, w, total, len(x), dxc, dw, db)
        results.append((out, dx, dw, db))
    for one, two in zip(*results):
        np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)


def test_batchnorm_backward():
    r = rng_for(15)
    M, C = 6, 3
    x, R = r.standard_normal((2, M, C))
    w, b = r.standard_normal((2, C))

    def loss():
        return np.sum(batchnorm(x, w, b, 1e-5)[0] * R)

    _, mean, rstd, _, _ = batchnorm(x, w, b, 1e-5)
    sums = np.empty((2, C))
    cpu.batchnorm_backward_moments(R, x, mean, rstd, sums)
    dx, dw, db = garbage(x.shape), garbage(C), garbage(C)
    cpu.batchnorm_backward(R, x, mean, rstd, w, sums, M, dx, dw, db)
    np.testing.assert_allclose(dx, central_diff(loss, x), **FD)
    np.testing.assert_allclose(dw - 0.25, central_diff(loss, w), **FD)
    np.testing.assert_allclose(db - 0.25, central_diff(loss, b), **FD)


# -- global average pooling --------------------------------------------------------------------------------

def test_global_avgpool():
    r = rng_for(16)
    x = r.standard_normal((3, 7, 5)).astype(np.float32)
    out = np.full((3, 5), np.nan, np.float32)
    cpu.global_avgpool_forward(x, out)
    np.testing.assert_allclose(out, x.astype(np.float64).mean(axis=1), **F32)
    x64, R = r.standard_normal((3, 7, 5)), r.standard_normal((3, 5))
    out64 = np.empty((3, 5))

    def loss():
        cpu.global_avgpool_forward(x64, out64)
        return np.sum(out64 * R)

    dx = garbage(x64.shape)
    cpu.global_avgpool_backward(R, dx)
    np.testing.assert_allclose(dx, central_diff(loss, x64), **FD)


# -- mean squared error ------------------------------------------------------------------------------------

def test_mse():
    r = rng_for(17)
    pred, target = r.standard_normal((2, 6, 3)).astype(np.float32)
    err = pred.astype(np.float64) - target
    grad = pred.copy()
    loss, sq = cpu.mse(grad, target)
    assert loss == pytest.approx(np.sum(np.mean(err ** 2, axis=1)), rel=1e-6)
    assert sq == pytest.approx(np.sum(err ** 2), rel=1e-6)
    np.testing.assert_allclose(grad, 2 * err / 3, **F32)
    p64, t64 = r.standard_normal((2, 4, 3))

    def loss64():
        return cpu.mse(p64.copy(), t64)[0]

    g64 = p64.copy()
    cpu.mse(g64, t64)
    np.testing.assert_allclose(g64, central_diff(loss64, p64), **FD)
