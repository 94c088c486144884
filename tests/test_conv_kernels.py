"""The NHWC convolution and pooling kernels of kernels/cpu.py against independent NumPy references
(float64, written with padding + strided slices + einsum, not im2col), adjoint identities and directional
finite differences."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from mpitrain.kernels import cpu

ACT_NAMES = ("identity", "relu", "tanh")


def rng_for(*key):
    return np.random.default_rng(np.random.SeedSequence([20240717, *key]))


def same(n, k, s):
    """'same' padding (TensorFlow's rule): out = ceil(n / s), the odd pixel of padding at the bottom/right."""
    out = -(-n // s)
    return max((out - 1) * s + k - n, 0) // 2, out


def valid(n, k, s):
    return 0, (n - k) // s + 1


def overpad(n, k, s):
    """More padding than a kernel: the first and last windows lie wholly in the padding."""
    return k + 1, (n + k + 2) // s + 1


def geometry(H, W, KH, KW, SH, SW, padding):
    (PH, OH), (PW, OW) = padding(H, KH, SH), padding(W, KW, SW)
    return KH, KW, SH, SW, PH, PW, OH, OW


# name, (N, H, W, C_in, C_out), (KH, KW, SH, SW), padding
CONV_CASES = [
    ("1d-same-odd", (3, 1, 11, 2, 4), (1, 3, 1, 1), same),
    ("1d-same-even", (2, 1, 10, 3, 2), (1, 4, 1, 1), same),     # asymmetric: 1 left, 2 right
    ("1d-valid-s2", (2, 1, 11, 2, 3), (1, 3, 1, 2), valid),
    ("2d-same-3x3", (2, 7, 6, 3, 5), (3, 3, 1, 1), same),
    ("2d-same-even-s2", (2, 7, 8, 2, 3), (2, 4, 2, 2), same),   # PH 0 (pad bottom), PW 1 (1 left, 1 right)
    ("2d-valid-s2", (3, 9, 7, 2, 4), (3, 3, 2, 2), valid),
    ("2d-same-5x5-cin1", (2, 8, 8, 1, 4), (5, 5, 1, 1), same),
    ("2d-same-s12", (2, 6, 9, 3, 2), (3, 2, 1, 2), same),
    ("2d-overpad", (2, 4, 5, 2, 3), (2, 3, 1, 2), overpad),
    # one input channel (im2col's tap-by-tap path): strided, windows wholly in the padding; 1-d, asymmetric
    ("2d-overpad-cin1-s2", (2, 5, 7, 1, 3), (3, 3, 2, 2), overpad),
    ("1d-same-even-cin1", (2, 1, 9, 1, 2), (1, 4, 1, 1), same),
]
CONV_IDS = [c[0] for c in CONV_CASES]


def act_ref(name, z):
    return np.maximum(z, 0.0) if name == "relu" else np.tanh(z) if name == "tanh" else z


def act_deriv_ref(name, z):
    return (z > 0).astype(np.float64) if name == "relu" else 1.0 - np.tanh(z) ** 2 if name == "tanh" \
        else np.ones_like(z)


def padded(x, geom):
    """x zero-padded so that every window of the geometry lies inside: PH/PW before, what is needed after."""
    KH, KW, SH, SW, PH, PW, OH, OW = geom
    N, H, W, C = x.shape
    below, right = max((OH - 1) * SH + KH - PH - H, 0), max((OW - 1) * SW + KW - PW - W, 0)
    return np.pad(x, ((0, 0), (PH, below), (PW, right), (0, 0)))


def window(xp, geom, kh, kw):
    """The (N, OH, OW, C) slice of the padded input that kernel tap (kh, kw) multiplies."""
    KH, KW, SH, SW, PH, PW, OH, OW = geom
    return xp[:, kh:kh + (OH - 1) * SH + 1:SH, kw:kw + (OW - 1) * SW + 1:SW, :]


def conv_ref(x, w, b, geom):
    """Pre-activation z (N, OH, OW, C_out) of the NHWC conv, float64, tap by tap."""
    KH, KW = geom[:2]
    x = np.asarray(x, np.float64)
    w4 = np.asarray(w, np.float64).reshape(w.shape[0], KH, KW, x.shape[3])
    xp = padded(x, geom)
    z = sum(np.einsum("nhwc,oc->nhwo", window(xp, geom, kh, kw), w4[:, kh, kw, :])
            for kh in range(KH) for kw in range(KW))
    return z + np.asarray(b, np.float64)


def conv_adjoint_ref(x, w, dz, geom):
    """dL/dx, dL/dw (C_out, KH·KW·C_in), dL/db of L = <conv_ref(x, w, b), dz>, tap by tap."""
    KH, KW = geom[:2]
    x, dz = np.asarray(x, np.float64), np.asarray(dz, np.float64)
    N, H, W, C = x.shape
    w4 = np.asarray(w, np.float64).reshape(w.shape[0], KH, KW, C)
    xp = padded(x, geom)
    dxp, dw4 = np.zeros_like(xp), np.zeros_like(w4)
    for kh in range(KH):
        for kw in range(KW):
            window(dxp, geom, kh, kw)[...] += np.einsum("nhwo,oc->nhwc", dz, w4[:, kh, kw, :])
            dw4[:, kh, kw, :] = np.einsum("nhwo,nhwc->oc", dz, window(xp, geom, kh, kw))
    PH, PW = geom[4], geom[5]
    return dxp[:, PH:PH + H, PW:PW + W, :], dw4.reshape(w.shape), dz.sum(axis=(0, 1, 2))


def close(actual, expected, rtol=1e-5, **kw):
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, **kw)


def conv_case(case, act_name="identity"):
    name, (N, H, W, C, O), (KH, KW, SH, SW), padding = case
    r = rng_for(1, CONV_IDS.index(name), ACT_NAMES.index(act_name))
    geom = geometry(H, W, KH, KW, SH, SW, padding)
    x = r.standard_normal((N, H, W, C)).astype(np.float32)
    w = (r.standard_normal((O, KH * KW * C)) / np.sqrt(KH * KW * C)).astype(np.float32)
    b = (r.standard_normal(O) * 0.3).astype(np.float32)
    return geom, x, w, b, r


def run_forward(x, w, b, act_name, geom):
    KH, KW, SH, SW, PH, PW, OH, OW = geom
    N, C = x.shape[0], x.shape[3]
    cols = np.full((N * OH * OW, KH * KW * C), np.nan, np.float32)  # garbage: every entry is written
    y = np.full((N, OH, OW, w.shape[0]), np.nan, np.float32)
    cpu.conv_forward(x, w, b, cpu.ACTIVATIONS[act_name], geom, cols, y)
    return cols, y


def test_same_padding_geometry():
    assert same(10, 4, 1) == (1, 10) and same(7, 2, 2) == (0, 4) and same(8, 4, 2) == (1, 4)
    assert same(28, 5, 1) == (2, 28) and valid(11, 3, 2) == (0, 5)
    assert overpad(5, 3, 2) == (4, 6)  # input columns -4 .. 7: windows 0 and 5 all padding


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_im2col_and_col2im_adjoint(case):
    geom, x, _, _, r = conv_case(case)
    KH, KW, SH, SW, PH, PW, OH, OW = geom
    N, H, W, C = x.shape
    cols = np.full((N * OH * OW, KH * KW * C), np.nan, np.float32)
    cpu.im2col(x, *geom, cols)
    xp = padded(x, geom)
    expected = np.stack([window(xp, geom, kh, kw) for kh in range(KH) for kw in range(KW)], axis=3)
    np.testing.assert_array_equal(cols, expected.reshape(N * OH * OW, KH * KW * C))  # a pure copy
    if PH or PW or geom != geometry(H, W, KH, KW, SH, SW, valid):
        assert np.any(cols == 0.0)
    # col2im is the adjoint: <im2col(x), c> = <x, col2im(c)>, and it overwrites dx.
    c = r.standard_normal(cols.shape).astype(np.float32)
    dx = np.full(x.shape, 7.0, np.float32)
    cpu.col2im(c, *geom, dx)
    lhs = np.vdot(cols.astype(np.float64), c.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), dx.astype(np.float64))
    assert rhs == pytest.approx(lhs, rel=1e-5, abs=1e-4)
    # ... and exactly the scatter-add of the windows
    dxp = np.zeros(xp.shape)
    c6 = c.astype(np.float64).reshape(N, OH, OW, KH, KW, C)
    for kh in range(KH):
        for kw in range(KW):
            window(dxp, geom, kh, kw)[...] += c6[:, :, :, kh, kw, :]
    close(dx, dxp[:, PH:PH + H, PW:PW + W, :])


@pytest.mark.parametrize("act_name", ACT_NAMES)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_forward_backward(case, act_name):
    geom, x, w, b, r = conv_case(case, act_name)
    act = cpu.ACTIVATIONS[act_name]
    z = conv_ref(x, w, b, geom)
    if act_name == "relu":  # far from the kink, so float32 and float64 agree on every unit's side
        assert np.min(np.abs(z)) > 1e-4 and np.any(z < 0) and np.any(z > 0)
    cols, y = run_forward(x, w, b, act_name, geom)
    close(y, act_ref(act_name, z))

    # loss sum(y * g): dL/dz = g * act'(z); the kernel's gradients against the reference adjoint
    g = r.standard_normal(y.shape).astype(np.float32)
    dz = g.astype(np.float64) * act_deriv_ref(act_name, z)
    dx_ref, dw_ref, db_ref = conv_adjoint_ref(x, w, dz, geom)
    dy = g.copy()
    dw, db = np.full(w.shape, 9.0, np.float32), np.full(b.shape, 9.0, np.float32)
    dcols, dx = np.full(cols.shape, np.nan, np.float32), np.full(x.shape, 9.0, np.float32)
    cpu.conv_backward(cols, w, y, dy, act, geom, dw, db, dcols, dx)
    close(dy, dz)  # dy ← dL/dz in place
    close(dw, dw_ref)
    close(db, db_ref)
    close(dx, dx_ref)

    # the reference adjoint is the adjoint of the reference forward: <z(x, w) - b, dz> = <x, dx> = <w, dw>
    lin = np.vdot(conv_ref(x, w, np.zeros_like(b), geom), dz)
    assert np.vdot(x.astype(np.float64), dx_ref) == pytest.approx(lin, rel=1e-10)
    assert np.vdot(w.astype(np.float64), dw_ref) == pytest.approx(lin, rel=1e-10)

    # directional finite differences of the float64 loss sum(act(conv(x, w) + b) * g) along random v
    def loss(xx, ww, bb):
        return np.vdot(act_ref(act_name, conv_ref(xx, ww, bb, geom)), g.astype(np.float64))

    x64, w64, b64, eps = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-6
    for k, (grad, arg) in enumerate(((dx, 0), (dw, 1), (db, 2))):
        v = r.standard_normal(grad.shape)
        plus, minus = [x64, w64, b64], [x64, w64, b64]
        plus[arg], minus[arg] = plus[arg] + eps * v, minus[arg] - eps * v
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert np.vdot(grad.astype(np.float64), v) == pytest.approx(fd, rel=1e-4, abs=1e-4), ("dx", "dw", "db")[k]


def test_conv_backward_reuses_cols_and_skips_dx():
    """dcols may be the saved cols buffer itself; with dx None only dy, dw, db are computed."""
    case = CONV_CASES[CONV_IDS.index("2d-same-even-s2")]
    geom, x, w, b, r = conv_case(case, "tanh")
    cols, y = run_forward(x, w, b, "tanh", geom)
    g = r.standard_normal(y.shape).astype(np.float32)
    outs = []
    for alias in (False, True):
        c = cols.copy()
        dy, dw, db, dx = g.copy(), np.empty_like(w), np.empty_like(b), np.empty_like(x)
        cpu.conv_backward(c, w, y, dy, cpu.TANH, geom, dw, db, c if alias else np.empty_like(c), dx)
        outs.append((dy, dw, db, dx))
    for a, b_ in zip(*outs):
        np.testing.assert_array_equal(a, b_)
    dy, dw, db = g.copy(), np.empty_like(w), np.empty_like(b)
    c = cols.copy()
    cpu.conv_backward(c, w, y, dy, cpu.TANH, geom, dw, db, None, None)
    np.testing.assert_array_equal(c, cols)  # cols untouched
    for a, b_ in zip((dy, dw, db), outs[0][:3]):
        np.testing.assert_array_equal(a, b_)


def test_conv_matches_torch():
    """The layout against PyTorch itself (NCHW, weights (C_out, C_in, KH, KW)), where torch is installed."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    case = CONV_CASES[CONV_IDS.index("2d-same-even-s2")]
    geom, x, w, b, r = conv_case(case, "relu")
    KH, KW, SH, SW, PH, PW, OH, OW = geom
    N, H, W, C = x.shape
    cols, y = run_forward(x, w, b, "relu", geom)
    xt = torch.tensor(x).permute(0, 3, 1, 2).double().requires_grad_()
    wt = torch.tensor(w).reshape(-1, KH, KW, C).permute(0, 3, 1, 2).double().requires_grad_()
    bt = torch.tensor(b).double().requires_grad_()
    below, right = (OH - 1) * SH + KH - PH - H, (OW - 1) * SW + KW - PW - W
    yt = torch.relu(F.conv2d(F.pad(xt, (PW, right, PH, below)), wt, bt, stride=(SH, SW)))
    close(y, yt.detach().permute(0, 2, 3, 1).numpy())
    g = r.standard_normal(y.shape).astype(np.float32)
    (yt * torch.tensor(g).permute(0, 3, 1, 2).double()).sum().backward()
    dy, dw, db, dx = g.copy(), np.empty_like(w), np.empty_like(b), np.empty_like(x)
    cpu.conv_backward(cols, w, y, dy, cpu.RELU, geom, dw, db, np.empty_like(cols), dx)
    close(dx, xt.grad.permute(0, 2, 3, 1).numpy())
    close(dw, wt.grad.permute(0, 2, 3, 1).reshape(w.shape).numpy())
    close(db, bt.grad.numpy())
    # max pooling, 3x3 stride 2 (overlapping windows): same values and same gradient
    xp = r.standard_normal((2, 9, 7, 3)).astype(np.float32)
    out, arg = np.empty((2, 4, 3, 3), np.float32), np.empty((2, 4, 3, 3), np.int32)
    cpu.maxpool_forward(xp, 3, 3, 2, 2, out, arg)
    xpt = torch.tensor(xp).permute(0, 3, 1, 2).requires_grad_()
    ot = F.max_pool2d(xpt, 3, 2)
    np.testing.assert_array_equal(out, ot.detach().permute(0, 2, 3, 1).numpy())
    gp = r.standard_normal(out.shape).astype(np.float32)
    (ot * torch.tensor(gp).permute(0, 3, 1, 2)).sum().backward()
    dxp = np.empty_like(xp)
    cpu.maxpool_backward(gp, arg, dxp)
    close(dxp, xpt.grad.permute(0, 2, 3, 1).numpy())


# -- pooling -----------------------------------------------------------------------------------------

# name, (N, H, W, C), (KH, KW, SH, SW)
POOL_CASES = [
    ("2x2s2", (2, 8, 6, 3), (2, 2, 2, 2)),
    ("2x2s2-odd", (2, 7, 5, 2), (2, 2, 2, 2)),    # last row / column not covered
    ("3x3s2-overlap", (2, 9, 7, 3), (3, 3, 2, 2)),
    ("3x3s1", (1, 5, 6, 2), (3, 3, 1, 1)),
    ("1d-k3s2", (3, 1, 11, 4), (1, 3, 1, 2)),
    ("2x3s1x2", (2, 6, 9, 2), (2, 3, 1, 2)),
]
POOL_IDS = [c[0] for c in POOL_CASES]


def pool_windows(x, KH, KW, SH, SW):
    """(N, OH, OW, C, KH·KW) windows in row-major window order."""
    v = sliding_window_view(x, (KH, KW), axis=(1, 2))[:, ::SH, ::SW]
    return v.reshape(*v.shape[:4], KH * KW)


def maxpool_ref(x, KH, KW, SH, SW):
    """out, arg (flat index (ih·W + iw)·C + c into x[n]; np.argmax: the first maximum) and the windows."""
    N, H, W, C = x.shape
    win = pool_windows(x, KH, KW, SH, SW)
    k = np.argmax(win, axis=-1)
    OH, OW = win.shape[1:3]
    ih = np.arange(OH)[None, :, None, None] * SH + k // KW
    iw = np.arange(OW)[None, None, :, None] * SW + k % KW
    return win.max(axis=-1), (ih * W + iw) * C + np.arange(C)


def scatter_ref(dy, arg, shape):
    dx = np.zeros((shape[0], np.prod(shape[1:])))
    n = np.broadcast_to(np.arange(shape[0])[:, None, None, None], dy.shape)
    np.add.at(dx, (n.ravel(), arg.ravel()), dy.astype(np.float64).ravel())
    return dx.reshape(shape)


def pool_case(case, ties=False):
    name, shape, (KH, KW, SH, SW) = case
    r = rng_for(2, POOL_IDS.index(name), ties)
    x = (r.integers(-2, 3, shape) if ties else r.standard_normal(shape)).astype(np.float32)
    N, H, W, C = shape
    return x, (KH, KW, SH, SW), (N, (H - KH) // SH + 1, (W - KW) // SW + 1, C), r


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_maxpool(case, ties):
    x, k, oshape, r = pool_case(case, ties)
    out, arg = np.full(oshape, np.nan, np.float32), np.full(oshape, -1, np.int32)
    cpu.maxpool_forward(x, *k, out, arg)
    out_ref, arg_ref = maxpool_ref(x, *k)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(arg, arg_ref)  # with ties: the first maximum, as np.argmax
    if ties:
        assert np.any(np.sum(pool_windows(x, *k) == out_ref[..., None], axis=-1) > 1)
    dy = r.standard_normal(oshape).astype(np.float32)
    dx = np.full(x.shape, 5.0, np.float32)
    cpu.maxpool_backward(dy, arg, dx)
    close(dx, scatter_ref(dy, arg_ref, x.shape))


def test_maxpool_ties_go_to_the_first_and_nan_propagates():
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, :2, 2:, 1] = 3.0  # window (0, 1), channel 1: four equal maxima
    x[0, 3, 1, 0] = np.nan  # window (1, 0), channel 0: NaN at its last position
    x[0, 2, 0, 0] = 1.0
    x[0, 2, 2, 0] = x[0, 3, 2, 0] = np.nan  # window (1, 1), channel 0: two NaNs, the last one wins
    x[0, 2, 3, 1], x[0, 3, 2, 1] = np.inf, -np.inf  # window (1, 1), channel 1: no NaN, inf − inf is one
    out, arg = np.empty((1, 2, 2, 2), np.float32), np.empty((1, 2, 2, 2), np.int32)
    cpu.maxpool_forward(x, 2, 2, 2, 2, out, arg)
    assert out[0, 0, 1, 1] == 3.0 and arg[0, 0, 1, 1] == (0 * 4 + 2) * 2 + 1
    assert arg[0, 0, 0, 0] == 0  # all-zero window: its first element
    assert np.isnan(out[0, 1, 0, 0]) and arg[0, 1, 0, 0] == (3 * 4 + 1) * 2
    assert np.isnan(out[0, 1, 1, 0]) and arg[0, 1, 1, 0] == (3 * 4 + 2) * 2
    assert out[0, 1, 1, 1] == np.inf and arg[0, 1, 1, 1] == (2 * 4 + 3) * 2 + 1
    dx = np.empty_like(x)
    cpu.maxpool_backward(np.ones_like(out), arg, dx)
    assert dx[0, 0, 2, 1] == 1.0 and dx[0, :2, 2:, 1].sum() == 1.0
    assert dx.sum() == 8.0 and np.count_nonzero(dx) == 8


def test_maxpool_overlapping_windows_add_up():
    x = np.zeros((1, 3, 5, 1), np.float32)
    x[0, 1, 2, 0] = 1.0  # in all three 3x3 stride-1 windows
    out, arg = np.empty((1, 1, 3, 1), np.float32), np.empty((1, 1, 3, 1), np.int32)
    cpu.maxpool_forward(x, 3, 3, 1, 1, out, arg)
    dx = np.empty_like(x)
    cpu.maxpool_backward(np.array([1.0, 2.0, 4.0], np.float32).reshape(out.shape), arg, dx)
    assert dx[0, 1, 2, 0] == 7.0 and dx.sum() == 7.0


@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_avgpool(case):
    x, k, oshape, r = pool_case(case)
    out = np.full(oshape, np.nan, np.float32)
    cpu.avgpool_forward(x, *k, out)
    close(out, pool_windows(x.astype(np.float64), *k).mean(axis=-1))
    dy = r.standard_normal(oshape).astype(np.float32)
    dx = np.full(x.shape, 5.0, np.float32)
    cpu.avgpool_backward(dy, *k, dx)
    # the adjoint of the forward: <avg(x), dy> = <x, avg_backward(dy)>, and the scatter itself
    assert np.vdot(x.astype(np.float64), dx) == pytest.approx(np.vdot(out.astype(np.float64), dy), rel=1e-5)
    KH, KW, SH, SW = k
    N, OH, OW, C = oshape
    dxr = np.zeros(x.shape)
    for kh in range(KH):
        for kw in range(KW):
            dxr[:, kh:kh + (OH - 1) * SH + 1:SH, kw:kw + (OW - 1) * SW + 1:SW, :] += dy / (KH * KW)
    close(dx, dxr)


def test_shape_checks():
    x = np.zeros((2, 5, 5, 3), np.float32)
    with pytest.raises(ValueError, match="im2col"):
        cpu.im2col(x, 3, 3, 1, 1, 1, 1, 5, 5, np.zeros((49, 27), np.float32))
    with pytest.raises(ValueError, match="col2im"):
        cpu.col2im(np.zeros((50, 26), np.float32), 3, 3, 1, 1, 1, 1, 5, 5, x)
    with pytest.raises(ValueError, match="maxpool_forward"):
        cpu.maxpool_forward(x, 2, 2, 2, 2, np.zeros((2, 3, 2, 3), np.float32), np.zeros((2, 3, 2, 3), np.int32))
    with pytest.raises(ValueError, match="maxpool_backward"):
        cpu.maxpool_backward(np.zeros((2, 2, 2, 3), np.float32), np.zeros((2, 2, 2, 2), np.int32), x)
    with pytest.raises(ValueError, match="avgpool_forward"):
        cpu.avgpool_forward(x, 3, 3, 2, 2, np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="avgpool_backward"):
        cpu.avgpool_backward(np.zeros((2, 3, 2, 3), np.float32), 2, 2, 2, 2, x)


def test_conv_refuses_strided_outputs():
    """An output with no (N·OH·OW, C_out) view (a window of a wider array) is an error, not a copy
    whose result would be lost."""
    geom = (3, 3, 1, 1, 1, 1, 4, 4)
    x, w, b = np.zeros((2, 4, 4, 3), np.float32), np.zeros((5, 27), np.float32), np.zeros(5, np.float32)
    cols, y = np.empty((32, 27), np.float32), np.empty((2, 4, 5, 5), np.float32)[:, :, :4, :]
    with pytest.raises(ValueError):
        cpu.conv_forward(x, w, b, cpu.RELU, geom, cols, y)
    with pytest.raises(ValueError):
        cpu.conv_backward(cols, w, y, y, cpu.RELU, geom, np.empty_like(w), np.empty_like(b), None, None)


def test_warmup_compiles_conv_kernels_float32():
    assert cpu.warmup() is None
    for kernel in (cpu.im2col, cpu.col2im, cpu.maxpool_forward, cpu.maxpool_backward, cpu.avgpool_forward,
                   cpu.avgpool_backward):
        assert any("float32" in str(sig) for sig in kernel.signatures), (kernel, kernel.signatures)
    assert any("int32" in str(sig) for sig in cpu.maxpool_forward.signatures)
