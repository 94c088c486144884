"""CPU kernels: Numba @njit passes (cache=True) around NumPy's BLAS.  Pure functions of arrays: no globals,
no config objects.

Shapes: x (batch, in), w (in, out) row-major, b (out,), activations (batch, out).  GEMMs are called from
Python through np.matmul (transposed operands are passed to BLAS as flags, not copied), so they run on
NumPy's OpenBLAS: its build runs these shapes 10–30 % faster than the SciPy OpenBLAS behind Numba's
np.dot, which put the whole step 3–6 % faster, at the floor of `bench step` (README Performance).
Everything around a GEMM is one compiled pass over the activation.  Gradients are of the *summed* loss;
the caller scales once, in the optimizer update.
"""
import numpy as np
from numba import njit, prange, uint64

IDENTITY, RELU, TANH = 0, 1, 2
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "tanh": TANH}


@njit(cache=True)
def bias_act(z, b, act):
    """z ← act(z + b), in place."""
    n, m = z.shape
    if act == RELU:
        for i in range(n):
            for j in range(m):
                z[i, j] = max(z[i, j] + b[j], 0.0)
    elif act == TANH:
        for i in range(n):
            for j in range(m):
                z[i, j] = np.tanh(z[i, j] + b[j])
    else:
        for i in range(n):
            for j in range(m):
                z[i, j] += b[j]


def _gemm(a, b, out):
    """out ← a @ b on NumPy's BLAS.  Quiet about inf/NaN, as the compiled kernels are: the training loop
    checks the loss itself and stops with one clear line."""
    with np.errstate(all="ignore"):
        np.matmul(a, b, out=out)


def dense_forward(x, w, b, act, out):
    """out ← act(x @ w + b)."""
    _gemm(x, w, out)
    bias_act(out, b, act)


@njit(cache=True)
def act_grad(y, dy, act, db):
    """Given y = act(z) and dy = dL/dy: dy ← dL/dz (in place), db ← sum_rows dL/dz."""
    n, m = dy.shape
    db[:] = 0.0
    if act == RELU:  # one loop per activation: no branch on act per element
        for i in range(n):
            for j in range(m):
                g = dy[i, j] if y[i, j] > 0.0 else np.float32(0.0)
                dy[i, j] = g
                db[j] += g
    elif act == TANH:
        for i in range(n):
            for j in range(m):
                g = dy[i, j] * (1.0 - y[i, j] * y[i, j])
                dy[i, j] = g
                db[j] += g
    else:
        for i in range(n):
            for j in range(m):
                db[j] += dy[i, j]


def dense_backward_params(x, y, dy, act, dw, db):
    """Given y = act(x @ w + b) and dy = dL/dy: dy ← dL/dz (in place), dw ← x.T @ dz, db ← sum_rows dz."""
    act_grad(y, dy, act, db)
    _gemm(x.T, dy, dw)


def dense_backward(x, w, y, dy, act, dw, db, dx):
    """dense_backward_params, then dx ← dz @ w.T (the gradient passed to the layer below)."""
    dense_backward_params(x, y, dy, act, dw, db)
    _gemm(dy, w.T, dx)


@njit(cache=True)
def softmax_xent(z, labels):
    """Fused softmax cross-entropy forward and backward.  Returns (summed loss, number correct) and
    overwrites the logits z with dL/dz = softmax(z) - onehot(labels)."""
    n, c = z.shape
    loss = 0.0
    correct = 0
    for i in range(n):
        y = labels[i]
        top = 0
        for j in range(1, c):
            if z[i, j] > z[i, top]:
                top = j
        mx = z[i, top]
        zy = z[i, y] - mx
        s = 0.0
        for j in range(c):
            e = np.exp(z[i, j] - mx)
            z[i, j] = e
            s += e
        loss += np.log(s) - zy
        inv = 1.0 / s
        for j in range(c):
            z[i, j] *= inv
        z[i, y] -= 1.0
        correct += top == y
    return loss, correct


@njit(cache=True, parallel=True)
def sgd_update(p, g, lr, scale, wd):
    """p ← p − lr (scale·g + wd·p)."""
    for i in prange(p.size):
        p[i] -= lr * (scale * g[i] + wd * p[i])


@njit(cache=True, parallel=True)
def momentum_update(p, g, v, lr, scale, mu, wd, nesterov):
    """Heavy-ball (or Nesterov) momentum in the PyTorch form: v ← mu·v + g'; p ← p − lr·(v or g' + mu·v)."""
    for i in prange(p.size):
        gi = scale * g[i] + wd * p[i]
        vi = mu * v[i] + gi
        v[i] = vi
        p[i] -= lr * (gi + mu * vi if nesterov else vi)


@njit(cache=True, parallel=True)
def adam_update(p, g, m, v, lr, scale, beta1, beta2, eps, wd, t):
    """Adam (Kingma & Ba) with bias correction at step t ≥ 1; weight decay as an L2 term in g."""
    c1 = 1.0 - beta1 ** t
    c2 = 1.0 - beta2 ** t
    for i in prange(p.size):
        gi = scale * g[i] + wd * p[i]
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


@njit(cache=True, parallel=True)
def adamw_update(p, g, m, v, lr, scale, beta1, beta2, eps, wd, t, mask):
    """AdamW as torch.optim.AdamW: decoupled weight decay p ← p·(1 − lr·wd) where mask[i] is 1 (mask None:
    everywhere), then the Adam step on g' = scale·g with bias correction at step t ≥ 1, eps outside the
    square root; m moves by lerp toward g', as PyTorch's exp_avg."""
    step = lr / (1.0 - beta1 ** t)
    c2 = np.sqrt(1.0 - beta2 ** t)
    keep = 1.0 - lr * wd
    for i in prange(p.size):
        gi = scale * g[i]
        mi = m[i] + (1.0 - beta1) * (gi - m[i])
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        pi = p[i] * keep if mask is None or mask[i] else p[i]
        p[i] = pi - step * mi / (np.sqrt(vi) / c2 + eps)


@njit(cache=True)
def dp_sqnorms(a, dz, sq):
    """DP-SGD, per-example clipping: sq[i] += (‖a_i‖² + 1)·‖dz_i‖², the squared L2 norm of example i's
    gradient of one dense layer (weights: the outer product a_i dz_iᵀ, whose norm is ‖a_i‖·‖dz_i‖; bias:
    dz_i), from the layer input a and the output gradient dz = dL/dz (Goodfellow 2015)."""
    n, k = a.shape
    m = dz.shape[1]
    for i in range(n):
        sa = 1.0
        for j in range(k):
            sa += a[i, j] * a[i, j]
        sz = 0.0
        for j in range(m):
            sz += dz[i, j] * dz[i, j]
        sq[i] += sa * sz


@njit(cache=True)
def _scale_rows(dz, factor, db):
    """dz_i ← factor_i·dz_i (in place), db ← Σ_i dz_i."""
    n, m = dz.shape
    db[:] = 0.0
    for i in range(n):
        f = factor[i]
        for j in range(m):
            g = dz[i, j] * f
            dz[i, j] = g
            db[j] += g


def dp_clipped_grad(a, dz, factor, dw, db):
    """DP-SGD: the sum over examples of the clipped gradients of one dense layer.  dz_i ← factor_i·dz_i
    (in place; factor_i = min(1, C/‖g_i‖)), then dw ← aᵀ·dz, db ← Σ_i dz_i."""
    _scale_rows(dz, factor, db)
    _gemm(a.T, dz, dw)


def warmup():
    """Compile (or load from the cache) every kernel for the float32 types training uses.  One rank per
    node calls this before the others start, so a node compiles once however many ranks it runs."""
    f4 = np.float32
    x, b, y, dy = np.zeros((2, 3), f4), np.zeros(4, f4), np.zeros((2, 4), f4), np.zeros((2, 4), f4)
    bias_act(y, b, RELU)
    act_grad(y, dy, RELU, b.copy())
    softmax_xent(y, np.zeros(2, np.int64))
    p = np.zeros(4, f4)
    sgd_update(p, b, 0.1, 1.0, 0.0)
    momentum_update(p, b, b.copy(), 0.1, 1.0, 0.9, 0.0, False)
    adam_update(p, b, b.copy(), b.copy(), 0.1, 1.0, 0.9, 0.999, 1e-8, 0.0, 1)
    for mask in (None, np.ones(4, np.uint8)):
        adamw_update(p, b, b.copy(), b.copy(), 0.1, 1.0, 0.9, 0.999, 1e-8, 0.0, 1, mask)
    dp_sqnorms(x, y, np.zeros(2))
    _scale_rows(dy, np.ones(2, f4), b.copy())
    wire = np.zeros(4, np.uint16)
    encode16(b.view(np.uint32), wire, False)
    decode16(wire, b.view(np.uint32), False)
    sum16(wire, wire.copy(), False)
    idx, val = np.zeros(2, np.uint32), np.zeros(2, f4)
    topk_select(b, 2, idx, val)
    scatter_add(b, idx, val)
    warmup_conv()
    warmup_ops()


# -- 16-bit wire formats of the compressed gradient allreduce (host buffers: MPI sends from the host) ----
# Numba has no float16 type and NumPy converts float16 in software (~30× slower than float32 arithmetic
# here), so the codecs work on the bits: u32 is a float32 array viewed as uint32, w a uint16 array.

@njit(cache=True)
def _to_half(u):
    """IEEE binary16 bits of the float32 with bits u, rounded to nearest even (overflow → ±inf, NaN → quiet
    NaN).  Branch-free (each case computed, one selected) so that the loops over it vectorise."""
    a = np.int64(u & 0x7FFFFFFF)
    # normal half: rebias the exponent (127 → 15) and round the 13 dropped bits to nearest even; a carry
    # into the exponent is the right result (up to inf)
    normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    # subnormal half (|x| < 2^-14): adding 0.5 lets the float32 adder round |x| to a multiple of 2^-24,
    # which leaves the half's 10 mantissa bits at the bottom of the sum
    summed = np.uint32(a).view(np.float32) + np.float32(0.5)
    sub = np.int64(np.float32(summed).view(np.uint32)) - 0x3F000000
    special = 0x7E00 if a > 0x7F800000 else 0x7C00
    h = special if a >= 0x47800000 else (sub if a < 0x38800000 else normal)
    return ((u >> 16) & 0x8000) | h


@njit(cache=True)
def _from_half(h):
    """float32 bits of the binary16 with bits h (exact): the exponent and mantissa bits moved into place
    and scaled by 2^112 (127 − 15 in the exponent; subnormal halves come out normal), inf/NaN restored."""
    f = np.uint32(np.int64(h & 0x7FFF) << 13).view(np.float32) * np.float32(2.0 ** 112)
    bits = np.int64(np.float32(f).view(np.uint32))
    bits = bits | 0x7F800000 if f >= np.float32(65536.0) else bits
    return (np.int64(h & 0x8000) << 16) | bits


@njit(cache=True)
def _to_bfloat(u):
    """bfloat16 bits (the high half of a float32) of the float32 with bits u, rounded to nearest even."""
    rounded = (np.int64(u) + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (u >> 16) | 0x40 if u & 0x7FFFFFFF > 0x7F800000 else rounded  # NaN stays NaN


@njit(cache=True)
def encode16(u, w, bf16):
    """w ← the binary16 (bf16 False) or bfloat16 bits of the float32 values whose bits are u."""
    if bf16:  # one loop per format: a branch-free body vectorises
        for i in range(u.size):
            w[i] = _to_bfloat(u[i])
    else:
        for i in range(u.size):
            w[i] = _to_half(u[i])


@njit(cache=True)
def decode16(w, u, bf16):
    """u ← the float32 bits of the 16-bit values w (exact)."""
    if bf16:
        for i in range(w.size):
            u[i] = np.int64(w[i]) << 16
    else:
        for i in range(w.size):
            u[i] = _from_half(w[i])


@njit(cache=True)
def _float(bits):
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def sum16(a, b, bf16):
    """b ← round16(float32(a) + float32(b)): the MPI reduction operator of the 16-bit allreduce, in one
    pass (decode both, add in float32, round once)."""
    if bf16:
        for i in range(b.size):
            s = _float(np.int64(a[i]) << 16) + _float(np.int64(b[i]) << 16)
            b[i] = _to_bfloat(np.float32(s).view(np.uint32))
    else:
        for i in range(b.size):
            s = _float(_from_half(a[i])) + _float(_from_half(b[i]))
            b[i] = _to_half(np.float32(s).view(np.uint32))


@njit(cache=True)
def topk_select(acc, k, idx, val):
    """Top-k sparsification with error feedback: idx, val ← the k entries of acc largest in magnitude
    (ascending index order), and those entries of acc are zeroed (acc keeps the residual).

    Two passes instead of a sort: a histogram of the magnitudes' top bits (exponent + 4 mantissa bits,
    monotone in |x|) finds the bucket holding the k-th largest; everything above it is taken, and only that
    bucket's entries are sorted."""
    bits = acc.view(np.uint32)
    hist = np.zeros(4096, np.int64)
    for i in range(acc.size):
        hist[(bits[i] & 0x7FFFFFFF) >> 19] += 1
    b, above = 4095, 0
    while above + hist[b] < k:
        above += hist[b]
        b -= 1
    cand = np.empty(hist[b], np.int64)
    j = c = 0
    for i in range(acc.size):
        m = (bits[i] & 0x7FFFFFFF) >> 19
        if m > b:
            idx[j] = i
            j += 1
        elif m == b:
            cand[c] = i
            c += 1
    best = np.argsort(np.abs(acc[cand]))[c - (k - above):]
    for t in range(k - above):
        idx[above + t] = cand[best[t]]
    idx[:] = np.sort(idx)
    for t in range(k):
        i = idx[t]
        val[t] = acc[i]
        acc[i] = 0.0


@njit(cache=True)
def scatter_add(g, idx, val):
    """g[idx[j]] += val[j] for every j (repeated indices add up)."""
    for j in range(idx.size):
        g[idx[j]] += val[j]


# -- Convolution and pooling, NHWC ---------------------------------------------------------------------
# Activations are x (N, H, W, C) float32 C-contiguous; a 1-d conv is H = 1 with KH = 1.  Conv weights are
# w (C_out, KH·KW·C_in) row-major, column ((kh·KW + kw)·C_in + c): (C_out, KH, KW, C_in) flattened; bias
# b (C_out,).  Geometry is geom = (KH, KW, SH, SW, PH, PW, OH, OW): kernel, stride, top/left padding and
# the output size, all chosen by the caller, so asymmetric 'same' padding works (input positions outside
# [0, H)×[0, W) read as 0; output pixel (oh, ow) reads input rows oh·SH − PH + kh, columns ow·SW − PW + kw).
# The convolution is im2col + one GEMM over the whole batch: cols (N·OH·OW, KH·KW·C_in), row
# ((n·OH + oh)·OW + ow); cols @ w.T (N·OH·OW, C_out) is the NHWC output (N, OH, OW, C_out) as it stands.

@njit(cache=True)
def _im2col_sample(x, n, KH, KW, SH, SW, PH, PW, OH, OW, cols):
    """im2col of sample n.  One input channel (a first layer): each tap (kh, kw) is a run of output
    pixels reading consecutive input pixels, written down a column of cols; more channels: each tap of
    each output pixel is a run of C consecutive floats."""
    N, H, W, C = x.shape
    r0 = n * OH * OW
    if C == 1:
        K = KH * KW
        xf, cf = x.reshape(-1), cols.reshape(-1)
        for oh in range(OH):
            for kh in range(KH):
                ih = oh * SH - PH + kh
                for kw in range(KW):
                    # the output columns ow whose input column ow·SW − PW + kw lies in [0, W)
                    lo = min(OW, max(0, (PW - kw + SW - 1) // SW))
                    hi = max(lo, min(OW, (W - 1 + PW - kw) // SW + 1))
                    if ih < 0 or ih >= H:
                        lo = hi = OW
                    # unsigned indices skip Numba's negative-index wrap; src may wrap below 0, but
                    # src + ow·SW is exact modulo 2⁶⁴ and in range for ow in [lo, hi)
                    d = uint64((r0 + oh * OW) * K + kh * KW + kw)
                    src = uint64((n * H + ih) * W + kw - PW)
                    for ow in range(lo):
                        cf[d + uint64(ow * K)] = 0.0
                    for ow in range(lo, hi):
                        cf[d + uint64(ow * K)] = xf[src + uint64(ow * SW)]
                    for ow in range(hi, OW):
                        cf[d + uint64(ow * K)] = 0.0
        return
    for oh in range(OH):
        for ow in range(OW):
            r = r0 + oh * OW + ow
            for kh in range(KH):
                ih = oh * SH - PH + kh
                for kw in range(KW):
                    iw = ow * SW - PW + kw
                    o = (kh * KW + kw) * C
                    if 0 <= ih < H and 0 <= iw < W:
                        for c in range(C):
                            cols[r, o + c] = x[n, ih, iw, c]
                    else:
                        for c in range(C):
                            cols[r, o + c] = 0.0


@njit(cache=True, parallel=True)
def im2col(x, KH, KW, SH, SW, PH, PW, OH, OW, cols):
    """cols[(n·OH + oh)·OW + ow, (kh·KW + kw)·C + c] ← x[n, oh·SH − PH + kh, ow·SW − PW + kw, c], 0 where
    that position is outside x (every entry of cols is written)."""
    N, H, W, C = x.shape
    if cols.shape[0] != N * OH * OW or cols.shape[1] != KH * KW * C:
        raise ValueError("im2col: cols must be (N*OH*OW, KH*KW*C)")
    for n in prange(N):  # a serial body per sample: prange's own loop body compiles to slower code
        _im2col_sample(x, n, KH, KW, SH, SW, PH, PW, OH, OW, cols)


@njit(cache=True, parallel=True)
def col2im(dcols, KH, KW, SH, SW, PH, PW, OH, OW, dx):
    """The adjoint of im2col with the same geometry: dx ← 0, then every in-range entry of dcols is added
    to the x position im2col read it from (entries of the padding are dropped)."""
    N, H, W, C = dx.shape
    if dcols.shape[0] != N * OH * OW or dcols.shape[1] != KH * KW * C:
        raise ValueError("col2im: dcols must be (N*OH*OW, KH*KW*C)")
    for n in prange(N):  # each sample scatters into its own dx[n]: no races
        dx[n] = 0.0
        for oh in range(OH):
            for ow in range(OW):
                r = (n * OH + oh) * OW + ow
                for kh in range(KH):
                    ih = oh * SH - PH + kh
                    if ih < 0 or ih >= H:
                        continue
                    for kw in range(KW):
                        iw = ow * SW - PW + kw
                        if iw < 0 or iw >= W:
                            continue
                        o = (kh * KW + kw) * C
                        for c in range(C):
                            dx[n, ih, iw, c] += dcols[r, o + c]


def _rows(a, m):
    """The (·, m) view of a C-contiguous array: a ValueError, never a copy that in-place results would miss."""
    return np.reshape(a, (-1, m), copy=False)


def conv_forward(x, w, b, act, geom, cols, out):
    """out ← act(conv(x, w) + b): cols ← im2col(x, *geom), out ← cols @ w.T, bias and activation in
    place (b None: out ← conv(x, w) alone, act unused).  out is (N, OH, OW, C_out) (or its (N·OH·OW, C_out)
    view), C-contiguous; cols is kept for conv_backward."""
    im2col(x, *geom, cols)
    z = _rows(out, w.shape[0])
    _gemm(cols, w.T, z)
    if b is not None:
        bias_act(z, b, act)


def conv_backward(cols, w, y, dy, act, geom, dw, db, dcols, dx):
    """Given y = act(conv(x, w) + b), cols = im2col(x, *geom) saved by conv_forward and dy = dL/dy:
    dy ← dL/dz (in place), db ← sum dz over N·OH·OW, dw ← dz.T @ cols, and, when dx is not None,
    dcols ← dz @ w and dx ← col2im(dcols, *geom).  dcols may be cols itself (cols is read before dcols is
    written); with dx None, dcols is not used.  db None: dy is dL/dz already (y and act unused)."""
    z_grad = _rows(dy, w.shape[0])
    if db is not None:
        act_grad(_rows(y, w.shape[0]), z_grad, act, db)
    _gemm(z_grad.T, cols, dw)
    if dx is not None:
        _gemm(z_grad, w, dcols)
        col2im(dcols, *geom, dx)


@njit(cache=True)
def _maxpool_sample(x, n, KH, KW, SH, SW, out, arg):
    """maxpool_forward of sample n.  The running maximum stays in registers, and NaN is left out of the hot
    compare (checking it there made LLVM's code 5× slower): a window whose sum is NaN is scanned again,
    where the last NaN wins as it does in sequence ("v > m or v is NaN")."""
    W, C = x.shape[2], x.shape[3]
    for oh in range(out.shape[1]):
        for ow in range(out.shape[2]):
            ih, iw = oh * SH, ow * SW
            for c in range(C):
                m, a, probe = x[n, ih, iw, c], (ih * W + iw) * C + c, np.float32(0.0)
                for kh in range(KH):
                    for kw in range(KW):
                        v = x[n, ih + kh, iw + kw, c]
                        probe += v
                        if v > m:
                            m, a = v, ((ih + kh) * W + iw + kw) * C + c
                if probe != probe:  # a NaN, or inf − inf (then the scan finds no NaN and changes nothing)
                    for kh in range(KH):
                        for kw in range(KW):
                            v = x[n, ih + kh, iw + kw, c]
                            if v != v:
                                m, a = v, ((ih + kh) * W + iw + kw) * C + c
                out[n, oh, ow, c] = m
                arg[n, oh, ow, c] = a


@njit(cache=True, parallel=True)
def maxpool_forward(x, KH, KW, SH, SW, out, arg):
    """Max pooling without padding, out (N, OH, OW, C) with OH ≤ (H − KH)//SH + 1 (likewise OW):
    out[n, oh, ow, c] ← max over the window at (oh·SH, ow·SW), and arg[n, oh, ow, c] ← the flat index
    (ih·W + iw)·C + c of that maximum in sample n's x[n] (ties: the first in row-major window order; a NaN
    wins, so it propagates).  arg is an integer array shaped like out (int32 is enough)."""
    N, H, W, C = x.shape
    OH, OW = out.shape[1], out.shape[2]
    if out.shape[0] != N or out.shape[3] != C or (OH - 1) * SH + KH > H or (OW - 1) * SW + KW > W:
        raise ValueError("maxpool_forward: out must be (N, OH, OW, C) with the windows inside x")
    for n in prange(N):
        if KH == 2 and KW == 2:  # the usual window, as constants: LLVM unrolls its taps (3–10× faster)
            _maxpool_sample(x, n, 2, 2, SH, SW, out, arg)
        else:
            _maxpool_sample(x, n, KH, KW, SH, SW, out, arg)


@njit(cache=True, parallel=True)
def maxpool_backward(dy, arg, dx):
    """The gradient of maxpool_forward: dx ← 0, then dx[n].flat[arg[n, oh, ow, c]] += dy[n, oh, ow, c]
    (overlapping windows, stride < kernel, add up)."""
    N, OH, OW, C = dy.shape
    if arg.shape != dy.shape or dx.shape[0] != N or dx.shape[3] != C:
        raise ValueError("maxpool_backward: arg must be shaped like dy, dx like the forward's x")
    for n in prange(N):
        flat = dx[n].reshape(-1)
        flat[:] = 0.0
        for oh in range(OH):
            for ow in range(OW):
                for c in range(C):
                    flat[arg[n, oh, ow, c]] += dy[n, oh, ow, c]


@njit(cache=True)
def _avgpool_sample(x, n, KH, KW, SH, SW, out):
    scale = np.float32(1.0 / (KH * KW))
    for oh in range(out.shape[1]):
        for ow in range(out.shape[2]):
            for c in range(x.shape[3]):
                t = np.float32(0.0)
                for kh in range(KH):
                    for kw in range(KW):
                        t += x[n, oh * SH + kh, ow * SW + kw, c]
                out[n, oh, ow, c] = t * scale


@njit(cache=True, parallel=True)
def avgpool_forward(x, KH, KW, SH, SW, out):
    """Average pooling without padding (out as for maxpool_forward): out ← the mean of each window."""
    N, H, W, C = x.shape
    OH, OW = out.shape[1], out.shape[2]
    if out.shape[0] != N or out.shape[3] != C or (OH - 1) * SH + KH > H or (OW - 1) * SW + KW > W:
        raise ValueError("avgpool_forward: out must be (N, OH, OW, C) with the windows inside x")
    for n in prange(N):
        _avgpool_sample(x, n, KH, KW, SH, SW, out)


@njit(cache=True, parallel=True)
def avgpool_backward(dy, KH, KW, SH, SW, dx):
    """The gradient (adjoint) of avgpool_forward: dx ← 0, then dy/(KH·KW) added to every position of
    each window."""
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    if dx.shape[0] != N or dx.shape[3] != C or (OH - 1) * SH + KH > H or (OW - 1) * SW + KW > W:
        raise ValueError("avgpool_backward: dx must be (N, H, W, C) with the windows inside it")
    scale = np.float32(1.0 / (KH * KW))
    for n in prange(N):
        dx[n] = 0.0
        for oh in range(OH):
            for ow in range(OW):
                for kh in range(KH):
                    for kw in range(KW):
                        ih, iw = oh * SH + kh, ow * SW + kw
                        for c in range(C):
                            dx[n, ih, iw, c] += dy[n, oh, ow, c] * scale


def warmup_conv():
    """warmup() for the convolution and pooling kernels (float32 activations, int32 arg-max)."""
    f4 = np.float32
    x = np.zeros((1, 2, 2, 1), f4)
    cols = np.zeros((4, 4), f4)
    im2col(x, 2, 2, 1, 1, 0, 0, 2, 2, cols)
    col2im(cols, 2, 2, 1, 1, 0, 0, 2, 2, x)
    out, arg = np.zeros((1, 1, 1, 1), f4), np.zeros((1, 1, 1, 1), np.int32)
    maxpool_forward(x, 2, 2, 2, 2, out, arg)
    maxpool_backward(out, arg, x)
    avgpool_forward(x, 2, 2, 2, 2, out)
    avgpool_backward(out, 2, 2, 2, 2, x)


@njit(cache=True, parallel=True)
def to_nhwc(x, out):
    """out (N, H, W, C) ← x (N, C·H·W), a batch stored channels first (the dataset's layout)."""
    N, H, W, C = out.shape
    for n in prange(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    out[n, h, w, c] = x[n, (c * H + h) * W + w]


@njit(cache=True, parallel=True)
def conv_sqnorms(cols, dz, rows, sq):
    """DP-SGD, per-example clipping of a conv layer: sq[i] += ‖dz_iᵀ cols_i‖² + ‖Σ_p dz_i[p]‖², the squared
    norm of example i's weight and bias gradient, where example i owns `rows` consecutive rows of cols
    (its im2col) and dz (dL/dz).  One small GEMM per example, never all of them at once."""
    N = sq.size
    for i in prange(N):
        a = cols[i * rows:(i + 1) * rows]
        d = dz[i * rows:(i + 1) * rows]
        g = np.dot(d.T.copy(), a)
        bias = d.sum(axis=0)
        sq[i] += np.sum(g.astype(np.float64) ** 2) + np.sum(bias.astype(np.float64) ** 2)


from .ops import *  # noqa: E402,F401,F403  the transformer and ResNet ops (kernels/ops.py), offered here too
