"""Secure aggregation: pairwise masking after Bonawitz et al. 2017 (arXiv:1611.04482) on a sparse random
neighbour graph as in SecAgg+ (Bell et al. 2020, arXiv:2004.04898).

Per round, for the cohort S (n clients, indexed 0…n−1 in client-id order) and a public k-regular graph
(a randomly labelled Harary graph drawn from (seed, round); complete when k = n − 1):

1. AdvertiseKeys: every sampled client u makes two fresh X25519 key pairs (c_u: share encryption,
   s_u: masking); the public keys go to rank 0 (Gatherv) and back to every rank (Bcast).
2. ShareKeys: u draws a 32-byte self-mask seed b_u and Shamir-shares s_u's secret key and b_u, t-of-(k+1)
   over p = 2^521 − 1, among its closed neighbourhood N[u] (itself and its k neighbours).  Each share
   travels through rank 0 encrypted with ChaCha20-Poly1305 under HKDF-SHA256(X25519(c_u, c_v)), so the
   aggregator routes ciphertexts it cannot read (Gatherv, then Scatterv to the holder's rank).
   -- simulated dropouts (fed.dropout_rate) leave here: they sent keys and shares, never a masked input --
3. MaskedInput: u encodes its contribution x_u in fixed point (per-slot scale 2^f, stochastic rounding,
   uint32 with wrap-around) and sends
       y_u = x_u + PRG(b_u) + Σ_{v∈N(u), u<v} PRG(s_uv) − Σ_{v∈N(u), u>v} PRG(s_uv)   (mod 2^32)
   with s_uv = HKDF-SHA256(X25519(s_u, s_v)) and PRG = the ChaCha20 keystream read as uint32.  A rank
   sums the y_u of the clients it hosts (mod 2^32) and sends that one vector (Gatherv), with the ids of
   the clients inside it.
4. Unmasking: rank 0 broadcasts the survivor set U; each surviving holder v reveals, for every u ∈ N[v],
   its share of b_u if u ∈ U, else its share of u's masking key — never both kinds for one client (the
   holders refuse, and rank 0's ShareStore refuses to accept, a second kind).  Rank 0 rebuilds b_u for
   u ∈ U and removes PRG(b_u); it rebuilds s_u for dropped u and removes the masks PRG(s_uv) that the
   survivors v ∈ N(u) added; the pairwise masks between survivors cancel in the sum.

The round completes when every u ∈ S keeps t surviving holders (complete graph: when at most n − t
clients drop).  Co-hosted clients trust their host rank (it trains them and holds their data anyway); the
aggregator sees per-rank masked sums, each uniformly distributed on (Z/2^32)^L.
"""
import math
import os
import secrets
import struct

import numpy as np

from ..errors import MpitrainError
from .aggregation import N_STATS, Result, contribution_scale
from .erase import Traces

P = 2 ** 521 - 1  # Mersenne prime M521: one field element holds a 32-byte secret
ELEM = 66         # bytes of a field element
SK, B = 0, 1      # the two kinds of share
MASK_INFO, SHARE_INFO = b"mpitrain secagg pairwise mask", b"mpitrain secagg share key"
SELF_NONCE, PAIR_NONCE = b"\x00" * 12 + b"self", b"\x00" * 12 + b"pair"  # ChaCha20: 16-byte counter‖nonce
SHARE_PLAIN = 2 * ELEM
SHARE_RECORD = 8 + SHARE_PLAIN + 16  # owner, holder (int32) ‖ ciphertext ‖ Poly1305 tag
REVEAL_RECORD = 9 + ELEM             # owner, holder (int32), kind (uint8) ‖ share
AUTO_COMPLETE = 13                   # cohorts up to this size use the complete graph by default


# -- primitives -------------------------------------------------------------------------------------

def keypair():
    """A fresh X25519 key pair: (private key object, 32 raw public bytes)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk):
    """The 32 raw bytes of a private key's public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(sk):
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_key(raw):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(bytes(raw))


def agree(sk, peer_public, info):
    """HKDF-SHA256 of the X25519 shared secret: a 32-byte key both ends derive alike."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


_ZEROS = {}


def prg(key, words, nonce=PAIR_NONCE):
    """`words` uint32 of the ChaCha20 keystream under a 32-byte key (a cryptographic PRG)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    zeros = _ZEROS.get(words)
    if zeros is None:
        zeros = _ZEROS[words] = bytes(4 * words)
    stream = Cipher(algorithms.ChaCha20(bytes(key), nonce), mode=None).encryptor().update(zeros)
    return np.frombuffer(stream, np.uint32)


def shamir_share(secret, xs, t):
    """Shares (y values) of a byte string at the points xs (distinct, non-zero): a random polynomial of
    degree t − 1 over GF(P) with constant term int(secret)."""
    s = int.from_bytes(bytes(secret), "big")
    if not (1 <= t <= len(xs)) or s >= P:
        raise ValueError("shamir: need 1 ≤ t ≤ number of shares and a secret below P")
    coeffs = [s] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % P
        out.append(y)
    return out


def shamir_reconstruct(points, t, nbytes=32):
    """The secret from any t of the (x, y) points (Lagrange interpolation at 0)."""
    points = list(points)[:t]
    if len(points) < t:
        raise ValueError(f"shamir: {len(points)} shares, {t} needed")
    s = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        s = (s + yi * num * pow(den, -1, P)) % P
    if s >> (8 * nbytes):
        raise ValueError("shamir: the shares do not interpolate to a secret of this size")
    return s.to_bytes(nbytes, "big")


def elem(y):
    return y.to_bytes(ELEM, "big")


# -- fixed point ------------------------------------------------------------------------------------

def scales_for(bounds, n):
    """Per-slot scales 2^f, the largest with n·(bound·2^f + 1) ≤ 2^31 − 1: a sum over n clients of values
    |x| ≤ bound, each rounded up by < 1, cannot leave the signed 32-bit range it is decoded from."""
    bounds = np.asarray(bounds, np.float64)
    room = (2.0 ** 31 - 1 - n) / (n * bounds)
    return np.exp2(np.floor(np.log2(room)))


def clip_count(v, bound):
    """Clip v to ±bound in place; the number of values that were beyond it."""
    count = np.count_nonzero(v > bound) + np.count_nonzero(v < -bound)
    np.clip(v, -bound, bound, out=v)
    return count


def encode(values, scales, bounds, rng, head=0, made=lambda a: a):
    """Clip to ±bound, scale, round stochastically (unbiased: floor(v·s + U[0,1))) and wrap into uint32.
    The first `head` slots share bounds[0] and scales[0] (the model coordinates: scalar arithmetic).
    made: called on each full-size intermediate (fed.erase registers them, erase.py)."""
    v = made(np.array(values, np.float64))
    if head:
        np.clip(v[:head], -bounds[0], bounds[0], out=v[:head])
        v[:head] *= scales[0]
    v[head:] = np.clip(v[head:], -bounds[head:], bounds[head:]) * scales[head:]
    v += rng.random(v.shape)
    np.floor(v, out=v)
    return made(v.astype(np.int64)).astype(np.uint32)  # masked in place next: no trace left in it


def decode(total, scales):
    """A uint32 sum (mod 2^32) back to floats: read as two's-complement int32, divide by the scale."""
    return total.view(np.int32).astype(np.float64) / scales


# -- the mask graph ---------------------------------------------------------------------------------

def degree(n, neighbors=0, dropout=0.0):
    """Neighbours per client: n − 1 (complete) for small cohorts or when asked, else an even k ≈ 3·log2 n
    (SecAgg+: O(log n) neighbours, so key agreement and masking cost O(n log n) per round, not O(n²)),
    raised for an expected dropout share until a round fails to unmask with probability ≤ 1e-3 (union
    bound over the n neighbourhoods, survivors of a neighbourhood ~ Binomial(k + 1, 1 − dropout))."""
    if neighbors == 0:
        if n <= AUTO_COMPLETE:
            return n - 1
        neighbors = 2 * math.ceil(1.5 * math.log2(n))
        if dropout > 0:
            from scipy.stats import binom

            while neighbors < n - 1 and n * binom.cdf(threshold(neighbors) - 1, neighbors + 1, 1 - dropout) > 1e-3:
                neighbors += 2
    k = neighbors + neighbors % 2  # Harary graphs with an even degree
    return n - 1 if k >= n - 1 else k


def threshold(k, t=0):
    """Shamir threshold within a closed neighbourhood of k + 1 clients: t, or a majority by default."""
    return t or (k + 1) // 2 + 1


def mask_graph(n, k, seed, rnd):
    """Each client's neighbours (sorted arrays of cohort indices): the Harary graph H(k, n) (client at ring
    position p linked to positions p ± 1 … k/2) under a random labelling drawn from (seed, round)."""
    if k >= n - 1:
        everyone = np.arange(n)
        return [np.delete(everyone, i) for i in range(n)]
    ring = np.random.default_rng(np.random.SeedSequence([seed, rnd, 0x6A5])).permutation(n)
    pos = np.empty(n, np.int64)
    pos[ring] = np.arange(n)
    offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
    return [np.sort(ring[(pos[i] + offsets) % n]) for i in range(n)]


def completes(graph, survivors, t, n_min):
    """The round can be unmasked: ≥ n_min survivors and t surviving holders for every client's secret."""
    alive = np.zeros(len(graph), bool)
    alive[list(survivors)] = True
    if alive.sum() < n_min:
        return False
    return all(alive[i] + alive[nb].sum() >= t for i, nb in enumerate(graph))


# -- the two sides' bookkeeping ---------------------------------------------------------------------

class Holder:
    """The shares one client holds for its neighbours; reveals at most one kind per owner and round."""

    def __init__(self):
        self.shares = {}    # owner → (y_sk, y_b)
        self.revealed = {}  # owner → kind

    def reveal(self, owner, kind):
        if self.revealed.setdefault(owner, kind) != kind:
            raise MpitrainError(f"secure aggregation: client asked for both kinds of share of client {owner}; "
                                "refusing (that would unmask its input)")
        return self.shares[owner][kind]


class ShareStore:
    """Rank 0's collected shares: for each client, shares of one kind only."""

    def __init__(self, t):
        self.t, self.kind, self.points = t, {}, {}

    def add(self, owner, kind, x, y):
        if self.kind.setdefault(owner, kind) != kind:
            raise MpitrainError(f"secure aggregation: received both kinds of share of client {owner}; refusing")
        self.points.setdefault(owner, {})[x] = y

    def reconstruct(self, owner, kind):
        pts = self.points.get(owner, {}) if self.kind.get(owner) == kind else {}
        if len(pts) < self.t:
            raise MpitrainError(f"secure aggregation: {len(pts)} of {self.t} shares of client {owner}")
        return shamir_reconstruct(sorted(pts.items()), self.t)


# -- the protocol over MPI ----------------------------------------------------------------------------

class SecureAggregator:
    """The round's secure sum of [ω_k·Δ_k | ω_k, ω_k·a_k, loss_k, samples_k, 1 (| b_k − ½) | c_k] over the
    surviving sampled clients, c_k the number of client k's coordinates clipped (it rides in the masked
    sum, so only the round's total is revealed).  `bounds(n)` gives per-slot bounds on |value| for a cohort
    of n (values are clipped to them before encoding) up to the count slot; `noise(k, rnd, n)` is client
    k's distributed DP noise share for the coordinates and the adaptive-clipping count slot, or None;
    `n_min(n)` the survivors a round needs (DP: the noise shares are calibrated to them)."""

    def __init__(self, comm, part, n_params, strategy, cfg, seed, bounds, noise=None, n_min=None, dropout=0.0,
                 clip=None, traces=None):
        """clip: R, each coordinate of Δ_k is clipped to ±R before weighting (fed.secagg.clip_range; None
        under DP, whose norm clip bounds the coordinates).  traces: the round's erase registry."""
        self.comm, self.part, self.n, self.strategy, self.seed = comm, part, n_params, strategy, seed
        self.clip = clip
        self.neighbors, self.t_cfg, self.dropout = cfg.neighbors, cfg.threshold, dropout
        self.bounds_for = lambda n: np.append(bounds(n), n_params)  # a client clips at most n_params values
        self.length = len(self.bounds_for(3))
        self.adaptive = self.length > n_params + N_STATS + 1
        self.noise, self.n_min = noise, n_min
        self.traces = Traces(False) if traces is None else traces
        self.host = np.zeros(part.clients, np.int64)
        from ..data.shard import block

        for r in range(1, comm.size):
            lo, hi = block(part.clients, comm.size - 1, r - 1)
            self.host[lo:hi] = r
        self.dump = os.environ.get("MPITRAIN_SECAGG_DUMP") if comm.rank == 0 else None

    def plan(self, n):
        """(k, t, n_min) for a cohort of n, or None when secure aggregation cannot run on it."""
        if n < 3:
            return None
        k = degree(n, self.neighbors, self.dropout)
        t = threshold(k, self.t_cfg)
        if t > k + 1:
            return None
        return k, t, max(t, self.n_min(n) if self.n_min else t)

    def check(self, n, where):
        """Start-up check for the (expected) cohort size: clear errors instead of rounds that never run."""
        if n < 3:
            raise MpitrainError(f"fed.secure_aggregation = true needs at least 3 sampled clients per round "
                                f"(the sum of 2 reveals each to the other); {where} samples {n}")
        k = degree(n, self.neighbors, self.dropout)
        t = threshold(k, self.t_cfg)
        if t > k + 1:
            raise MpitrainError(f"fed.secagg.threshold = {t}: expected ≤ {k + 1}, the clients sharing each "
                                f"secret (" + ("the sampled clients" if k == n - 1 else
                                               f"a client and its {k} neighbours") + f"; {where} samples {n})")
        bounds = self.bounds_for(n)[:self.n]
        if scales_for(bounds, n).min() < 2.0 ** 8:
            raise MpitrainError(f"fed.secure_aggregation: fixed-point precision below 8 bits for {n} clients "
                                f"(range ±{bounds.max():g} per coordinate); lower fed.secagg.clip_range or "
                                "sample fewer clients")

    # -- round -------------------------------------------------------------------------------------
    def begin(self, rnd, cohort, active):
        comm = self.comm
        self.rnd, self.cohort, self.bytes, self.store = rnd, np.asarray(cohort), 0, None
        n = len(cohort)
        plan = self.plan(n)
        self.skip = plan is None
        self.sum, self.included = np.zeros(self.length, np.uint32), []
        if self.skip:
            return False
        self.k, self.t, self.min_survivors = plan
        self.graph = mask_graph(n, self.k, self.seed, rnd)
        self.index = {int(c): i for i, c in enumerate(cohort)}
        self.local = np.flatnonzero(self.host[cohort] == comm.rank)
        act = np.zeros(n, bool)
        act[[self.index[int(c)] for c in active]] = True
        self.local_active = {int(i) for i in self.local if act[i]}
        self.bounds = self.bounds_for(n)
        self.scales = scales_for(self.bounds, n)

        # 1. AdvertiseKeys
        self.c_sk, self.s_sk, self.b = {}, {}, {}
        pub = []
        for i in self.local:
            (self.c_sk[i], cp), (self.s_sk[i], sp) = keypair(), keypair()
            self.b[i] = os.urandom(32)
            pub.append(cp + sp)
        table, _ = comm.gatherv(np.frombuffer(b"".join(pub), np.uint8))
        if comm.rank == 0:
            self.bytes += table.nbytes * comm.size  # in, then out to every client rank
            if table.size != 64 * n:
                raise MpitrainError(f"secure aggregation: {table.size // 64} public keys for {n} clients")
        table = comm.bcast_array(table if comm.rank == 0 else None, np.uint8).tobytes()
        self.c_pub = [table[64 * i:64 * i + 32] for i in range(n)]
        self.s_pub = [table[64 * i + 32:64 * i + 64] for i in range(n)]

        # 2. ShareKeys: Shamir shares of (s_u, b_u) for N[u], encrypted for each holder, routed via rank 0
        records = []
        for i in self.local:
            holders = np.sort(np.append(self.graph[i], i))
            xs = [int(h) + 1 for h in holders]
            ys_sk = shamir_share(private_bytes(self.s_sk[i]), xs, self.t)
            ys_b = shamir_share(self.b[i], xs, self.t)
            for h, ysk, yb in zip(holders, ys_sk, ys_b):
                records.append(struct.pack("<ii", i, h) + self._seal(i, int(h), elem(ysk) + elem(yb)))
        routed, counts = comm.gatherv(np.frombuffer(b"".join(records), np.uint8))
        send = recv_counts = None
        if comm.rank == 0:
            recs = routed.reshape(-1, SHARE_RECORD)
            holder = recs[:, 4:8].copy().view(np.int32).ravel()
            dest = self.host[self.cohort[holder]]
            order = np.argsort(dest, kind="stable")
            send = recs[order].ravel()
            recv_counts = np.bincount(dest, minlength=comm.size) * SHARE_RECORD
            self.bytes += 2 * routed.nbytes
        mine = comm.scatterv(send, recv_counts, np.uint8).reshape(-1, SHARE_RECORD)
        self.holders = {int(i): Holder() for i in self.local}
        for rec in mine:
            owner, h = struct.unpack("<ii", rec[:8].tobytes())
            plain = self._open(owner, h, rec[8:].tobytes())
            self.holders[h].shares[owner] = (int.from_bytes(plain[:ELEM], "big"),
                                             int.from_bytes(plain[ELEM:], "big"))
        return True

    def _nonce(self, owner, holder):
        return struct.pack("<iii", self.rnd, owner, holder)

    def _seal(self, owner, holder, plain):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        key = agree(self.c_sk[owner], self.c_pub[holder], SHARE_INFO)
        return ChaCha20Poly1305(key).encrypt(self._nonce(owner, holder), plain, self._nonce(owner, holder))

    def _open(self, owner, holder, sealed):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        key = agree(self.c_sk[holder], self.c_pub[owner], SHARE_INFO)
        try:
            return ChaCha20Poly1305(key).decrypt(self._nonce(owner, holder), sealed, self._nonce(owner, holder))
        except InvalidTag:
            raise MpitrainError(f"secure aggregation: share from client {owner} failed authentication") from None

    def contribution(self, k, delta, w, steps, loss, seen, below=None):
        """Client k's vector before masking: [ω·Δ | ω, ω·a, loss, samples, 1 (| b − ½) | c] (+ DP noise
        share), c the coordinates clipped: to ±R (fed.secagg.clip_range), and (with DP) a noised coordinate
        beyond its fixed-point bound, as encoding would clip it."""
        n, v = self.n, self.traces.add(np.empty(self.length, np.float64))
        v[:n] = delta
        clipped = clip_count(v[:n], self.clip) if self.clip is not None else 0
        v[:n] *= contribution_scale(self.strategy, w, steps)
        loss = min(float(loss), 64.0 * seen) if np.isfinite(loss) else 64.0 * seen
        v[n:n + N_STATS] = (w, w * steps, loss, seen, 1.0)
        if self.adaptive:  # adaptive clipping's count slot
            v[n + N_STATS] = float(below) - 0.5
        if self.noise is not None:
            z = self.noise(k, self.rnd, len(self.cohort))
            v[:n] += z[:n]
            v[n + N_STATS:-1] += z[n:]
            clipped += clip_count(v[:n], self.bounds[0])
        v[-1] = clipped
        return v

    def add(self, k, delta, w, steps, loss, seen, below=None):
        self.add_vector(k, self.contribution(k, delta, w, steps, loss, seen, below))

    def add_vector(self, k, values):
        """Encode, mask and add client k's vector to this rank's sum (mod 2^32)."""
        i = self.index[int(k)]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rnd, int(k), 0x5A]))
        y = encode(values, self.scales, self.bounds, rng, head=self.n, made=self.traces.add)
        y += prg(self.b[i], self.length, SELF_NONCE)
        for j in self.graph[i]:
            j = int(j)
            if j in self.local_active:  # both in this rank's sum: +m and −m cancel here
                continue
            m = prg(agree(self.s_sk[i], self.s_pub[j], MASK_INFO), self.length)
            if i < j:
                y += m
            else:
                y -= m
        self.sum += y
        self.included.append(i)

    def finish(self, stop, diverged):
        comm, L = self.comm, self.length
        vec = self.sum if self.included else np.zeros(0, np.uint32)
        masked, counts = comm.gatherv(vec)
        ids, id_counts = comm.gatherv(np.array([stop, diverged, *self.included], np.int64))
        survivors = None
        if comm.rank == 0:
            self.bytes += masked.nbytes + ids.nbytes
            starts = np.concatenate([[0], np.cumsum(id_counts)])
            stop, diverged = float(ids[starts[:-1]].sum()), float(ids[starts[:-1] + 1].sum())
            got = [int(x) for r in range(comm.size) for x in ids[starts[r] + 2:starts[r + 1]]]
            if self.dump:  # tests: exactly what rank 0 received in this round
                np.savez(f"{self.dump}-{self.rnd}.npz", masked=masked, counts=counts, ids=np.array(got, np.int64))
            total = np.zeros(L, np.uint32)
            for part in np.split(masked, np.cumsum(counts)[:-1]):
                if part.size:
                    total += part
            ok = not self.skip and completes(self.graph, got, self.t, self.min_survivors)
            survivors = np.array([ok, *got], np.int64)
        survivors = comm.bcast_array(survivors, np.int64)
        if comm.rank == 0:
            self.bytes += survivors.nbytes * (comm.size - 1)
        ok, alive = bool(survivors[0]), {int(x) for x in survivors[1:]}
        if not ok:  # too few clients sampled or surviving: the round is abandoned, nothing is unmasked
            return Result(np.zeros(self.n), stop=stop, diverged=diverged, skipped=True,
                          metrics={"survivors": len(alive)}) if comm.rank == 0 else None

        # 4. Unmasking: each surviving holder reveals one kind of share per neighbour
        records = []
        for v in sorted(self.local_active):
            for u in np.append(self.graph[v], v):
                u = int(u)
                kind = B if u in alive else SK
                y = self.holders[v].reveal(u, kind)
                records.append(struct.pack("<iiB", u, v, kind) + elem(y))
        revealed, _ = comm.gatherv(np.frombuffer(b"".join(records), np.uint8))
        if comm.rank != 0:
            return None
        self.bytes += revealed.nbytes
        store = self.store = ShareStore(self.t)
        for rec in revealed.reshape(-1, REVEAL_RECORD):
            u, v, kind = struct.unpack("<iiB", rec[:9].tobytes())
            store.add(u, kind, v + 1, int.from_bytes(rec[9:].tobytes(), "big"))
        for u in sorted(alive):
            total -= prg(store.reconstruct(u, B), L, SELF_NONCE)
        dropped = sorted(set(range(len(self.cohort))) - alive)
        for u in dropped:
            sk = private_key(store.reconstruct(u, SK))
            if public_bytes(sk) != self.s_pub[u]:
                raise MpitrainError(f"secure aggregation: the rebuilt key of client {u} does not match its "
                                    "public key")
            for v in self.graph[u]:
                v = int(v)
                if v in alive:
                    m = prg(agree(sk, self.s_pub[v], MASK_INFO), L)
                    if v < u:
                        total -= m
                    else:
                        total += m
        values = decode(total, self.scales)
        n = self.n
        s = values[n:]
        return Result(values[:n], *s[:N_STATS], stop=stop, diverged=diverged,
                      below=s[N_STATS] if self.adaptive else 0.0,
                      metrics={"survivors": len(alive), "dropped": len(dropped), "neighbors": self.k,
                               "threshold": self.t, "clipped": int(round(s[-1]))})
