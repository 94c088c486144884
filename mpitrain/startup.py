"""Start-up checks every run makes before training: the launch is a real MPI job, and all ranks run the
same configuration, package version and data."""
import hashlib
import os

import numpy as np

from . import __version__
from .errors import MpitrainError


def check_world(comm, config_text, data_checksum):
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if comm.size == 1 and step_tasks > 1:
        raise MpitrainError(f"SLURM_STEP_NUM_TASKS={step_tasks} but MPI sees a world of 1: the ranks started as "
                            "singletons. Launch with `srun --mpi=pmi2` or the MPI's own mpirun, and check that "
                            "mpi4py uses the MPI the launcher belongs to (`python -m mpitrain info`)", agreed=True)
    mine = int(hashlib.sha256(f"{config_text}|{__version__}|{data_checksum}".encode()).hexdigest()[:15], 16)
    every = comm.allgather_int(mine)
    odd = np.flatnonzero(every != every[0])
    if len(odd):
        raise MpitrainError(f"ranks {', '.join(map(str, odd))} differ from rank 0 in configuration, mpitrain "
                            "version or data checksum", agreed=True)
