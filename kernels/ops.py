"""CPU kernels of the transformer and ResNet ops: layernorm, gelu, token + position embedding, causal
multi-head self-attention, dropout, groupnorm, SyncBatchNorm's split passes, global average pooling and the
mean-squared-error loss.  Same style as cpu.py (re-exported there, so ``backend("cpu")`` offers them):
Numba @njit(cache=True) passes, pure functions of arrays, no globals.

Conventions.  Arrays are float32 and C-contiguous unless said; N rows are the B·T positions or B samples.
Every kernel is also correct on float64 arrays (the tests take finite differences in float64).
- A backward ACCUMULATES (+=) into parameter gradients (dw, db, dwte, …: the model zeroes its gradient vector
  once per step) and WRITES (=) the input gradient dx (the model adds residual branches itself).
- Sums over rows into a parameter gradient go through partial sums over a fixed number of row chunks, added
  in chunk order: no race, and the same bits whatever the thread count.
- Statistics are accumulated in float64 (as cheap as float32 in a sequential reduction, and exact enough for
  the 10⁵-element channels of a BatchNorm).
"""
import numpy as np
from numba import njit, prange, types, uint64
from numba.extending import overload

__all__ = ["layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward", "encoder_forward",
           "encoder_backward", "attention_forward", "attention_backward", "dropout_forward", "dropout_backward",
           "groupnorm_forward", "groupnorm_backward", "batchnorm_moments", "batchnorm_stats", "batchnorm_forward",
           "batchnorm_backward_moments", "batchnorm_backward", "global_avgpool_forward",
           "global_avgpool_backward", "mse", "warmup_ops"]

CHUNKS = 64  # row chunks of a parameter-gradient sum: a fixed count, so results do not depend on threads


@njit(cache=True)
def _chunk(n, k, nch):
    """Rows [lo, hi) of chunk k when n rows are cut into nch chunks."""
    return n * k // nch, n * (k + 1) // nch


def _flat(a):
    """The 1-d view of a C-contiguous array: a ValueError, never a copy that in-place results would miss."""
    return np.reshape(a, -1, copy=False)


# -- exp in float32 that LLVM vectorises: Numba's np.exp and np.tanh on float32 call libm once per element
# (np.tanh: ~25 ns), which made GELU 30× slower than PyTorch's.  Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2,
# a degree-7 polynomial of r, 2ⁿ put into the exponent bits; ≤ 1.4 ulp from exp on [-87.3, 88.3], branch-free
# (x is clamped: below, the smallest normal float; from 88.4 on, inf).  float64 keeps np.exp (the tests'
# finite differences run in float64).

LOG2E, LN2_HI, LN2_LO = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                      1.6666665459e-1, 5.0000001201e-1))
F0, F1, F2 = np.float32(0.0), np.float32(1.0), np.float32(2.0)  # literals would promote float32 to float64


def _exp(x):
    return np.exp(x)


@overload(_exp)
def _exp_overload(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def expf(x):
        x = min(max(x, np.float32(-87.33)), np.float32(88.8))
        n = np.floor(x * LOG2E + np.float32(0.5))
        r = x - n * LN2_HI - n * LN2_LO
        p = EXP_P[0]
        for c in EXP_P[1:]:
            p = p * r + c
        return (p * r * r + r + F1) * np.int32((np.int32(n) + 127) << 23).view(np.float32)

    return expf


# -- LayerNorm (PyTorch semantics: biased variance, eps inside the square root) ----------------------------

# fastmath reassoc: the sums over a row vectorise (4× faster; partial sums in float64, the same bits on any
# thread count); error_model numpy: no zero check on the divisions
@njit(cache=True, parallel=True, error_model="numpy", fastmath={"reassoc"})
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
        r = 1.0 / np.sqrt(v / C + eps)
        mean[i], rstd[i] = m, r
        m, r = mean[i], rstd[i]  # as stored: the backward sees the same values
        for c in range(C):
            out[i, c] = (x[i, c] - m) * r * w[c] + b[c]


@njit(cache=True, parallel=True, error_model="numpy", fastmath={"reassoc"})
def layernorm_backward(dout, x, w, mean, rstd, dx, dw, db):
    """dx ← dL/dx; dw += Σ_rows dout·x̂, db += Σ_rows dout (x̂ = (x − mean)·rstd)."""
    N, C = x.shape
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
            g_mean /= C
            gx_mean /= C
            for c in range(C):
                xh = (x[i, c] - m) * r
                dx[i, c] = (dout[i, c] * w[c] - g_mean - xh * gx_mean) * r
    for k in range(nch):
        for c in range(C):
            dw[c] += part[k, 0, c]
            db[c] += part[k, 1, c]


# -- GELU, GPT-2's tanh form: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) ----------------------------------
# computed as x·σ(2u) (u the tanh's argument; 1 + tanh(u) = 2σ(2u)): one exp, no cancellation, and the
# derivative σ(2u) + 2x·σ(1 − σ)·u'.

GELU_S = np.float32(np.sqrt(2.0 / np.pi))
GELU_A = np.float32(0.044715)
GELU_M2S, GELU_3A = np.float32(-2.0 * np.sqrt(2.0 / np.pi)), np.float32(3.0 * 0.044715)


# error_model="numpy": IEEE division (Numba's default checks every divisor for zero, which stops LLVM from
# vectorising the loop: 4× slower)
@njit(cache=True, parallel=True, error_model="numpy")
def _gelu_forward(x, out):
    for i in prange(x.size):
        xi = x[i]
        out[i] = xi / (F1 + _exp(GELU_M2S * (xi + GELU_A * xi * xi * xi)))


@njit(cache=True, parallel=True, error_model="numpy")
def _gelu_backward(x, dout, dx):
    for i in prange(x.size):
        xi = x[i]
        x2 = xi * xi
        s = F1 / (F1 + _exp(GELU_M2S * (xi + GELU_A * x2 * xi)))
        dx[i] = dout[i] * (s + F2 * GELU_S * xi * s * (F1 - s) * (F1 + GELU_3A * x2))


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

# fastmath reassoc: the row sums vectorise (partial sums; the same bits on any thread count)
@njit(cache=True, parallel=True, error_model="numpy", fastmath={"reassoc"})
def _softmax_causal(att, scale):
    """Each (b, h) tile of scores S (T, T) ← softmax(S·scale) with the causal mask (0 above the diagonal)."""
    B, NH, T, _ = att.shape
    for bh in prange(B * NH):
        a = att[bh // NH, bh % NH]
        for t in range(T):
            row = a[t]
            mx = row[0]
            for u in range(1, t + 1):
                mx = max(mx, row[u])
            s = F0
            for u in range(t + 1):
                e = _exp((row[u] - mx) * scale)
                row[u] = e
                s += e
            inv = F1 / s
            for u in range(t + 1):
                row[u] *= inv
            for u in range(t + 1, T):
                row[u] = F0


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _softmax_causal_backward(att, dp, scale):
    """dp ← dS·scale from dp = dL/dP, tile by tile: P ⊙ (dP − rowsum(dP ⊙ P))·scale, 0 above the diagonal."""
    B, NH, T, _ = att.shape
    for bh in prange(B * NH):
        p, g = att[bh // NH, bh % NH], dp[bh // NH, bh % NH]
        for t in range(T):
            dot = F0
            for u in range(t + 1):
                dot += g[t, u] * p[t, u]
            for u in range(t + 1):
                g[t, u] = p[t, u] * (g[t, u] - dot) * scale
            for u in range(t + 1, T):
                g[t, u] = F0


def _qkv_heads(a, NH):
    """The (B, NH, T, hs) views of q, k, v: the three C-wide column blocks of a (B, T, 3C), head h being
    columns h·hs:(h+1)·hs of each."""
    B, T, C3 = a.shape
    v = a.reshape(B, T, 3, NH, C3 // 3 // NH).transpose(2, 0, 3, 1, 4)
    return v[0], v[1], v[2]


def _heads(a, NH):
    """The (B, NH, T, hs) view of a (B, T, C)."""
    B, T, C = a.shape
    return a.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


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
# (NUMBA_NUM_THREADS = OPENBLAS_NUM_THREADS = 1), best of 30 / 3 calls, AMD EPYC, 2026-05:
#     B=12 T=64  C=128 NH=4:  forward fused   3.19 ms, batched 0.87 ms;  backward fused    6.24 ms, batched 0.70 ms
#     B=64 T=256 C=384 NH=6:  forward fused 717    ms, batched  169 ms;  backward fused 1568    ms, batched  213 ms
# BLAS wins even though it also computes the masked half.  The passes go over a few samples at a time, as
# many as keep their (NH, T, T) tiles within ATT_CHUNK bytes (half a 1 MiB L2): each pass then finds the
# scores the one before wrote still in cache, instead of streaming the whole (B, NH, T, T) array through
# memory five times (100 MB for the second config above), and the backward's dL/datt scratch stays in cache.

ATT_CHUNK = 1 << 19


def _samples_per_pass(att):
    B, NH, T, _ = att.shape
    return max(1, min(B, ATT_CHUNK // (NH * T * T * att.itemsize)))


def attention_forward(qkv, n_head, out, att):
    """Causal multi-head self-attention as nanoGPT: att[b, h] ← softmax(q kᵀ/√hs) with the causal mask
    (probabilities; 0 above the diagonal), out[b, :, h·hs:(h+1)·hs] ← att[b, h] @ v.  qkv (B, T, 3C) holds
    q, k, v as three C-wide column blocks; out (B, T, C); att (B, n_head, T, T) is kept for the backward."""
    _check_attention(qkv, n_head, att)
    q, k, v = _qkv_heads(qkv, n_head)
    o, scale, step = _heads(out, n_head), _scale(att, q), _samples_per_pass(att)
    with np.errstate(all="ignore"):  # quiet about inf/NaN, as cpu._gemm: the training loop checks the loss
        for lo in range(0, len(qkv), step):
            s = slice(lo, lo + step)
            np.matmul(q[s], k[s].transpose(0, 1, 3, 2), out=att[s])
            _softmax_causal(att[s], scale)
            np.matmul(att[s], v[s], out=o[s])


def attention_backward(dout, qkv, att, n_head, dqkv, scratch):
    """dqkv ← dL/dqkv from dout = dL/dout (B, T, C) and the forward's qkv and att; scratch is a
    (B, n_head, T, T) array it overwrites (one can serve every layer; only its first samples are used)."""
    _check_attention(qkv, n_head, att)
    q, k, v = _qkv_heads(qkv, n_head)
    dq, dk, dv = _qkv_heads(dqkv, n_head)
    do, scale, step = _heads(dout, n_head), _scale(att, q), _samples_per_pass(att)
    with np.errstate(all="ignore"):
        for lo in range(0, len(qkv), step):
            s = slice(lo, lo + step)
            d = scratch[:len(att[s])]
            np.matmul(att[s].transpose(0, 1, 3, 2), do[s], out=dv[s])
            np.matmul(do[s], v[s].transpose(0, 1, 3, 2), out=d)  # dL/datt
            _softmax_causal_backward(att[s], d, scale)  # dL/d(q kᵀ)
            np.matmul(d, k[s], out=dq[s])
            np.matmul(d.transpose(0, 1, 3, 2), q[s], out=dk[s])


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
    keep_scale = 1.0 / (1.0 - p)
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

# A sample's map is read as rows of C contiguous channels: each pass sums per channel (vectorised along the
# row), and a group's statistic adds its channels' sums (a group's channels, cg of them, are too few for a
# loop of their own to vectorise: that was 15× slower).

@njit(cache=True)
def _group_sums(sc, G, total):
    """total[g] ← Σ sc over group g's channels."""
    cg = len(sc) // G
    for g in range(G):
        total[g] = 0.0
        for c in range(g * cg, (g + 1) * cg):
            total[g] += sc[c]


@njit(cache=True, parallel=True, error_model="numpy")
def groupnorm_forward(x, G, w, b, eps, out, mean, rstd):
    """x (N, S, C) (S = H·W positions), G groups of C/G consecutive channels: out ← (x − mean)·rstd·w + b
    with mean (N, G), rstd = 1/√(var + eps) (N, G) over each sample's group, kept for the backward."""
    N, S, C = x.shape
    cg = C // G
    if C % G:
        raise ValueError("groupnorm: channels must be a multiple of groups")
    for n in prange(N):
        sc, total = np.zeros(C), np.empty(G)  # per channel, per group (float64)
        mc = np.empty(C, x.dtype)  # each channel's group mean
        for i in range(S):
            for c in range(C):
                sc[c] += x[n, i, c]
        _group_sums(sc, G, total)
        for c in range(C):
            mc[c] = total[c // cg] / (S * cg)
        sc[:] = 0.0
        for i in range(S):
            for c in range(C):
                d = x[n, i, c] - mc[c]
                sc[c] += d * d
        _group_sums(sc, G, total)
        for g in range(G):
            mean[n, g], rstd[n, g] = mc[g * cg], 1.0 / np.sqrt(total[g] / (S * cg) + eps)
        sw = np.empty(C, x.dtype)
        for c in range(C):  # mean and rstd as stored: the backward sees the same values
            mc[c] = mean[n, c // cg]
            sw[c] = rstd[n, c // cg] * w[c]
        for i in range(S):
            for c in range(C):
                out[n, i, c] = (x[n, i, c] - mc[c]) * sw[c] + b[c]


@njit(cache=True, parallel=True, error_model="numpy")
def groupnorm_backward(dout, x, w, mean, rstd, G, dx, dw, db):
    """dx ← dL/dx; dw += Σ dout·x̂, db += Σ dout over samples and positions."""
    N, S, C = x.shape
    cg = C // G
    part = np.zeros((N, 2, C), dw.dtype)  # per sample, added in sample order
    for n in prange(N):
        mc, rc = np.empty(C, x.dtype), np.empty(C, x.dtype)
        for c in range(C):
            mc[c], rc[c] = mean[n, c // cg], rstd[n, c // cg]
        sg, sgx = np.zeros(C), np.zeros(C)  # per channel: Σ dx̂ and Σ dx̂·x̂ (dx̂ = dout·w), float64
        for i in range(S):
            for c in range(C):
                xh = (x[n, i, c] - mc[c]) * rc[c]
                gi = dout[n, i, c] * w[c]
                sg[c] += gi
                sgx[c] += gi * xh
                part[n, 0, c] += dout[n, i, c] * xh
                part[n, 1, c] += dout[n, i, c]
        g_mean, gx_mean = np.empty(G), np.empty(G)
        _group_sums(sg, G, g_mean)
        _group_sums(sgx, G, gx_mean)
        for c in range(C):  # each channel's means of dx̂ and dx̂·x̂ over its group
            sg[c], sgx[c] = g_mean[c // cg] / (S * cg), gx_mean[c // cg] / (S * cg)
        for i in range(S):
            for c in range(C):
                xh = (x[n, i, c] - mc[c]) * rc[c]
                dx[n, i, c] = (dout[n, i, c] * w[c] - sg[c] - xh * sgx[c]) * rc[c]
    for n in range(N):
        for c in range(C):
            dw[c] += part[n, 0, c]
            db[c] += part[n, 1, c]


# -- BatchNorm as SyncBatchNorm: the model sums the moments over the data group (one Allreduce) between the
# passes, so every rank normalises with the statistics of the global batch.  x (M, C) is channels last
# (M = samples·positions); sums are float64 (2, C).

@njit(cache=True, parallel=True)
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


@njit(cache=True, parallel=True)
def batchnorm_forward(x, mean, rstd, w, b, out):
    """out ← (x − mean)·rstd·w + b per channel of x (M, C)."""
    M, C = x.shape
    for i in prange(M):
        for c in range(C):
            out[i, c] = (x[i, c] - mean[c]) * rstd[c] * w[c] + b[c]


def batchnorm_backward_moments(dout, x, mean, rstd, sums):
    """sums[0] ← Σ dout, sums[1] ← Σ dout·x̂ per channel of this rank's rows."""
    _moments(dout, x, mean, rstd, sums)


@njit(cache=True, parallel=True)
def batchnorm_backward(dout, x, mean, rstd, w, sums, count, dx, dw, db):
    """dx ← dL/dx with the global (all-rank) backward moments sums and row count; dw += Σ dout·x̂ and
    db += Σ dout over this rank's rows (the gradient Allreduce adds the other ranks')."""
    M, C = x.shape
    nch = min(M, CHUNKS)
    part = np.zeros((nch, 2, C), dw.dtype)
    g_mean = sums[0] / count
    gx_mean = sums[1] / count
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

@njit(cache=True, parallel=True)
def global_avgpool_forward(x, out):
    """out[n] ← the mean of x[n] (S, C) over its S positions."""
    N, S, C = x.shape
    for n in prange(N):
        out[n] = 0.0
        for i in range(S):
            for c in range(C):
                out[n, c] += x[n, i, c]
        for c in range(C):
            out[n, c] /= S


@njit(cache=True, parallel=True)
def global_avgpool_backward(dout, dx):
    """dx[n, s] ← dout[n]/S at every position s."""
    N, S, C = dx.shape
    for n in prange(N):
        for i in range(S):
            for c in range(C):
                dx[n, i, c] = dout[n, c] / S


# -- Mean squared error ------------------------------------------------------------------------------------

@njit(cache=True)
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
