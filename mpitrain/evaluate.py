"""Distributed evaluation: each rank scores its contiguous part of a split; sums are reduced."""
import numpy as np

from .data.shard import block
from .errors import MpitrainError


def read_part(comm, data, split="test"):
    """This rank's rows of `split` (all ranks agree on errors)."""
    n = getattr(data, f"n_{split}")
    return comm.agree(data.read, split, *block(n, comm.size, comm.rank), comm.rank)


def evaluate(comm, model, params, x, y):
    """(mean loss, accuracy) over the union of every rank's (x, y)."""
    loss, correct = model.score(params, x, y) if len(x) else (0.0, 0)
    loss, correct, n = comm.allreduce([loss, correct, len(x)])
    return loss / n, correct / n


def check_compatible(spec, data, model_path):
    """One line where the file's samples are not what the model reads: the feature shape (an equal count
    is not enough: (16, 16, 3) is not (3, 16, 16)) and the classes."""
    if spec.feature_shape != data.feature_shape or spec.n_out != data.n_classes:
        raise MpitrainError(f"{model_path}: the model takes samples of shape {list(spec.feature_shape)} and "
                            f"{spec.n_out} classes, {data.path} has {list(data.feature_shape)} and "
                            f"{data.n_classes} classes")


def as_trained(x, file_stats, model_stats):
    """Rows x of a data file, standardised with file_stats (the file's standardize/; None: raw), standardised
    in place as the model's training rows were, with model_stats (model.h5's; None: x as it is): a file
    prepared apart from the model's has statistics of its own."""
    from .data.prepare import per_feature

    if model_stats is None:
        return x
    n = x.shape[1]
    fm, fs = per_feature(file_stats, n) if file_stats is not None else (np.zeros(n), np.ones(n))
    mm, ms = per_feature(model_stats, n)
    if not (np.array_equal(fm, mm) and np.array_equal(fs, ms)):  # raw = x·fs + fm, then (raw − mm) / ms
        x *= (fs / ms).astype(np.float32)
        x += ((fm - mm) / ms).astype(np.float32)
    return x
