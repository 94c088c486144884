"""The Python API: the functions the command line runs, for one's own programs.

    import mpitrain
    summary = mpitrain.train("run.toml", {"train.lr": 0.1, "model.kind": "lenet5"}, out="runs/a")
    summary = mpitrain.federate(overrides={"data.path": "parts.h5", "fed.rounds": 20}, comm=my_comm)
    model = mpitrain.load_model("runs/a/model.h5")
    labels = model.predict(x)          # x: (N, *feature_shape) or (N, features), raw as given to prepare
    labels = model.predict(x, layout="nhwc")  # x: (N, H, W, C), channels last (prepare --layout nhwc)
    targets = mpitrain.load_model("runs/diabetes/model.h5").predict(x)  # regression: (N, K), original units
    names = [model.class_names[k] for k in labels]  # where the training data named its classes

Every rank of `comm` (an mpi4py communicator; default COMM_WORLD) calls the same function with the same
arguments; only that communicator is used, so a call works inside a larger MPI program.  An `out` that holds
a run is refused unless `resume` continues it or `overwrite=True` replaces it.  Bad input raises
MpitrainError with the one line the command line prints, on every rank of `comm`.  Signals are the
caller's: the API does not install mpitrain's SIGTERM/SIGUSR1/SIGINT handlers (the command line does).
"""
import numpy as np


def train(config=None, overrides=None, out=None, comm=None, resume=None, quiet=True, overwrite=False):
    """Synchronous data-parallel training; returns the summary dict (summary.json) on every rank."""
    from .trainer import train as run

    return _run(run, "train", config, overrides, out, comm, resume, quiet, overwrite)


def federate(config=None, overrides=None, out=None, comm=None, resume=None, quiet=True, overwrite=False):
    """Federated rounds (rank 0 of `comm` aggregates); returns the summary dict on every rank."""
    from .federated.run import federate as run

    return _run(run, "federate", config, overrides, out, comm, resume, quiet, overwrite)


def _run(run, command, config, overrides, out, comm, resume, quiet, overwrite):
    """config: a TOML path or None; overrides: {"section.key": value} or ["section.key=value", …]; a key
    the command does not read is refused (config.load); resume: None, "auto", a run folder or a checkpoint
    file."""
    from .comm import Comm
    from .config import load
    from .session import check_start

    comm = comm if isinstance(comm, Comm) else Comm(comm)  # the CLI passes its own
    cfg = comm.agree(load, config, overrides or (), command)
    comm.agree(check_start, out, resume, overwrite, cfg.checkpoint.dir)
    return run(cfg, comm, out, quiet, resume, overwrite)


class Predictor:
    """A trained model read from its model.h5, on this process's CPU."""

    def __init__(self, path):
        from .checkpoint import load_model
        from .model import Model

        self.path = path
        self.spec, self.params, self.standardize, state = load_model(path, standardize=True, state=True)
        self.model = Model(self.spec)
        if state is not None:  # BatchNorm's running statistics
            self.model.ctx.state[:] = state
        if self.spec.task == "regress":  # what prepare standardised the targets with: predict undoes it
            from .evaluate import model_targets

            self.targets = model_targets(path)
        from .classes import model_names

        # the training data's class names (class k is class_names[k]), or None
        self.class_names = model_names(path, self.spec.n_out) if self.spec.task == "classify" else None

    def rows(self, x, layout="nchw"):
        """x as float32 rows (N, features) in the model's feature order: x is (N, *feature_shape) or flat
        (N, features), or with layout="nhwc" its samples have their channels last (prepare --layout nhwc)."""
        from .errors import MpitrainError

        fs, n_in = self.spec.feature_shape, self.spec.n_in
        x = np.asarray(x, np.float32)
        last = (*fs[1:], fs[0]) if len(fs) > 1 else None  # a sample with its channels last
        if layout == "nhwc":
            if last is None or x.shape[1:] != last:
                raise MpitrainError(f"predict: x has shape {x.shape}; with layout='nhwc' expected "
                                    f"(N, {', '.join(map(str, last or fs))})"
                                    + ("" if last else " (the model's samples have no channel axis)"))
            x = x.transpose(0, x.ndim - 1, *range(1, x.ndim - 1))
        elif layout != "nchw":
            raise MpitrainError(f"predict: layout={layout!r}; expected 'nchw' (channels first) or 'nhwc'")
        elif x.shape[1:] not in (fs, (n_in,)):  # an equal count is not enough: (32, 32, 3) is not (3, 32, 32)
            shapes = " or ".join(sorted({f"(N, {', '.join(map(str, fs))})", f"(N, {n_in})"}))
            hint = (f": its samples have their channels last; expected (N, {', '.join(map(str, fs))}) (channels "
                    f"first) or (N, {n_in}), or pass layout='nhwc'" if x.shape[1:] == last != fs
                    else f"; expected {shapes}")
            raise MpitrainError(f"predict: x has shape {x.shape}{hint}")
        return x.reshape(len(x), n_in)

    def outputs(self, x, standardized=False, layout="nchw"):
        """The model's outputs (N, classes or targets), float64, for samples x (see rows), raw as prepare read
        them (standardised here with the training split's statistics stored in model.h5), or with
        standardized=True rows standardised with those statistics (the model's own data file)."""
        from .data.prepare import per_feature

        x = self.rows(x, layout)
        if not standardized and self.standardize is not None:
            mean, std = per_feature(self.standardize, self.spec.n_in)
            x = (x - mean) / std
        return self.model.logits(self.params, np.ascontiguousarray(x, np.float32)).astype(np.float64)

    def predict_proba(self, x, standardized=False, layout="nchw"):
        """Class probabilities (N, classes) of samples x (see outputs)."""
        from .errors import MpitrainError

        if self.spec.task == "regress":
            raise MpitrainError(f"predict_proba: {self.path} is a regression model ({self.spec.n_out} target(s)), "
                                "without class probabilities; predict gives its targets")
        z = self.outputs(x, standardized, layout)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, x, standardized=False, layout="nchw"):
        """Class labels (N,) of samples x (see outputs); a regression model's targets (N, targets) in their
        original units (prepare's standardisation of the targets undone)."""
        if self.spec.task == "regress":
            mean, std = self.targets
            return self.outputs(x, standardized, layout) * std + mean
        return np.argmax(self.predict_proba(x, standardized, layout), axis=1)


    def generate(self, prompt, tokens=200, temperature=0.8, top_k=0, seed=0):
        """A language model's continuation of the text prompt: `tokens` tokens sampled one at a time from
        softmax(logits / temperature) (the top_k most likely only, when top_k > 0; temperature 0: the most
        likely), seeded."""
        from .generate import continuation

        return continuation(self, prompt, tokens, temperature, top_k, seed)


def load_model(path):
    """The model of a model.h5 as a Predictor (predict, predict_proba; generate for language models)."""
    return Predictor(path)
