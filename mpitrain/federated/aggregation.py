"""What a round sums, and the plain path: one Reduce(SUM) of [Σ ω_k·Δ_k | Σω, Σω·a, Σloss, Σsamples,
Σclients, stop, diverged (| Σ(b_k − ½) with adaptive clipping)].

An aggregator has three calls per round, made by every rank in the same order: ``begin(rnd, cohort,
active)`` (False = the round is skipped), ``add(k, delta, w, steps, loss, seen, below)`` for each hosted
active client with a finite update, ``finish(stop, diverged)`` → a Result on rank 0 (None elsewhere);
stop and diverged (this rank's count of clients whose loss or update is not finite, which were not added)
are summed over ranks on every path alike.  What an aggregator holds of individual contributions (this
rank's, or those rank 0 gathered) goes through the round's erase registry `traces` (erase.py: its fixed
buffers held, per-round arrays added as they are made): fed.erase zeroes them once the round is aggregated.
The secure (secagg.py) and the robust (robust.py) aggregators have the same calls, so the round loop in
run.py is one loop.
"""
from dataclasses import dataclass, field

import numpy as np

N_STATS = 5  # Σω, Σω·a, Σloss, Σsamples, Σclients


@dataclass
class Result:
    """Rank 0's view of a round.  total / denominator is the aggregate update (denominator defaults to the
    summed weight: a weighted mean; DP replaces it by the fixed m, robust rules return their estimate
    with denominator 1)."""
    total: np.ndarray
    weight: float = 0.0
    weight_steps: float = 0.0
    loss: float = 0.0
    seen: float = 0.0
    clients: float = 0.0
    stop: float = 0.0
    diverged: float = 0.0       # clients whose loss or update was not finite: the run stops (run.py)
    below: float = 0.0          # Σ (1[‖Δ_k‖ ≤ C] − ½): adaptive clipping
    denominator: float = None
    skipped: bool = False       # nothing was aggregated (secure aggregation could not complete)
    metrics: dict = field(default_factory=dict)

    def mean(self):
        d = self.weight if self.denominator is None else self.denominator
        return self.total / d if d else np.zeros_like(self.total)

    def tau_eff(self):
        return self.weight_steps / self.weight if self.weight else 1.0


def contribution_scale(strategy, w, steps):
    """The factor of Δ_k in the sum: ω_k, or ω_k / a_k for FedNova."""
    return w / steps if strategy == "fednova" else w


class MeanAggregator:
    """The plain weighted sum: one float32 Reduce(SUM) per round, whatever the number of hosted clients."""

    def __init__(self, comm, n, strategy, adaptive=False, traces=None):
        self.comm, self.n, self.strategy, self.adaptive = comm, n, strategy, adaptive
        self.buf = np.zeros(n + N_STATS + 2 + int(adaptive), np.float32)
        self.scaled = np.zeros(n, np.float32)  # ω_k·Δ_k, here rather than in a fresh temporary per client
        self.bytes = (comm.size - 1) * self.buf.nbytes
        if traces is not None:
            traces.hold(self.buf, self.scaled)

    def begin(self, rnd, cohort, active):
        self.buf[:] = 0.0
        return True

    def add(self, k, delta, w, steps, loss, seen, below=None):
        n, buf = self.n, self.buf
        np.multiply(delta, contribution_scale(self.strategy, w, steps), out=self.scaled)
        buf[:n] += self.scaled
        buf[n:n + N_STATS] += (w, w * steps, loss, seen, 1)
        if self.adaptive:
            buf[n + N_STATS + 2] += float(below) - 0.5

    def finish(self, stop, diverged):
        n, buf = self.n, self.buf
        buf[n + N_STATS:n + N_STATS + 2] = stop, diverged
        self.comm.reduce_sum(buf)
        if self.comm.rank != 0:
            return None
        s = buf[n:]  # float32 scalars: the same arithmetic as before these layers existed
        return Result(buf[:n], *s[:N_STATS], stop=s[N_STATS], diverged=s[N_STATS + 1],
                      below=s[N_STATS + 2] if len(s) > N_STATS + 2 else 0.0)
