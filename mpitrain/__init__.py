"""mpitrain: data-parallel and federated neural-network training over MPI.

The Python API (api.py) is imported on first use, so ``python -m mpitrain`` still fixes its thread
counts before NumPy loads."""

__version__ = "0.1.0"
__all__ = ["train", "federate", "load_model", "MpitrainError"]


def __getattr__(name):
    if name in ("train", "federate", "load_model"):
        from . import api

        return getattr(api, name)
    if name == "MpitrainError":
        from .errors import MpitrainError

        return MpitrainError
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
