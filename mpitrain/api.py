"""The Python API: the functions the command line runs, for one's own programs.

    import mpitrain
    summary = mpitrain.train("run.toml", {"train.lr": 0.1, "model.kind": "lenet5"}, out="runs/a")
    summary = mpitrain.federate(overrides={"data.path": "parts.h5", "fed.rounds": 20}, comm=my_comm)
    model = mpitrain.load_model("runs/a/model.h5")
    labels = model.predict(x)          # x: (N, *feature_shape) or (N, features), raw as given to prepare

Every rank of `comm` (an mpi4py communicator; default COMM_WORLD) calls the same function with the same
arguments; only that communicator is used, so a call works inside a larger MPI program.  Bad input raises
MpitrainError with the one line the command line prints, on every rank of `comm`.  Signals are the
caller's: the API does not install mpitrain's SIGTERM/SIGUSR1 handlers (the command line does).
"""
import numpy as np


def train(config=None, overrides=None, out=None, comm=None, resume=None, quiet=True):
    """Synchronous data-parallel training; returns the summary dict (summary.json) on every rank."""
    from .trainer import train as run

    return _run(run, "train", config, overrides, out, comm, resume, quiet)


def federate(config=None, overrides=None, out=None, comm=None, resume=None, quiet=True):
    """Federated rounds (rank 0 of `comm` aggregates); returns the summary dict on every rank."""
    from .federated.run import federate as run

    return _run(run, "federate", config, overrides, out, comm, resume, quiet)


def _run(run, command, config, overrides, out, comm, resume, quiet):
    """config: a TOML path or None; overrides: {"section.key": value} or ["section.key=value", …]; a key
    the command does not read is refused (config.load)."""
    from .comm import Comm
    from .config import load

    comm = comm if isinstance(comm, Comm) else Comm(comm)  # the CLI passes its own
    cfg = comm.agree(load, config, overrides or (), command)
    return run(cfg, comm, out, quiet, resume)


class Predictor:
    """A trained model read from its model.h5, on this process's CPU."""

    def __init__(self, path):
        from .checkpoint import load_model
        from .model import Model

        self.spec, self.params, self.standardize = load_model(path, standardize=True)
        self.model = Model(self.spec)

    def predict_proba(self, x, standardized=False):
        """Class probabilities (N, classes) of samples x, raw as prepare read them (standardised here
        with the training split's statistics stored in model.h5), or rows of an mpitrain data file with
        standardized=True."""
        spec = self.spec
        x = np.asarray(x, np.float32)
        if x.ndim == 0 or int(np.prod(x.shape[1:])) != spec.n_in:
            from .errors import MpitrainError

            shapes = {f"(N, {', '.join(map(str, spec.feature_shape))})", f"(N, {spec.n_in})"}
            raise MpitrainError(f"predict: x has shape {x.shape}; expected {' or '.join(sorted(shapes))}")
        x = x.reshape(len(x), -1)
        if not standardized and self.standardize is not None:
            mean, std = self.standardize
            if len(mean) != spec.n_in:  # one value per channel (images): repeat over each channel's pixels
                mean, std = (np.repeat(v, spec.n_in // len(v)) for v in (mean, std))
            x = (x - mean) / std
        z = self.model.logits(self.params, np.ascontiguousarray(x, np.float32)).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, x, standardized=False):
        """Class labels (N,) of samples x (see predict_proba)."""
        return np.argmax(self.predict_proba(x, standardized), axis=1)


def load_model(path):
    """The model of a model.h5 as a Predictor (predict, predict_proba)."""
    return Predictor(path)
