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
    cuda.synchronize()
