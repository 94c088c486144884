"""SIGTERM / SIGUSR1 (preemption, time limit, `scancel --signal`) and SIGINT (Ctrl-C): remember the request;
the training loops carry the flag in a collective they already make, so every rank stops at the same step
boundary, after a checkpoint, with exit code EXIT_PREEMPTED.  A second Ctrl-C interrupts at once."""
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the SLURM templates requeue the job on it
_requested = [False]


class Preempted(Exception):
    """Raised on every rank after the checkpoint is written."""


def _request(signum, frame):
    _requested[0] = True
    if signum == signal.SIGINT:  # the next Ctrl-C is Python's KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)


def install():
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _request)


def requested():
    return _requested[0]
