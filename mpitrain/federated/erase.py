"""Trace erasure (fed.erase, on by default): zero what a client's data left in this rank's memory.

A client rank holds, while it works for a client, that client's rows (features and labels), the batches
cut from them, the model's activations, the local model, its optimizer state, the gradient and the
update; the aggregator holds the individual updates a robust rule gathers.  Every such array goes
through a Traces registry, in one of three ways, so that none can be let go unseen:
  hold(a)           a buffer that lives as long as its owner and is never replaced (the local model);
  buffer(name, m)   a reused buffer the registry itself allocates, and grows: the one it replaces is
                    zeroed first (DP-SGD's Poisson batches vary in size, so a batch buffer grows mid-run);
  add(a)            an array made during one piece of work (a client's rows as read from the file, the
                    update Client.train returns, its clipped or attacked copy, flipped labels, a round's
                    gathered updates), zeroed at the next wipe and only then let go.
One wipe() zeroes them all: a client's Traces when its work in the round ends (training, or scoring its
local test split), the round's Traces (what the aggregator held of the individual contributions) when the
round has been aggregated, and both when federate returns or raises.  What this cannot reach is listed in
docs/privacy.md (copies NumPy, BLAS, h5py, MPI or TenSEAL make internally, the page cache, swap).
"""
import numpy as np


class Traces:
    """Buffers that hold traces of client data on this rank; `with traces:` wipes them when the block
    ends, normally or by an exception.  With on = False nothing is zeroed (buffers are still reused)."""

    def __init__(self, on):
        self.on, self.sources, self.made, self.owned = on, [], [], {}

    def hold(self, *sources):
        """Buffers zeroed at every wipe: arrays, or callables that return the arrays an object holds at
        that moment (the model's per-batch-size buffers appear as batch sizes occur)."""
        self.sources += sources

    def buffer(self, name, rows, shape=(), dtype=np.float32):
        """The first `rows` rows of the registry's buffer `name` (rows × shape, reused across calls).  A
        larger request replaces it by a new one, after zeroing the old: the only way a buffer is let go."""
        a = self.owned.get(name)
        if a is None or len(a) < rows:
            if a is not None and self.on:
                a[:] = 0
            a = self.owned[name] = np.empty((rows, *shape), dtype)
        return a[:rows]

    def add(self, array):
        """An array made during this piece of work: zeroed at the next wipe, then let go.  Returns it."""
        if self.on:
            self.made.append(array)
        return array

    def wipe(self):
        if self.on:
            for source in self.sources:
                for a in (source() if callable(source) else (source,)):
                    a[:] = 0
            for a in (*self.owned.values(), *self.made):
                a[:] = 0
        self.made.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wipe()
        return False
