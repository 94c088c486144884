"""Probes run under mpiexec by the tests: `cache DATA`, `memory DATA`, `raise DATA OUT`, `slow-default OUT`,
`nonfinite-checkpoint OUT`, `stop-at-end DATA OUT`."""
import resource
import sys
import time

from mpitrain.comm import Comm


def _say(*values):
    """One write per line, so lines of different ranks do not interleave."""
    sys.stdout.write(" ".join(map(str, values)) + "\n")
    sys.stdout.flush()


def cache(path):
    """Print '<rank> <kernel cache misses>' after compiling the kernels the way training does."""
    from mpitrain.kernels import compiled, cpu

    comm = Comm()
    compiled(comm)
    cpu.warmup()  # every rank uses every kernel: a rank that compiled instead of loading shows a miss
    misses = sum(sum(f.stats.cache_misses.values()) for f in vars(cpu).values() if hasattr(f, "stats"))
    _say(comm.rank, misses)


def memory(path):
    """Print '<rank> <lo> <hi> <peak RSS growth in bytes>' while opening the data and reading the shard."""
    from mpitrain.data.shard import DataFile, TrainShard

    comm = Comm()
    data = DataFile(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = TrainShard(data, 64, comm.rank, comm.size, 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _say(comm.rank, shard.lo, shard.hi, after - before)


def raise_mid_training(path, out):
    """Rank 2 raises in its 5th gradient computation, printing 'raising at <epoch seconds>' first; the job
    must end, not hang."""
    from mpitrain import cli
    from mpitrain.model import Model

    comm = Comm()
    if comm.rank == 2:
        original, calls = Model.loss_grad, [0]

        def failing(self, *args):
            calls[0] += 1
            if calls[0] == 5:
                _say("raising at", time.time())
                raise RuntimeError("injected failure")
            return original(self, *args)

        Model.loss_grad = failing
    cli.main(["train", "--quiet", "--out", out, "--set", f"data.path={path}", "--set", "train.steps=100000"])


def slow_default(out):
    """Rank 1 reaches the default dataset only after rank 0 has prepared it (as a slow, oversubscribed rank
    would): it must still wait with rank 0, not run ahead into the next collective."""
    from mpitrain import cli, session

    comm = Comm()
    if comm.rank == 1:
        original = session.limit

        def late(n):
            time.sleep(5)
            return original(n)

        session.limit = late
    cli.main(["train", "--quiet", "--out", out, "--set", "train.steps=2"])


def nonfinite_checkpoint(out):
    """Only rank 0's state is not finite (as with a sharded optimizer state): every rank must end."""
    import numpy as np

    from mpitrain.checkpoint import Checkpointer
    from mpitrain.comm import install_abort_hook, report_error
    from mpitrain.config import Config
    from mpitrain.errors import MpitrainError
    from mpitrain.model import ModelSpec

    comm = Comm()
    install_abort_hook(comm)
    ckpt = Checkpointer(comm, Config(), out, ModelSpec("softmax", 4, 3), "", "", {"run": "train", "train.optimizer": "sgd"})
    state = np.float32([np.inf, 1.0]) if comm.rank == 0 else np.float32([1.0])
    try:
        ckpt.save(1, {"params": np.ones(15, np.float32), "opt/v": state})
    except MpitrainError as exc:
        sys.exit(report_error(comm, exc))


def stop_at_end(path, out):
    """A stop request (as SIGUSR1 sets it) pending from the start of a 1-step run."""
    from mpitrain import cli, preempt

    preempt.requested = lambda: True
    cli.main(["train", "--quiet", "--out", out, "--set", f"data.path={path}", "--set", "train.steps=1"])


if __name__ == "__main__":
    {"cache": cache, "memory": memory, "raise": raise_mid_training, "slow-default": slow_default,
     "nonfinite-checkpoint": nonfinite_checkpoint, "stop-at-end": stop_at_end}[sys.argv[1]](*sys.argv[2:])
