"""How synchronous training keeps the ranks together: the [comm] options of one training step.

Every mode takes the step's buffer [gradient (n) | loss sum | hit count | flags] after backward and leaves
on every rank the summed scalars and the parameters the plain path would have produced.

  plain         one Allreduce(IN_PLACE) of the whole buffer
  overlap       the gradient in buckets of about comm.bucket_mb, cut at layer boundaries in reverse layer
                order: backward starts an Iallreduce on each bucket as soon as it has written it; the
                update waits for all of them
  hierarchical  Reduce to each node's (or comm.group_size block's) first rank, Allreduce among those
                leaders, Bcast inside the node: one inter-node message set per node, not per rank
  fp16, bf16    the gradient travels as 16-bit floats (scaled to the mean first, so fp16 does not
                overflow); summed in float32 and rounded back at every reduction stage
  topk          each rank sends its comm.topk_ratio·n largest entries of gradient + residual (indices and
                values, one Allgather); what it did not send stays in its residual (error feedback)
  sharded       ZeRO-1/2: Reduce_scatter the gradient, each rank updates its 1/p of the parameters with
                optimizer state for that part only, Allgatherv the parameters
  local_sgd     no gradient exchange: each rank steps on its own part of the batch and the parameters
                are averaged (Allreduce, weighted by each rank's share of the global batch) every
                comm.local_steps-th step of the run (counted across resumes) — and whenever the loop
                evaluates, checkpoints or stops, so that those see one model
  fsdp          ZeRO-3: each rank holds only its 1/p of the parameters, of the gradient and of the
                optimizer state; a unit's parameters (consecutive layers, at least comm.bucket_mb of them)
                are Allgathered just before its forward and again before its backward (the next unit's
                gather started while this one computes), and its gradient is Reduce_scattered as soon as
                backward has produced it

The scalars (loss, hits, flags) are summed exactly in every mode (a separate few-byte Allreduce where the
gradient does not travel as plain float32).  `seconds` counts this rank's time in these collectives,
`bytes` what it sends in them under bandwidth-optimal algorithms (ring_bytes).
"""
import time

import numpy as np

from .checkpoint import Parts
from .errors import MpitrainError
from .kernels import cpu


def make(cfg, comm, model):
    """The synchronisation of cfg.comm.mode for a model (its buffer: n gradient slots, then the scalars)."""
    c = cfg.comm
    if c.mode != "plain" and cfg.train.device != "cpu":
        raise MpitrainError(f"comm.mode = {c.mode!r} works on host buffers; with train.device = "
                            f"{cfg.train.device!r} use comm.mode = plain (one staged Allreduce per step)")
    n = model.n_params
    if c.mode == "overlap":
        return Overlap(comm, n, model.starts, c.bucket_mb)
    if c.mode == "hierarchical":
        return Hierarchical(comm, n, c.group_size)
    if c.mode in ("fp16", "bf16"):
        return Half(comm, n, c.mode == "bf16")
    if c.mode == "topk":
        return TopK(comm, n, c.topk_ratio)
    if c.mode == "sharded":
        return Sharded(comm, n)
    if c.mode == "local_sgd":
        return LocalSGD(comm, n, c.local_steps)
    if c.mode == "fsdp":
        tied = next((l for l in model.net if l.shares is not None), None)
        if tied is not None:  # its gradient lands in another unit's, which fsdp reduces once, unit by unit
            raise MpitrainError(f"comm.mode = 'fsdp': layer {tied.name} ({tied.text()}) shares the parameters of "
                                f"{tied.shares.name}, which fsdp cannot gather twice yet; use comm.mode = plain or "
                                "sharded (ZeRO-2)")
        return FSDP(comm, model, c.bucket_mb)
    return Plain(comm, n)


class Plain:
    ready = None  # overlap's backward hook

    def own(self, params):
        """The parameters the loop trains, from a full vector (fsdp keeps its shard of it)."""
        return params

    def init(self, model, seed):
        """What own(model.init_params(seed)) gives, made here without a full vector where the mode keeps
        only a shard (every rank draws the same seeded values: no broadcast needed)."""
        return self.own(model.init_params(seed))

    def full(self, params):
        """A full parameter vector on every rank, for evaluation (fsdp gathers one)."""
        return params

    def saved(self, params):
        """The parameters a checkpoint or model.h5 holds: the vector, or Parts of it (see gather_state)."""
        return params

    def bytes_per_rank(self, params, grad):
        """(parameter bytes, gradient bytes) this rank holds, from the live buffers."""
        return params.nbytes, grad.nbytes

    def gradient(self, buf):
        """Where backward writes the gradient: the first n slots of the step's buffer (fsdp: itself)."""
        return buf[:self.n]

    def __init__(self, comm, n):
        self.comm, self.n = comm, n
        self.slots = n  # gradient slots of the step's buffer (the scalars follow)
        self.part = slice(0, n)  # the parameters this rank updates (and keeps optimizer state for)
        self.due = False  # local_sgd: the loop evaluates or checkpoints after this step
        self.step = 0  # the global number of the last step reduced (a resumed loop starts it at its step)
        self.seconds, self.bytes, self.steps = 0.0, 0, 0
        self.frozen = 0  # train.freeze: gradient slots [0, frozen) no update reads (plain, hierarchical skip them)

    def reduce(self, buf, scale):
        """Sum the step's buffer over ranks (scale = 1 / global batch turns the gradient sum into a mean)."""
        self._timed(self._reduce, buf, scale)
        self.steps += 1
        self.step += 1

    def update(self, opt, params, grad, lr, scale, count):
        """The optimizer step on this rank's part, then whatever makes the parameters whole again."""
        opt.update(params, grad, lr, scale)

    def gather_state(self, state):
        """What a checkpoint holds of the optimizer state {"opt/NAME": vector} and of this mode's own state
        (rank 0's view is written): full vectors; sharded gathers its parts, and top-k and local SGD add
        every rank's own vectors as "ranks/NAME" rows (p × n)."""
        return state

    def restore(self, arrays, state):
        """The inverse on resume: this rank's part of each optimizer vector (and its own rows, when the
        checkpoint has them for this many ranks)."""
        for name, v in state.items():
            v[:] = arrays[f"opt/{name}"][self.part]

    def _gather_rows(self, vectors):
        """{"ranks/NAME": every rank's vector as one (p × n) array} on rank 0 (empty elsewhere)."""
        out = {}
        for name, v in vectors.items():
            rows, _ = self.comm.gatherv(v)
            if self.comm.rank == 0:
                out[f"ranks/{name}"] = rows.reshape(self.comm.size, -1)
        return out

    def _own_row(self, arrays, name):
        """This rank's row of "ranks/NAME" if the checkpoint was written by as many ranks, else None (a
        resume on another rank count starts that state from rank 0's vector or zeros: correct, not exact)."""
        rows = arrays.get(f"ranks/{name}")
        return rows[self.comm.rank] if rows is not None and len(rows) == self.comm.size else None

    def bind(self, buf):
        """The step buffer (overlap reduces its buckets while backward writes it)."""
        self.buf = buf

    def grad_sqnorm(self):
        """The squared L2 norm of the whole reduced gradient (summed over the ranks' parts where each holds
        one), in float64: train.clip_norm's norm is the full gradient's in every mode."""
        g = self.buf[:self.n]
        return float(np.einsum("i,i->", g, g, dtype=np.float64))

    def _timed(self, fn, *args):
        t = time.perf_counter()
        fn(*args)
        self.seconds += time.perf_counter() - t

    def _reduce(self, buf, scale):
        self._sum(buf[self.frozen:])

    def _sum(self, buf):
        self.comm.allreduce_sum(buf)
        self.bytes += ring_bytes(buf.nbytes, self.comm.size)


def ring_bytes(nbytes, p, kind="allreduce"):
    """Bytes one rank sends in a bandwidth-optimal collective on nbytes (the bus-bandwidth convention of
    `bench allreduce`): allreduce 2(p−1)/p·nbytes; reduce-scatter, allgather, reduce or broadcast of a
    vector of nbytes (p−1)/p·nbytes."""
    return (2 if kind == "allreduce" else 1) * (p - 1) * nbytes // p


class Overlap(Plain):
    def __init__(self, comm, n, offsets, bucket_mb):
        super().__init__(comm, n)
        # buckets from the top of the vector down (backward's order), closed at the first layer boundary
        # past bucket_mb; a layer larger than that is one bucket
        self.cuts, top, limit = [], n, max(1, int(bucket_mb * (1 << 20) / 4))
        for lo in sorted(offsets, reverse=True):
            if top - lo >= limit or lo == 0:
                self.cuts.append((lo, top))
                top = lo
        self.pending, self.next = [], 0

    def ready(self, lo):
        """Backward has written grad[lo:]: start the buckets that lie in it, and let MPI progress."""
        self._timed(self._advance, lo)

    def _advance(self, lo):
        self._start(lo)
        self.comm.progress(self.pending)

    def _start(self, lo):
        while self.next < len(self.cuts) and self.cuts[self.next][0] >= lo:
            a, b = self.cuts[self.next]
            self.pending.append(self.comm.iallreduce_sum(self.buf[a:b]))
            self.bytes += ring_bytes(4 * (b - a), self.comm.size)
            self.next += 1

    def _reduce(self, buf, scale):
        self._start(0)  # any bucket backward did not report (none from Model.loss_grad)
        self._sum(buf[self.n:])
        self.comm.waitall(self.pending)
        self.pending, self.next = [], 0


class Hierarchical(Plain):
    def __init__(self, comm, n, group_size):
        super().__init__(comm, n)
        self.node, self.leaders = comm.groups(group_size)

    def _reduce(self, buf, scale):
        buf = buf[self.frozen:]
        self.node.reduce_sum(buf)
        if self.leaders is not None:
            self.leaders.allreduce_sum(buf)
        self.node.bcast(buf)
        g, nb = self.node.size, buf.nbytes
        self.bytes += 2 * ring_bytes(nb, g, "reduce")
        if self.leaders is not None:
            self.bytes += ring_bytes(nb, self.leaders.size)


class Half(Plain):
    def __init__(self, comm, n, bf16):
        super().__init__(comm, n)
        self.bf16, self.wire = bf16, np.empty(n, np.uint16)

    def _reduce(self, buf, scale):
        g = buf[:self.n]
        g *= scale  # the mean gradient: fp16 holds it where the sum could overflow 65504
        cpu.encode16(g.view(np.uint32), self.wire, self.bf16)
        self.comm.allreduce_16(self.wire, self.bf16)
        cpu.decode16(self.wire, g.view(np.uint32), self.bf16)
        g *= 1.0 / scale
        self.bytes += ring_bytes(self.wire.nbytes, self.comm.size)
        self._sum(buf[self.n:])


class TopK(Plain):
    def __init__(self, comm, n, ratio):
        super().__init__(comm, n)
        self.k = max(1, min(n, round(ratio * n)))
        self.residual = np.zeros(n, np.float32)  # per rank (error feedback): checkpointed as rows
        self.mine = np.empty(2 * self.k, np.uint32)  # [indices | float32 bits of the values]
        self.all = np.empty((comm.size, 2 * self.k), np.uint32)

    def _reduce(self, buf, scale):
        g, k = buf[:self.n], self.k
        self.residual += g
        cpu.topk_select(self.residual, k, self.mine[:k], self.mine[k:].view(np.float32))
        self.comm.allgather(self.mine, self.all)
        g[:] = 0.0
        for row in self.all:
            cpu.scatter_add(g, row[:k], row[k:].view(np.float32))
        self.bytes += ring_bytes(self.all.nbytes, self.comm.size, "allgather")
        self._sum(buf[self.n:])

    def gather_state(self, state):
        return {**state, **self._gather_rows({"residual": self.residual})}

    def restore(self, arrays, state):
        super().restore(arrays, state)
        row = self._own_row(arrays, "residual")
        self.residual[:] = 0.0 if row is None else row


class Sharded(Plain):
    def __init__(self, comm, n):
        super().__init__(comm, n)
        p, r = comm.size, comm.rank
        self.displs = np.array([n * i // p for i in range(p)], np.int64)
        self.counts = np.diff(np.append(self.displs, n))
        self.part = slice(int(self.displs[r]), int(self.displs[r] + self.counts[r]))
        self.mine = np.empty(self.counts[r], np.float32)  # this rank's part of the summed gradient

    def _reduce(self, buf, scale):
        self.comm.reduce_scatter_sum(buf[:self.n], self.mine, self.counts)
        self.bytes += ring_bytes(4 * self.n, self.comm.size, "reduce_scatter")
        self._sum(buf[self.n:])

    def update(self, opt, params, grad, lr, scale, count):
        opt.update(params[self.part], self.mine, lr, scale)
        self._timed(self.comm.allgatherv_inplace, params, self.counts, self.displs)
        self.bytes += ring_bytes(4 * self.n, self.comm.size, "allgather")

    def grad_sqnorm(self):
        sq = np.array([np.einsum("i,i->", self.mine, self.mine, dtype=np.float64)])
        self.comm.allreduce_sum(sq)
        return float(sq[0])

    def gather_state(self, state):
        """Parts: the checkpoint gathers each vector onto rank 0 as it writes it."""
        return {name: Parts(self.comm, v) for name, v in state.items()}


class LocalSGD(Plain):
    def __init__(self, comm, n, every):
        super().__init__(comm, n)
        self.every = every

    def _reduce(self, buf, scale):
        self._sum(buf[self.n:])  # loss, hits and the stop/checkpoint flags stay exact and agreed
        self.flagged = bool(buf[self.n + 2:].any())

    def update(self, opt, params, grad, lr, scale, count):
        opt.update(params, grad, lr, 1.0 / count)  # this rank's own mean gradient (and optimizer state)
        if self.step % self.every == 0 or self.due or self.flagged:
            # weighted by this rank's share of the global batch (count · scale), not 1/p: with an uneven
            # split, local_steps = 1 is then the plain step exactly
            params *= np.float32(count * scale)
            self._timed(self._sum, params)

    def gather_state(self, state):
        return {**state, **self._gather_rows(state)}

    def restore(self, arrays, state):
        super().restore(arrays, state)  # rank 0's state, kept for a resume on another rank count
        for name, v in state.items():
            row = self._own_row(arrays, f"opt/{name}")
            if row is not None:
                v[:] = row


class FSDP(Sharded):
    """comm.mode = "fsdp" (module doc).  The flat vector is cut as in sharded mode (rank r owns
    [⌊rn/p⌋, ⌊(r+1)n/p⌋)).  The layers with parameters are grouped, bottom up, into units of consecutive
    layers of at least unit_mb (comm.bucket_mb; a smaller remainder at the top joins the unit below): each
    unit is one Allgatherv and one Reduce_scatter, so a stack of small layers does not pay a collective, and
    a wait for the slowest rank, per layer.  A unit's slice [a, b) spans some ranks' shards, so its
    Allgatherv takes from each rank the overlap of its shard with [a, b), in rank order, which is the slice
    itself.  The model sees this object instead of flat vectors (Model.loss_grad asks fetch(layer) for the
    parameters and grad_of(layer) for where to write the gradient, and ready(offset) after each layer's
    backward).  Memory: the shards, two gather buffers and one gradient buffer of the largest unit."""

    def __init__(self, comm, model, unit_mb):
        super().__init__(comm, model.n_params)
        self.slots = 0
        limit, groups = max(1, int(unit_mb * (1 << 20) / 4)), [[]]
        for l in model.with_params:
            if sum(x.n_params for x in groups[-1]) >= limit:
                groups.append([])
            groups[-1].append(l)
        if len(groups) > 1 and sum(x.n_params for x in groups[-1]) < limit:
            top = groups.pop()
            groups[-1] += top
        self.units = [(g[0].offset, g[-1].offset + g[-1].n_params) for g in groups]  # forward order
        self.unit_of = {l.offset: u for u, g in enumerate(groups) for l in g}
        self.plan = []
        r = comm.rank
        for a, b in self.units:
            lo, hi = np.maximum(self.displs, a), np.minimum(self.displs + self.counts, b)
            counts = np.maximum(hi - lo, 0)
            mine = slice(int(lo[r] - self.part.start), int(lo[r] - self.part.start + counts[r]))
            self.plan.append((counts, np.concatenate([[0], np.cumsum(counts)[:-1]]), mine))
        size = max(b - a for a, b in self.units)
        self.shard = np.zeros(self.counts[r], np.float32)
        self.gshard = self.mine  # this rank's part of the summed gradient, filled layer by layer
        self.bufs = [np.empty(size, np.float32), np.empty(size, np.float32)]
        self.gbuf = np.empty(size, np.float32)
        self.held = [None, None]  # the unit whose parameters each buffer holds
        self.pending = None  # (buffer, request) of the prefetch in flight
        self.split = {"allgather": 0.0, "reduce_scatter": 0.0}  # where `seconds` went (bench scaling)

    def own(self, params):
        self.shard[:] = params[self.part]
        return self

    def init(self, model, seed):
        self.shard = model.init_params(seed, self.part)
        return self

    def full(self, params):
        out = np.empty(self.n, np.float32)
        out[self.part] = self.shard
        return self.comm.allgatherv_inplace(out, self.counts, self.displs)

    def saved(self, params):
        return Parts(self.comm, self.shard)

    def bytes_per_rank(self, params, grad):
        return self.shard.nbytes, self.gshard.nbytes

    def gradient(self, buf):
        return self

    def _gather(self, i, j):
        """Start gathering unit i's parameters into buffer j."""
        counts, displs, mine = self.plan[i]
        self.held[j] = i
        self.bytes += ring_bytes(4 * int(counts.sum()), self.comm.size, "allgather")
        return self.comm.iallgatherv(self.shard[mine], self.bufs[j], counts, displs)

    def fetch(self, layer, down=False):
        """The layer's (W, b) views on its unit's gathered parameters, waited for; then the gather of the
        unit the pass needs next (up in forward, down in backward) is started, to overlap this one's compute."""
        t = time.perf_counter()
        i = self.unit_of[layer.offset]
        if self.pending is not None and self.held[self.pending[0]] == i:
            j, req = self.pending
            self.pending = None
            if req is not None:
                req.Wait()
        elif i in self.held:  # another layer of the unit, the top unit when backward starts, or the one below
            j = self.held.index(i)
        else:
            j = 1 - self.pending[0] if self.pending is not None else 0
            req = self._gather(i, j)
            if req is not None:
                req.Wait()
        nxt = i - 1 if down else i + 1
        if 0 <= nxt < len(self.units) and nxt not in self.held and self.pending is None:
            self.pending = (1 - j, self._gather(nxt, 1 - j))
        t = time.perf_counter() - t
        self.seconds += t
        self.split["allgather"] += t
        return layer.views(self.bufs[j], at=layer.offset - self.units[i][0])

    def grad_of(self, layer):
        if not layer.n_params:
            return None
        return layer.views(self.gbuf, at=layer.offset - self.units[self.unit_of[layer.offset]][0])

    def ready(self, offset):
        """Backward has written this layer's gradient: once its unit's lowest layer is done, Reduce_scatter
        the unit's gradient into this rank's shard."""
        u = self.unit_of[offset]
        if offset != self.units[u][0]:
            return  # the unit's layers below are still to come
        counts, _, mine = self.plan[u]
        t = time.perf_counter()
        self.comm.reduce_scatter_sum(self.gbuf[:int(counts.sum())], self.gshard[mine], counts)
        self.bytes += ring_bytes(4 * int(counts.sum()), self.comm.size, "reduce_scatter")
        t = time.perf_counter() - t
        self.seconds += t
        self.split["reduce_scatter"] += t

    def _reduce(self, buf, scale):
        self._sum(buf)  # the step's scalars; the gradient went layer by layer

    def update(self, opt, params, grad, lr, scale, count):
        opt.update(self.shard, self.gshard, lr, scale)
        self.held = [None, None]  # the gathered copies are stale now
