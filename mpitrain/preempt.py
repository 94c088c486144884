"""SIGTERM / SIGUSR1 (preemption, time limit, `scancel --signal`): remember the request; the training
loops carry the flag in a collective they already make, so every rank stops at the same step boundary,
after a checkpoint, with exit code EXIT_PREEMPTED."""
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the SLURM templates requeue the job on it
_requested = [False]


class Preempted(Exception):
    """Raised on every rank after the checkpoint is written."""


def install():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _requested.__setitem__(0, True))


def requested():
    return _requested[0]
