"""TensorBoard event files beside metrics.jsonl (train.log = ["tensorboard"]), written by tensorboardX: every
number RunLog records becomes a scalar under its metrics.jsonl name, at its step (train) or round (federate)."""
from .errors import MpitrainError

LOGS = ("tensorboard",)  # what train.log may name


def check(logs):
    """train.log as the configuration gives it (every rank checks it when loading): one line for a log not known
    or whose library is not installed."""
    for name in logs:
        if name not in LOGS:
            raise MpitrainError(f"train.log = {logs!r}: unknown log {name!r} (known: {', '.join(LOGS)})")
    if "tensorboard" in logs:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise MpitrainError('train.log = ["tensorboard"] needs tensorboardX: pip install "mpitrain[tensorboard]"'
                                ) from None


class TensorBoard:
    def __init__(self, out_dir, index):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops the events past `index`, of steps a resumed run does again (metrics.jsonl
        # keeps its lines up to index, see RunLog.start)
        self.writer = SummaryWriter(out_dir, purge_step=index + 1 if index else None)
        self.at = index

    def record(self, fields):
        at = self.at = fields.get("step", fields.get("round", self.at))
        for name, value in fields.items():
            if name not in ("step", "round", "epoch") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.writer.add_scalar(name, value, at)

    def close(self, summary):
        """The run's totals (samples/s, communication seconds, …) at its last step or round; summary None: a
        run stopped early, which has none."""
        if summary is not None:
            self.record({k: v for k, v in summary.items() if k in TOTALS})
        self.writer.close()


# summary.json's totals that metrics.jsonl has no record of (its per-step and per-round values are logged as
# they come)
TOTALS = ("samples_per_second", "comm_seconds", "comm_bytes_per_step", "tensor_comm_seconds",
          "seconds_per_round", "bytes_per_round", "wall_seconds")
