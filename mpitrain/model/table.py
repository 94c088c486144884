"""The parameter table: every named tensor of a model with its place in the one flat float32 vector.

Layers declare their tensors (base.Param: name, shape, init rule, weight decay, tensor split); the table
lays them out in layer order — a block's tensors are one contiguous range, the natural unit of fsdp — and
is what everything outside the model reads: the initial values, AdamW's decay mask, names for export and
messages.  Gradients and optimizer state share the layout."""
from dataclasses import dataclass

import numpy as np

from .base import Param

INIT_CHUNK = 1 << 16  # values drawn at a time: the generator's stream is the same in chunks


@dataclass(frozen=True)
class Entry:
    name: str
    param: Param
    offset: int

    @property
    def size(self):
        return self.param.size


class ParameterTable:
    def __init__(self, layers, state=False):
        """The trainable tensors of layers (a model's top level), or with state=True the non-trainable ones
        (BatchNorm running statistics) of the model's state vector."""
        self.entries = []
        for layer in layers:
            for l in layer.layers():
                if state and l.state_size:
                    o = l.state_offset
                    for p in l.state_entries():
                        self.entries.append(Entry(f"{l.name}.{p.name}", p, o))
                        o += p.size
            if not state and layer.n_params:
                o = layer.offset
                for name, p in layer.entries():
                    self.entries.append(Entry(name, p, o))
                    o += p.size
        self.size = sum(e.size for e in self.entries)
        self.by_name = {e.name: e for e in self.entries}

    def __iter__(self):
        return iter(self.entries)

    def view(self, flat, name):
        e = self.by_name[name]
        return flat[e.offset:e.offset + e.size].reshape(e.param.shape)

    def decay_mask(self, groups=("weight",)):
        """1 where AdamW's weight decay applies: the tensors of those groups (by default the weights of dense,
        conv and attention projections; not biases, norms and embeddings), 0 elsewhere."""
        mask = np.zeros(self.size, np.uint8)
        for e in self.entries:
            mask[e.offset:e.offset + e.size] = e.param.group in groups
        return mask

    def init(self, seed, part=None):
        """The initial vector (or its entries in `part`, a slice, made without the rest): each tensor by its
        rule, the random ones drawn in table order from one generator seeded by seed, chunk by chunk — the
        values of a full draw, whichever part is kept."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1417]))
        part = part or slice(0, self.size)
        flat = np.zeros(part.stop - part.start, np.float32)
        for e in self.entries:
            rule, *args = e.param.init
            lo, hi = max(e.offset, part.start), min(e.offset + e.size, part.stop)
            if rule == "ones" and lo < hi:
                flat[lo - part.start:hi - part.start] = 1.0
            if rule not in ("uniform", "normal"):
                continue
            for c in range(e.offset, e.offset + e.size, INIT_CHUNK):  # drawn, kept or not
                n = min(INIT_CHUNK, e.offset + e.size - c)
                values = rng.uniform(-args[0], args[0], n) if rule == "uniform" else rng.normal(0.0, args[0], n)
                lo, hi = max(c, part.start), min(c + n, part.stop)
                if lo < hi:
                    flat[lo - part.start:hi - part.start] = values[lo - c:hi - c]
        return flat

    def lines(self):
        """One line per tensor (name, shape, offset, group), for messages and reading a model."""
        return [f"{e.name:40s} {'×'.join(map(str, e.param.shape)):>14s}  @{e.offset:<10d} {e.param.group}"
                for e in self.entries]
