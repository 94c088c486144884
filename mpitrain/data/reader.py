"""The stream plan's reader (shard.py's module docstring has the plan): a child process per rank that reads
and checks windows of blocks straight into two buffers it shares with its rank, while the rank's steps
compute.

Why a process and not a thread: h5py holds the GIL while HDF5 reads and decompresses, and the Numba kernels
hold it while they compute, so a reader thread ran in turns with the step rather than beside it (bench
stream: 0.89–0.94× the in-memory steps/s).  The child has its own interpreter; all the rank does for a window
is one line on a pipe each way.  The buffers are an unlinked file in /dev/shm mapped by both processes: HDF5
reads into them directly, and nothing about a window but its (epoch, index) and the child's answer (a row
count or an error's text, JSON) crosses the pipe — no pickling.

The child ignores SIGTERM, SIGUSR1 and SIGINT: its rank decides when a run stops (preempt.py) and checkpoints
first; the child ends when the rank closes the pipe, which its exit (or death) does."""
import json
import mmap
import os
import subprocess
import sys
import tempfile

import numpy as np

from ..errors import MpitrainError
from ..memory import status_bytes

# the child's program: the signals are ignored before anything slow is imported
CHILD = ("import signal as s; [s.signal(g, s.SIG_IGN) for g in (s.SIGTERM, s.SIGUSR1, s.SIGINT)]; "
         "from mpitrain.data.reader import main; main()")


def _shapes(data, rows, span, strata):
    """(shape, dtype) of a slot's x, y (labels, or regression targets) and order buffers."""
    return [((rows, data.n_features), np.float32), ((rows, *data.y_shape), data.y_dtype), ((span, strata), np.int64)]


def layout(data, rows, span, strata):
    """Byte offsets of the two slots' (x, y, order) buffers in the shared file, and its size (each buffer
    starts on a 64-byte boundary)."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in _shapes(data, rows, span, strata)]
    offsets, at = [], 0
    for size in sizes * 2:
        offsets.append(at)
        at += -(-max(size, 1) // 64) * 64
    return offsets, at


def views(buffer, data, rows, span, strata):
    """The two slots' (x, y, order) arrays on the shared mapping."""
    offsets, _ = layout(data, rows, span, strata)
    shapes = _shapes(data, rows, span, strata)
    arrays = [np.frombuffer(buffer, dtype, int(np.prod(shape)), at).reshape(shape)
              for at, (shape, dtype) in zip(offsets, shapes * 2)]
    return arrays[:3], arrays[3:]


class Blocks:
    """The rank's side of the reader, for a rank's strata of train/ and for a federated client's rows of
    partition/: strata j in `strata` are the rows bounds[j]…bounds[j+1]-1 of split/x, read a window (W blocks
    of K rows of every stratum) at a time into one of two buffers.  At most one read is in flight (`next`);
    `current` is the window the steps use."""

    def __init__(self, data, split, strata, block, window, rank):
        """strata: how many strata a window holds at most."""
        self.data, self.split, self.rank, self.block, self.window = data, split, rank, block, window
        self.span = block * window
        rows = strata * self.span
        shape = rows, self.span, strata
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory, not disk, where Linux has it
        with tempfile.TemporaryFile(dir=shm) as f:  # unlinked: nothing to clean up, whatever ends the run
            f.truncate(layout(data, *shape)[1])
            self.mapping = mmap.mmap(f.fileno(), layout(data, *shape)[1])
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(f.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(f.fileno(),), env=env)
        self.buffers = views(self.mapping, data, *shape)
        # the child's chunk cache (h5py's is 1 MiB by default) holds a window's chunks, so a chunk that two
        # blocks of a window share is decompressed once
        chunks = data.f[f"{split}/x"].chunks
        cache = max(2**20, rows * data.row_bytes)
        slots = max(521, 100 * (cache // ((chunks[0] if chunks else 1) * 4 * data.n_features))) | 1
        self._send(path=data.path, cache=[cache, slots], split=split, rank=rank, block=block, window=window,
                   shape=shape)
        self.next = self.current = None
        self.slot = 0  # the buffer of `current`
        self.peak_rss = 0  # the child's, in bytes, known once closed

    def _send(self, **message):
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._ended()

    def _ended(self):
        code = self.proc.wait()
        raise MpitrainError(f"{self.data.path}: the reader process of rank {self.rank} ended ("
                            + (f"killed by signal {-code})" if code < 0 else f"exit code {code}; its error is above)"))

    def _reply(self):
        """The answer to the read in flight: {"steps": n} or {"error": text}, received once."""
        epoch, w, slot, reply = self.next
        if reply is None:
            line = self.proc.stdout.readline()
            if not line:
                self._ended()
            reply = json.loads(line)
            self.next = epoch, w, slot, reply
        return reply

    def start(self, bounds, strata, positions, key):
        """Read these strata (at most the number given to __init__) from now on: a federated client after
        another.  The plan of (epoch, stratum j) is seeded by (*key, epoch, j); an epoch visits the first
        `positions` samples of each stratum's order."""
        self.settled()
        self.strata = strata
        self.positions = positions
        self._send(start=[[int(b) for b in bounds], [strata.start, strata.stop], int(positions), [int(k) for k in key]])
        self.next = self.current = None

    def settled(self):
        """The two window buffers, once a read in flight has finished (its error no longer matters): then
        nothing writes into them (fed.erase zeroes them after each client's work)."""
        if self.next is not None:
            try:
                self._reply()
            except MpitrainError:  # the child is gone: nothing writes into the buffers any more
                pass
        return [a for slot in self.buffers for a in slot[:2]]

    def submit(self, epoch, w):
        """Start reading window w of `epoch` into the buffer not in use."""
        slot = 1 - self.slot if self.current is not None else 0
        self._send(read=[int(epoch), int(w), slot])
        self.next = int(epoch), int(w), slot, None

    def take(self, epoch, w):
        """Window w of `epoch` as (x, y, rows), waiting for its read; the window before stays valid until
        prefetch()."""
        if self.next is None or self.next[:2] != (epoch, w):  # the first window, or a resumed run's
            self.settled()  # never two reads in flight
            self.current = None
            self.submit(epoch, w)
        reply, slot = self._reply(), self.next[2]
        self.next = self.current = None
        if "error" in reply:  # a bad block raises here, on its own rank
            raise MpitrainError(reply["error"])
        x, y, order = self.buffers[slot]
        self.current, self.slot = (epoch, w, x, y, order[:reply["steps"], :len(self.strata)]), slot
        return self.current[2:]

    def prefetch(self):
        """Start reading the window after the current one into the other buffer."""
        epoch, w = self.current[:2]
        self.submit(*((epoch, w + 1) if (w + 1) * self.span < self.positions else (epoch + 1, 0)))

    def close(self):
        """End the child; its peak resident memory (the windows it shares with the rank included) is then
        in peak_rss."""
        self.settled()
        self.proc.stdin.close()  # the child's signal to end: it answers with its peak memory
        line = self.proc.stdout.readline()
        self.peak_rss = json.loads(line)["peak_rss_bytes"] if line else 0
        self.proc.wait()
        self.proc.stdout.close()


class Reader:
    """The child's side: reads windows of the plan into the shared buffers and checks them."""

    def __init__(self, fd, path, cache, split, rank, block, window, shape):
        from .shard import DataFile

        self.data = DataFile(path, cache)
        self.split, self.rank, self.block, self.window = split, rank, block, window
        self.span = block * window
        self.dx, self.dy = self.data.f[f"{split}/x"], self.data.f[f"{split}/y"]
        self.mapping = mmap.mmap(fd, layout(self.data, *shape)[1])
        os.close(fd)
        self.buffers = views(self.mapping, self.data, *shape)

    def start(self, bounds, strata, positions, key):
        self.bounds, self.strata, self.positions, self.key = bounds, range(*strata), positions, tuple(key)
        self.orders = None, {}  # (epoch, {stratum: its block order}), drawn once an epoch

    def blocks(self, epoch, j):
        """Stratum j's block order in `epoch`: its full blocks permuted, the short one last."""
        if self.orders[0] != epoch:
            self.orders = epoch, {}
        if j not in self.orders[1]:
            size = self.bounds[j + 1] - self.bounds[j]
            rng = np.random.default_rng(np.random.SeedSequence([*self.key, epoch, j, 0xB10C]))
            order = rng.permutation(size // self.block)
            self.orders[1][j] = np.append(order, size // self.block) if size % self.block else order
        return self.orders[1][j]

    def _read(self, lo, hi, x, y):
        """Rows [lo, hi) into the first rows of x and y, with HDF5's own calls: a third of read_direct's time
        (its Python selections).  One read a block: a union of the window's blocks in one read is ~15×
        slower in HDF5 2.0 (measured: 199 ms against 11 ms for 256 blocks of 20 rows)."""
        from h5py import h5s

        for d, out in ((self.dx, x), (self.dy, y)):
            space = d.id.get_space()
            space.select_hyperslab((lo,) + (0,) * (out.ndim - 1), (hi - lo,) + out.shape[1:])
            d.id.read(h5s.create_simple((hi - lo,) + out.shape[1:]), space, out[:hi - lo])

    def read(self, epoch, w, slot):
        """Read and check window w of every stratum into the slot; its rows, positions × strata, go into the
        slot's order buffer.  Returns the number of positions."""
        x, y, order = self.buffers[slot]
        spans, ends, n = [], [], 0  # the window's blocks in file order; where each stratum's rows end
        for j in self.strata:
            for b in np.sort(self.blocks(epoch, j)[w * self.window:(w + 1) * self.window]):
                lo = self.bounds[j] + int(b) * self.block
                spans.append((lo, min(lo + self.block, self.bounds[j + 1])))
                n += spans[-1][1] - lo
            ends.append(n)
        self._each(spans, lambda lo, hi, at: self._read(lo, hi, x[at:], y[at:]))
        # the whole window checked at once; block by block only to name the first bad one
        if not self.data.fine(x[:n], y[:n]):
            self._each(spans, lambda lo, hi, at: self.data.check(x[at:at + hi - lo], y[at:at + hi - lo],
                                                                 self.split, lo, self.rank))
        steps = min(self.span, self.positions - w * self.span)
        for c, j in enumerate(self.strata):
            # SeedSequence pads its entropy with zeros, so window 0 is seeded as the in-memory plan's
            # stratum: a stratum that fits one window (W·K ≥ its size) is visited exactly as in memory
            rng = np.random.default_rng(np.random.SeedSequence([*self.key, epoch, j, w]))
            start = ends[c - 1] if c else 0
            order[:steps, c] = rng.permutation(ends[c] - start)[:steps] + start
        return steps

    def _each(self, spans, f):
        """f(lo, hi, at) for each block in file order (at: where its rows are in the window), naming the
        block in the error of a read that fails (e.g. a chunk that does not decompress); a check names it
        itself."""
        at = 0
        for lo, hi in spans:
            try:
                f(lo, hi, at)
            except OSError as exc:
                raise MpitrainError(f"{self.data.path}: {self.split} rows {lo}..{hi - 1} (rank {self.rank}): "
                                    f"cannot read ({' '.join(str(exc).split())})") from None
            at += hi - lo


def answer(message):
    """One line to the rank; a rank that has ended (an error elsewhere) ends the child quietly."""
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os._exit(0)


def main():
    """The child: one JSON line of set-up, then {"start": …} and {"read": [epoch, w, slot]} lines, each read
    answered by {"steps": n} or {"error": text}; at the end of its input it answers {"peak_rss_bytes": n}
    and ends."""
    try:
        reader = Reader(int(sys.argv[1]), **json.loads(sys.stdin.readline()))
    except MpitrainError as exc:  # the rank checked the same file, so only a file changed since gets here
        sys.exit(f"mpitrain: error: {exc}")
    for line in sys.stdin:
        message = json.loads(line)
        if "start" in message:
            reader.start(*message["start"])
            continue
        try:
            answer({"steps": reader.read(*message["read"])})
        except MpitrainError as exc:
            answer({"error": str(exc)})
    answer({"peak_rss_bytes": status_bytes("VmHWM")})  # not ru_maxrss: that would be the rank's peak
