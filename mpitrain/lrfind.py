"""`lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", §3.3; as fastai's lr_find).  From the model's initial parameters, train's own step (trainer.Stepper,
same data order, augmentation and loss) runs at a learning rate rising exponentially from min_lr to max_lr
over `steps` steps; the loss is recorded and smoothed, the test stops once it diverges, and the suggestion is
the rate where the smoothed loss falls fastest against log lr."""
import math

import numpy as np

from .controls import Controls
from .data.shard import open_shard
from .errors import MpitrainError
from .optim import Optimizer
from .session import Session
from .sync import make as make_sync
from .trainer import Stepper

BETA = 0.98  # the smoothing of the recorded loss (an exponential average with bias correction, as fastai's)
DIVERGED = 4.0  # stop when the smoothed loss exceeds this multiple of the best so far
SKIP = 10, 5  # points left out of the suggestion at the start (the average still settling) and at the end


def lr_find(cfg, comm, steps=100, min_lr=1e-7, max_lr=10.0):
    """{"lr": [...], "loss": [...], "smoothed": [...], "suggested_lr": x, "stopped": why} on every rank."""
    comm.agree(_check, cfg, steps, min_lr, max_lr)
    t, run = cfg.train, Session(cfg, comm)
    data, model = run.data, run.model
    controls = comm.agree(Controls, cfg, data, model)
    shard = open_shard(comm, data, cfg.data, t.global_batch, t.seed, comm.rank, comm.size,
                       cfg.model.block_size if data.task == "lm" else None)
    try:
        sync = comm.agree(make_sync, cfg, comm, model)
        opt = comm.agree(Optimizer, run.kernels, t.optimizer, model.n_params, t.momentum, t.beta1, t.beta2, t.eps,
                         t.weight_decay, decay_mask=model.table.decay_mask().astype(np.uint8))
        params = sync.own(model.xp.to_device(model.init_params(t.seed)))  # the same on every rank (seeded)
        step_fn = Stepper(model, opt, sync, clip_norm=t.clip_norm)
        model.ctx.seed, model.ctx.first = t.seed, shard.strata.start  # dropout keys, as train's
        model.ctx.comm = comm if comm.size > 1 else None
        lrs, losses, smoothed, stopped = [], [], [], f"reached --max-lr {max_lr:g}"
        avg, best = 0.0, math.inf
        for i in range(steps):
            lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
            epoch, s = divmod(i, shard.steps_per_epoch)
            model.ctx.step = i
            x, y = controls.batch(*shard.get(epoch, s), i, shard.strata.start)
            loss, _ = step_fn(params, x, y, lr, 1.0 / t.global_batch)
            loss /= t.global_batch
            if not math.isfinite(loss):
                stopped = f"the loss is not finite at lr {lr:.3g}"
                break
            avg = BETA * avg + (1 - BETA) * loss
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(avg / (1 - BETA ** (i + 1)))
            best = min(best, smoothed[-1])
            if smoothed[-1] > DIVERGED * best:
                stopped = f"the loss diverged at lr {lr:.3g} (over {DIVERGED:g}× its lowest)"
                break
    finally:
        shard.close()
    return {"lr": lrs, "loss": losses, "smoothed": smoothed, "suggested_lr": suggest(lrs, smoothed),
            "stopped": stopped}


def _check(cfg, steps, min_lr, max_lr):
    if not 0 < min_lr < max_lr:
        raise MpitrainError(f"lr-find: --min-lr {min_lr:g} and --max-lr {max_lr:g}: expected 0 < min < max")
    if steps < 3:
        raise MpitrainError(f"lr-find: --steps {steps}: expected ≥ 3")
    if cfg.comm.mode != "plain" or cfg.parallel.tensor > 1:
        raise MpitrainError("lr-find runs data-parallel with every rank holding the whole model: comm.mode = "
                            "'plain' and parallel.tensor = 1")


def suggest(lrs, smoothed):
    """The learning rate of the steepest descent of the smoothed loss against log lr, SKIP points left out
    (as fastai's lr_find); None: too few points."""
    lo, hi = SKIP[0], len(lrs) - SKIP[1]
    if hi - lo < 3:
        return None
    slope = np.gradient(np.asarray(smoothed[lo:hi]), np.log(lrs[lo:hi]))
    return float(lrs[lo + int(np.argmin(slope))])


def report(result):
    """The curve and the suggestion as lines for the user."""
    lines = [f"{'step':>5} {'lr':>10} {'loss':>10} {'smoothed':>10}"]
    for i, (lr, loss, smooth) in enumerate(zip(result["lr"], result["loss"], result["smoothed"])):
        lines.append(f"{i + 1:5d} {lr:10.3e} {loss:10.4f} {smooth:10.4f}")
    lines.append(f"stopped: {result['stopped']}")
    lr = result["suggested_lr"]
    lines.append(f"suggested lr: {lr:.3g} (steepest descent of the smoothed loss)" if lr is not None else
                 "suggested lr: none (too few points before the loss diverged; lower --min-lr or raise --steps)")
    return "\n".join(lines)


def plot(result, out):
    """PNG of the loss against the learning rate (log axis), the suggestion marked."""
    from .plot import _matplotlib, png_path, write

    FigureCanvasAgg, Figure, _ = _matplotlib()
    out = png_path(out)
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result["lr"], result["loss"], color="0.7", linewidth=1, label="loss")
    ax.plot(result["lr"], result["smoothed"], color="C0", linewidth=1.8, label="smoothed")
    if result["suggested_lr"] is not None:
        ax.axvline(result["suggested_lr"], color="C3", linestyle="--",
                   label=f"suggested {result['suggested_lr']:.3g}")
    if result["loss"]:  # the loss up to 1.5× its start: the blow-up past the divergence would flatten the rest
        ax.set_ylim(0.95 * min(result["loss"]), min(max(result["loss"]), 1.5 * result["smoothed"][0]) * 1.02)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    write(fig, out)
    return out
