"""Federated rounds over MPI.  Rank 0 is the aggregator and holds no training data; ranks 1…P-1 host the
clients block-wise (rank r hosts a contiguous range of clients, hence one contiguous hyperslab of
partition/, read by that rank alone).  A round: every rank draws the same client sample from
(seed, round) → hosted sampled clients train locally (the project's Stepper and optimizer) → each client
rank sums [ω_k·Δ_k, ω_k, ω_k·a_k, loss, samples, clients, stop] over its clients into one buffer → one
Reduce(SUM) to rank 0 → the strategy updates the model → one Bcast of [model, stop, checkpoint due].  Only model-sized vectors
and a few scalars ever cross ranks.
"""
import math
import time

import numpy as np

from .. import __version__
from .. import preempt
from ..data.shard import block
from ..errors import MpitrainError
from ..evaluate import evaluate
from ..optim import Optimizer
from ..session import Session
from ..train import Stepper
from .strategies import DEFAULT_SERVER_LR, check, init_state, server_update

EXTRA = 6  # aggregate slots after the model: Σω, Σω·a, Σloss, Σsamples, Σclients, stop requests


class Partition:
    """The partition table (offsets, local train sizes) and this rank's clients."""

    def __init__(self, data, comm):
        f = data.f
        if "partition" not in f:
            raise MpitrainError(f"{data.path}: no partition (add one with: python -m mpitrain prepare "
                                f"--out {data.path} --partition iid --clients N)")
        self.offsets = f["partition/offsets"][...].astype(np.int64)
        self.n_train = f["partition/n_train"][...].astype(np.int64)
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


def sample_clients(seed, rnd, clients, fraction, min_clients):
    """The round's cohort: max(⌊fraction·K⌋, min_clients) clients (at most K), drawn from (seed, round)."""
    m = min(clients, max(math.floor(fraction * clients + 1e-9), min_clients, 1))  # 0.29·100 → 29, not 28
    rng = np.random.default_rng(np.random.SeedSequence([seed, rnd, 0x5A3]))
    return np.sort(rng.choice(clients, m, replace=False))


class Client:
    """Local training of one client at a time on this rank, reusing one model, optimizer and Stepper."""

    def __init__(self, model, kernels, t, f):
        self.t, self.f = t, f
        opt = Optimizer(kernels, t.optimizer, model.n_params, t.momentum, t.beta1, t.beta2, t.eps, t.weight_decay)
        self.stepper = Stepper(model, opt)
        self.params = np.empty(model.n_params, np.float32)

    def train(self, k, rnd, x, y, global_params):
        """Train client k from the global model; returns (Δ_k, local steps a_k, loss sum, samples seen)."""
        t, f = self.t, self.f
        self.params[:] = global_params
        self.stepper.opt.reset()
        self.stepper.prox = (f.mu, global_params) if f.strategy == "fedprox" else None
        n = len(x)
        if f.strategy == "fedsgd":  # one full-batch gradient step
            batch, steps = n, 1
        else:
            batch = min(f.local_batch, n)
            steps = f.local_steps or f.local_epochs * -(-n // batch)
        rng = np.random.default_rng(np.random.SeedSequence([t.seed, rnd, k, 0xC1]))
        per_epoch = -(-n // batch)
        loss = seen = 0.0
        for s in range(steps):
            epoch, i = divmod(s, per_epoch)
            if i == 0:
                order = rng.permutation(n)
            rows = order[i * batch:(i + 1) * batch]
            l, _ = self.stepper(self.params, x[rows], y[rows], t.lr, 1.0 / len(rows))
            loss, seen = loss + l, seen + len(rows)
        return self.params - global_params, steps, loss, seen


def federate(cfg, comm, out=None, quiet=False, resume=None):
    t, f = cfg.train, cfg.fed
    comm.agree(check, f.strategy)
    run = Session(cfg, comm)
    data, spec, model = run.data, run.spec, run.model
    part = comm.agree(Partition, data, comm)
    lo, hi = (part.offsets[part.hosted.start], part.offsets[part.hosted.stop]) if comm.rank else (0, 0)
    cx, cy = comm.agree(data.read, "partition", lo, hi, comm.rank)
    client = comm.agree(Client, model, run.kernels, t, f)
    n = spec.n_params
    state = init_state(f.strategy, n)
    server_lr = f.server_lr or DEFAULT_SERVER_LR.get(f.strategy, 1.0)
    model_buf = np.zeros(n + 2, np.float32)  # [model | stop, checkpoint due]: the round's one Bcast
    params = model_buf[:n]
    resumed = run.open(out, f.rounds, quiet, resume)
    log, ckpt = run.log, run.ckpt
    if resumed:
        first, arrays, _ = resumed
        params[:] = arrays["params"]
        for name, v in state.items():
            v[:] = arrays[f"server/{name}"]
    else:
        first = 0
        if comm.rank == 0:
            params[:] = model.init_params(t.seed)
        comm.bcast(params)
    log.say(f"mpitrain {__version__} federate: {f.strategy}, {part.clients} clients on {comm.size - 1} client "
            f"rank(s) × {run.threads} thread(s), {spec.kind} {'-'.join(map(str, spec.sizes))}, "
            f"rounds {first + 1}…{f.rounds} → {run.out}")

    agg = np.zeros(n + EXTRA, np.float32)
    bytes_per_round = (comm.size - 1) * (model_buf.nbytes + agg.nbytes)  # Bcast out + Reduce in
    rounds_to_target = test_acc = test_loss = fed_acc = worst = None
    round_seconds = []
    for rnd in range(first, f.rounds):
        tic = time.perf_counter()
        cohort = sample_clients(t.seed, rnd, part.clients, f.fraction, f.min_clients)
        agg[:] = 0.0
        for k in cohort[(cohort >= part.hosted.start) & (cohort < part.hosted.stop)]:
            a, b = part.offsets[k] - lo, part.offsets[k] - lo + part.n_train[k]
            delta, steps, loss, seen = client.train(int(k), rnd, cx[a:b], cy[a:b], params)
            w = float(part.n_train[k]) if f.weighting == "samples" else 1.0
            agg[:n] += (w / steps if f.strategy == "fednova" else w) * delta
            agg[n:n + 5] += (w, w * steps, loss, seen, 1)
        agg[n + 5] = preempt.requested()
        comm.reduce_sum(agg)
        if comm.rank == 0:
            server_update(f.strategy, params, agg[:n] / agg[n], state, server_lr, f.beta1, f.beta2, f.tau,
                          f.server_momentum, tau_eff=agg[n + 1] / agg[n])
            model_buf[n:] = (agg[n + 5] + preempt.requested(), ckpt.time_due())
        comm.bcast(model_buf)  # the new model and rank 0's decisions reach every rank together
        stop, timed = model_buf[n:] > 0
        round_seconds.append(time.perf_counter() - tic)
        record = {"round": rnd + 1, "clients": len(cohort), "train_loss": float(agg[n + 2] / max(agg[n + 3], 1)),
                  "bytes": bytes_per_round, "round_seconds": round_seconds[-1]}
        if (rnd + 1) % f.eval_every == 0 or rnd + 1 == f.rounds:
            test_loss, test_acc = evaluate(comm, model, params, run.test_x, run.test_y)
            fed_acc, worst = federated_eval(comm, model, params, part, cx, cy, lo)
            record.update(test_loss=test_loss, test_accuracy=test_acc, federated_accuracy=fed_acc,
                          worst_client_accuracy=worst)
            if rounds_to_target is None and test_acc >= f.target_accuracy:
                rounds_to_target = rnd + 1
            log.say(f"round {rnd + 1}/{f.rounds}  clients {len(cohort)}  test acc {test_acc:.4f}  "
                    f"federated acc {fed_acc:.4f}  worst client {worst:.4f}")
        log.record(**record)
        log.advance(1)
        if ckpt.due(rnd + 1, stop or timed) or rnd + 1 == f.rounds:
            ckpt.save(rnd + 1, {"params": params, **{f"server/{k}": v for k, v in state.items()}})
        if stop:
            log.say(f"stop requested: checkpointed round {rnd + 1} in {ckpt.dir}; exit {preempt.EXIT_PREEMPTED}")
            log.finish(None)
            raise preempt.Preempted()
    if test_acc is None:  # resumed at the end: score the restored model
        test_loss, test_acc = evaluate(comm, model, params, run.test_x, run.test_y)
        fed_acc, worst = federated_eval(comm, model, params, part, cx, cy, lo)
    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "federated_accuracy": fed_acc,
        "worst_client_accuracy": worst, "rounds": f.rounds, "rounds_to_target": rounds_to_target,
        "target_accuracy": f.target_accuracy, "strategy": f.strategy, "clients": part.clients,
        "bytes_per_round": bytes_per_round, "resumed_from_round": first,
        "seconds_per_round": float(np.median(round_seconds)) if round_seconds else None,
    }
    log.say(f"done: test accuracy {test_acc:.4f}, rounds to {f.target_accuracy}: {rounds_to_target} → {run.out}")
    return run.finish(summary, params, rounds=f.rounds)


def federated_eval(comm, model, params, part, cx, cy, lo):
    """Clients score the global model on their local test splits: (weighted accuracy, worst client)."""
    correct = count = 0.0
    worst = 1.0
    for k in part.hosted:
        a, b = part.offsets[k] - lo + part.n_train[k], part.offsets[k + 1] - lo
        if b > a:
            _, c = model.score(params, cx[a:b], cy[a:b])
            correct, count, worst = correct + c, count + (b - a), min(worst, c / (b - a))
    correct, count = comm.allreduce([correct, count])
    return correct / max(count, 1), comm.allreduce([worst], "min")[0]
