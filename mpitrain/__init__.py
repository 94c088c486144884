"""mpitrain: data-parallel and federated neural-network training over MPI."""

__version__ = "0.1.0"
