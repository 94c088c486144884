"""Tensor parallelism, [parallel] tensor = T: Megatron-LM's layer split, for dense and conv stacks.

The ranks form a data × tensor grid (Comm.grid: T contiguous ranks per tensor group).  The ranks of a
tensor group share every step's samples, and each holds only its slice of every layer's parameters, as its
own flat float32 vector with per-layer views: the layer library's layers, built at their local sizes, do
the math.  Down the stack, an activation is whole on every rank of the group or split over it along its
last axis (features, or the channels of an NHWC map), and each layer with parameters is

  column  (whole input) this rank's share of the outputs (dense) or output channels (conv), activation
          included: no communication forward; backward sums dL/dinput over the group (one Allreduce)
  row     (split input) every output from this rank's inputs (features, or input channels of a conv),
          summed over the group (one Allreduce) before the bias and the activation; backward needs none
  whole   the last layer with parameters when its input is whole (the classifier after an even number of
          dense layers: the odd one out), replicated on every rank of the group: the logits are then whole
          without gathering them, and a classifier is small

so a column → row pair costs one Allreduce of its output forward and one of its input gradient backward.
Pooling and flatten act per channel, on the split map as it is; a dense after a flattened split map is a
row layer over the input features this rank holds.  Row biases and whole layers are replicated: every rank
of the group computes the same gradient for them from the same dL/dz, so they stay identical.  The data
group's gradient exchange (sync.py, on the data communicator) sees only this rank's vector.

Checkpoints and model.h5 hold full vectors: Grid.take cuts this rank's vector out of a full one (start,
resume from any layout), Grid.full and Grid.saved put the group's vectors back together.
"""
import time

import numpy as np

from .checkpoint import Parts
from .errors import MpitrainError
from .kernels.cpu import IDENTITY
from .model import Model
from .model.base import Sequence
from .model.layers import Conv, Dense, Flatten, Pool
from .sync import ring_bytes

MODES = ("plain", "sharded", "fsdp")  # data-group exchanges that treat every slot alike (replicas stay equal)


class Grid:
    """The data × tensor layout of a training run: the tensor and data groups (tp, dp), the model the steps
    run (a TensorModel, or the full model when T = 1) and the conversions between this rank's vectors and
    full ones (identities when T = 1)."""

    def __init__(self, cfg, comm, model):
        T = cfg.parallel.tensor
        if T > 1 and cfg.train.device != "cpu":
            raise MpitrainError(f"parallel.tensor = {T} works on host buffers; with train.device = "
                                f"{cfg.train.device!r} use parallel.tensor = 1")
        if T > 1 and cfg.comm.mode not in MODES:
            raise MpitrainError(f"comm.mode = {cfg.comm.mode!r} with parallel.tensor = {T}: over the data group "
                                f"tensor parallelism combines with comm.mode = {', '.join(MODES)} only")
        self.tp, self.dp = comm.grid(T)
        self.T, self.n, self.model = T, model.n_params, model
        other = next((l for l in model.net if not l.tensor), None)
        if T > 1 and other is not None:
            raise MpitrainError(f"parallel.tensor = {T}: layer {other.name} ({other.text().split()[0]}) cannot be "
                                "split yet (tensor parallelism splits dense layers on flat features, conv, pooling "
                                "and flatten); use parallel.tensor = 1")
        if T > 1:
            self.nets = [split(model.net, T, t) for t in range(T)]
            self.counts = np.array([sum(l.n_params for _, _, l, _ in net) for net in self.nets], np.int64)
            self.model = TensorModel(model.spec, self.nets[self.tp.rank], self.tp)

    def take(self, full):
        """This rank's vector of a full one (parameters or an optimizer state vector)."""
        if self.T == 1:
            return full
        mine = np.empty(self.model.n_params, np.float32)
        for e in self.nets[self.tp.rank]:
            _move(e, full, mine, take=True)
        return mine

    def full(self, mine):
        """The full vector on every rank (for evaluation): one Allgatherv over the tensor group."""
        if self.T == 1:
            return mine
        displs = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        buf = np.empty(int(self.counts.sum()), np.float32)
        buf[displs[self.tp.rank]:][:len(mine)] = mine
        self.tp.allgatherv_inplace(buf, self.counts, displs)
        return self.assemble(np.split(buf, displs[1:]))

    def saved(self, v):
        """What a checkpoint or model.h5 holds of this rank's vector v (or of its Parts over the data group)."""
        return v if self.T == 1 else Whole(self, v)

    def restored(self, arrays, names):
        """A checkpoint's optimizer vectors opt/NAME cut to this rank's slices (sync.restore takes them)."""
        return arrays if self.T == 1 else {f"opt/{k}": self.take(arrays[f"opt/{k}"]) for k in names}

    def assemble(self, vectors):
        """The full vector from every tensor rank's vector, in tensor rank order."""
        full = np.empty(self.n, np.float32)
        for net, v in zip(self.nets, vectors):
            for e in net:
                _move(e, full, v, take=False)
        return full


class Whole(Parts):
    """A vector held as the tensor group's slices, each perhaps in Parts over the data group (sharded, fsdp):
    gather() — every rank calls it — returns the full vector on rank 0 (None elsewhere)."""

    def __init__(self, grid, v):
        super().__init__(grid.tp, v.local if isinstance(v, Parts) else v)
        self.grid, self.v = grid, v

    def gather(self):
        mine = self.v.gather() if isinstance(self.v, Parts) else self.v  # whole on data rank 0
        if self.grid.dp.rank:
            return None
        vectors, counts = self.grid.tp.gatherv(mine)
        return None if self.grid.tp.rank else self.grid.assemble(np.split(vectors, np.cumsum(counts)[:-1]))


class TensorModel(Model):
    """The model of one rank of a tensor group: its local layers, column and row ones wrapped with the
    group's Allreduces (timed in seconds, bytes as ring_bytes)."""

    def __init__(self, spec, plan, tp):
        super().__init__(spec, "cpu")
        self.tp, self.seconds, self.bytes = tp, 0.0, 0
        wrap = {"column": Column, "row": Row}
        self.net = [wrap[how](self, l) if how in wrap else l for how, _, l, _ in plan]
        self.seq = Sequence(self.net, self.xp)
        self.with_params = [l for l in self.net if l.n_params]
        self.starts = [l.offset for l in self.with_params]

    @property
    def n_params(self):
        return sum(l.n_params for l in self.with_params)

    def sum(self, buf):
        t = time.perf_counter()
        self.tp.allreduce_sum(buf)
        self.seconds += time.perf_counter() - t
        self.bytes += ring_bytes(buf.nbytes, self.tp.size)


class Column:
    """A column layer: the local layer as it is forward; backward sums its input gradient over the group."""

    def __init__(self, model, layer):
        self.model, self.layer = model, layer

    def __getattr__(self, name):  # shapes, views, scratch, offset: the local layer's
        return getattr(self.layer, name)

    def backward(self, k, p, g, x, y, dy, dx, s):
        self.layer.backward(k, p, g, x, y, dy, dx, s)
        if dx is not None:
            self.model.sum(dx)


class Row(Column):
    """A row layer: partial outputs summed over the group, then bias and activation; backward as it is (the
    output, and so dL/dz, is whole on every rank: dW and dx are this rank's rows, db the whole of it)."""

    def __init__(self, model, layer):
        super().__init__(model, layer)
        self.zero = np.zeros(layer.out_shape[-1], np.float32)

    def forward(self, k, p, x, out, s):
        self.layer.forward(k, (p[0], self.zero), x, out, s, act=IDENTITY)
        self.model.sum(out)
        k.bias_act(out.reshape(-1, len(self.zero)), p[1], self.layer.act)

    def backward(self, k, p, g, x, y, dy, dx, s):
        self.layer.backward(k, p, g, x, y, dy, dx, s)


def _like(l, outputs, in_shape):
    """A dense or conv layer like l with `outputs` units/channels on in_shape."""
    if isinstance(l, Dense):
        new = Dense(outputs, in_shape)
    else:
        KH, KW, SH, SW = l.geom[:4]
        new = Conv(l.dims, outputs, (KH, KW), (SH, SW), l.same, in_shape)
    new.act = l.act
    return new


def split(net, T, t):
    """Tensor rank t's [(how, full layer, local layer, part)] for the layers of net (module doc): how is
    column, row, whole or None (no parameters); part is the (lo, hi) outputs of a column layer or the inputs
    of a row one ((lo, hi) channels, or the flat feature indices after a flattened split map)."""
    last = max(i for i, l in enumerate(net) if l.n_params)
    plan, cut, offset = [], None, 0  # cut: how the activation entering the layer is split (None: whole)
    for i, l in enumerate(net):
        how, part = None, None
        if isinstance(l, Flatten):
            local = l if cut is None else Flatten((*l.in_shape[:-1], _width(cut)))
            if cut is not None and len(l.in_shape) == 3:  # NHWC (h, w, this rank's channels) → feature indices
                H, W, C = l.in_shape
                cut = (np.arange(H * W)[:, None] * C + np.arange(*cut)).ravel()
        elif isinstance(l, Pool):  # a fresh one: the local conv below it is unfused (its bias and activation
            # come before the pooling), since a row conv's pre-activation sum is whole only after the Allreduce
            local = Pool(l.dims, l.kind, l.win[:2], l.win[2:], (*l.in_shape[:-1], _width(cut) if cut is not None
                                                               else l.in_shape[-1]))
        elif cut is None and i == last:
            how, local = "whole", _like(l, l.out_shape[-1], l.in_shape)
        elif cut is None:
            n = l.out_shape[-1]
            part = cut = (n * t // T, n * (t + 1) // T)
            if cut[0] == cut[1]:
                raise MpitrainError(f"model layer {l.text()!r}: its {n} outputs cannot be split over parallel.tensor "
                                    f"= {T} ranks (each needs one or more)")
            how, local = "column", _like(l, cut[1] - cut[0], l.in_shape)
        else:
            how, part, local = "row", cut, _like(l, l.out_shape[-1], (*l.in_shape[:-1], _width(cut)))
            cut = None
        if local.n_params:
            local.offset, offset = offset, offset + local.n_params
        plan.append((how, l, local, part))
    return plan


def _width(cut):
    return cut[1] - cut[0] if isinstance(cut, tuple) else len(cut)


def _move(entry, full, mine, take):
    """Copy a layer's slice of the full vector into this rank's vector (take) or back (not take)."""
    how, fl, ll, part = entry
    if how is None:
        return
    (W, b), (w, c) = fl.views(full), ll.views(mine)
    if isinstance(fl, Conv):  # W (C_out, KH·KW·C_in) as (C_out, KH·KW, C_in): a channel is an index
        W, w = W.reshape(W.shape[0], -1, fl.in_shape[-1]), w.reshape(w.shape[0], -1, ll.in_shape[-1])
    cut = slice(*part) if isinstance(part, tuple) else part
    index, bias = {"whole": ((...,), slice(None)),
                   "column": ((cut,) if isinstance(fl, Conv) else (slice(None), cut), cut),
                   "row": ((slice(None), slice(None), cut) if isinstance(fl, Conv) else (cut,), slice(None))}[how]
    if take:
        w[...], c[...] = W[index], b[bias]
    else:
        W[index], b[bias] = w, c
