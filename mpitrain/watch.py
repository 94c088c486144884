"""The metric train.early_stop and train.keep_best watch: its best value so far, the step of it, and the
evaluations since, kept in checkpoints so a resumed run goes on improving on the same best."""
import numpy as np

from .errors import MpitrainError


class Watch:
    def __init__(self, cfg, data):
        """data: the opened DataFile; a metric it cannot give is one line before the first step."""
        t, e = cfg.train, cfg.train.early_stop
        self.metric, self.patience, self.min_delta, self.keep = e.metric, e.patience, e.min_delta, t.keep_best
        self.on = bool(self.patience or self.keep)
        mode = e.mode if e.mode != "auto" else "max" if self.metric.endswith(("accuracy", "r2")) else "min"
        self.sign = 1.0 if mode == "min" else -1.0  # compared as sign × value: lower is better
        self.best = self.best_step = None
        self.waited = 0  # evaluations since the best
        split = self.metric.split("_")[0]
        evaluated = "val" if data.n_val else "test" if data.n_test else None
        if self.on and split != evaluated:
            watches = "train.early_stop" if self.patience else "train.keep_best"
            why = (f"{data.path} has no val/ split (prepare --validation-fraction writes one)" if split == "val"
                   else f"{data.path} has a val/ split, which train evaluates on; the test split is scored once, "
                        "at the end, and never steers training" if data.n_val else f"{data.path} has no test rows")
            raise MpitrainError(f"train.early_stop.metric = {self.metric!r} ({watches}): {why}")

    def update(self, comm, step, metrics):
        """Record the evaluation of `step` (metrics: name → value); True when it is a new best.  Every rank
        takes rank 0's value, so every rank decides the same (a reduction need not be bit-identical on all)."""
        value = float(comm.bcast(np.array([metrics[self.metric]], np.float64))[0])
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.waited = value, step, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self):
        return bool(self.patience) and self.waited >= self.patience

    def attrs(self):
        """What a checkpoint keeps of it (nothing before the first evaluation)."""
        if self.best is None:
            return {}
        return {"best_metric": self.metric, "best_value": self.best, "best_step": self.best_step,
                "best_waited": self.waited}

    def restore(self, attrs, say):
        """Continue from a checkpoint's attrs(); a checkpoint that watched another metric starts afresh."""
        if "best_metric" not in attrs:
            return
        if str(attrs["best_metric"]) != self.metric:
            say(f"the checkpoint watched {attrs['best_metric']}, this run watches {self.metric}: its best starts "
                "afresh")
            return
        self.best, self.best_step = float(attrs["best_value"]), int(attrs["best_step"])
        self.waited = int(attrs["best_waited"])

    def summary(self):
        return {"best_step": self.best_step, f"best_{self.metric}": self.best} if self.on else {}
