"""TensorBoard event files beside metrics.jsonl (train.log = ["tensorboard"]), written by tensorboardX: every
number RunLog records becomes a scalar under its metrics.jsonl name, at its step (train) or round (federate):
the loss and metrics, lr, samples/s and communication seconds (train), round seconds, bytes and ε (federate)."""
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

    def record(self, fields):
        at = fields.get("step", fields.get("round"))
        for name, value in fields.items():
            if name not in ("step", "round", "epoch") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.writer.add_scalar(name, value, at)
        self.writer.flush()  # as metrics.jsonl: a run that stops with an error keeps what it recorded

    def close(self):
        self.writer.close()
