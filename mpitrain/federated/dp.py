"""Differential privacy for federated rounds: client-level DP-FedAvg (McMahan et al. 2018,
arXiv:1710.06963) with optional adaptive clipping (Andrew et al. 2019, arXiv:1905.03871), record-level
DP-SGD inside each client (Abadi et al. 2016), and their privacy accounting with Google's dp-accounting
(RDP accountant).

Client level, per round: every sampled client clips its update to L2 norm C (Δ·min(1, C/‖Δ‖)); weights are
uniform and the denominator is the fixed m (the expected cohort size), so one client moves the average by
at most C/m; Gaussian noise of std z·C is added to the sum — by rank 0 (central), or, with secure
aggregation, as independent shares N(0, (z·C)²/n_min) drawn by each client so that any n_min survivors
carry the full noise and the aggregator never sees a less noisy sum.

Sampling and accounting: with fed.dp.sampling = "poisson" (default) each client joins a round
independently with probability q = fed.fraction and the accountant composes
PoissonSampledDpEvent(q, GaussianDpEvent(z)) T times (add-or-remove-one-client adjacency: the DP-FedAvg
analysis).  With "fixed" the cohort is the usual fixed-size sample without replacement and the accountant
composes SampledWithoutReplacementDpEvent(K, m, GaussianDpEvent(z/2)) under replace-one adjacency: replacing
one client moves the clipped sum by up to 2C, so the noise is z/2 times that sensitivity.
"""
import hashlib
import math
import os

import numpy as np

from ..errors import MpitrainError
from .strategies import local_schedule


# -- noise --------------------------------------------------------------------------------------------

def noise_key(seed, saved=None):
    """32 bytes that seed every noise draw: from fed.dp.noise_seed ≥ 0 (reproducible, for experiments and
    tests: anyone with the config can predict the noise), else the checkpointed key, else the OS CSPRNG."""
    if seed >= 0:
        return hashlib.sha256(f"mpitrain dp noise {seed}".encode()).digest()
    if saved is not None:
        return bytes(np.asarray(saved, np.uint8))
    return os.urandom(32)


def gaussian(key, std, size, *ids):
    """N(0, std²) draws from a generator seeded by (key, ids) — e.g. (round, client) — so a round's noise
    is the same after a resume."""
    words = np.frombuffer(key, np.uint32).tolist()
    rng = np.random.default_rng(np.random.SeedSequence([*words, *ids]))
    return rng.normal(0.0, std, size)


def clip_norm(delta, clip):
    """(Δ·min(1, C/‖Δ‖₂), ‖Δ‖ ≤ C): the clipped update and the indicator adaptive clipping counts."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    below = norm <= clip
    return (delta if below else (delta * np.float32(clip / norm)).astype(np.float32)), below


# -- accounting ---------------------------------------------------------------------------------------

def _dp_accounting():
    """The dp-accounting package, or one clear error."""
    try:
        import dp_accounting
    except ImportError:
        raise MpitrainError("differential privacy needs the dp-accounting package: "
                            "pip install 'dp-accounting>=0.4'") from None
    return dp_accounting


def _quiet_absl():
    try:  # dp-accounting logs a warning per RDP order its without-replacement series does not converge on
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


class Accountant:
    """ε(T) at δ for T compositions of one DP event, by dp-accounting's RdpAccountant: the RDP of one event
    is computed once and ε(T) = compute_epsilon(orders, T·rdp, δ), exactly what an accountant composing
    the event T times returns."""

    def __init__(self, event, relation, delta):
        _dp_accounting()
        from dp_accounting.rdp import rdp_privacy_accountant as rpa

        _quiet_absl()
        acc = rpa.RdpAccountant(neighboring_relation=relation)
        acc.compose(event, 1)
        public = isinstance(getattr(type(acc), "rdp", None), property)  # older releases: private fields only
        self.orders = np.array(acc.orders if public else acc._orders)
        self.rdp = np.array(acc.rdp if public else acc._rdp)
        self.delta, self._compute = delta, rpa.compute_epsilon

    def epsilon(self, rounds):
        if rounds <= 0:
            return 0.0
        return float(self._compute(self.orders, rounds * self.rdp, self.delta)[0])

    def max_rounds(self, target, limit):
        """The most rounds (≤ limit) whose ε stays ≤ target."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo


def client_accountant(dp, clients):
    return Accountant(*client_event(dp.sampling, clients, dp.q if dp.sampling == "poisson" else dp.m, dp.z),
                      dp.delta)


def client_event(sampling, clients, size, z):
    """(DpEvent, NeighboringRelation) of one round of client-level DP (see the module doc); size is the
    sampling probability q (poisson) or the cohort size m (fixed)."""
    dpa = _dp_accounting()
    if sampling == "poisson":
        return (dpa.PoissonSampledDpEvent(size, dpa.GaussianDpEvent(z)),
                dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return (dpa.SampledWithoutReplacementDpEvent(clients, int(size), dpa.GaussianDpEvent(z / 2)),
            dpa.NeighboringRelation.REPLACE_ONE)


def dp_cohort(key, rnd, clients, sampling, q, m):
    """The round's cohort under DP, drawn from the secret sampling key: Poisson (every client with
    probability q) or a fixed-size sample of m without replacement."""
    words = np.frombuffer(key, np.uint32).tolist()
    rng = np.random.default_rng(np.random.SeedSequence([*words, rnd, 0x9015]))
    if sampling == "poisson":
        return np.flatnonzero(rng.random(clients) < q)
    return np.sort(rng.choice(clients, int(m), replace=False))


class ClientDP:
    """DP-FedAvg state: the clip norm C (adaptive or fixed), the noise key, the fixed denominator m."""

    def __init__(self, f, clients, cohort, secure, seed):
        d = f.dp
        self.z, self.clip, self.delta = d.noise_multiplier, float(d.clip), d.delta
        self.sampling, self.adaptive, self.secure = d.sampling, d.adaptive, secure
        self.gamma, self.clip_lr = d.target_quantile, d.clip_lr
        self.q = f.fraction
        self.m = f.fraction * clients if d.sampling == "poisson" else float(cohort)
        self.clients, self.cohort = clients, cohort
        self.noise_seed = d.noise_seed
        self.sigma_b = (d.count_stddev or self.m / 20) if d.adaptive else 0.0
        if d.adaptive:
            if 2 * self.sigma_b <= self.z:
                raise MpitrainError(f"fed.dp.count_stddev = {self.sigma_b:g}: adaptive clipping needs "
                                    f"2·count_stddev > fed.dp.noise_multiplier = {self.z:g} (the update noise "
                                    "is z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2))")
            self.z_delta = (self.z ** -2 - (2 * self.sigma_b) ** -2) ** -0.5 if self.z > 0 else 0.0
        else:
            self.z_delta = self.z
        self.key = noise_key(self.noise_seed)

    def sampling_key(self):
        """The key cohorts are drawn from (rank 0 broadcasts it): derived from the noise key, so cohorts
        are as unpredictable as the noise to anyone without the checkpoint, not a function of train.seed."""
        return hashlib.sha256(self.key + b"mpitrain dp sampling").digest()

    # -- state (checkpointed by rank 0) ---------------------------------------------------------------
    def state(self):
        return {"dp/clip": np.array([self.clip], np.float64), "dp/noise_key": np.frombuffer(self.key, np.uint8)}

    def restore(self, arrays, root):
        """The adapted clip norm on every rank (a fixed one is the configuration's); the noise key on rank 0
        only (it is the aggregator's secret: client ranks keep their own fresh keys)."""
        if self.adaptive:
            self.clip = float(arrays["dp/clip"][0])
        if root:
            self.key = noise_key(self.noise_seed, arrays.get("dp/noise_key"))

    # -- client side ----------------------------------------------------------------------------------
    def clip_update(self, delta):
        return clip_norm(delta, self.clip)

    @staticmethod
    def n_min(n):
        """Survivors that must carry the full distributed noise: ⌈2n/3⌉ (secure aggregation refuses to
        unmask a round with fewer)."""
        return max(1, -(-2 * n // 3))

    def share_noise(self, key, k, rnd, n, size, n_params):
        """Client k's noise share in round rnd (cohort of n): std z_Δ·C/√n_min on the coordinates and
        σ_b/√n_min on the clipped-count slot."""
        root = math.sqrt(self.n_min(n))
        z = gaussian(key, 1.0, size, rnd, k, 0x5EC)
        z[:n_params] *= self.z_delta * self.clip / root
        z[n_params:] *= self.sigma_b / root
        return z

    # -- server side ----------------------------------------------------------------------------------
    def server(self, result, rnd):
        """Noise (central mode), the fixed denominator m, and the adaptive clip update.  Returns b̄."""
        n = len(result.total)
        if not self.secure:
            total = result.total.astype(np.float64)
            total += gaussian(self.key, self.z_delta * self.clip, n, rnd, 0x5E7)
            result.total = total
            if self.adaptive:
                result.below += float(gaussian(self.key, self.sigma_b, 1, rnd, 0x5E8)[0])
        result.denominator = self.m
        b_bar = None
        if self.adaptive:
            b_bar = result.below / self.m + 0.5
            self.clip *= math.exp(-self.clip_lr * (b_bar - self.gamma))
        return b_bar


# -- record-level DP-SGD ------------------------------------------------------------------------------

class DPSGD:
    """Per-example clipping and Gaussian noise for one client's local steps (Abadi et al. 2016).

    Each local step draws a Poisson batch (every local example with probability q = B/n), sums the
    per-example gradients clipped to L2 norm C (Numba kernels: per-example norms of dense layers from
    activations and output gradients, then the clipped sum), adds N(0, (σC)²) per coordinate and divides by
    the expected batch B.  Installed as the Stepper's loss_grad, so the client's optimizer loop is the
    project's one training step."""

    def __init__(self, model, kernels, g, key):
        self.model, self.k, self.clip, self.sigma, self.key = model, kernels, float(g.clip), g.noise_multiplier, key
        self.rng = None

    def start(self, k, rnd):
        """Client k's generators for round rnd, from the rank's secret key: the Poisson batches must be as
        unpredictable to the aggregator as the noise, or sampling would not amplify privacy."""
        words = np.frombuffer(self.key, np.uint32).tolist()
        self.rng = np.random.default_rng(np.random.SeedSequence([*words, rnd, k, 0xD5]))
        self.batch_rng = np.random.default_rng(np.random.SeedSequence([*words, rnd, k, 0xD6]))

    def batch(self, n, size):
        """A Poisson batch of the n local examples: each with probability size / n."""
        return np.flatnonzero(self.batch_rng.random(n) < size / n)

    def loss_grad(self, params, grad, x, y):
        """grad ← Σ_i clip_C(∇ℓ_i) + N(0, (σC)²); returns (loss sum, number correct) of the batch."""
        model = self.model
        loss = correct = 0.0
        if len(x):
            loss, correct = model.loss_grad(params, grad, x, y)  # leaves each layer's input and dL/dz
            sq = np.zeros(len(x), np.float64)
            layers = [PerExample(self.k, *t) for t in model.trace]
            for l in layers:
                l.sqnorms(sq)
            factor = np.minimum(1.0, self.clip / np.maximum(np.sqrt(sq), 1e-30)).astype(np.float32)
            for l in layers:
                l.clipped_grad(factor, *l.layer.views(grad))
        else:
            grad[:] = 0.0
        if self.sigma > 0:
            grad += self.rng.normal(0.0, self.sigma * self.clip, len(grad)).astype(np.float32)
        return loss, correct


def check_per_example(model):
    """One line naming the first layer with parameters whose per-example norms PerExample cannot compute."""
    other = next((l for l in model.net if l.n_params and not l.per_example), None)
    if other is not None:
        raise MpitrainError(f"fed.dpsgd: layer {other.name} ({other.text().split()[0]}) has no per-example "
                            "gradient norms yet (dense layers on flat features and convs with a bias have); "
                            "use client-level DP (fed.dp) with this model")


class PerExample:
    """One layer's per-example gradients, from its input a and dL/dz as backward left them, never
    materialised: a dense layer's norms are ‖a_i‖·‖dz_i‖ (kernels.dp_sqnorms); a conv layer's come from
    its im2col rows (recomputed: backward reused that buffer) per sample (kernels.conv_sqnorms).  The
    clipped sum is one GEMM over rows scaled by each example's factor."""

    def __init__(self, k, layer, a, dz, scratch):
        self.k, self.layer, self.conv = k, layer, "cols" in scratch
        if self.conv:
            cols = scratch["cols"]
            k.im2col(a, *layer.geom, cols)
            self.a, self.dz = cols, dz.reshape(len(cols), -1)
            self.rows = len(cols) // len(a)  # output positions per example
        else:
            self.a, self.dz, self.rows = a, dz, 1

    def sqnorms(self, sq):
        if self.conv:
            self.k.conv_sqnorms(self.a, self.dz, self.rows, sq)
        else:
            self.k.dp_sqnorms(self.a, self.dz, sq)

    def clipped_grad(self, factor, dw, db):
        if self.conv:  # dw (C_out, K) = (f·dz)ᵀ cols: the dense rule on the transposed view
            self.k.dp_clipped_grad(self.a, self.dz, np.repeat(factor, self.rows), dw.T, db)
        else:
            self.k.dp_clipped_grad(self.a, self.dz, factor, dw, db)


def record_accountants(part, f, g):
    """{(q, steps per round): Accountant of one local step} over the distinct client sizes: record-level
    ε for a client that takes part in every round (an upper bound)."""
    dpa = _dp_accounting()
    out = {}
    for n in np.unique(part.n_train):
        n = int(n)
        batch, steps = local_schedule(f, n)
        q = batch / n
        if (q, steps) not in out:
            out[(q, steps)] = Accountant(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(g.noise_multiplier)),
                                         dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, g.delta)
    return out


def record_epsilon(accountants, rounds):
    return max(acc.epsilon(steps * rounds) for (_, steps), acc in accountants.items())
