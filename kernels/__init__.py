"""Numba kernels, installed as mpitrain.kernels.  ``backend(device)`` is the one dispatch point: every
backend module offers the same functions with the same semantics (pure functions of arrays).
``arrays(backend)`` gives the allocation helpers that go with a backend (numpy ones for cpu)."""
import os
from types import SimpleNamespace

import numpy as np

from ..errors import MpitrainError

DEVICES = ("cpu", "cuda")

# The cpu backend's allocation helpers, here so that kernels/cpu.py stays kernels only.  The arrays are
# already where the kernels compute, so moving them is the identity (no copy).
HOST = SimpleNamespace(zeros=lambda shape: np.zeros(shape, np.float32),
                       empty=lambda shape: np.empty(shape, np.float32),
                       ints=lambda shape: np.empty(shape, np.int32),  # max-pool arg-max indices
                       staging=lambda n: np.zeros(n, np.float32),
                       to_device=lambda a: a, to_host=lambda a: a)


def backend(device="cpu"):
    if device == "cpu":
        from . import cpu

        return cpu
    if device == "cuda":
        return _cuda()
    raise MpitrainError(f"device {device!r} is not available; expected one of {', '.join(DEVICES)}")


def arrays(k):
    """zeros(shape), empty(shape) (float32), staging(n) (the host buffer MPI sends), to_device(a) and
    to_host(a) for the arrays backend k computes on."""
    from . import cpu

    return HOST if k is cpu else k


def _cuda():
    """kernels.cuda, or an MpitrainError naming what is missing (the package, or a usable GPU and driver)."""
    try:
        from numba import cuda
    except ImportError as e:
        raise MpitrainError(f"device 'cuda': numba-cuda is not installed (pip install 'mpitrain[cuda]'): {e}")
    if not cuda.is_available():
        from numba.cuda.cudadrv.driver import driver

        why = str(getattr(driver, "initialization_error", None) or "the driver found no GPU").strip()
        raise MpitrainError(f"device 'cuda': no usable CUDA GPU (numba.cuda.is_available() is False: "
                            f"{' '.join(why.split())})")
    from . import cuda as k

    return k


def select_gpu(comm):
    """One GPU per rank: the node-local rank (from the launcher, else the MPI node communicator) modulo
    the node's GPU count, so ranks on a node spread over its GPUs."""
    from numba import cuda

    local = next((os.environ[v] for v in ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
                  if v in os.environ), None)
    local = int(local) if local is not None else comm.node().rank
    cuda.select_device(local % len(cuda.gpus))


def compiled(comm, device="cpu"):
    """The backend, compiled once per node: the node's first rank compiles (or loads the on-disk cache)
    while the others wait, then they load the cache instead of 64 ranks racing to compile."""
    k = backend(device)
    if device == "cuda":
        select_gpu(comm)
    node = comm.node()
    if node.rank == 0:
        k.warmup()
    node.barrier()
    if device == "cuda" and node.rank:  # a CUDA module loads per process (context): from the cache now
        k.warmup()
    return k
