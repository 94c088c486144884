"""CUDA kernels (numba-cuda): the functions of kernels/cpu.py with the same signatures and semantics, on
device arrays (numba DeviceNDArray), plus the allocation helpers the model and optimizer use.

Every array argument lives on the GPU; only the scalars softmax_xent returns come back to the host.  Math
is float32 throughout (the CPU kernels accumulate some sums in float64, so results agree to float32
tolerances, not bit for bit).  One tiled shared-memory GEMM with transpose flags serves the forward
product and both backward products, so no transposed copy is ever made.
"""
import math

import numpy as np
from numba import cuda, float32

from .cpu import ACTIVATIONS, IDENTITY, RELU, TANH  # noqa: F401  (same constants as the CPU backend)

TILE = 16  # GEMM tile: TILE×TILE threads per block, two TILE×TILE float32 tiles in shared memory
THREADS = 256  # threads per block of the one-dimensional kernels

# -- allocation helpers (the cpu backend's numpy equivalents are kernels.HOST) -------------------------


def zeros(shape):
    a = cuda.device_array(shape, np.float32)
    a[:] = 0.0
    return a


def empty(shape):
    return cuda.device_array(shape, np.float32)


def ints(shape):
    """int32 device array (the max-pool arg-max indices)."""
    return cuda.device_array(shape, np.int32)


def staging(n):
    """Zeroed page-locked host vector: the buffer MPI reduces, filled and emptied by one DMA each way."""
    a = cuda.pinned_array(n, np.float32)
    a[:] = 0.0
    return a


def to_device(a):
    return cuda.to_device(np.ascontiguousarray(a))


def to_host(a):
    return a.copy_to_host()


def _blocks(n):
    return max((n + THREADS - 1) // THREADS, 1), THREADS


# -- kernels ---------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _act(z, act):
    if act == RELU:
        return max(z, float32(0.0))
    if act == TANH:
        return math.tanh(z)
    return z


@cuda.jit(cache=True)
def _gemm(a, b, c, ta, tb, bias, act, epilogue):
    """c ← op(a) @ op(b) (op = transpose when ta / tb), then c ← act(c + bias) when epilogue.

    Each block computes one TILE×TILE tile of c, stepping over k one tile at a time through shared memory.
    A transposed operand is read with the thread indices swapped, so global reads stay coalesced (adjacent
    threads read adjacent addresses) whichever layout the operand has."""
    sa = cuda.shared.array((TILE, TILE), float32)
    sb = cuda.shared.array((TILE, TILE), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    r0, c0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    m, n = c.shape
    kdim = a.shape[0] if ta else a.shape[1]
    acc = float32(0.0)
    for k0 in range(0, kdim, TILE):
        if ta:  # op(a)[r0 + tx, k0 + ty] = a[k0 + ty, r0 + tx]
            k, r = k0 + ty, r0 + tx
            sa[tx, ty] = a[k, r] if k < kdim and r < m else float32(0.0)
        else:
            k, r = k0 + tx, r0 + ty
            sa[ty, tx] = a[r, k] if k < kdim and r < m else float32(0.0)
        if tb:  # op(b)[k0 + tx, c0 + ty] = b[c0 + ty, k0 + tx]
            k, j = k0 + tx, c0 + ty
            sb[tx, ty] = b[j, k] if k < kdim and j < n else float32(0.0)
        else:
            k, j = k0 + ty, c0 + tx
            sb[ty, tx] = b[k, j] if k < kdim and j < n else float32(0.0)
        cuda.syncthreads()
        for q in range(TILE):
            acc += sa[ty, q] * sb[q, tx]
        cuda.syncthreads()
    i, j = r0 + ty, c0 + tx
    if i < m and j < n:
        if epilogue:
            acc = _act(acc + bias[j], act)
        c[i, j] = acc


def _matmul(a, b, c, ta=False, tb=False, bias=None, act=IDENTITY):
    m, n = c.shape
    grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    _gemm[grid, (TILE, TILE)](a, b, c, int(ta), int(tb), c[0] if bias is None else bias, act, bias is not None)


@cuda.jit(cache=True)
def _bias_act(z, b, act):
    i, j = cuda.grid(2)
    if i < z.shape[0] and j < z.shape[1]:
        z[i, j] = _act(z[i, j] + b[j], act)


@cuda.jit(cache=True)
def _dz_colsum(y, dy, act, factor, scaled, db):
    """Per column j (one thread; adjacent threads read adjacent addresses of each row): dy ← dL/dz in place
    (activation derivative through the output y; or, when scaled, each row i times factor[i]) and
    db[j] ← Σ_i dz[i, j].  A fixed row order per column keeps the sum deterministic."""
    j = cuda.grid(1)
    n, m = dy.shape
    if j < m:
        s = float32(0.0)
        for i in range(n):
            g = dy[i, j]
            if scaled:
                g *= factor[i]
            elif act == RELU:
                g = g if y[i, j] > float32(0.0) else float32(0.0)
            elif act == TANH:
                g *= float32(1.0) - y[i, j] * y[i, j]
            dy[i, j] = g
            s += g
        db[j] = s


@cuda.jit(cache=True)
def _softmax_xent_rows(z, labels, out):
    """One thread per row: z[i] ← softmax(z[i]) − onehot(labels[i]); out[0, i] ← loss, out[1, i] ← hit."""
    i = cuda.grid(1)
    n, c = z.shape
    if i < n:
        y = labels[i]
        top = 0
        for j in range(1, c):
            if z[i, j] > z[i, top]:
                top = j
        mx = z[i, top]
        zy = z[i, y] - mx
        s = float32(0.0)
        for j in range(c):
            e = math.exp(z[i, j] - mx)
            z[i, j] = e
            s += e
        out[0, i] = math.log(s) - zy
        inv = float32(1.0) / s
        for j in range(c):
            z[i, j] *= inv
        z[i, y] -= float32(1.0)
        out[1, i] = float32(1.0) if top == y else float32(0.0)


@cuda.jit(cache=True)
def _sgd(p, g, lr, scale, wd):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i] -= lr * (scale * g[i] + wd * p[i])


@cuda.jit(cache=True)
def _momentum(p, g, v, lr, scale, mu, wd, nesterov):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = scale * g[i] + wd * p[i]
        vi = mu * v[i] + gi
        v[i] = vi
        p[i] -= lr * (gi + mu * vi if nesterov else vi)


@cuda.jit(cache=True)
def _adam(p, g, m, v, lr, scale, beta1, beta2, eps, wd, c1, c2):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = scale * g[i] + wd * p[i]
        mi = beta1 * m[i] + (float32(1.0) - beta1) * gi
        vi = beta2 * v[i] + (float32(1.0) - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


@cuda.jit(cache=True)
def _dp_sqnorms(a, dz, sq):
    i = cuda.grid(1)
    if i < a.shape[0]:
        sa = 1.0  # float64, as sq (the CPU kernel's precision for the norms that decide the clipping)
        for j in range(a.shape[1]):
            sa += a[i, j] * a[i, j]
        sz = 0.0
        for j in range(dz.shape[1]):
            sz += dz[i, j] * dz[i, j]
        sq[i] += sa * sz


# -- the public functions: the signatures of kernels/cpu.py ---------------------------------------------

_F = np.float32  # scalars go to the kernels as float32: float32 math, and one compiled signature each


def bias_act(z, b, act):
    """z ← act(z + b), in place."""
    grid = ((z.shape[0] + TILE - 1) // TILE, (z.shape[1] + TILE - 1) // TILE)
    _bias_act[grid, (TILE, TILE)](z, b, act)


def dense_forward(x, w, b, act, out):
    """out ← act(x @ w + b): bias and activation fused into the GEMM's epilogue."""
    _matmul(x, w, out, bias=b, act=act)


def dense_backward_params(x, y, dy, act, dw, db):
    """dy ← dL/dz (in place), dw ← x.T @ dz, db ← sum_rows dz."""
    _dz_colsum[_blocks(dy.shape[1])](y, dy, act, db, False, db)  # factor unused: db stands in for it
    _matmul(x, dy, dw, ta=True)


def dense_backward(x, w, y, dy, act, dw, db, dx):
    """dense_backward_params, then dx ← dz @ w.T."""
    dense_backward_params(x, y, dy, act, dw, db)
    _matmul(dy, w, dx, tb=True)


_rows = {}  # batch size -> (2, n) device scratch of softmax_xent: allocated once, not every step


def softmax_xent(z, labels):
    """Fused softmax cross-entropy; z ← dL/dz.  Returns (summed loss, number correct) as host numbers: one
    per-row kernel, then one copy of the per-row results (summed in float64 on the host)."""
    n = z.shape[0]
    if n not in _rows:
        _rows[n] = cuda.device_array((2, n), np.float32)
    out = _rows[n]
    _softmax_xent_rows[_blocks(n)](z, labels, out)
    loss, hit = out.copy_to_host().astype(np.float64)
    return float(loss.sum()), int(hit.sum())


def sgd_update(p, g, lr, scale, wd):
    _sgd[_blocks(p.size)](p, g, _F(lr), _F(scale), _F(wd))


def momentum_update(p, g, v, lr, scale, mu, wd, nesterov):
    _momentum[_blocks(p.size)](p, g, v, _F(lr), _F(scale), _F(mu), _F(wd), bool(nesterov))


def adam_update(p, g, m, v, lr, scale, beta1, beta2, eps, wd, t):
    c1, c2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t  # bias corrections on the host, in float64
    _adam[_blocks(p.size)](p, g, m, v, _F(lr), _F(scale), _F(beta1), _F(beta2), _F(eps), _F(wd), _F(c1), _F(c2))


def dp_sqnorms(a, dz, sq):
    """sq[i] += (‖a_i‖² + 1)·‖dz_i‖² (sq: float64 device array)."""
    _dp_sqnorms[_blocks(a.shape[0])](a, dz, sq)


def dp_clipped_grad(a, dz, factor, dw, db):
    """dz_i ← factor_i·dz_i (in place), then dw ← aᵀ·dz, db ← Σ_i dz_i."""
    _dz_colsum[_blocks(dz.shape[1])](dz, dz, IDENTITY, factor, True, db)
    _matmul(a, dz, dw, ta=True)


def warmup():
    """Compile every kernel for the types training uses (tiny arrays), before the first step."""
    x, w, b = zeros((2, 3)), zeros((3, 4)), zeros(4)
    y, dy, dx = zeros((2, 4)), zeros((2, 4)), zeros((2, 3))
    bias_act(y, b, RELU)
    dense_forward(x, w, b, RELU, y)
    dense_backward(x, w, y, dy, RELU, zeros((3, 4)), zeros(4), dx)
    softmax_xent(y, cuda.to_device(np.zeros(2, np.int64)))
    p = zeros(4)
    sgd_update(p, b, 0.1, 1.0, 0.0)
    momentum_update(p, b, zeros(4), 0.1, 1.0, 0.9, 0.0, False)
    adam_update(p, b, zeros(4), zeros(4), 0.1, 1.0, 0.9, 0.999, 1e-8, 0.0, 1)
    dp_sqnorms(x, y, cuda.to_device(np.zeros(2)))
    dp_clipped_grad(x, dy, to_device(np.ones(2, np.float32)), zeros((3, 4)), zeros(4))
    warmup_conv()
    cuda.synchronize()


# -- Convolution and pooling, NHWC (the layouts and geometry of kernels/cpu.py's section) ----------------
# One thread per output element (grid-stride loops), so global writes are coalesced and nothing races:
# the adjoints (col2im, avgpool_backward) gather, for each input position, the entries that read it, in
# the order the CPU kernels add them.  maxpool_backward has no window geometry to gather with (only arg),
# so it scatters, one thread per (sample, channel): a channel's arg-max indices stay in that channel.
# The conv GEMMs are _gemm with transpose flags on the (N·OH·OW, ·) views of the NHWC arrays.

PART_ROWS = 64  # rows per partial column sum of a conv's bias gradient (N·OH·OW rows, few columns)


def _mat(a, m):
    """The (·, m) view of a C-contiguous device array (reshape never copies a device array: it raises)."""
    if a.size % m:
        raise ValueError(f"an array of shape {a.shape} has no (·, {m}) view")
    return a.reshape(a.size // m, m)


@cuda.jit(cache=True)
def _im2col(x, KH, KW, SH, SW, PH, PW, OH, OW, cols):
    N, H, W, C = x.shape
    K = cols.shape[1]
    for t in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        r, q = t // K, t % K
        tap, c = q // C, q % C
        kh, kw = tap // KW, tap % KW
        n, p = r // (OH * OW), r % (OH * OW)
        ih, iw = (p // OW) * SH - PH + kh, (p % OW) * SW - PW + kw
        if ih >= 0 and ih < H and iw >= 0 and iw < W:
            cols[r, q] = x[n, ih, iw, c]
        else:
            cols[r, q] = float32(0.0)


@cuda.jit(cache=True)
def _col2im(dcols, KH, KW, SH, SW, PH, PW, OH, OW, dx):
    """dx[n, ih, iw, c] ← Σ of the dcols entries im2col read from there, over the output pixels in
    ascending (oh, ow) order (kh and kw descending), as cpu.col2im adds them."""
    N, H, W, C = dx.shape
    for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        c, u = t % C, t // C
        iw, u = u % W, u // W
        ih, n = u % H, u // H
        s = float32(0.0)
        for a in range(KH):
            kh = KH - 1 - a
            dh = ih + PH - kh
            if dh < 0 or dh % SH != 0 or dh // SH >= OH:
                continue
            oh = dh // SH
            for b in range(KW):
                kw = KW - 1 - b
                dw = iw + PW - kw
                if dw < 0 or dw % SW != 0 or dw // SW >= OW:
                    continue
                s += dcols[(n * OH + oh) * OW + dw // SW, (kh * KW + kw) * C + c]
        dx[n, ih, iw, c] = s


@cuda.jit(cache=True)
def _dz_parts(y, dy, act, rows, part):
    """dy ← dL/dz in place (as _dz_colsum) and part[p, j] ← Σ dz[i, j] over the p-th block of `rows` rows:
    one thread per (block, column), adjacent threads on adjacent columns; _dz_colsum then adds the parts."""
    t = cuda.grid(1)
    n, m = dy.shape
    if t < part.shape[0] * m:
        p, j = t // m, t % m
        s = float32(0.0)
        for i in range(p * rows, min((p + 1) * rows, n)):
            g = dy[i, j]
            if act == RELU:
                g = g if y[i, j] > float32(0.0) else float32(0.0)
            elif act == TANH:
                g *= float32(1.0) - y[i, j] * y[i, j]
            dy[i, j] = g
            s += g
        part[p, j] = s


_parts = {}  # (blocks, columns) -> partial-sum scratch of act_grad: allocated once


def act_grad(y, dy, act, db):
    """dy ← dL/dz (in place), db ← Σ_rows dz: _dz_colsum, after a pass of partial sums when there are more
    than PART_ROWS rows (a conv's N·OH·OW), so that no thread walks every row.  Deterministic."""
    n, m = dy.shape
    blocks = -(-n // PART_ROWS)
    if blocks <= 1:
        _dz_colsum[_blocks(m)](y, dy, act, db, False, db)
        return
    if (blocks, m) not in _parts:
        _parts[blocks, m] = cuda.device_array((blocks, m), np.float32)
    part = _parts[blocks, m]
    _dz_parts[_blocks(blocks * m)](y, dy, act, PART_ROWS, part)
    _dz_colsum[_blocks(m)](part, part, IDENTITY, db, False, db)  # identity: part is left as it is


@cuda.jit(cache=True)
def _maxpool_fwd(x, KH, KW, SH, SW, out, arg):
    W, C = x.shape[2], x.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        c, u = t % C, t // C
        ow, u = u % OW, u // OW
        oh, n = u % OH, u // OH
        ih, iw = oh * SH, ow * SW
        best = x[n, ih, iw, c]
        where = (ih * W + iw) * C + c
        for kh in range(KH):
            for kw in range(KW):
                if kh == 0 and kw == 0:
                    continue
                ih, iw = oh * SH + kh, ow * SW + kw
                v = x[n, ih, iw, c]
                if v > best or v != v:  # the first maximum; a NaN wins
                    best = v
                    where = (ih * W + iw) * C + c
        out[n, oh, ow, c] = best
        arg[n, oh, ow, c] = where


@cuda.jit(cache=True)
def _maxpool_bwd(dy, arg, dx):
    """One thread per (n, c): zero channel c of dx[n], then add dy into dx[n].flat[arg] in (oh, ow) order,
    as cpu.maxpool_backward does (maxpool_forward's arg for channel c indexes channel c: no races)."""
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    for t in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n, c = t // C, t % C
        for ih in range(H):
            for iw in range(W):
                dx[n, ih, iw, c] = float32(0.0)
        for oh in range(OH):
            for ow in range(OW):
                a = arg[n, oh, ow, c]
                dx[n, a // (W * C), (a // C) % W, a % C] += dy[n, oh, ow, c]


@cuda.jit(cache=True)
def _avgpool_fwd(x, KH, KW, SH, SW, scale, out):
    C = x.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        c, u = t % C, t // C
        ow, u = u % OW, u // OW
        oh, n = u % OH, u // OH
        s = float32(0.0)
        for kh in range(KH):
            for kw in range(KW):
                s += x[n, oh * SH + kh, ow * SW + kw, c]
        out[n, oh, ow, c] = s * scale


@cuda.jit(cache=True)
def _avgpool_bwd(dy, KH, KW, SH, SW, scale, dx):
    """dx[n, ih, iw, c] ← Σ dy·scale over the windows that hold (ih, iw), in (oh, ow) order."""
    OH, OW = dy.shape[1], dy.shape[2]
    H, W, C = dx.shape[1], dx.shape[2], dx.shape[3]
    for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        c, u = t % C, t // C
        iw, u = u % W, u // W
        ih, n = u % H, u // H
        lo_h, lo_w = ih - KH + 1, iw - KW + 1
        oh0 = 0 if lo_h <= 0 else (lo_h + SH - 1) // SH
        ow0 = 0 if lo_w <= 0 else (lo_w + SW - 1) // SW
        s = float32(0.0)
        for oh in range(oh0, min(ih // SH + 1, OH)):
            for ow in range(ow0, min(iw // SW + 1, OW)):
                s += dy[n, oh, ow, c] * scale
        dx[n, ih, iw, c] = s


@cuda.jit(cache=True)
def _to_nhwc(x, out):
    N, H, W, C = out.shape
    for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        c, u = t % C, t // C
        w, u = u % W, u // W
        h, n = u % H, u // H
        out[n, h, w, c] = x[n, (c * H + h) * W + w]


def _check_pool(x, KH, KW, SH, SW, out, what):
    N, H, W, C = x.shape
    OH, OW = out.shape[1], out.shape[2]
    if out.shape[0] != N or out.shape[3] != C or (OH - 1) * SH + KH > H or (OW - 1) * SW + KW > W:
        raise ValueError(f"{what}: out must be (N, OH, OW, C) with the windows inside x")


def im2col(x, KH, KW, SH, SW, PH, PW, OH, OW, cols):
    """cols[(n·OH + oh)·OW + ow, (kh·KW + kw)·C + c] ← x[n, oh·SH − PH + kh, ow·SW − PW + kw, c], 0 where
    that position is outside x (every entry of cols is written)."""
    N, H, W, C = x.shape
    if cols.shape[0] != N * OH * OW or cols.shape[1] != KH * KW * C:
        raise ValueError("im2col: cols must be (N*OH*OW, KH*KW*C)")
    _im2col[_blocks(cols.size)](x, KH, KW, SH, SW, PH, PW, OH, OW, cols)


def col2im(dcols, KH, KW, SH, SW, PH, PW, OH, OW, dx):
    """The adjoint of im2col: dx ← the sum, for each x position, of the dcols entries read from it
    (entries of the padding are dropped).  A gather: deterministic, no atomics."""
    N, H, W, C = dx.shape
    if dcols.shape[0] != N * OH * OW or dcols.shape[1] != KH * KW * C:
        raise ValueError("col2im: dcols must be (N*OH*OW, KH*KW*C)")
    _col2im[_blocks(dx.size)](dcols, KH, KW, SH, SW, PH, PW, OH, OW, dx)


def conv_forward(x, w, b, act, geom, cols, out):
    """out ← act(conv(x, w) + b): cols ← im2col(x, *geom), then out ← act(cols @ w.T + b) in one GEMM with
    the bias and activation in its epilogue (b None: no epilogue).  out is (N, OH, OW, C_out) or its
    (N·OH·OW, C_out) view."""
    im2col(x, *geom, cols)
    _matmul(cols, w, _mat(out, w.shape[0]), tb=True, bias=b, act=act)


def conv_backward(cols, w, y, dy, act, geom, dw, db, dcols, dx):
    """dy ← dL/dz (in place), db ← Σ dz over N·OH·OW, dw ← dz.T @ cols, and when dx is not None dcols ←
    dz @ w, dx ← col2im(dcols, *geom).  dcols may be cols (the kernels run in order on one stream, so
    dw's GEMM has read cols before dcols' GEMM writes it).  db None: dy is dL/dz already."""
    dz = _mat(dy, w.shape[0])
    if db is not None:
        act_grad(_mat(y, w.shape[0]), dz, act, db)
    _matmul(dz, cols, dw, ta=True)
    if dx is not None:
        _matmul(dz, w, dcols)
        col2im(dcols, *geom, dx)


def maxpool_forward(x, KH, KW, SH, SW, out, arg):
    """Max pooling without padding: out ← the maximum of each window, arg (int32, shaped like out) ← its
    flat index (ih·W + iw)·C + c in x[n] (ties: the first in row-major window order; a NaN wins)."""
    _check_pool(x, KH, KW, SH, SW, out, "maxpool_forward")
    _maxpool_fwd[_blocks(out.size)](x, KH, KW, SH, SW, out, arg)


def maxpool_backward(dy, arg, dx):
    """dx ← 0, then dx[n].flat[arg[n, oh, ow, c]] += dy[n, oh, ow, c] (overlapping windows add up)."""
    N, OH, OW, C = dy.shape
    if tuple(arg.shape) != tuple(dy.shape) or dx.shape[0] != N or dx.shape[3] != C:
        raise ValueError("maxpool_backward: arg must be shaped like dy, dx like the forward's x")
    _maxpool_bwd[_blocks(N * C)](dy, arg, dx)


def avgpool_forward(x, KH, KW, SH, SW, out):
    """Average pooling without padding: out ← the mean of each window."""
    _check_pool(x, KH, KW, SH, SW, out, "avgpool_forward")
    _avgpool_fwd[_blocks(out.size)](x, KH, KW, SH, SW, _F(1.0 / (KH * KW)), out)


def avgpool_backward(dy, KH, KW, SH, SW, dx):
    """The adjoint of avgpool_forward: dx ← the sum of dy/(KH·KW) over the windows holding each position."""
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    if dx.shape[0] != N or dx.shape[3] != C or (OH - 1) * SH + KH > H or (OW - 1) * SW + KW > W:
        raise ValueError("avgpool_backward: dx must be (N, H, W, C) with the windows inside it")
    _avgpool_bwd[_blocks(dx.size)](dy, KH, KW, SH, SW, _F(1.0 / (KH * KW)), dx)


def to_nhwc(x, out):
    """out (N, H, W, C) ← x (N, C·H·W), a batch stored channels first (the dataset's layout)."""
    _to_nhwc[_blocks(out.size)](x, out)


def warmup_conv():
    """warmup() for the convolution and pooling kernels (float32 activations, int32 arg-max)."""
    x, cols, w, b = zeros((1, 2, 2, 1)), zeros((4, 4)), zeros((1, 4)), zeros(1)
    geom = (2, 2, 1, 1, 1, 1, 2, 2)
    y, dy = zeros((1, 2, 2, 1)), zeros((1, 2, 2, 1))
    conv_forward(x, w, b, RELU, geom, cols, y)  # im2col and the GEMM
    conv_backward(cols, w, y, dy, RELU, geom, zeros((1, 4)), b, cols, x)  # the GEMMs and col2im
    _dz_parts[1, 1](cols, cols, RELU, PART_ROWS, zeros((1, 4)))  # the partial sums of a larger conv
    out, arg = zeros((1, 1, 1, 1)), ints((1, 1, 1, 1))
    maxpool_forward(x, 2, 2, 2, 2, out, arg)
    maxpool_backward(out, arg, x)
    avgpool_forward(x, 2, 2, 2, 2, out)
    avgpool_backward(out, 2, 2, 2, 2, x)
    to_nhwc(zeros((1, 4)), x)
