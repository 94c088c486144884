"""Threads per rank: decided before NumPy/Numba load, so 64 ranks on one node do not start 64×cores threads.

Order: NUMBA_NUM_THREADS, then SLURM_CPUS_PER_TASK / SRUN_CPUS_PER_TASK, then the node's cores divided by
the ranks on this node (read from the launcher's environment: MPICH hydra, Open MPI, SLURM), at least 1.
"""
import os

_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "PMI_LOCAL_SIZE")
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _int_env(name):
    try:
        return int(os.environ.get(name, "").split("(")[0].split(",")[0])
    except ValueError:
        return None


def threads_per_rank():
    for name in ("NUMBA_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK"):
        n = _int_env(name)
        if n and n > 0:
            return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = next((n for n in map(_int_env, _LOCAL_SIZE_VARS) if n), 1)
    return max(1, cores // local)


def configure_env():
    """Set the thread variables that are not set yet; call before importing numpy. Returns the count."""
    n = threads_per_rank()
    for name in THREAD_VARS:
        os.environ.setdefault(name, str(n))
    return n


def limit(n):
    """Apply n threads at run time to Numba and to every loaded BLAS (NumPy's and SciPy's)."""
    import numba
    import scipy.linalg.cython_blas  # noqa: F401  (Numba loads SciPy's OpenBLAS too: load it so the limit reaches it)
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(n)
    return numba.get_num_threads()
