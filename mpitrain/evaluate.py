"""Distributed evaluation: each rank scores its contiguous part of a split; sums are reduced."""
from .data.shard import block
from .errors import MpitrainError


def read_part(comm, data, split="test"):
    """This rank's rows of `split` (all ranks agree on errors)."""
    n = data.n_test if split == "test" else data.n_train
    return comm.agree(data.read, split, *block(n, comm.size, comm.rank), comm.rank)


def evaluate(comm, model, params, x, y):
    """(mean loss, accuracy) over the union of every rank's (x, y)."""
    loss, correct = model.score(params, x, y) if len(x) else (0.0, 0)
    loss, correct, n = comm.allreduce([loss, correct, len(x)])
    return loss / n, correct / n


def check_compatible(spec, data, model_path):
    if spec.n_in != data.n_features or spec.n_out != data.n_classes:
        raise MpitrainError(f"{model_path}: the model takes {spec.n_in} features and {spec.n_out} classes, "
                            f"{data.path} has {data.n_features} features and {data.n_classes} classes")
    if spec.sizes is None and spec.feature_shape != data.feature_shape:  # conv/pool read the shape
        raise MpitrainError(f"{model_path}: the model takes samples of shape {list(spec.feature_shape)}, "
                            f"{data.path} has {list(data.feature_shape)}")
