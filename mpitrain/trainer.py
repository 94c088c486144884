"""Synchronous data-parallel SGD: every rank computes the gradient of the summed loss over its part of
the global batch, one in-place Allreduce sums the flat gradient (with the loss and hit counts riding in
its last two slots), and every rank applies the same optimizer update to its identical parameters.
[comm] swaps that exchange for overlapped, compressed, hierarchical, sharded or local-SGD ones (sync.py);
[parallel] tensor = T splits every layer over T ranks that share the samples (tensor.py), and the
exchange then runs over the data group."""
import functools
import math
import time

import numpy as np

from . import __version__
from . import preempt
from .checkpoint import Parts
from .controls import Controls
from .data.shard import open_shard
from .evaluate import said, scores
from .finetune import trainable
from .kernels import HOST
from .memory import peak_rss
from .optim import Optimizer, schedule
from .session import Session, gpt_defaults
from .sync import make as make_sync
from .tensor import Grid
from .watch import Watch


class Stepper:
    """One optimizer step on flat buffers: summed-loss gradient → optional synchronisation (sync.py) →
    fused update."""

    def __init__(self, model, optimizer, sync=None, flags=0, clip_norm=0.0):
        self.model, self.opt, self.sync, self.clip_norm = model, optimizer, sync, clip_norm
        n, xp = model.n_params, model.xp
        self.n = n if sync is None else sync.slots  # fsdp: no full gradient (it leaves layer by layer)
        self.buf = xp.staging(self.n + 2 + flags)  # [gradient | loss sum | number correct | flags]; pinned on a GPU
        # On the host the gradient is a view of the buffer MPI reduces; on a GPU it stays on the device and
        # passes through the buffer's first n slots, one copy each way per step.
        self.staged = xp is not HOST
        self.grad = xp.zeros(n) if self.staged else self.buf[:n] if sync is None else sync.gradient(self.buf)
        self.flags = self.buf[self.n + 2:]  # set before a step; summed over ranks with the gradient
        self.prox = None  # (mu, anchor): FedProx adds (mu/2)·||params − anchor||² per sample
        self.loss_grad = model.loss_grad  # (params, grad, x, y) → (loss sum, correct); DP-SGD swaps in its own
        if sync is not None:
            sync.bind(self.buf)
            if sync.ready is not None:  # overlap: backward reports each finished layer
                self.loss_grad = functools.partial(model.loss_grad, ready=sync.ready)

    def __call__(self, params, x, y, lr, scale):
        """Returns (loss sum, number correct), summed over ranks when reducing."""
        n, xp = self.n, self.model.xp
        x, y = xp.to_device(x), xp.to_device(y)  # the identity on the host
        self.buf[n], self.buf[n + 1] = self.loss_grad(params, self.grad, x, y)
        if self.prox is not None:  # gradient of the summed loss: the proximal term counts once per sample
            mu, anchor = self.prox
            self.grad += (mu * len(x)) * (params - anchor)
        if self.sync is None:
            self.opt.update(params, self.grad, lr, self.clipped(scale))
        else:
            if self.staged:
                self.grad.copy_to_host(self.buf[:n])
            self.sync.reduce(self.buf, scale)
            if self.staged:
                self.grad.copy_to_device(self.buf[:n])
            self.sync.update(self.opt, params, self.grad, lr, self.clipped(scale), len(x))
        return float(self.buf[n]), float(self.buf[n + 1])

    def clipped(self, scale):
        """The gradient's scale, lowered so that the global norm of the mean gradient is at most clip_norm
        (PyTorch's clip_grad_norm_: factor clip / (norm + 1e-6)).  The norm is of the whole gradient
        whatever the comm mode (sync.grad_sqnorm sums the shards' parts)."""
        if not self.clip_norm:
            return scale
        if self.sync is None:
            g = self.model.xp.to_host(self.grad)
            sq = float(np.einsum("i,i->", g, g, dtype=np.float64))
        else:
            sq = self.sync.grad_sqnorm()
        norm = math.sqrt(sq) * scale
        return scale * min(1.0, self.clip_norm / (norm + 1e-6))


def train(cfg, comm, out=None, quiet=False, resume=None, overwrite=False):
    if cfg.model.kind == "gpt":
        chose = gpt_defaults(cfg)
        if comm.rank == 0 and not quiet and chose:
            print(f"model.kind = gpt: {', '.join(chose)} (nanoGPT's baby-GPT recipe; set any of them to change it)",
                  flush=True)
    t, run = cfg.train, Session(cfg, comm)
    data, spec, model = run.data, run.spec, run.model
    watch = comm.agree(Watch, cfg, data)
    # evaluations during training use val/ where the file has one: the test split is then scored once, at the end
    split = "val" if data.n_val else "test" if data.n_test else None
    held = run.part("val") if data.n_val else (run.test_x, run.test_y)
    grid = comm.agree(Grid, cfg, comm, model)  # data × tensor: the ranks of a tensor group read the same batches
    dp, local = grid.dp, grid.model  # the data group, and the model this rank's steps run (its slices)
    controls = comm.agree(Controls, cfg, data, local)  # loss weights and smoothing, augmentation
    shard = open_shard(comm, data, cfg.data, t.global_batch, t.seed, dp.rank, dp.size,
                       cfg.model.block_size if data.task == "lm" else None)
    total = t.steps or t.epochs * shard.steps_per_epoch
    lr = t.lr * t.global_batch / 256 if t.scale_lr else t.lr
    lr_at = comm.agree(schedule, t.schedule, lr, total, t.warmup_steps, t.step_size, t.gamma)
    sync = comm.agree(make_sync, cfg, dp, local)
    part = sync.part  # the parameters this rank updates: all of them, or its shard (comm.mode = sharded)
    mask = grid.take(model.table.decay_mask(t.decay).astype(np.float32))[part].astype(np.uint8)  # adamw: which decay
    moves = comm.agree(trainable, model, t.freeze) if t.freeze else None  # train.freeze: 0 in frozen tensors
    if moves is not None:
        moves = grid.take(moves.astype(np.float32)).astype(np.uint8)  # laid out as this rank's vector
        sync.frozen = int(np.argmax(moves))  # the gradient of frozen tensors at the bottom need not travel
    opt = comm.agree(Optimizer, run.kernels, t.optimizer, part.stop - part.start, t.momentum, t.beta1, t.beta2,
                     t.eps, t.weight_decay, decay_mask=mask, trainable=None if moves is None else moves[part])
    limit = "train.steps" if t.steps else "train.epochs"
    resumed = run.open(out, total, quiet, resume, {"run": "train", "train.optimizer": t.optimizer,
                                                   "train.global_batch": t.global_batch},
                       "step", lambda index: f"raise {limit} to continue it", overwrite)
    if run.finished is not None:
        shard.close()
        return run.finished
    log, ckpt = run.log, run.ckpt
    last = {}  # the last step's train loss (and accuracy): kept in checkpoints for a run resumed at its end
    if resumed:
        first, arrays, attrs = resumed
        params = grid.take(arrays["params"].astype(np.float32))
        sync.restore(grid.restored(arrays, opt.state), opt.state)  # checkpoints hold full vectors whatever the mode
        opt.t = int(attrs["opt_t"])
        if "state" in arrays:  # BatchNorm running statistics
            local.ctx.state[:] = arrays["state"]
        last = {k: float(attrs[k]) for k in ("train_loss", "train_accuracy") if k in attrs}
        watch.restore(attrs, log.say)
        del resumed, arrays  # the checkpoint's full vectors: fsdp and tensor ranks keep only their slices
    else:
        first = 0
        params = model.init_params(t.seed) if comm.rank == 0 else np.empty(spec.n_params, np.float32)
        if run.init is not None:  # fine-tuning: the init model's tensors over the fresh ones (a resume wins)
            run.init.apply(params, local.ctx.state)
            log.say(run.init.describe())
        comm.bcast(params)
        params = grid.take(params)
    run.init = None  # its vectors are not held through the run
    params = sync.own(model.xp.to_device(params))  # on the device (the identity on the host); fsdp: its shard
    log.say(f"mpitrain {__version__}: {spec.kind} {spec.describe()} ({spec.n_params} params) "
            f"on {comm.size} rank(s){f' ({dp.size} data × {grid.T} tensor)' if grid.T > 1 else ''} "
            f"× {run.threads} thread(s), {data.n_train} train samples, "
            f"global batch {t.global_batch}, steps {first + 1}…{total} → {run.out}")

    if shard.note:
        log.say(shard.note)
    if not data.n_test:
        log.say(f"{data.path} has no test rows: no test score"
                + ("" if split else "; no val/ split either, so the run is never evaluated"))
    if "partition" in data.f:
        log.say(f"{data.path} holds a federated partition of {len(data.f['partition/n_train'])} clients: train "
                "pools every client's rows (the file's whole train split, the clients' local test rows included)")
    step_fn = Stepper(local, opt, sync, flags=2, clip_norm=t.clip_norm)  # flags: stop requested, checkpoint due
    # dropout masks keyed by the global sample index of this rank's first row; BatchNorm sums its batch
    # statistics over the data group (ranks of a tensor group share their samples)
    local.ctx.seed, local.ctx.first = t.seed, shard.strata.start
    local.ctx.comm = dp if dp.size > 1 else None
    sync.step = first  # local SGD averages on the global step count, resumed or not
    eval_every = t.eval_every or shard.steps_per_epoch
    scale = 1.0 / t.global_batch
    train_seconds = 0.0
    test = None  # the last test evaluation's metrics (evaluate.scores)
    metrics = {}  # the last evaluation's metrics
    targets = data.targets if spec.task == "regress" else None  # RMSE in the targets' original units
    end = first if watch.stop else total  # a run that stopped early and resumed ends where it stopped

    def whole():  # the parameters whole on rank 0 (every rank calls it: sharded modes gather them)
        saved = grid.saved(sync.saved(params))
        return saved.gather() if isinstance(saved, Parts) else model.xp.to_host(saved)

    if first < end:  # the first step's data is read before the timed loop, as an in-memory part is
        shard.get(*divmod(first, shard.steps_per_epoch))
    for step in range(first, end):
        tic = time.perf_counter()
        epoch, s = divmod(step, shard.steps_per_epoch)
        lr_now = lr_at(step)
        step_fn.flags[:] = (preempt.requested(), ckpt.time_due())
        grid.tp.allreduce_sum(step_fn.flags)  # the data group sums them next: every rank sees every flag
        # local SGD averages the parameters before anything reads them: evaluation, checkpoint, the end
        sync.due = (step + 1) % eval_every == 0 or step + 1 == total or ckpt.due(step + 1, False)
        local.ctx.step = step
        x, y = controls.batch(*shard.get(epoch, s), step, shard.strata.start)
        loss, correct = step_fn(params, x, y, lr_now, scale)
        train_seconds += time.perf_counter() - tic
        if not np.isfinite(loss):
            raise run.diverged(f"step {step + 1}", "the loss")
        stop, timed = step_fn.flags > 0
        last = {"train_loss": loss * scale}
        if spec.task != "regress":  # a regression step's hits are its squared errors: train_loss says them
            last["train_accuracy"] = correct * scale
        if (step + 1) % max(t.log_every, 1) == 0 or step + 1 == total:
            log.record(step=step + 1, epoch=epoch + 1, lr=lr_now, **last,  # epochs count from 1, as printed
                       samples_per_second=(step + 1 - first) * t.global_batch / train_seconds,  # rank 0's, so far
                       comm_seconds=sync.seconds)
        if split and ((step + 1) % eval_every == 0 or step + 1 == total):
            metrics = scores(comm, model, grid.full(sync.full(params)), *held, prefix=split, targets=targets)
            if split == "test":
                test = metrics
            log.record(step=step + 1, epoch=epoch + 1, **metrics)
            log.say(f"step {step + 1}/{total}  epoch {epoch + 1}  loss {last['train_loss']:.4f}  {said(metrics)}")
            if watch.on and watch.update(comm, step + 1, metrics) and t.keep_best:
                run.save("best.h5", whole(), steps=step + 1, **{f"best_{watch.metric}": watch.best})
            if watch.stop:
                end = step + 1
                log.say(f"early stop at step {end}: {watch.metric} has not improved on {watch.best:.4f} (step "
                        f"{watch.best_step}) for {watch.waited} evaluation(s)")
        log.advance(1, loss=f"{loss * scale:.4f}")
        if ckpt.due(step + 1, stop or timed) or step + 1 == end:
            host = model.xp.to_host
            state = sync.gather_state({f"opt/{k}": host(v) for k, v in opt.state.items()})
            state = {k: grid.saved(v) for k, v in state.items()}
            state["state"] = local.ctx.state  # BatchNorm running statistics: the same on every rank
            ckpt.save(step + 1, {"params": grid.saved(host(sync.saved(params))), **state}, opt_t=opt.t, **last,
                      **watch.attrs())
        if step + 1 == end:  # the last step, or an early stop: the run simply ends (model.h5, summary, exit 0)
            break
        if stop:
            run.stop(f"step {step + 1}")
    shard.close()
    if data.n_test and test is None:  # val/ steered training, or resumed at the end: score the model once
        test = scores(comm, model, grid.full(sync.full(params)), run.test_x, run.test_y, targets=targets)
    memory = [sum(v.nbytes for v in opt.state.values()), *sync.bytes_per_rank(params, step_fn.grad), peak_rss(),
              shard.reader_rss]
    tensor = getattr(local, "seconds", 0.0), getattr(local, "bytes", 0) / max(sync.steps, 1)
    train_seconds, comm_seconds, *memory, tensor_seconds, tensor_bytes = comm.allreduce(
        [train_seconds, sync.seconds, *memory, *tensor], op="max")
    summary = {
        **(test or {"test_loss": None, "test_accuracy": None}), **last, **metrics, **watch.summary(),
        "steps": end, "epochs": end / shard.steps_per_epoch, "global_batch": t.global_batch,
        "samples_per_second": (end - first) * t.global_batch / train_seconds if train_seconds else None,
        "comm_seconds": comm_seconds, "comm_mode": cfg.comm.mode, "data_stream": shard.streams,
        "comm_bytes_per_step": sync.bytes / max(sync.steps, 1), "optimizer_state_bytes_per_rank": int(memory[0]),
        "param_bytes_per_rank": int(memory[1]), "grad_bytes_per_rank": int(memory[2]), "peak_rss_bytes": int(memory[3]),
        "reader_peak_rss_bytes": int(memory[4]),
        "resumed_from_step": first, "tensor_parallel": grid.T, "data_parallel": dp.size,
        "tensor_comm_seconds": tensor_seconds, "tensor_comm_bytes_per_step": tensor_bytes,
    }
    if watch.patience:
        summary["stopped_early_at_step"] = end if end < total else None
    speed = summary["samples_per_second"]  # None when the run resumed at its end: no step was timed
    timing = (f"{speed:.0f} samples/s, {train_seconds:.1f} s ({comm_seconds:.1f} s in {cfg.comm.mode} communication"
              f"{f', {tensor_seconds:.1f} s in the tensor group' if grid.T > 1 else ''})" if speed else
              f"no step left to run after step {first}")
    log.say(f"done: {said(test, loss=False) if test else 'no test score (no test rows)'}, {timing} → {run.out}")
    return run.finish(summary, whole(), steps=end)
