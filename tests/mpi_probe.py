"""Probes run under mpiexec by the tests: `cache DATA`, `memory DATA`, `raise DATA OUT`."""
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


if __name__ == "__main__":
    {"cache": cache, "memory": memory, "raise": raise_mid_training}[sys.argv[1]](*sys.argv[2:])
