"""Federated rounds over MPI.  Rank 0 is the aggregator and holds no training data; ranks 1…P-1 host the
clients block-wise (rank r hosts a contiguous range of clients, hence one contiguous hyperslab of
partition/, read by that rank alone).  A round: every rank draws the same client sample from
(seed, round) → hosted sampled clients train locally (the project's Stepper and optimizer) → each client
rank sums [ω_k·Δ_k, ω_k, ω_k·a_k, loss, samples, clients, stop] over its clients into one buffer → one
Reduce(SUM) to rank 0 → the strategy updates the model → one Bcast of [model, stop, checkpoint due].  Only
model-sized vectors and a few scalars ever cross ranks.

Layers around the same loop (Layers below): differential privacy clips each update and adds noise
(dp.py), secure aggregation replaces the Reduce by a masked uint32 sum (secagg.py), robust rules replace it
by a Gather of the individual updates (robust.py); simulated dropouts and attackers act on the clients.
With fed.erase (the default) what a client's data leaves on its rank is zeroed when its work ends (erase.py).
"""
import math
import time

import numpy as np

from .. import __version__
from .. import preempt
from ..data.shard import Blocks, ClientRows, block, block_rows
from ..errors import MpitrainError
from ..evaluate import evaluate
from ..optim import Optimizer
from ..session import Session
from ..trainer import Stepper
from .aggregation import MeanAggregator
from .dp import DPSGD, ClientDP, check_per_example, dp_cohort, noise_key
from .erase import Traces
from .robust import GatherAggregator, attack_update, attackers
from .secagg import SecureAggregator
from .strategies import DEFAULT_SERVER_LR, check, init_state, local_schedule, server_update, step_norm



class Partition:
    """The partition table (offsets, local train sizes) and this rank's clients."""

    def __init__(self, data, comm):
        f = data.f
        if "partition" not in f:
            raise MpitrainError(f"{data.path}: no partition (add one with: python -m mpitrain prepare "
                                f"--out {data.path} --partition iid --clients N)")
        self.offsets = f["partition/offsets"][...].astype(np.int64)
        self.n_train = f["partition/n_train"][...].astype(np.int64)
        self.checksum = str(f["partition"].attrs.get("checksum", ""))  # files partitioned before it carry none
        self.clients = len(self.n_train)
        if comm.size < 2:
            raise MpitrainError("federate needs at least 2 ranks: rank 0 aggregates, ranks 1… host clients")
        if comm.size - 1 > self.clients:
            raise MpitrainError(f"{data.path}: {comm.size - 1} client ranks but only {self.clients} clients; "
                                f"launch at most {self.clients + 1} ranks")
        empty = np.flatnonzero(self.n_train < 1)
        if len(empty):
            raise MpitrainError(f"{data.path}: client {empty[0]} has no training samples")
        self.hosted = range(*block(self.clients, comm.size - 1, comm.rank - 1)) if comm.rank else range(0)


class HostedRows:
    """This rank's clients' rows of partition/.  In memory they are all checked at start-up: without
    fed.erase read once and kept; with it a client's rows are read from the file when its work starts, into
    arrays that `traces` zeroes when that work ends, so no copy of them stays on the rank between its turns.
    Streamed (blocks, a Blocks reader: data.stream or past data.memory_mb) a client's training rows come
    window by window, checked as they arrive, and `traces` zeroes the reader's two window buffers."""

    def __init__(self, data, part, rank, traces, blocks):
        self.data, self.part, self.rank, self.traces, self.blocks = data, part, rank, traces, blocks
        o = part.offsets
        self.lo, hi = (o[part.hosted.start], o[part.hosted.stop]) if rank else (0, 0)
        if blocks is not None:
            traces.hold(blocks.settled)
            return
        if not traces.on:
            self.x, self.y = data.read("partition", self.lo, hi, rank)
            return
        for k in part.hosted:  # the same checks as the block read, client by client
            with traces:
                data.read("partition", o[k], o[k + 1], rank, traces.add)

    def get(self, k):
        """(x, y) of client k's training rows, in memory."""
        o = self.part.offsets
        return self.read(o[k], o[k] + self.part.n_train[k])

    def read(self, a, b):
        """Rows [a, b) of partition/: read from the file with fed.erase or streaming (arrays `traces`
        zeroes), else the rows kept in memory."""
        if self.traces.on or self.blocks is not None:
            return self.data.read("partition", a, b, self.rank, self.traces.add)
        return self.x[a - self.lo:b - self.lo], self.y[a - self.lo:b - self.lo]


def sample_clients(seed, rnd, clients, fraction, min_clients):
    """The round's cohort: max(⌊fraction·K⌋, min_clients) clients (at most K), drawn from (seed, round)."""
    m = cohort_size(clients, fraction, min_clients)
    rng = np.random.default_rng(np.random.SeedSequence([seed, rnd, 0x5A3]))
    return np.sort(rng.choice(clients, m, replace=False))


class Client:
    """Local training of one client at a time on this rank, reusing one model, optimizer and Stepper.
    Every buffer it fills from a client's data is registered with `traces` (the client's work's erase
    registry, erase.py) as it is made; without one (benchmarks, tests) nothing is zeroed."""

    def __init__(self, model, kernels, t, f, dpsgd=None, traces=None):
        self.t, self.f = t, f
        opt = Optimizer(kernels, t.optimizer, model.n_params, t.momentum, t.beta1, t.beta2, t.eps, t.weight_decay,
                        decay_mask=model.table.decay_mask(t.decay))
        self.stepper = Stepper(model, opt)
        self.ctx = model.ctx
        self.params = np.empty(model.n_params, np.float32)
        self.n_in = model.spec.n_in
        self.dpsgd = dpsgd  # record-level DP-SGD: Poisson batches, clipped per-example gradients + noise
        if dpsgd is not None:
            self.stepper.loss_grad = dpsgd.loss_grad
        self.traces = Traces(False) if traces is None else traces
        self.traces.hold(self.buffers)

    def train(self, k, rnd, x, y, global_params):
        """Train client k from the global model on its rows x, y (arrays, or x a streamed ClientRows and y None);
        returns (Δ_k, a_k (strategies.step_norm), loss sum, samples seen)."""
        t, f = self.t, self.f
        self.params[:] = global_params
        self.stepper.opt.reset()
        self.stepper.prox = (f.mu, global_params) if f.strategy == "fedprox" else None
        key = [t.seed, rnd, k, 0xC1]
        local = x if isinstance(x, ClientRows) else ClientRows(key, x, y)
        n = local.n
        batch, steps = local_schedule(f, n)
        if self.dpsgd is not None:
            self.dpsgd.start(k, rnd)
        per_epoch = -(-n // batch)
        loss = seen = 0.0
        for s in range(steps):
            if self.dpsgd is not None:  # Poisson batch; the summed gradient is divided by the expected size
                rows, scale = self.dpsgd.batch(n, batch), 1.0 / batch
                xb, yb = self.buffers_for(len(rows))
                np.take(x, rows, axis=0, out=xb, mode="clip")  # "raise" would gather into a hidden copy first
                np.take(y, rows, out=yb, mode="clip")
            else:
                epoch, i = divmod(s, per_epoch)
                xb, yb = local.batch(epoch, i * batch, min((i + 1) * batch, n), *self.buffers_for(batch))
                scale = 1.0 / len(xb)
            # dropout masks keyed by (client, round, step): no two local steps of any client share one
            self.ctx.seed, self.ctx.first, self.ctx.step = t.seed, k << 32, rnd << 24 | s
            l, _ = self.stepper(self.params, xb, yb, t.lr, scale)
            loss, seen = loss + l, seen + len(xb)
        return self.params - global_params, step_norm(f, t, steps), loss, seen  # FedNova: ‖a_k‖₁, not τ

    def buffers_for(self, m):
        """The client's batch buffers for m rows, reused across steps and clients (no fresh copy of rows per
        step); the registry allocates them, and zeroes one it outgrows (DP-SGD's batch sizes vary)."""
        return (self.traces.buffer("batch x", m, (self.n_in,), np.float32),
                self.traces.buffer("batch y", m, (), np.int64))

    def buffers(self):
        """The fixed buffers a client's training leaves on this rank: its local model, the model's
        activations, the gradient and the optimizer state (the batch buffers are the registry's own)."""
        s = self.stepper
        return [self.params, s.buf, s.grad, *s.opt.state.values(), *s.model.buffers()]


def cohort_size(clients, fraction, min_clients):
    """max(⌊fraction·K⌋, min_clients) clients (at least 1, at most K)."""
    return min(clients, max(math.floor(fraction * clients + 1e-9), min_clients, 1))  # 0.29·100 → 29, not 28


def dropouts(seed, rnd, cohort, rate):
    """The simulated dropouts of a round: ⌊rate·n⌋ of the cohort, drawn from (seed, round).  They have sent
    their keys and shares (secure aggregation's hard case) and send no update."""
    count = int(math.floor(rate * len(cohort) + 1e-9))
    if count == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, rnd, 0xD809]))
    return np.sort(rng.choice(cohort, count, replace=False))


class Layers:
    """The privacy and robustness layers around a round, checked once on every rank (no collectives
    here, so comm.agree can report a bad combination as one line): the cohort rule, differential privacy
    (client level and record level), the aggregator (mean Reduce, secure sum, CKKS sum, robust Gather) and the
    simulated attackers.  `traces`: the round's erase registry, which the aggregator registers what it
    holds of individual contributions with."""

    def __init__(self, cfg, comm, part, model, kernels, traces):
        t, f = cfg.train, cfg.fed
        n = model.n_params
        if f.min_clients > part.clients and "fed.min_clients" in getattr(cfg, "given", ()):
            raise MpitrainError(f"fed.min_clients = {f.min_clients}: expected at most the {part.clients} clients "
                                "of the partition (the default 2 alone is capped at the number of clients)")
        self.dp = self.dpsgd = None
        self.fixed = cohort_size(part.clients, f.fraction, f.min_clients)
        dp_on = f.dp.noise_multiplier > 0 or f.dp.clip_only
        self.weighting = "uniform" if dp_on else f.weighting
        he = f.encryption == "ckks"
        if dp_on:  # distributed noise (drawn by the clients) under secure aggregation or encryption
            self.dp = ClientDP(f, part.clients, self.fixed, f.secure_aggregation or he, t.seed)
            self.expected = self.dp.m
        else:
            self.expected = self.fixed
        if f.dpsgd.noise_multiplier > 0:
            if t.device != "cpu":
                raise MpitrainError(f"fed.dpsgd with train.device = {t.device!r}: the per-example clipping "
                                    "kernels exist for the cpu backend only")
            check_per_example(model)
            self.dpsgd = DPSGD(model, kernels, f.dpsgd, noise_key(f.dp.noise_seed))
        adaptive = bool(self.dp and self.dp.adaptive)
        if f.secure_aggregation:
            steps = np.array([local_schedule(f, int(m))[1] for m in part.n_train])
            a_max = max(step_norm(f, t, int(s)) for s in steps)  # the largest a_k a client reports
            w_max = 1.0 if self.weighting == "uniform" else float(part.n_train.max())
            seen_max = float((steps * part.n_train).max())
            dp = self.dp

            def bounds(cohort):
                if dp is None:
                    coord, b = w_max * f.secagg.clip_range, []
                else:
                    root = math.sqrt(dp.n_min(cohort))
                    coord, b = dp.clip + 8 * dp.z_delta * dp.clip / root, [0.5 + 8 * dp.sigma_b / root] * adaptive
                return np.array([coord] * n + [w_max, w_max * a_max, 64 * seen_max, seen_max, 1.0] + b)

            def noise(k, rnd, cohort):  # distributed DP: client k's share of the round's noise
                return dp.share_noise(dp.key, k, rnd, cohort, n + adaptive, n)

            self.agg = SecureAggregator(comm, part, n, f.strategy, f.secagg, t.seed, bounds,
                                        noise if dp else None, dp.n_min if dp else None, f.dropout_rate,
                                        clip=None if dp else f.secagg.clip_range, traces=traces)
            if dp is None or dp.sampling == "fixed":
                self.agg.check(self.fixed, f"fed.fraction = {f.fraction:g} of {part.clients} clients with "
                                           f"fed.min_clients = {f.min_clients}")
            else:
                self.agg.check(max(int(self.expected), 0), f"Poisson sampling with q = fed.fraction = "
                                                           f"{f.fraction:g} of {part.clients} clients on average")
        elif he:  # CKKS: rank 0 adds ciphertexts and never holds the secret key (he.py)
            from .he import HEAggregator

            self.agg = HEAggregator(comm, part, n, f, t, self.dp, adaptive, traces)
        elif f.aggregator != "mean":
            active = self.fixed - math.floor(f.dropout_rate * self.fixed + 1e-9)
            byz = math.floor(f.robust.fraction * active + 1e-9)
            if f.aggregator in ("krum", "multikrum") and active < 2 * byz + 3:
                raise MpitrainError(f"fed.aggregator = {f.aggregator!r}: Krum needs n ≥ 2f + 3 updates a round; "
                                    f"this run has n = {active}, f = ⌊fed.robust.fraction·n⌋ = {byz}; sample "
                                    "more clients or lower fed.robust.fraction")
            self.agg = GatherAggregator(comm, n, f.strategy, f.aggregator, f.robust.fraction, f.robust.norm_bound,
                                        f.robust.mixing, traces)
        else:
            self.agg = MeanAggregator(comm, n, f.strategy, adaptive, traces)
        self.attackers = np.zeros(part.clients, bool)
        if f.attack != "none":
            self.attackers = attackers(t.seed, part.clients, f.attack_fraction)


def refuse_tensor(tensor):
    if tensor != 1:
        raise MpitrainError(f"parallel.tensor = {tensor}: federated training keeps a whole model per client; "
                            "tensor parallelism is for train (set parallel.tensor = 1)")


def federate(cfg, comm, out=None, quiet=False, resume=None, overwrite=False):
    local, shared = Traces(cfg.fed.erase), Traces(cfg.fed.erase)  # one client's work; a round's contributions
    with local, shared:  # fed.erase: zeroed when the run returns or raises, on every rank
        return _federate(cfg, comm, out, quiet, resume, overwrite, local, shared)


def _federate(cfg, comm, out, quiet, resume, overwrite, local, shared):
    t, f = cfg.train, cfg.fed
    comm.agree(check, f.strategy)
    comm.agree(refuse_tensor, cfg.parallel.tensor)
    run = Session(cfg, comm)
    data, spec, model = run.data, run.spec, run.model
    norm = next((x for l in model.net for x in l.layers() if x.state_size), None)
    if norm is not None:  # rank 0's model would keep its initial running statistics
        raise MpitrainError(f"federate: layer {norm.name} (batchnorm) keeps running statistics, which federated "
                            "rounds do not aggregate yet; use GroupNorm (model.norm = group for resnet8/20, or "
                            "groupnorm G in model.layers), as Hsieh et al. 2020 recommend for non-IID clients",
                            agreed=True)
    part = comm.agree(Partition, data, comm)
    _, blocks = comm.agree(client_blocks, cfg, data, part, comm)
    rows = comm.agree(HostedRows, data, part, comm.rank, local, blocks)
    layers = comm.agree(Layers, cfg, comm, part, model, run.kernels, shared)
    dp, agg = layers.dp, layers.agg
    client = comm.agree(Client, model, run.kernels, t, f, layers.dpsgd, local)
    n = spec.n_params
    state = init_state(f.strategy, n)
    server_lr = f.server_lr or DEFAULT_SERVER_LR.get(f.strategy, 1.0)
    model_buf = np.zeros(n + 3, np.float32)  # [model | stop, checkpoint due, diverged]: the round's one Bcast
    params = model_buf[:n]
    rounds, accountant, record_acc = f.rounds, None, None  # rounds: the last, fed.rounds or what ε allows
    if dp is not None and dp.z > 0:  # clipping only (z = 0) has ε = ∞: nothing to account
        from .dp import client_accountant

        accountant = comm.agree(client_accountant, dp, part.clients) if comm.rank == 0 else comm.agree(_nothing)
        if f.dp.target_epsilon > 0:
            allowed = np.array([accountant.max_rounds(f.dp.target_epsilon, f.rounds) if comm.rank == 0 else 0])
            rounds = int(comm.bcast(allowed)[0])
            if rounds == 0:
                raise MpitrainError(f"fed.dp.target_epsilon = {f.dp.target_epsilon:g}: one round already spends "
                                    + (f"ε = {accountant.epsilon(1):.4g}" if accountant else "more")
                                    + f" at δ = {dp.delta:g} (fed.dp.noise_multiplier = {dp.z:g})", agreed=True)
    if layers.dpsgd is not None:
        from .dp import record_accountants, record_epsilon

        record_acc = comm.agree(record_accountants, part, f, f.dpsgd) if comm.rank == 0 else comm.agree(_nothing)
    resumed = run.open(out, rounds, quiet, resume, resume_meaning(f, part, layers), "round",
                       lambda index: past_rounds(comm, f, dp, accountant, rounds, index), overwrite)
    if run.finished is not None:
        if rows.blocks is not None:
            rows.blocks.close()
        return run.finished
    log, ckpt = run.log, run.ckpt
    if resumed:
        first, arrays, attrs = resumed
        rounds_to_target = int(attrs.get("rounds_to_target", 0)) or None  # reached before the checkpoint
        skipped = int(attrs.get("skipped_rounds", 0))
        clipped_total = int(attrs.get("clipped_coordinates", 0))
        params[:] = arrays["params"]
        for name, v in state.items():
            v[:] = arrays[f"server/{name}"]
        if dp is not None:
            dp.restore(arrays, comm.rank == 0)
    else:
        first, rounds_to_target, skipped, clipped_total = 0, None, 0, 0
        if comm.rank == 0:
            params[:] = model.init_params(t.seed)
        comm.bcast(params)
    if dp is not None:  # cohorts come from rank 0's secret key; rank 0 alone accounts
        dp.cohort_key = comm.bcast(np.frombuffer(dp.sampling_key(), np.uint8).copy()).tobytes()
    log.say(f"mpitrain {__version__} federate: {f.strategy}, {part.clients} clients on {comm.size - 1} client "
            f"rank(s) × {run.threads} thread(s), {spec.kind} {spec.describe()}, "
            f"rounds {first + 1}…{rounds} → {run.out}")
    given = getattr(cfg, "given", ())
    if dp is not None:
        log.say(f"differential privacy: clip {dp.clip:g}{' (adaptive)' if dp.adaptive else ''}"
                + default_note("fed.dp.clip", given) + ", "
                + (f"noise multiplier {dp.z:g}" if dp.z > 0 else "no noise (clipping only: ε = ∞)")
                + f", {dp.sampling} sampling, uniform client weights over the fixed "
                f"denominator m = {dp.m:g}" + (" (fed.weighting = samples is not used under DP)"
                                               if f.weighting == "samples" else ""))
    if layers.dpsgd is not None:
        g = f.dpsgd
        log.say(f"record-level DP-SGD: per-example clip {g.clip:g}" + default_note("fed.dpsgd.clip", given)
                + f", noise multiplier {g.noise_multiplier:g}, Poisson batches of {f.local_batch} expected samples")

    def draw(rnd):
        if dp is not None:
            return dp_cohort(dp.cohort_key, rnd, part.clients, dp.sampling, f.fraction, layers.fixed)
        return sample_clients(t.seed, rnd, part.clients, f.fraction, f.min_clients)

    flip = data.n_classes - 1
    test_acc = test_loss = fed_acc = worst = None
    round_seconds, round_bytes = [], []
    epsilon = record_eps = None
    for rnd in range(first, rounds):
        tic = time.perf_counter()
        cohort = draw(rnd)
        dropped = dropouts(t.seed, rnd, cohort, f.dropout_rate)
        active = np.setdiff1d(cohort, dropped)
        diverged = 0  # clients whose loss or update is not finite: checked before any aggregator encodes it
        if agg.begin(rnd, cohort, active):
            for k in active[(active >= part.hosted.start) & (active < part.hosted.stop)]:
                with local:  # client k's work in this round: its traces are zeroed when it ends
                    flipped = f.attack == "label_flip" and layers.attackers[k]
                    if rows.blocks is not None:  # read window by window
                        x, y = ClientRows([t.seed, rnd, int(k), 0xC1], blocks=rows.blocks, lo=int(part.offsets[k]),
                                          n=int(part.n_train[k]), flip=flip if flipped else None), None
                    else:
                        x, y = rows.get(k)
                        if flipped:
                            y = local.add(flip - y)
                    delta, steps, loss, seen = client.train(int(k), rnd, x, y, params)
                    local.add(delta)
                    if not (np.isfinite(loss) and np.all(np.isfinite(delta))):
                        diverged += 1
                        continue
                    if layers.attackers[k] and f.attack in ("sign_flip", "scale"):
                        delta = local.add(attack_update(f.attack, delta, f.attack_scale))
                    below = None
                    if dp is not None:
                        delta, below = dp.clip_update(delta)
                        local.add(delta)
                    w = float(part.n_train[k]) if layers.weighting == "samples" else 1.0
                    agg.add(int(k), delta, w, steps, loss, seen, below)
        res = agg.finish(preempt.requested(), diverged)
        clip_now = None
        if comm.rank == 0:
            bad = res.diverged > 0 or not np.isfinite(res.loss)
            if not (res.skipped or bad):
                if dp is not None:
                    dp.server(res, rnd)
                server_update(f.strategy, params, res.mean().astype(np.float32, copy=False), state, server_lr,
                              f.beta1, f.beta2, f.tau, f.server_momentum, tau_eff=res.tau_eff())
                bad = not np.all(np.isfinite(params))
            model_buf[n:] = (res.stop + preempt.requested(), ckpt.time_due(), bad)
        shared.wipe()  # the individual contributions this rank held or gathered: aggregated now
        comm.bcast(model_buf)  # the new model and rank 0's decisions reach every rank together
        if model_buf[n + 2]:
            raise run.diverged(f"round {rnd + 1}", "the loss or a client update")
        if dp is not None and dp.adaptive:
            dp.clip = float(comm.bcast(np.array([dp.clip]))[0])
            clip_now = dp.clip
        stop, timed = model_buf[n:n + 2] > 0
        round_seconds.append(time.perf_counter() - tic)
        round_bytes.append((comm.size - 1) * model_buf.nbytes + (agg.bytes if comm.rank == 0 else 0))
        record = {"round": rnd + 1, "clients": len(cohort), "bytes": round_bytes[-1],
                  "round_seconds": round_seconds[-1]}
        if comm.rank == 0:
            record["train_loss"] = float(res.loss / max(res.seen, 1))
            if len(dropped) or res.skipped:
                record.update(dropped=len(dropped), survivors=float(res.clients), skipped=res.skipped)
            skipped += res.skipped
            if f.secure_aggregation:
                record["clipped"] = clipped = res.metrics.get("clipped", 0)
                if clipped and not clipped_total:
                    log.say(f"warning: round {rnd + 1}: secure aggregation clipped {clipped} update coordinate(s) "
                            + (f"to ±fed.secagg.clip_range = ±{f.secagg.clip_range:g}, so the model differs from "
                               "plain aggregation's; raise fed.secagg.clip_range (each doubling costs a bit of "
                               "fixed-point precision)" if dp is None else
                               "whose noise share fell beyond the fixed-point bound C + 8σ")
                            + "; metrics.jsonl counts them per round (clipped), summary.json in all")
                clipped_total += clipped
        if accountant is not None:
            epsilon = accountant.epsilon(rnd + 1)
            record["epsilon"] = epsilon
        if clip_now is not None:
            record["clip"] = clip_now
        if record_acc is not None:
            record_eps = record_epsilon(record_acc, rnd + 1)
            record["record_epsilon"] = record_eps
        if (rnd + 1) % f.eval_every == 0 or rnd + 1 == rounds:
            test_loss, test_acc = evaluate(comm, model, params, run.test_x, run.test_y)
            fed_acc, worst = federated_eval(comm, model, params, part, rows, local)
            record.update(test_loss=test_loss, test_accuracy=test_acc, federated_accuracy=fed_acc,
                          worst_client_accuracy=worst)
            if rounds_to_target is None and test_acc >= f.target_accuracy:
                rounds_to_target = rnd + 1
            log.say(f"round {rnd + 1}/{rounds}  clients {len(cohort)}  test acc {test_acc:.4f}"
                    + (f"  federated acc {fed_acc:.4f}" if fed_acc is not None else "")
                    + (f"  worst client {worst:.4f}" if worst is not None else "")
                    + (f"  ε {epsilon:.3f}" if epsilon is not None else ""))
        log.record(**record)
        log.advance(1)
        if ckpt.due(rnd + 1, stop or timed) or rnd + 1 == rounds:
            ckpt.save(rnd + 1, {"params": params, **{f"server/{k}": v for k, v in state.items()},
                                **(dp.state() if dp is not None else {})}, rounds_to_target=rounds_to_target or 0,
                      skipped_rounds=skipped, clipped_coordinates=clipped_total)
        if stop and rnd + 1 < rounds:  # at the last round the run simply ends
            run.stop(f"round {rnd + 1}")
    if test_acc is None:  # resumed at the end: score the restored model
        test_loss, test_acc = evaluate(comm, model, params, run.test_x, run.test_y)
        fed_acc, worst = federated_eval(comm, model, params, part, rows, local)
    if rows.blocks is not None:
        rows.blocks.close()
    if accountant is not None and epsilon is None:
        epsilon = accountant.epsilon(rounds)
    if record_acc is not None and record_eps is None:
        record_eps = record_epsilon(record_acc, rounds)
    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "federated_accuracy": fed_acc,
        "worst_client_accuracy": worst, "rounds": rounds, "rounds_to_target": rounds_to_target,
        "target_accuracy": f.target_accuracy, "strategy": f.strategy, "clients": part.clients,
        "bytes_per_round": int(np.mean(round_bytes)) if round_bytes else None, "resumed_from_round": first,
        "seconds_per_round": float(np.median(round_seconds)) if round_seconds else None,
        "aggregator": f.aggregator, "secure_aggregation": f.secure_aggregation, "weighting": layers.weighting,
        "encryption": f.encryption, "erase": f.erase,
    }
    if f.secure_aggregation or f.dropout_rate:
        summary.update(dropout_rate=f.dropout_rate, skipped_rounds=skipped)
    if f.secure_aggregation:
        summary.update(clipped_coordinates=clipped_total)
    if f.attack != "none":
        summary.update(attack=f.attack, attackers=int(layers.attackers.sum()))
    if dp is not None:
        summary.update(epsilon=epsilon, delta=dp.delta, noise_multiplier=dp.z, clip=dp.clip,
                       dp_sampling=dp.sampling, expected_cohort=dp.m, rounds_requested=f.rounds,
                       stopped_at_target_epsilon=rounds < f.rounds)
    if record_acc is not None:
        summary.update(record_epsilon=record_eps, record_delta=f.dpsgd.delta,
                       record_noise_multiplier=f.dpsgd.noise_multiplier, record_clip=f.dpsgd.clip)
    log.say(f"done: test accuracy {test_acc:.4f}, rounds to {f.target_accuracy}: {rounds_to_target or 'not reached'}"
            + (f", ε = {epsilon:.3f} at δ = {dp.delta:g}" if epsilon is not None else "") + f" → {run.out}")
    return run.finish(summary, params, rounds=rounds)


def _nothing():
    return None


def past_rounds(comm, f, dp, accountant, rounds, index):
    """What to change for a checkpoint of round `index` past the run's last `rounds`: fed.rounds, or, where
    fed.dp.target_epsilon set the last round, the target (the checkpoint has spent more than it allows)."""
    if rounds == f.rounds:
        return "raise fed.rounds to continue it"
    spent = float(comm.bcast(np.array([accountant.epsilon(index) if comm.rank == 0 else 0.0]))[0])
    return (f"fed.dp.target_epsilon = {f.dp.target_epsilon:g} allows {rounds} round(s), and the {index} done have "
            f"spent ε = {spent:.4f} at δ = {dp.delta:g}: set it to {math.ceil(spent * 1e4) / 1e4:g} or more")


def default_note(key, given):
    """Said at start-up when a DP clip norm was not given: its default 1 is a guess at the scale of the
    norms, which it bounds, and the noise is scaled to it."""
    return "" if key in given else f" (not given: the default of {key}; set it near the norms it clips)"


def resume_meaning(f, part, layers):
    """The settings that give a federated checkpoint's state, the privacy spent so far, and rounds_to_target
    their meaning (Checkpointer refuses a resume that changes any): the server state's strategy, the
    partition, whether each kind of DP is on, every input of the accountants, fed.target_accuracy.  Refusing
    is what keeps ε exact: the accountants compose one event per round, the same event in every round."""
    d, g = f.dp, f.dpsgd
    meaning = {"run": "federate", "fed.strategy": f.strategy, "partition": part.checksum,
               "fed.target_accuracy": f.target_accuracy,
               "fed.dp.noise_multiplier": d.noise_multiplier, "fed.dp.clip_only": d.clip_only,
               "fed.dpsgd.noise_multiplier": g.noise_multiplier}
    if layers.dp is not None:  # q (poisson) or the cohort size m (fixed); the clip state's meaning
        meaning.update({"fed.dp.sampling": d.sampling, "fed.fraction": f.fraction, "fed.dp.adaptive": d.adaptive})
        if d.sampling == "fixed":
            meaning["fed.min_clients"] = f.min_clients
    if layers.dpsgd is not None:  # every client's batch and local steps per round
        meaning.update({"fed.local_batch": f.local_batch, "fed.local_epochs": f.local_epochs,
                        "fed.local_steps": f.local_steps})
    return meaning


def client_blocks(cfg, data, part, comm):
    """(streamed, this rank's block reader): streamed with data.stream, or automatically when the largest
    client rank's rows exceed data.memory_mb; the reader is None on rank 0 and when clients are in memory."""
    d, f = cfg.data, cfg.fed
    row = 4 * data.n_features + 8
    hosted = [part.offsets[block(part.clients, comm.size - 1, r)[1]] - part.offsets[block(part.clients, comm.size - 1, r)[0]]
              for r in range(comm.size - 1)]
    if not (d.stream or (d.memory_mb > 0 and max(hosted) * row > d.memory_mb * 2**20)):
        return False, None
    if f.dpsgd.noise_multiplier > 0:
        raise MpitrainError("fed.dpsgd with a streamed partition (data.stream, or clients' rows beyond "
                            "data.memory_mb): DP-SGD's Poisson batches draw rows from all of a client's data; "
                            "raise data.memory_mb so that the clients' rows stay in memory")
    if comm.rank == 0:
        return True, None
    k = block_rows(data, "partition", d.memory_mb, 1, d.window_blocks, d.block_rows)  # one stratum a window
    return True, Blocks(data, "partition", 1, k, d.window_blocks, comm.rank)


def federated_eval(comm, model, params, part, rows, local):
    """Clients score the global model on their local test splits: (weighted accuracy, worst client), or
    (None, None) when no client has a local test split (prepare --client-test-fraction 0).  Streamed
    clients read their test rows a block at a time.  With fed.erase (local.on) the worst client's accuracy,
    one client's own value, is not computed: None."""
    correct = count = 0.0
    worst = 1.0
    for k in part.hosted:
        a, b = part.offsets[k] + part.n_train[k], part.offsets[k + 1]
        step = max(rows.blocks.span if rows.blocks is not None else b - a, 1)
        c = 0
        for i in range(a, b, step):
            with local:
                c += model.score(params, *rows.read(i, min(i + step, b)))[1]
        if b > a:
            correct, count, worst = correct + c, count + (b - a), min(worst, c / (b - a))
    correct, count = comm.allreduce([correct, count])
    worst = None if local.on else comm.allreduce([worst], "min")[0]
    return (correct / count, worst) if count else (None, None)
