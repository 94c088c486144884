"""Trace erasure (fed.erase, on by default): zero what a client's data left in this rank's memory.

A client rank holds, while it works for a client, that client's rows (features and labels), the batches
cut from them, the model's activations, the local model, its optimizer state, the gradient and the
update; the aggregator holds the individual updates a robust rule gathers.  Each such buffer is
registered once with a Traces and zeroed by one wipe(): a client's Traces when its work in the round
ends (training, or scoring its local test split), the round's Traces (what the aggregator held of the
individual contributions) when the round has been aggregated, and both when federate returns or raises.
Arrays made anew during a piece of work (a client's rows as read from the file, the update Client.train
returns, its clipped or attacked copy, flipped labels) are added as they appear and let go at the next
wipe.  What this cannot reach is listed in
docs/privacy.md (copies NumPy, BLAS, h5py, MPI or TenSEAL make internally, the page cache, swap).
"""


class Traces:
    """Buffers that hold traces of client data on this rank; `with traces:` wipes them when the block
    ends, normally or by an exception."""

    def __init__(self, on):
        self.on, self.sources, self.made = on, [], []

    def hold(self, *sources):
        """Buffers zeroed at every wipe: arrays, or callables that return the arrays an object holds at
        that moment (the model's per-batch-size buffers appear as batch sizes occur)."""
        self.sources += sources

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
            for a in self.made:
                a[:] = 0
        self.made.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wipe()
        return False
