"""Numba kernels, installed as mpitrain.kernels.  ``backend(device)`` is the one dispatch point: every
backend module offers the same functions with the same semantics (pure functions of arrays)."""
from ..errors import MpitrainError

DEVICES = ("cpu",)


def backend(device="cpu"):
    if device == "cpu":
        from . import cpu

        return cpu
    raise MpitrainError(f"device {device!r} is not available; expected one of {', '.join(DEVICES)}")


def compiled(comm, device="cpu"):
    """The backend, compiled once per node: the node's first rank compiles (or loads the on-disk cache)
    while the others wait, then they load the cache instead of 64 ranks racing to compile."""
    k = backend(device)
    node = comm.node()
    if node.rank == 0:
        k.warmup()
    node.barrier()
    return k
