"""The only module that imports mpi4py.  Buffer (upper-case) calls only: nothing is ever pickled.

Works at size 1 when a script is started without mpirun (MPI singleton init).
"""
import os
import sys
import time
import traceback

import numpy as np

from .errors import MpitrainError


def _mpi():
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        raise MpitrainError(
            f"mpi4py could not load an MPI library ({exc}); install the MPICH wheel with "
            "pip install 'mpitrain[mpi]', or build mpi4py against the site MPI (see README)") from None
    return MPI


class Comm:
    """A communicator with the few collectives mpitrain uses."""

    def __init__(self, raw=None):
        self.MPI = _mpi()
        self.raw = self.MPI.COMM_WORLD if raw is None else raw
        self.rank = self.raw.Get_rank()
        self.size = self.raw.Get_size()
        self._node = None
        self._ops = {}  # user-defined reduction operators, created on first use
        self._allreduce, self._in_place, self._sum = self.raw.Allreduce, self.MPI.IN_PLACE, self.MPI.SUM
        # MPITRAIN_COMM_TRACE=PREFIX: every rank logs each message it sends (op, dtype, shape, bytes)
        # to PREFIX.<rank>, the audit trail of what crosses ranks (tests check federated isolation with it)
        trace = os.environ.get("MPITRAIN_COMM_TRACE")
        self.trace = open(f"{trace}.{self.rank}", "a", encoding="utf-8") if trace and raw is None else None

    # -- hot path ------------------------------------------------------------------------------------
    def allreduce_sum(self, buf):
        """In-place global sum of a contiguous array (the flat gradient)."""
        if self.trace:
            self._note("Allreduce", buf)
        if self.size > 1:
            self._allreduce(self._in_place, buf, self._sum)  # bound once: this wrapper costs ~0.2 µs
        return buf

    def reduce_sum(self, buf, root=0):
        """Sum of a contiguous array onto `root` (in place there; other ranks' buffers are unchanged)."""
        if self.trace:
            self._note("Reduce", buf)
        if self.size > 1:
            send = self.MPI.IN_PLACE if self.rank == root else buf
            self.raw.Reduce(send, buf if self.rank == root else None, op=self.MPI.SUM, root=root)
        return buf

    # -- the communication options of synchronous training (sync.py) ----------------------------------
    def iallreduce_sum(self, buf):
        """Start an in-place global sum of a contiguous array; returns the request."""
        if self.trace:
            self._note("Iallreduce", buf)
        return self.raw.Iallreduce(self._in_place, buf, self._sum)

    def progress(self, requests):
        """Let MPI advance outstanding nonblocking collectives (MPICH progresses them inside MPI calls)."""
        self.MPI.Request.Testall(requests)

    def waitall(self, requests):
        self.MPI.Request.Waitall(requests)

    def allreduce_16(self, wire, bf16):
        """In-place global sum of 16-bit floats (uint16 bits; binary16, or bfloat16 if bf16): a user-defined
        MPI operator adds in float32 and rounds back, at every stage of the reduction."""
        if self.trace:
            self._note("Allreduce-bf16" if bf16 else "Allreduce-fp16", wire)
        if self.size > 1:
            key = "bf16" if bf16 else "fp16"
            if key not in self._ops:
                from .kernels.cpu import sum16

                def op(a, b, _type, bf16=bf16):
                    sum16(np.frombuffer(a, np.uint16), np.frombuffer(b, np.uint16), bf16)

                self._ops[key] = self.MPI.Op.Create(op, commute=True)
            self.raw.Allreduce(self._in_place, [wire, self.MPI.UINT16_T], self._ops[key])
        return wire

    def allgather(self, mine, out):
        """out (size × len(mine)) ← every rank's equal-length array, in rank order."""
        if self.trace:
            self._note("Allgather", mine)
        if self.size > 1:
            self.raw.Allgather(mine, out)
        else:
            out[:] = mine
        return out

    def reduce_scatter_sum(self, buf, out, counts):
        """out ← this rank's part of the global sum of buf, cut into consecutive parts of `counts`."""
        if self.trace:
            self._note("Reduce_scatter", buf)
        if self.size > 1:
            self.raw.Reduce_scatter(buf, out, counts, self._sum)
        else:
            out[:] = buf
        return out

    def allgatherv_inplace(self, buf, counts, displs):
        """Every rank's part of buf (counts[r] values from displs[r], this rank's filled in) → all of buf."""
        if self.trace:
            self._note("Allgatherv", buf[:counts[self.rank]])
        if self.size > 1:
            self.raw.Allgatherv(self.MPI.IN_PLACE, [buf, counts, displs, self.MPI.FLOAT])
        return buf

    def iallgatherv(self, mine, buf, counts, displs):
        """Start gathering every rank's `mine` (counts[r] float32 values) into buf at displs[r]; returns
        the request, or None when there is nothing to wait for (one rank)."""
        if self.trace:
            self._note("Iallgatherv", mine)
        if self.size == 1:
            buf[:len(mine)] = mine
            return None
        return self.raw.Iallgatherv(mine, [buf, counts, displs, self.MPI.FLOAT])

    def groups(self, group_size=0):
        """(my group, the group leaders) for two-level collectives: groups are the shared-memory nodes
        (group_size 0) or blocks of group_size consecutive ranks (to emulate nodes on one machine); the
        leaders' communicator (each group's rank 0) is None on the other ranks."""
        group = Comm(self.raw.Split(self.rank // group_size, self.rank)) if group_size else self.node()
        color = 0 if group.rank == 0 else self.MPI.UNDEFINED
        leaders = self.raw.Split(color, self.rank)
        return group, (Comm(leaders) if leaders != self.MPI.COMM_NULL else None)

    def grid(self, tensor):
        """(tensor group, data group) of the data × tensor grid of parallel.tensor = T: ranks r with the
        same r // T form a tensor group (T contiguous ranks: the chattiest traffic stays inside a node),
        ranks with the same r % T a data group.  Rank r is rank r % T of its tensor group and r // T of its
        data group; rank 0 is rank 0 of both.  T = 1: this rank alone, and this communicator."""
        if tensor < 1 or self.size % tensor:
            divisors = ", ".join(str(d) for d in range(1, self.size + 1) if self.size % d == 0)
            raise MpitrainError(f"parallel.tensor = {tensor} does not divide the {self.size} rank(s) of this run: "
                                f"expected one of {divisors}")
        if tensor == 1:
            return Comm(self.MPI.COMM_SELF), self
        return (Comm(self.raw.Split(self.rank // tensor, self.rank)),
                Comm(self.raw.Split(self.rank % tensor, self.rank)))

    # -- start-up, evaluation, bookkeeping ------------------------------------------------------------
    def bcast(self, buf, root=0):
        """In-place broadcast of a contiguous array."""
        if self.trace and self.rank == root:
            self._note("Bcast", buf)
        if self.size > 1:
            self.raw.Bcast(buf, root=root)
        return buf

    def _note(self, op, buf):
        self.trace.write(f"{op} {buf.dtype} {'x'.join(map(str, buf.shape))} {buf.nbytes}\n")
        self.trace.flush()

    def allreduce(self, values, op="sum"):
        """Reduce a few numbers (float64) across ranks; op is sum, min or max."""
        buf = np.array(values, dtype=np.float64)
        if self.trace:
            self._note(f"Allreduce-{op}", buf)
        if self.size > 1:
            mpi_op = {"sum": self.MPI.SUM, "min": self.MPI.MIN, "max": self.MPI.MAX}[op]
            self.raw.Allreduce(self.MPI.IN_PLACE, buf, op=mpi_op)
        return buf

    def allgather_int(self, value):
        """Every rank's integer, as an int64 array indexed by rank."""
        out = np.full(self.size, value, dtype=np.int64)
        if self.trace:
            self._note("Allgather", out[:1])
        if self.size > 1:
            self.raw.Allgather(np.array([value], np.int64), out)
        return out

    # -- variable-size buffers (federated protocols: keys, shares, per-client updates) -----------------
    def gatherv(self, buf, root=0):
        """Every rank's 1-D array (any length, one dtype everywhere) onto `root`, in rank order: one Gather
        of the int64 counts, then one Gatherv.  Returns (concatenation, counts) on root, (None, None)
        elsewhere."""
        buf = np.ascontiguousarray(buf)
        if self.trace:
            self._note("Gather", np.zeros(1, np.int64))
            self._note("Gatherv", buf)
        if self.size == 1:
            return buf.copy(), np.array([buf.size], np.int64)
        counts = np.zeros(self.size, np.int64) if self.rank == root else None
        self.raw.Gather(np.array([buf.size], np.int64), counts, root=root)
        if self.rank != root:
            self.raw.Gatherv(buf, None, root=root)
            return None, None
        out = np.empty(int(counts.sum()), buf.dtype)
        self.raw.Gatherv(buf, [out, counts], root=root)
        return out, counts

    def scatterv(self, buf, counts, dtype, root=0):
        """Rank r receives buf[sum(counts[:r]) : sum(counts[:r+1])] of root's 1-D array: one Scatter of the
        int64 counts, then one Scatterv.  buf and counts matter on root only; returns this rank's part."""
        if self.trace and self.rank == root:
            self._note("Scatter", np.zeros(self.size, np.int64))
            self._note("Scatterv", np.ascontiguousarray(buf))
        if self.size == 1:
            return np.ascontiguousarray(buf, dtype).copy()
        mine = np.zeros(1, np.int64)
        send = np.ascontiguousarray(counts, np.int64) if self.rank == root else None
        self.raw.Scatter(send, mine, root=root)
        out = np.empty(int(mine[0]), dtype)
        if self.rank == root:
            self.raw.Scatterv([np.ascontiguousarray(buf, dtype), send], out, root=root)
        else:
            self.raw.Scatterv(None, out, root=root)
        return out

    def bcast_array(self, buf, dtype, root=0):
        """Broadcast root's 1-D array of any length (length first); other ranks pass None."""
        if self.size == 1:
            return np.ascontiguousarray(buf, dtype)
        n = np.array([buf.size if self.rank == root else 0], np.int64)
        if self.trace and self.rank == root:
            self._note("Bcast", n)
            self._note("Bcast", np.ascontiguousarray(buf, dtype))
        self.raw.Bcast(n, root=root)
        out = np.ascontiguousarray(buf, dtype) if self.rank == root else np.empty(int(n[0]), dtype)
        self.raw.Bcast(out, root=root)
        return out

    def bcast_bytes(self, data, root=0):
        """Broadcast a byte string as two buffers (length, bytes)."""
        if self.size == 1:
            return data
        if self.trace and self.rank == root:
            self._note("Bcast-bytes", np.frombuffer(data, np.uint8))
        n = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self.raw.Bcast(n, root=root)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.raw.Bcast(buf, root=root)
        return buf.tobytes()

    def barrier(self):
        if self.size > 1:
            self.raw.Barrier()

    def node(self):
        """The ranks sharing this node's memory (a sub-communicator), created once."""
        if self._node is None:
            self._node = self if self.size == 1 else Comm(self.raw.Split_type(self.MPI.COMM_TYPE_SHARED))
        return self._node

    def agree(self, fn, *args, **kwargs):
        """Run fn on every rank.  If any rank raises MpitrainError, every rank raises the error of the
        lowest failing rank, marked agreed, so it is printed once and no rank is left waiting."""
        try:
            result, message = fn(*args, **kwargs), None
        except MpitrainError as exc:
            result, message = None, str(exc)
        if self.size == 1:
            if message is not None:
                raise MpitrainError(message, agreed=True)
            return result
        first = np.array([self.rank if message is not None else self.size], dtype=np.int64)
        if self.trace:
            self._note("Allreduce-min", first)
        self.raw.Allreduce(self.MPI.IN_PLACE, first, op=self.MPI.MIN)
        first = int(first[0])
        if first < self.size:
            text = self.bcast_bytes(message.encode() if self.rank == first else b"", root=first).decode()
            raise MpitrainError(text, agreed=True)
        return result

    def abort(self, code, message):
        """Print `message` on stderr and end every rank of the job with `code`.  The message goes out in
        one write, and Abort waits a moment: hydra's proxy drops what it has not yet read from this rank's
        pipe once the abort reaches it (CI saw a traceback cut after its first line)."""
        sys.stderr.flush()
        os.write(2, message.encode(errors="replace"))
        time.sleep(0.5)
        self.raw.Abort(code)


def report_error(comm, exc):
    """Print a bad-input error as one line; returns the exit code (2).  An error only this rank saw
    aborts the whole job so that no other rank waits forever in a collective."""
    if comm is None or comm.size == 1 or exc.agreed:
        if comm is None or comm.rank == 0:
            print(f"mpitrain: error: {exc}", file=sys.stderr, flush=True)
        return 2
    comm.abort(2, f"mpitrain: error on rank {comm.rank}: {exc}\n")
    return 2


def install_abort_hook(comm):
    """An uncaught exception on any rank prints the rank and traceback, then aborts the whole MPI job
    (as ``python -m mpi4py`` does) instead of leaving the other ranks in a collective forever."""
    def hook(etype, value, tb):
        text = f"mpitrain: rank {comm.rank} of {comm.size} failed:\n" + "".join(
            traceback.format_exception(etype, value, tb))
        if comm.size > 1:
            comm.abort(1, text)  # does not return
        sys.stderr.write(text)

    sys.excepthook = hook
