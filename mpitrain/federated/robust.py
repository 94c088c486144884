"""Byzantine-robust aggregation and the attacks that test it.

Robust rules need every client's update at the server: each client rank sends [stop | its active
clients' rows (Δ_k, ω_k, ω_k·a_k, loss_k, samples_k)] in one float32 Gatherv (counts first).  That is
exactly what secure aggregation hides, so the two are refused together (config.py).

Rules (n updates, f = ⌊β n⌋ with β = fed.robust.fraction):
  median        coordinate-wise median
  trimmed_mean  coordinate-wise mean after cutting the f largest and f smallest values
  krum          the update with the least sum of squared distances to its n − f − 2 nearest others
                (Blanchard et al. 2017; needs n ≥ 2f + 3)
  multikrum     the mean of the n − f updates with the best Krum scores
  norm_bound    every update clipped to L2 norm M (fed.robust.norm_bound, or the round's median norm),
                then the weighted mean (Sun et al. 2019)
With fed.robust.mixing = nnm every update is first replaced by the mean of its n − f nearest updates
(nearest-neighbour mixing, Allouah et al. 2023): it shrinks the spread of the honest updates, which on
small clients otherwise leaves Krum picking one overfit client's update round after round.
Attacks (simulation; a seeded fed.attack_fraction of the clients): sign_flip Δ → −Δ; scale
Δ → −c·Δ (c = fed.attack_scale); label_flip: train on C − 1 − y.
"""
import numpy as np

from ..errors import MpitrainError
from .aggregation import N_STATS, Result
from .erase import Traces

ROBUST = ("median", "trimmed_mean", "krum", "multikrum", "norm_bound")


def attackers(seed, clients, fraction):
    """A boolean mask of the attacking clients: ⌊fraction·K⌋ of them, drawn from the seed."""
    mask = np.zeros(clients, bool)
    count = int(np.floor(fraction * clients + 1e-9))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA77]))
    mask[rng.choice(clients, count, replace=False)] = True
    return mask


def attack_update(attack, delta, scale):
    if attack == "sign_flip":
        return -delta
    if attack == "scale":
        return (-scale * delta).astype(np.float32)
    return delta


def sq_distances(x):
    """The squared L2 distances between the rows of x (float64)."""
    x = np.asarray(x, np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def krum_scores(x, f):
    """Each row's sum of squared distances to its n − f − 2 nearest other rows."""
    d = sq_distances(x)
    np.fill_diagonal(d, np.inf)
    near = len(x) - f - 2
    return np.sort(d, axis=1)[:, :near].sum(axis=1)


def nnm(x, f):
    """Nearest-neighbour mixing: each row → the mean of its n − f nearest rows, itself included (float64)."""
    n = len(x)
    d = sq_distances(x)
    np.fill_diagonal(d, -1.0)  # itself first, even next to an identical row
    w = np.zeros((n, n))
    np.put_along_axis(w, np.argsort(d, axis=1, kind="stable")[:, :n - f], 1.0 / (n - f), axis=1)
    return w @ np.asarray(x, np.float64)


def aggregate(rule, x, weights=None, fraction=0.25, norm_bound=0.0, mixing="none"):
    """The robust estimate (float64) of the rows of x (clients × parameters).  The rules work in place on
    one float64 copy of x, or on x itself when it is float64 (then overwritten): the individual updates
    are in no array but that one, which the caller can zero (fed.erase)."""
    n = len(x)
    if n == 0:
        return np.zeros(x.shape[1])
    x = np.asarray(x, np.float64)  # once: every rule computes in float64
    f = int(np.floor(fraction * n + 1e-9))
    if mixing == "nnm":
        x = nnm(x, f)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if rule == "mean":
        return w @ x / w.sum()
    if rule == "median":
        return np.median(x, axis=0, overwrite_input=True)
    if rule == "trimmed_mean":
        x.sort(axis=0)
        return x[f:n - f].mean(axis=0) if n - 2 * f > 0 else np.median(x, axis=0, overwrite_input=True)
    if rule in ("krum", "multikrum"):
        if n < 2 * f + 3:
            raise MpitrainError(f"fed.aggregator = {rule!r}: Krum needs n ≥ 2f + 3 updates; this round has "
                                f"n = {n}, f = ⌊fed.robust.fraction·n⌋ = {f}; sample more clients or lower "
                                "fed.robust.fraction")
        scores = krum_scores(x, f)
        if rule == "krum":
            return x[int(np.argmin(scores))].copy()
        best = np.zeros((n, 1), bool)
        best[np.argsort(scores, kind="stable")[:n - f]] = True
        return x.mean(axis=0, where=best)
    if rule == "norm_bound":
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        bound = norm_bound or float(np.median(norms))
        x *= np.minimum(1.0, bound / np.maximum(norms, 1e-30))[:, None]
        return w @ x / w.sum()
    raise MpitrainError(f"fed.aggregator = {rule!r}: expected one of mean, {', '.join(ROBUST)}")


class GatherAggregator:
    """Individual updates at rank 0 (one float32 Gatherv per round), then a robust rule."""

    def __init__(self, comm, n, strategy, rule, fraction, norm_bound, mixing, traces=None):
        self.comm, self.n, self.strategy = comm, n, strategy
        self.rule, self.fraction, self.norm_bound, self.mixing = rule, fraction, norm_bound, mixing
        self.row = n + N_STATS - 1  # Δ_k | ω, ω·a, loss, samples
        self.rows = []  # this rank's rows of the round
        self.traces = Traces(False) if traces is None else traces  # every individual update goes through it

    def begin(self, rnd, cohort, active):
        self.rows = []
        self.bytes = 0
        return True

    def add(self, k, delta, w, steps, loss, seen, below=None):
        row = self.traces.add(np.concatenate([delta, np.array([w, w * steps, loss, seen], np.float32)]))
        if self.strategy == "fednova":
            row[:self.n] /= np.float32(steps)
        self.rows.append(row)

    def finish(self, stop, diverged):
        add = self.traces.add
        buf = add(np.concatenate([np.array([stop, diverged], np.float32), *self.rows]))
        got, counts = self.comm.gatherv(buf)
        if self.comm.rank != 0:
            return None
        add(got)
        self.bytes = got.nbytes + (self.comm.size - 1) * 8
        starts = np.concatenate([[0], np.cumsum(counts)])
        stop, diverged = float(got[starts[:-1]].sum()), float(got[starts[:-1] + 1].sum())
        rows = [got[a + 2:b].reshape(-1, self.row) for a, b in zip(starts[:-1], starts[1:])]
        x = add(np.concatenate(rows) if rows else np.zeros((0, self.row), np.float32))
        n = self.n
        work = add(x[:, :n].astype(np.float64))  # the rules' one working copy, overwritten by them
        est = aggregate(self.rule, work, x[:, n], self.fraction, self.norm_bound, self.mixing)
        s = x[:, n:].sum(axis=0, dtype=np.float64)
        return Result(est, weight=s[0], weight_steps=s[1], loss=s[2], seen=s[3], clients=float(len(x)),
                      stop=stop, diverged=diverged, denominator=1.0)
