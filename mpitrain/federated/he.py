"""Homomorphic encryption of the federated aggregate: CKKS through TenSEAL (fed.encryption = "ckks").

Keys.  At the first round rank 1 (the first client rank) creates a CKKS context (fed.he: poly modulus
degree N, coefficient moduli, scale 2^scale_bits) with symmetric encryption and sends, as uint8 buffers in
one Scatterv rooted at rank 1 (never pickled):
  * rank 0 a secret-free copy: the encryption parameters only (no secret key: TenSEAL's is_private() is
    false there; symmetric contexts have no public key either), enough to add ciphertexts and multiply
    them by plaintexts;
  * every other client rank the full context with the secret key.
MPICH's Scatterv sends each rank its own part only (linear algorithm), so rank 0 never receives the secret
key.  Every client rank holds the key, so encryption is symmetric (with the secret key: about 3× faster
than public-key encryption, same ciphertext size, same RLWE security).  Trust model: the clients trust each
other with the key (any client rank can decrypt any ciphertext, as in NVFlare's HE filter); the aggregator
is honest but curious: it runs the protocol as written and may try to learn individual contributions from
what it receives.  The MPI transport between client ranks is assumed private (it carries the key once).

A round.  Each client rank sums its hosted clients' contributions in plaintext (they are on one trusted
rank), as in the plain path, into one float64 vector
    [Σ ω_k·Δ_k (n) | Σ loss_k, Σ samples_k (| Σ (b_k − ½) with adaptive clipping)]
(+ the clients' distributed DP noise shares), cuts it into chunks of N/2 values (the slot count) and
encrypts one packed ckks_vector per chunk: ONE encrypted vector per rank per round, whatever the number
of clients it hosts.  The stats [stop, diverged, Σω, Σω·a, Σclients] travel in plaintext (one float64
Gatherv): rank 0 needs Σω for the weighting, and all of them follow from the public partition table, the
round's cohort and the dropouts (drawn from train.seed), except which clients diverged (that stops the run).
The losses, sample counts and the adaptive-clipping count stay encrypted.

Rank 0 deserialises every rank's chunks (each one checked: it parses, has the expected size, scale, level
and encryption; else one error naming the client rank and the round, raised on every rank before anything
of the round is applied), adds them, and applies the weighting by one plaintext multiply per chunk:
1/D on the model slots (D = Σω, or the fixed m under DP), 1/T on the loss and sample slots (T = the public
bound Σ_k steps_k·batch_k of the round's samples, so that they stay in CKKS's range).  It never decrypts.
The encrypted weighted mean is then split into contiguous blocks of chunks, one block per client rank
(Scatterv); each client rank decrypts its block and the float64 plaintexts come back to rank 0 (Gatherv),
which runs the strategy's server step and the model Bcast as today.  Decision: the decrypted mean returns
to rank 0 rather than every client rank computing the server step, so the round loop, checkpoints and
model.h5 stay as they are.  What rank 0 sees is the aggregate, exactly what secure aggregation reveals, and
for the strategies allowed here (fedsgd, fedavg, fedprox, fednova, fedavgm) nothing more than the global
models it publishes anyway: their aggregate is a linear function of two (fedavgm: three) consecutive global
models.  The adaptive strategies (fedadam, fedyogi, fedadagrad) and the robust rules are refused
(config.py): their server step needs plaintext values beyond what the models reveal.

DP.  Client-level DP uses distributed noise, as with secure aggregation: every client adds its share
N(0, (z·C)²/n_min) before encryption, so the aggregate anyone decrypts already carries the full noise; a
round with fewer than n_min = ⌈2n/3⌉ survivors is skipped (nothing is decrypted).  Dropouts: the sum over
the survivors needs no recovery.

Range and precision (defaults N = 8192, [60, 40, 40], 2^40): a fresh ciphertext has the two data primes
(100 bits), the multiply and rescale leave the 60-bit prime with scale 2^40, so a decrypted slot must stay
below 2^(60−40−1) = 2^19 in magnitude (the weighted mean of Δ does; losses are clipped to 64 per sample
as in secure aggregation); errors ≈ 1e-8 absolute on the mean.

Not covered: integrity.  CKKS ciphertexts are malleable and unauthenticated; a client rank can send any
well-formed ciphertext (even one under another key, which decrypts to noise).  The checks catch transport
corruption and mismatched parameters, not a malicious client.  Tests: MPITRAIN_HE_CORRUPT=RANK:ROUND[:size]
makes that client rank garble (or shorten) its ciphertext in that round (1-based).
"""
import os
import struct

import numpy as np

from ..data.shard import block
from ..errors import MpitrainError
from .aggregation import Result, contribution_scale
from .strategies import local_schedule

KEY_RANK = 1  # the client rank that creates the context


def tenseal():
    """The tenseal module, or one clear error."""
    try:
        import tenseal as ts
    except ImportError:
        raise MpitrainError("fed.encryption = 'ckks' needs TenSEAL: pip install 'mpitrain[he]' "
                            "(or pip install 'tenseal>=0.3')") from None
    return ts


# -- keys ---------------------------------------------------------------------------------------------

def make_context(he):
    """A fresh private CKKS context (symmetric encryption) from the [fed.he] settings."""
    ts = tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, he.poly_modulus_degree, coeff_mod_bit_sizes=list(he.coeff_mod_bit_sizes),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    ctx.global_scale = 2.0 ** he.scale_bits
    return ctx


def public_bytes(ctx):
    """The secret-free copy of a context (rank 0's): parameters only, no secret, relin or Galois keys."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                         save_relin_keys=False)


def secret_bytes(ctx):
    """The full context with the secret key (the other client ranks')."""
    return ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                         save_relin_keys=False)


def load_context(buf, scale_bits):
    ts = tenseal()
    ctx = ts.context_from(bytes(buf), n_threads=1)
    ctx.global_scale = 2.0 ** scale_bits
    return ctx


# -- vectors ------------------------------------------------------------------------------------------

def chunk_sizes(length, slots):
    """The sizes of the ckks_vectors a vector of `length` values is cut into."""
    full, rest = divmod(length, slots)
    return [slots] * full + ([rest] if rest else [])


def encrypt(ctx, values, slots):
    """Serialised packed ckks_vectors of consecutive chunks of `slots` values (never ckks_tensor)."""
    ts = tenseal()
    values = np.asarray(values, np.float64)
    return [ts.ckks_vector(ctx, values[i:i + slots].tolist()).serialize()  # a list converts faster
            for i in range(0, len(values), slots)]


def pack(chunks):
    """A list of byte strings as one uint8 buffer: int64 count, int64 lengths, then the bytes."""
    head = struct.pack(f"<q{len(chunks)}q", len(chunks), *map(len, chunks))
    return np.frombuffer(head + b"".join(chunks), np.uint8)


def unpack(buf):
    """The byte strings of pack(); ValueError if the framing does not add up."""
    data = np.asarray(buf, np.uint8).tobytes()
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, no chunk count")
    (count,) = struct.unpack_from("<q", data)
    if not 0 <= count <= (len(data) - 8) // 8:
        raise ValueError(f"chunk count {count} in {len(data)} bytes")
    lengths = struct.unpack_from(f"<{count}q", data, 8)
    pos = 8 + 8 * count
    if min(lengths, default=0) < 0 or pos + sum(lengths) != len(data):
        raise ValueError(f"chunk lengths add up to {sum(lengths)} of {len(data) - pos} bytes")
    out = []
    for n in lengths:
        out.append(data[pos:pos + n])
        pos += n
    return out


def load_chunk(ctx, data, size, levels, where):
    """One received ciphertext, checked: it parses, holds `size` values, is a real (non-transparent)
    two-polynomial ciphertext at the fresh level and scale.  Errors are MpitrainError naming `where`."""
    ts = tenseal()
    try:
        v = ts.ckks_vector_from(ctx, data)
    except Exception as exc:  # TenSEAL raises ValueError / RuntimeError on a bad stream
        raise MpitrainError(f"{where} does not deserialise ({type(exc).__name__}: {exc})") from None
    if v.size() != size:
        raise MpitrainError(f"{where} holds {v.size()} values, expected {size}")
    cts = v.ciphertext()
    c = cts[0] if len(cts) == 1 else None
    if c is None or c.size() != 2 or c.is_transparent() or c.coeff_modulus_size() != levels \
            or not np.isclose(c.scale, ctx.global_scale, rtol=1e-9):
        raise MpitrainError(f"{where} is not a fresh ciphertext of this context (level, scale or size differs)")
    return v


def aggregate(ctx, uploads, sizes, levels, factors, rnd):
    """Σ over uploads [(client rank, [bytes per chunk])] of the decoded vectors, each chunk then multiplied
    by its plaintext factors (a float, or a list of len(chunk)); the encrypted result as CKKSVectors.
    Every upload is checked before the sum is returned: a bad one raises one MpitrainError naming the client
    rank and the round (1-based)."""
    acc = None
    for rank, chunks in uploads:
        where = f"fed.encryption: the ciphertext from client rank {rank} in round {rnd + 1}"
        if len(chunks) != len(sizes):
            raise MpitrainError(f"{where} has {len(chunks)} chunks, expected {len(sizes)}")
        vecs = [load_chunk(ctx, b, s, levels, f"{where} (chunk {i})") for i, (b, s) in enumerate(zip(chunks, sizes))]
        if acc is None:
            acc = vecs
        else:
            for a, v in zip(acc, vecs):
                a.add_(v)
    if acc is None:
        return None
    for a, f in zip(acc, factors):
        a.mul_(f)
    return acc


def decrypt(ctx, chunks):
    """The float64 values of serialised ciphertexts (needs the secret key)."""
    ts = tenseal()
    if not chunks:
        return np.zeros(0)
    return np.concatenate([np.asarray(ts.ckks_vector_from(ctx, b).decrypt(), np.float64) for b in chunks])


def corruption(rank):
    """MPITRAIN_HE_CORRUPT=RANK:ROUND[:size] (tests): {round (0-based): mode} for this client rank."""
    spec = os.environ.get("MPITRAIN_HE_CORRUPT", "")
    out = {}
    for item in filter(None, spec.split(",")):
        r, rnd, *mode = item.split(":")
        if int(r) == rank:
            out[int(rnd) - 1] = mode[0] if mode else "garble"
    return out


# -- the aggregator -----------------------------------------------------------------------------------

class HEAggregator:
    """The round's weighted mean under CKKS: begin / add / finish like the other aggregators (aggregation.py).

    dp: the ClientDP (distributed noise shares are added on the clients) or None."""

    def __init__(self, comm, part, n_params, f, t, dp=None, adaptive=False, traces=None):
        tenseal()  # one clear line on every rank when the extra is not installed
        self.comm, self.part, self.n, self.strategy, self.he = comm, part, n_params, f.strategy, f.he
        self.f, self.dp, self.adaptive = f, dp, adaptive
        self.length = n_params + 2 + int(adaptive)  # | loss, samples (| below)
        self.slots = f.he.poly_modulus_degree // 2
        self.sizes = chunk_sizes(self.length, self.slots)
        self.levels = len(f.he.coeff_mod_bit_sizes) - 1  # data primes of a fresh ciphertext
        self.limit = 2.0 ** (f.he.coeff_mod_bit_sizes[0] - f.he.scale_bits - 1)  # |a decrypted slot| (Range)
        self.samples_bound = np.array([np.prod(local_schedule(f, int(m))) for m in part.n_train], np.float64)
        self.ctx = None
        self.vec = np.zeros(self.length, np.float64)  # this rank's plaintext sum of a round
        self.scaled = np.zeros(n_params, np.float64)  # ω_k·Δ_k, here rather than in fresh temporaries
        if traces is not None:
            traces.hold(self.vec, self.scaled)
        self.setup_bytes = self.context_bytes = 0  # rank 0: the context copy it received (counted in round 1)
        self.corrupt = corruption(comm.rank) if comm.rank else {}
        if dp is not None and dp.sampling == "fixed":
            active = dp.cohort - int(np.floor(f.dropout_rate * dp.cohort + 1e-9))
            if active < dp.n_min(dp.cohort):
                raise MpitrainError(f"fed.encryption = 'ckks' with client-level DP: {active} of {dp.cohort} sampled "
                                    f"clients survive fed.dropout_rate = {f.dropout_rate:g}, fewer than the "
                                    f"{dp.n_min(dp.cohort)} the distributed noise is calibrated to; lower "
                                    "fed.dropout_rate")

    def setup(self):
        """Rank 1 makes the context; rank 0 gets the secret-free copy, the other client ranks the full one
        (one uint8 Scatterv rooted at rank 1)."""
        comm = self.comm
        send = counts = None
        if comm.rank == KEY_RANK:
            self.ctx = make_context(self.he)
            pub, sec = public_bytes(self.ctx), secret_bytes(self.ctx)
            send = np.frombuffer(pub + sec * (comm.size - 2), np.uint8)
            counts = [len(pub), 0] + [len(sec)] * (comm.size - 2)
        mine = comm.scatterv(send, counts, np.uint8, root=KEY_RANK)
        if comm.rank != KEY_RANK:
            self.ctx = load_context(mine, self.he.scale_bits)
        if comm.rank == 0:
            self.setup_bytes = self.context_bytes = mine.nbytes
            if self.ctx.is_private():  # by construction; a cheap guard of the trust model
                raise MpitrainError("fed.encryption: rank 0 received a context with a secret key")
        elif not self.ctx.is_private():
            raise MpitrainError(f"fed.encryption: client rank {comm.rank} received no secret key")

    def begin(self, rnd, cohort, active):
        if self.ctx is None:
            self.setup()
        self.rnd, self.cohort = rnd, np.asarray(cohort)
        self.active = np.asarray(active)
        self.bytes = self.setup_bytes
        self.setup_bytes = 0
        self.vec[:] = 0.0
        self.stats = np.zeros(4, np.float64)  # Σω, Σω·a, Σclients, coordinates beyond the range
        return True

    def add(self, k, delta, w, steps, loss, seen, below=None):
        n, v = self.n, self.vec
        # the mean is a convex combination of the Δ_k (FedNova: of Δ_k / a_k): it stays in range if each does
        lim = self.limit * (steps if self.strategy == "fednova" else 1.0)
        beyond = np.count_nonzero(delta > lim) + np.count_nonzero(delta < -lim)
        v[:n] += np.multiply(delta, contribution_scale(self.strategy, w, steps), out=self.scaled, dtype=np.float64)
        loss = min(float(loss), 64.0 * seen) if np.isfinite(loss) else 64.0 * seen
        v[n:n + 2] += (loss, seen)
        if self.adaptive:
            v[n + 2] += float(below) - 0.5
        if self.dp is not None:  # distributed noise: client k's share
            z = self.dp.share_noise(self.dp.key, k, self.rnd, len(self.cohort), n + int(self.adaptive), n)
            v[:n] += z[:n]
            if self.adaptive:
                v[n + 2] += z[n]
        self.stats += (w, w * steps, 1.0, beyond)

    def factors(self, weight):
        """Per chunk, the plaintext rank 0 multiplies by: 1/D on the model slots, 1/T on loss and samples,
        1/D on the adaptive count; (D, T) with them."""
        d = self.dp.m if self.dp is not None else weight
        d = d if d > 0 else 1.0
        t = max(1.0, float(self.samples_bound[self.active].sum()))
        scale = np.full(self.length, 1.0 / d)
        scale[self.n:self.n + 2] = 1.0 / t
        out, pos = [], 0
        for s in self.sizes:
            part = scale[pos:pos + s]
            out.append(float(part[0]) if np.all(part == part[0]) else part.tolist())
            pos += s
        return out, d, t

    def finish(self, stop, diverged):
        comm, n = self.comm, self.n
        included = self.stats[2] > 0
        data = np.zeros(0, np.uint8)
        if comm.rank and included and not self.stats[3]:  # out of range: nothing to encrypt (rank 0 refuses)
            values = self.vec
            mode = self.corrupt.get(self.rnd)
            if mode == "size":
                values = values[:-1]
            chunks = encrypt(self.ctx, values, self.slots)
            if mode == "garble":
                c = bytearray(chunks[0])
                c[len(c) // 2:len(c) // 2 + 64] = bytes(64)
                chunks[0] = bytes(c)
            data = pack(chunks)
        meta, _ = comm.gatherv(np.array([stop, diverged, *self.stats], np.float64))
        up, counts = comm.gatherv(data)
        code, message = 0, ""
        if comm.rank == 0:
            self.bytes += meta.nbytes + up.nbytes
            meta = meta.reshape(comm.size, 6)
            stop, diverged = float(meta[:, 0].sum()), float(meta[:, 1].sum())
            weight, weight_steps, clients, beyond = meta[:, 2:].sum(axis=0)
            uploads, pos = [], 0
            try:
                if beyond:  # CKKS would wrap them around: a wrong mean, silently
                    r = int(np.flatnonzero(meta[:, 5])[0])
                    first, scale = self.he.coeff_mod_bit_sizes[0], self.he.scale_bits
                    raise MpitrainError(f"fed.encryption: round {self.rnd + 1}: {int(beyond)} update coordinate(s) "
                                        f"(client rank {r} first) beyond CKKS's range ±2^{first - scale - 1} (fed.he:"
                                        f" first prime {first} bits − scale_bits {scale} − 1), "
                                        "which would decrypt wrapped around; the model is diverging (lower train.lr) "
                                        "or widen the range (a larger first prime in fed.he.coeff_mod_bit_sizes, or a "
                                        "smaller fed.he.scale_bits)")
                for r in range(1, comm.size):
                    part = up[pos:pos + counts[r]]
                    pos += counts[r]
                    if meta[r, 4] > 0 or part.size:
                        try:
                            chunks = unpack(part)
                        except ValueError as exc:
                            raise MpitrainError(f"fed.encryption: the ciphertext from client rank {r} in round "
                                                f"{self.rnd + 1} does not deserialise ({exc})") from None
                        uploads.append((r, chunks))
                factors, d, t = self.factors(weight)
                acc = aggregate(self.ctx, uploads, self.sizes, self.levels, factors, self.rnd)
            except MpitrainError as exc:
                code, message = 2, str(exc)
            if code == 0:
                noise_short = self.dp is not None and clients < self.dp.n_min(len(self.cohort))
                code = 1 if (diverged > 0 or acc is None or noise_short) else 0
        code = int(comm.bcast(np.array([code], np.int64))[0])
        if code == 2:  # every rank raises the same line; nothing of the round was applied
            message = comm.bcast_bytes(message.encode()).decode()
            raise MpitrainError(message, agreed=True)
        if comm.rank == 0:
            self.bytes += 8 * (comm.size - 1)
        if code == 1:  # nothing to decrypt: diverged (the run stops), no survivor, or too few for DP noise
            if comm.rank != 0:
                return None
            skipped = self.dp is not None and diverged == 0
            return Result(np.zeros(n), weight, weight_steps, 0.0, 0.0, clients, stop=stop, diverged=diverged,
                          skipped=skipped, metrics={"survivors": clients})

        # decryption: contiguous blocks of chunks, one per client rank, and the plaintexts back to rank 0
        send = send_counts = None
        if comm.rank == 0:
            blobs = [a.serialize() for a in acc]
            parts = [[] if r == 0 else blobs[slice(*block(len(blobs), comm.size - 1, r - 1))]
                     for r in range(comm.size)]
            packed = [pack(p) if p else np.zeros(0, np.uint8) for p in parts]
            send, send_counts = np.concatenate(packed), [p.size for p in packed]
            self.bytes += send.nbytes
        mine = comm.scatterv(send, send_counts, np.uint8)
        plain = decrypt(self.ctx, unpack(mine)) if mine.size else np.zeros(0)
        values, _ = comm.gatherv(plain)
        if comm.rank != 0:
            return None
        self.bytes += values.nbytes
        if values.size != self.length:
            raise MpitrainError(f"fed.encryption: {values.size} decrypted values in round {self.rnd + 1}, "
                                f"expected {self.length}")
        return Result(values[:n] * d, weight, weight_steps, values[n] * t, values[n + 1] * t, clients,
                      stop=stop, diverged=diverged, below=values[n + 2] * d if self.adaptive else 0.0,
                      metrics={"survivors": clients})
