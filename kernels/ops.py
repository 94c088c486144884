"""CPU kernels of the transformer and ResNet ops: layernorm, gelu, token + position embedding, causal
multi-head self-attention, dropout, groupnorm, SyncBatchNorm's split passes, global average pooling, the
mean-squared-error loss and the weighted, label-smoothed cross-entropy.  Same style as cpu.py (re-exported there, so ``backend("cpu")`` offers them):
Numba @njit(cache=True) passes, pure functions of arrays, no globals.

Conventions.  Arrays are float32 and C-contiguous unless said; N rows are the B·T positions or B samples.
Every kernel also runs on float64 arrays (the tests take finite differences in float64; gelu's and the
softmax's exp is then good to 5e-10).
- A backward ACCUMULATES (+=) into parameter gradients (dw, db, dwte, …: the model zeroes its gradient vector
  once per step) and WRITES (=) the input gradient dx (the model adds residual branches itself).
- A sum into a parameter gradient goes through partial sums over a fixed partition (row chunks, samples,
  vocabulary ranges) added in a fixed order: no race, and the same bits whatever the thread count.
- Statistics are accumulated in float64 (exact enough for the 10⁵-element channels of a BatchNorm); the
  elementwise arithmetic stays in the arrays' precision (F = x.dtype.type casts a row's statistics to it: a
  float64 scalar would turn a float32 loop into a float64 one).
- Compiled with FAST math flags: LLVM may reassociate sums, so that a row's reduction vectorises (5–14×
  faster than the sequential sum: a LayerNorm of 16384×384 floats 34 ms → 2.5 ms, 1 thread), and fuse
  multiply-adds.  The order is fixed by the compiled code, so runs stay deterministic; NaN and inf keep their
  IEEE meaning.  error_model="numpy": a division by 0 gives inf (Python's error model checks every
  division, which stops a loop from vectorising).
"""
import math

import numpy as np
from numba import njit, prange, uint64

__all__ = ["layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward", "encoder_forward",
           "encoder_backward", "attention_forward", "attention_backward", "dropout_forward", "dropout_backward",
           "groupnorm_forward", "groupnorm_backward", "batchnorm_moments", "batchnorm_stats", "batchnorm_forward",
           "batchnorm_backward_moments", "batchnorm_backward", "global_avgpool_forward",
           "global_avgpool_backward", "mse", "softmax_xent_weighted", "warmup_ops"]

FAST = {"reassoc", "contract"}
PARALLEL = dict(cache=True, parallel=True, fastmath=FAST, error_model="numpy")
CHUNKS = 64  # row chunks of a parameter-gradient sum: a fixed count, so results do not depend on threads


@njit(cache=True)
def _chunk(n, k, nch):
    """Rows [lo, hi) of chunk k when n rows are cut into nch chunks."""
    return n * k // nch, n * (k + 1) // nch


def _flat(a):
    """The 1-d view of a C-contiguous array: a ValueError, never a copy that in-place results would miss."""
    return np.reshape(a, -1, copy=False)


# -- LayerNorm (PyTorch semantics: biased variance, eps inside the square root) ----------------------------

@njit(**PARALLEL)
def layernorm_forward(x, w, b, eps, out, mean, rstd):
    """out ← (x − mean)·rstd·w + b per row of x (N, C); mean (N) and rstd = 1/√(var + eps) (N) are kept for
    the backward."""
    N, C = x.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += x[i, c]
        m = s / C
        v = 0.0
        for c in range(C):
            d = x[i, c] - m
            v += d * d
        mean[i], rstd[i] = m, 1.0 / np.sqrt(v / C + eps)
        mi, ri = mean[i], rstd[i]  # as stored, in x's precision
        for c in range(C):
            out[i, c] = (x[i, c] - mi) * ri * w[c] + b[c]


@njit(**PARALLEL)
def layernorm_backward(dout, x, w, mean, rstd, dx, dw, db):
    """dx ← dL/dx; dw += Σ_rows dout·x̂, db += Σ_rows dout (x̂ = (x − mean)·rstd)."""
    N, C = x.shape
    F = dx.dtype.type
    nch = min(N, CHUNKS)
    part = np.zeros((nch, 2, C), dw.dtype)
    for k in prange(nch):
        lo, hi = _chunk(N, k, nch)
        for i in range(lo, hi):
            m, r = mean[i], rstd[i]
            g_mean = 0.0  # the means of dx̂ = dout·w and of dx̂·x̂ over the row
            gx_mean = 0.0
            for c in range(C):
                xh = (x[i, c] - m) * r
                g = dout[i, c] * w[c]
                g_mean += g
                gx_mean += g * xh
                part[k, 0, c] += dout[i, c] * xh
                part[k, 1, c] += dout[i, c]
            gm, gxm = F(g_mean / C), F(gx_mean / C)
            for c in range(C):
                xh = (x[i, c] - m) * r
                dx[i, c] = (dout[i, c] * w[c] - gm - xh * gxm) * r
    for k in range(nch):
        for c in range(C):
            dw[c] += part[k, 0, c]
            db[c] += part[k, 1, c]


# -- exp that vectorises ----------------------------------------------------------------------------------
# Numba's np.exp and np.tanh are scalar libm calls (no SVML here): ~5 ns and ~50 ns per float32, where a
# vectorised polynomial takes well under 1 ns.  float32 constants keep float32 arithmetic in float32 (an
# integer or a Python float would promote it to float64); float64 arrays promote them.

ONE, HALF, THREE = np.float32(1.0), np.float32(0.5), np.float32(3.0)
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # Cody & Waite: ln 2 in two parts
EXP_LO, EXP_HI = np.float32(-87.0), np.float32(88.0)
EXP_BIAS = np.float32(126.5)
E3, E4, E5, E6, E7, E8, E9 = (np.float32(1.0 / math.factorial(k)) for k in range(3, 10))


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _exp(v):
    """exp(v) in straight-line code that LLVM vectorises: v = n·ln 2 + r with |r| ≤ ln 2/2, e^r by its Taylor
    series to r⁹ (float32: within 1e-7 relative; float64: 5e-10), times 2ⁿ put into the exponent bits.  v is
    clamped to [−87, 88] (exp(−inf) gives 1.6e-38, not 0); NaN gives NaN."""
    v = EXP_LO if v < EXP_LO else v  # selects that keep NaN (max/min would drop it)
    v = EXP_HI if v > EXP_HI else v
    t = v * LOG2E + EXP_BIAS  # n + 126.5, in [0.98, 253.5]: truncating it is flooring it
    e = np.int32(t if t == t else EXP_BIAS)  # n + 126 (NaN: any n, the polynomial is NaN anyway)
    n = np.float32(e - 126)
    r = v - n * LN2_HI - n * LN2_LO
    p = ((((((((E9 * r + E8) * r + E7) * r + E6) * r + E5) * r + E4) * r + E3) * r + HALF) * r + ONE) * r + ONE
    return p * np.int32((e + 1) << 23).view(np.float32)


# -- GELU, GPT-2's tanh form: 0.5·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³) -------------------------------
# computed as x·σ(2u), since 0.5·(1 + tanh(u)) = σ(2u) = 1/(1 + exp(−2u)): with _exp, 0.39 M elements take
# 0.24 ms (tanh: 23 ms, np.exp: 1.1 ms; 1 thread)

GELU_S2 = np.float32(-2.0 * np.sqrt(2.0 / np.pi))  # −2·√(2/π)
GELU_A = np.float32(0.044715)


@njit(**PARALLEL)
def _gelu_forward(x, out):
    for i in prange(x.size):  # one flat prange (blocks of an inner range loop did not vectorise: 3× slower)
        xi = x[i]
        out[i] = xi / (ONE + _exp(GELU_S2 * (xi + GELU_A * xi * xi * xi)))


@njit(**PARALLEL)
def _gelu_backward(x, dout, dx):
    for i in prange(x.size):
        xi = x[i]
        s = ONE / (ONE + _exp(GELU_S2 * (xi + GELU_A * xi * xi * xi)))  # σ(2u); 1 − tanh(u)² = 4s(1 − s)
        dx[i] = dout[i] * (s - xi * s * (ONE - s) * GELU_S2 * (ONE + THREE * GELU_A * xi * xi))


def gelu_forward(x, out):
    """out ← gelu(x), any shape (C-contiguous)."""
    _gelu_forward(_flat(x), _flat(out))


def gelu_backward(x, dout, dx):
    """dx ← gelu'(x)·dout, any shape; dx may be dout itself."""
    _gelu_backward(_flat(x), _flat(dout), _flat(dx))


# -- Token and position embedding ------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def encoder_forward(tokens, wte, wpe, out):
    """out[b, t] ← wte[tokens[b, t]] + wpe[t] (tokens (B, T) int32, wte (V, C), wpe (Tmax ≥ T, C))."""
    B, T = tokens.shape
    V, C = wte.shape
    if T > wpe.shape[0]:
        raise ValueError("encoder_forward: more positions than wpe has rows")
    for b in range(B):  # a raise inside prange would make it serial
        for t in range(T):
            if tokens[b, t] < 0 or tokens[b, t] >= V:
                raise ValueError("encoder_forward: a token outside [0, V)")
    for b in prange(B):
        for t in range(T):
            tok = tokens[b, t]
            for c in range(C):
                out[b, t, c] = wte[tok, c] + wpe[t, c]


@njit(cache=True, parallel=True)
def encoder_backward(dout, tokens, dwte, dwpe):
    """dwte[tok] += dout at every position holding tok; dwpe[t] += Σ_b dout[b, t].  The vocabulary is cut
    into chunks, each task scanning every position for its own tokens: no race, and every row of dwte adds
    its positions in order (the same bits whatever the thread count)."""
    B, T = tokens.shape
    V, C = dwte.shape
    for t in prange(T):
        for b in range(B):
            for c in range(C):
                dwpe[t, c] += dout[b, t, c]
    nch = min(V, CHUNKS)
    for k in prange(nch):
        lo, hi = _chunk(V, k, nch)
        for b in range(B):
            for t in range(T):
                tok = tokens[b, t]
                if lo <= tok < hi:
                    for c in range(C):
                        dwte[tok, c] += dout[b, t, c]


# -- Causal multi-head self-attention ------------------------------------------------------------------------

@njit(**PARALLEL)
def _softmax_causal(att, scale):
    """Each (b, h) tile of scores S (T, T) ← softmax(S·scale) with the causal mask (0 above the diagonal)."""
    B, NH, T, _ = att.shape
    F = att.dtype.type
    for bh in prange(B * NH):
        a = att[bh // NH, bh % NH]
        for t in range(T):
            row = a[t]
            mx = row[0]
            for u in range(1, t + 1):
                mx = max(mx, row[u])
            s = 0.0
            for u in range(t + 1):
                e = _exp((row[u] - mx) * scale)
                row[u] = e
                s += e
            inv = F(1.0 / s)
            for u in range(t + 1):
                row[u] *= inv
            for u in range(t + 1, T):
                row[u] = 0.0


@njit(**PARALLEL)
def _softmax_causal_backward(att, dp, scale):
    """dp ← dS·scale from dp = dL/dP, tile by tile: P ⊙ (dP − rowsum(dP ⊙ P))·scale, 0 above the diagonal."""
    B, NH, T, _ = att.shape
    F = att.dtype.type
    for bh in prange(B * NH):
        p, g = att[bh // NH, bh % NH], dp[bh // NH, bh % NH]
        for t in range(T):
            dot = 0.0
            for u in range(t + 1):
                dot += g[t, u] * p[t, u]
            dot = F(dot)
            for u in range(t + 1):
                g[t, u] = p[t, u] * (g[t, u] - dot) * scale
            for u in range(t + 1, T):
                g[t, u] = 0.0


def _qkv_heads(a, NH):
    """The (B, NH, T, hs) views of q, k, v: the three C-wide column blocks of a (B, T, 3C), head h being
    columns h·hs:(h+1)·hs of each (views, never copies: results are written through them)."""
    B, T, C3 = a.shape
    v = np.reshape(a, (B, T, 3, NH, C3 // 3 // NH), copy=False).transpose(2, 0, 3, 1, 4)
    return v[0], v[1], v[2]


def _heads(a, NH):
    """The (B, NH, T, hs) view of a (B, T, C)."""
    B, T, C = a.shape
    return np.reshape(a, (B, T, NH, C // NH), copy=False).transpose(0, 2, 1, 3)


def _scale(att, q):
    """1/√hs in att's precision (float32 keeps the compiled softmax in float32)."""
    return att.dtype.type(1.0 / np.sqrt(q.shape[3]))


def _check_attention(qkv, n_head, att):
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head) or att.shape != (B, n_head, T, T):
        raise ValueError("attention: qkv must be (B, T, 3C) with C a multiple of n_head, att (B, n_head, T, T)")


# The GEMMs go to NumPy's BLAS as batched np.matmul on strided views (each (T, hs) slice has unit column
# stride, so it is passed to sgemm as it stands, no copy); the softmax is one compiled pass per (sample, head)
# tile.  A fused version (scores, softmax and att @ v in one compiled loop per tile, k transposed so that the
# inner loops are contiguous axpys; only the causal half computed) was measured against it, 1 thread
# (NUMBA_NUM_THREADS = OPENBLAS_NUM_THREADS = 1), best of 30 / 3 calls, AMD EPYC (2 cores, shared), 2026-12-07:
#     B=12 T=64  C=128 NH=4:  forward fused   3.19 ms, batched 0.87 ms;  backward fused    6.24 ms, batched 0.70 ms
#     B=64 T=256 C=384 NH=6:  forward fused 717    ms, batched  169 ms;  backward fused 1568    ms, batched  213 ms
# BLAS wins even though it also computes the masked half.  (Measured while the softmax still used np.exp; with
# _exp the batched version's small case takes 0.58 / 0.67 ms.)

def attention_forward(qkv, n_head, out, att):
    """Causal multi-head self-attention as nanoGPT: att[b, h] ← softmax(q kᵀ/√hs) with the causal mask
    (probabilities; 0 above the diagonal), out[b, :, h·hs:(h+1)·hs] ← att[b, h] @ v.  qkv (B, T, 3C) holds
    q, k, v as three C-wide column blocks; out (B, T, C); att (B, n_head, T, T) is kept for the backward."""
    _check_attention(qkv, n_head, att)
    q, k, v = _qkv_heads(qkv, n_head)
    with np.errstate(all="ignore"):  # quiet about inf/NaN, as cpu._gemm: the training loop checks the loss
        np.matmul(q, k.transpose(0, 1, 3, 2), out=att)
        _softmax_causal(att, _scale(att, q))
        np.matmul(att, v, out=_heads(out, n_head))


def attention_backward(dout, qkv, att, n_head, dqkv, scratch):
    """dqkv ← dL/dqkv from dout = dL/dout (B, T, C) and the forward's qkv and att; scratch is a
    (B, n_head, T, T) array it overwrites (one can serve every layer)."""
    _check_attention(qkv, n_head, att)
    q, k, v = _qkv_heads(qkv, n_head)
    dq, dk, dv = _qkv_heads(dqkv, n_head)
    do = _heads(dout, n_head)
    with np.errstate(all="ignore"):
        np.matmul(att.transpose(0, 1, 3, 2), do, out=dv)
        np.matmul(do, v.transpose(0, 1, 3, 2), out=scratch)  # dL/datt
        _softmax_causal_backward(att, scratch, _scale(att, q))  # dL/d(q kᵀ)
        np.matmul(scratch, k, out=dq)
        np.matmul(scratch.transpose(0, 1, 3, 2), q, out=dk)


# -- Dropout -------------------------------------------------------------------------------------------------
# The mask is a counter-based hash of (seed, site, step, global sample, position): splitmix64's output function
# applied along a stream keyed by the first four, so it does not depend on how ranks split the batch nor on
# what ran before (resume is bit-exact).  Element i of an array of rows row_len long is sample
# first_sample + i // row_len, position i % row_len.

GOLDEN = uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _mix(z):
    """splitmix64's output function (Steele, Lea & Flood 2014): a bijection of 64-bit words."""
    z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
    return z ^ (z >> uint64(31))


@njit(cache=True, parallel=True)
def _dropout(x, out, p, seed, site, step, first_sample, row_len):
    """out ← x·mask/(1 − p) over the flat arrays (the backward is the same map applied to dout)."""
    if not 0.0 <= p < 1.0 or x.size % row_len:
        raise ValueError("dropout: p must be in [0, 1) and the size a multiple of row_len")
    if p == 0.0:
        out[:] = x
        return
    keep_scale = x.dtype.type(1.0 / (1.0 - p))
    threshold = uint64(p * 4294967296.0)  # keep when the hash's top 32 bits are ≥ p·2³²
    key = _mix(_mix(_mix(uint64(seed) + GOLDEN) ^ uint64(site)) ^ uint64(step))
    for r in prange(x.size // row_len):
        row_key = _mix(key ^ uint64(first_sample + r))
        for j in range(row_len):
            i = r * row_len + j
            h = _mix(row_key + uint64(j + 1) * GOLDEN)  # splitmix64's stream from row_key
            out[i] = x[i] * keep_scale if (h >> uint64(32)) >= threshold else 0.0


def dropout_forward(x, out, p, seed, site, step, first_sample, row_len):
    """out ← x with each element dropped with probability p and the kept ones scaled by 1/(1 − p) (p = 0: a
    copy).  The mask is keyed by (seed, site, step, sample, position) only: site tells the dropout layers
    of one step apart, the rows of x are the global samples first_sample, first_sample + 1, … (row_len
    elements each), any shape (C-contiguous)."""
    _dropout(_flat(x), _flat(out), float(p), seed, site, step, first_sample, row_len)


def dropout_backward(dout, dx, p, seed, site, step, first_sample, row_len):
    """dx ← dL/dx: dout through the forward's mask (the same keys); dx may be dout itself."""
    _dropout(_flat(dout), _flat(dx), float(p), seed, site, step, first_sample, row_len)


# -- GroupNorm, channels last (PyTorch semantics: statistics over a group's channels at every position) ------
# One task per sample, every pass running over the sample's contiguous (S, C) block with per-channel
# accumulators (a loop over a group's few channels at a time does not vectorise: 18× slower at (128, 1024, 16)).

@njit(**PARALLEL)
def groupnorm_forward(x, G, w, b, eps, out, mean, rstd):
    """x (N, S, C) (S = H·W positions), G groups of C/G consecutive channels: out ← (x − mean)·rstd·w + b
    with mean (N, G), rstd = 1/√(var + eps) (N, G) over each sample's group, kept for the backward."""
    N, S, C = x.shape
    cg = C // G
    if C % G:
        raise ValueError("groupnorm: channels must be a multiple of groups")
    for n in prange(N):
        xn, on = x[n], out[n]
        acc = np.zeros(C)
        for i in range(S):
            for c in range(C):
                acc[c] += xn[i, c]
        m = np.empty(C)  # each channel's group mean
        for g in range(G):
            m[g * cg:(g + 1) * cg] = acc[g * cg:(g + 1) * cg].sum() / (S * cg)
        acc[:] = 0.0
        for i in range(S):
            for c in range(C):
                d = xn[i, c] - m[c]
                acc[c] += d * d
        mc, scale = np.empty(C, x.dtype), np.empty(C, x.dtype)
        for g in range(G):
            mean[n, g], rstd[n, g] = m[g * cg], 1.0 / np.sqrt(acc[g * cg:(g + 1) * cg].sum() / (S * cg) + eps)
            for c in range(g * cg, (g + 1) * cg):
                mc[c], scale[c] = mean[n, g], rstd[n, g] * w[c]  # as stored, in x's precision
        for i in range(S):
            for c in range(C):
                on[i, c] = (xn[i, c] - mc[c]) * scale[c] + b[c]


@njit(**PARALLEL)
def groupnorm_backward(dout, x, w, mean, rstd, G, dx, dw, db):
    """dx ← dL/dx; dw += Σ dout·x̂, db += Σ dout over samples and positions.  A group's means of dx̂ = dout·w
    and of dx̂·x̂ are Σ_c w_c·(Σ dout, Σ dout·x̂ of channel c): the per-channel sums serve both."""
    N, S, C = x.shape
    cg = C // G
    part = np.zeros((N, 2, C), dw.dtype)  # per sample, added in sample order
    for n in prange(N):
        xn, dn, dxn = x[n], dout[n], dx[n]
        mc, rc = np.empty(C, x.dtype), np.empty(C, x.dtype)
        for c in range(C):
            mc[c], rc[c] = mean[n, c // cg], rstd[n, c // cg]
        sx, sd = np.zeros(C), np.zeros(C)  # Σ dout·x̂, Σ dout per channel
        for i in range(S):
            for c in range(C):
                d = dn[i, c]
                sx[c] += d * ((xn[i, c] - mc[c]) * rc[c])
                sd[c] += d
        part[n, 0], part[n, 1] = sx, sd
        gm, gxm = np.empty(C, x.dtype), np.empty(C, x.dtype)  # per channel: its group's two means
        for g in range(G):
            lo, hi = g * cg, (g + 1) * cg
            gm[lo:hi] = np.sum(w[lo:hi] * sd[lo:hi]) / (S * cg)
            gxm[lo:hi] = np.sum(w[lo:hi] * sx[lo:hi]) / (S * cg)
        for i in range(S):
            for c in range(C):
                xh = (xn[i, c] - mc[c]) * rc[c]
                dxn[i, c] = (dn[i, c] * w[c] - gm[c] - xh * gxm[c]) * rc[c]
    for n in range(N):
        for c in range(C):
            dw[c] += part[n, 0, c]
            db[c] += part[n, 1, c]


# -- BatchNorm as SyncBatchNorm: the model sums the moments over the data group (one Allreduce) between the
# passes, so every rank normalises with the statistics of the global batch.  x (M, C) is channels last
# (M = samples·positions); sums are float64 (2, C).

@njit(**PARALLEL)
def _moments(a, x, mean, rstd, sums):
    """sums[0] ← Σ a, sums[1] ← Σ a·x̂ per channel (x̂ = (x − mean)·rstd; mean None: x̂ = x·a, the
    plain moments Σx, Σx² when a is x)."""
    M, C = a.shape
    nch = min(M, CHUNKS)
    part = np.zeros((nch, 2, C))
    for k in prange(nch):
        lo, hi = _chunk(M, k, nch)
        for i in range(lo, hi):
            for c in range(C):
                ai = np.float64(a[i, c])  # the product in float64 too: Σx² is exact to 1e-16
                xh = x[i, c] if mean is None else (x[i, c] - mean[c]) * rstd[c]
                part[k, 0, c] += ai
                part[k, 1, c] += ai * xh
    sums[:] = 0.0
    for k in range(nch):
        for c in range(C):
            sums[0, c] += part[k, 0, c]
            sums[1, c] += part[k, 1, c]


def batchnorm_moments(x, sums):
    """sums[0] ← Σx, sums[1] ← Σx² per channel of this rank's x (M, C)."""
    _moments(x, x, None, None, sums)


def batchnorm_stats(sums, count, eps, mean, rstd):
    """mean ← Σx/count, rstd ← 1/√(var + eps) with the biased variance Σx²/count − mean², from the global
    moments; returns that variance (float64; a running variance takes it ·count/(count − 1))."""
    m = sums[0] / count
    var = np.maximum(sums[1] / count - m * m, 0.0)  # rounding can take a constant channel below 0
    mean[:] = m
    rstd[:] = 1.0 / np.sqrt(var + eps)
    return var


@njit(**PARALLEL)
def batchnorm_forward(x, mean, rstd, w, b, out):
    """out ← (x − mean)·rstd·w + b per channel of x (M, C)."""
    M, C = x.shape
    for i in prange(M):
        for c in range(C):
            out[i, c] = (x[i, c] - mean[c]) * rstd[c] * w[c] + b[c]


def batchnorm_backward_moments(dout, x, mean, rstd, sums):
    """sums[0] ← Σ dout, sums[1] ← Σ dout·x̂ per channel of this rank's rows."""
    _moments(dout, x, mean, rstd, sums)


@njit(**PARALLEL)
def batchnorm_backward(dout, x, mean, rstd, w, sums, count, dx, dw, db):
    """dx ← dL/dx with the global (all-rank) backward moments sums and row count; dw += Σ dout·x̂ and
    db += Σ dout over this rank's rows (the gradient Allreduce adds the other ranks')."""
    M, C = x.shape
    nch = min(M, CHUNKS)
    part = np.zeros((nch, 2, C), dw.dtype)
    g_mean = (sums[0] / count).astype(dx.dtype)
    gx_mean = (sums[1] / count).astype(dx.dtype)
    for k in prange(nch):
        lo, hi = _chunk(M, k, nch)
        for i in range(lo, hi):
            for c in range(C):
                xh = (x[i, c] - mean[c]) * rstd[c]
                dx[i, c] = w[c] * rstd[c] * (dout[i, c] - g_mean[c] - xh * gx_mean[c])
                part[k, 0, c] += dout[i, c] * xh
                part[k, 1, c] += dout[i, c]
    for k in range(nch):
        for c in range(C):
            dw[c] += part[k, 0, c]
            db[c] += part[k, 1, c]


# -- Global average pooling, channels last ----------------------------------------------------------------

@njit(**PARALLEL)
def global_avgpool_forward(x, out):
    """out[n] ← the mean of x[n] (S, C) over its S positions."""
    N, S, C = x.shape
    inv = out.dtype.type(1.0 / S)
    for n in prange(N):
        out[n] = 0.0
        for i in range(S):
            for c in range(C):
                out[n, c] += x[n, i, c]
        for c in range(C):
            out[n, c] *= inv


@njit(**PARALLEL)
def global_avgpool_backward(dout, dx):
    """dx[n, s] ← dout[n]/S at every position s."""
    N, S, C = dx.shape
    inv = dx.dtype.type(1.0 / S)
    for n in prange(N):
        for i in range(S):
            for c in range(C):
                dx[n, i, c] = dout[n, c] * inv


# -- Mean squared error ------------------------------------------------------------------------------------

@njit(cache=True, fastmath=FAST, error_model="numpy")
def mse(pred, target):
    """Fused forward and backward of the mean squared error, a sample's loss being the mean over its K
    outputs of (pred − target)².  Returns (summed loss, summed squared error) and overwrites pred (N, K)
    with d(summed loss)/d(pred) = 2(pred − target)/K."""
    N, K = pred.shape
    sq = 0.0
    for i in range(N):
        for j in range(K):
            d = pred[i, j] - target[i, j]
            sq += d * d
            pred[i, j] = d * (2.0 / K)
    return sq / K, sq


# -- Cross-entropy with class weights and label smoothing -------------------------------------------------

@njit(cache=True, error_model="numpy")
def softmax_xent_weighted(z, labels, w, eps, f):
    """PyTorch's CrossEntropyLoss(weight=w, label_smoothing=eps) per sample, times f: sample i's loss is
    (1 − eps)·w[y]·(−log p_y) + (eps/C)·Σ_c w[c]·(−log p_c), so that with f = N / Σ_i w[y_i] the summed loss
    over N is the weighted mean.  Returns (f·summed loss, number correct) and overwrites the logits z with
    f·dL/dz = f·(p·((1 − eps)·w[y] + (eps/C)·Σw) − (1 − eps)·w[y]·onehot(y) − (eps/C)·w)."""
    n, c = z.shape
    total = 0.0
    for j in range(c):
        total += w[j]
    side = eps / c
    loss = 0.0
    correct = 0
    for i in range(n):
        y = labels[i]
        top = 0
        for j in range(1, c):
            if z[i, j] > z[i, top]:
                top = j
        mx = z[i, top]
        s = 0.0
        for j in range(c):
            s += np.exp(z[i, j] - mx)
        lse = np.log(s) + mx
        wy = (1.0 - eps) * w[y]
        for j in range(c):
            loss += (side * w[j]) * (lse - z[i, j])
        loss += wy * (lse - z[i, y])
        mass = wy + side * total
        for j in range(c):
            z[i, j] = f * (np.exp(z[i, j] - lse) * mass - side * w[j])
        z[i, y] -= f * wy
        correct += top == y
    return f * loss, correct


def warmup_ops():
    """warmup() for these kernels (float32, int32 tokens)."""
    f4 = np.float32
    x, w, v = np.zeros((2, 3), f4), np.ones(3, f4), np.zeros(2, f4)
    layernorm_forward(x, w, w, 1e-5, x.copy(), v, v.copy())
    layernorm_backward(x, x, w, v, v, x.copy(), w.copy(), w.copy())
    gelu_forward(x, x.copy())
    gelu_backward(x, x, x.copy())
    tokens, x3 = np.zeros((1, 2), np.int32), np.zeros((1, 2, 3), f4)
    encoder_forward(tokens, x, x, x3)
    encoder_backward(x3, tokens, x.copy(), x.copy())
    qkv, att = np.zeros((1, 2, 3), f4), np.zeros((1, 1, 2, 2), f4)
    attention_forward(qkv, 1, x3[:, :, :1].copy(), att)
    attention_backward(np.zeros((1, 2, 1), f4), qkv, att, 1, qkv.copy(), att.copy())
    dropout_forward(x, x.copy(), 0.5, 0, 0, 0, 0, 3)
    dropout_backward(x, x.copy(), 0.5, 0, 0, 0, 0, 3)
    mean = np.zeros((1, 1), f4)
    groupnorm_forward(x3, 1, w, w, 1e-5, x3.copy(), mean, mean.copy())
    groupnorm_backward(x3, x3, w, mean, mean, 1, x3.copy(), w.copy(), w.copy())
    sums = np.zeros((2, 3))
    batchnorm_moments(x, sums)
    batchnorm_forward(x, w, w, w, w, x.copy())
    batchnorm_backward_moments(x, x, w, w, sums)
    batchnorm_backward(x, x, w, w, w, sums, 2, x.copy(), w.copy(), w.copy())
    global_avgpool_forward(x3, x[:1].copy())
    global_avgpool_backward(x[:1], x3.copy())
    mse(x.copy(), x)
    softmax_xent_weighted(x.copy(), np.zeros(2, np.int64), w, 0.1, 1.0)
