"""Distributed evaluation: each rank scores its contiguous part of a split; sums are reduced."""
import numpy as np

from .data.shard import block
from .errors import MpitrainError


def read_part(comm, data, split="test"):
    """This rank's rows of `split` (all ranks agree on errors)."""
    n = getattr(data, f"n_{split}")
    return comm.agree(data.read, split, *block(n, comm.size, comm.rank), comm.rank)


def scores(comm, model, params, x, y, prefix="test", targets=None):
    """The task's metrics (model/tasks.py) over the union of every rank's (x, y), named prefix_…: the mean
    loss and the accuracy; for regression the mean loss (of the standardised targets, as in training), and
    the RMSE and R² of the targets in their original units: targets is the (mean, std) that prepare
    standardised them with (None: they are as given)."""
    if model.spec.task != "regress":
        loss, hits = model.score(params, x, y) if len(x) else (0.0, 0)
        loss, hits, n = comm.allreduce([loss, hits, len(x)])
        return model.task.metrics(prefix, loss, hits, n)
    K = model.spec.n_out
    loss, sums = 0.0, np.zeros((3, K))
    if len(x):
        from .kernels import cpu  # the predictions are on the host, whatever the model's device

        pred = model.logits(params, x)
        r = pred.astype(np.float64) - y
        loss = model.task.loss_grad(cpu, pred, y)[0]
        y = y.astype(np.float64)
        sums = np.stack([(r * r).sum(axis=0), y.sum(axis=0), (y * y).sum(axis=0)])
    loss, n, *sums = comm.allreduce([loss, len(x), *sums.ravel()])
    sse, total, squares = np.reshape(sums, (3, K))
    var = np.ones(K) if targets is None else np.square(np.asarray(targets[1], np.float64))  # back to original units
    # sums of standardised targets: well conditioned; R² pools the targets, each about its own mean (scikit-learn's
    # multioutput="variance_weighted")
    ss_tot = float(var @ (squares - total * total / n))
    return model.task.metrics(prefix, loss, float(var @ sse), n, (ss_tot, n * K))


WORDS = {"accuracy": "acc", "r2": "R²", "bits_per_token": "bits/token"}  # a log line's names of metrics


def said(metrics, loss=True):
    """metrics (scores) in a log line's words: "test loss 0.0722  test acc 0.9889"."""
    words = []
    for key, value in metrics.items():
        split, name = key.split("_", 1)
        if loss or name != "loss":
            words.append(f"{split} {WORDS.get(name, name)} {value:.4f}")
    return "  ".join(words)


def evaluate(comm, model, params, x, y):
    """(mean loss, accuracy) over the union of every rank's (x, y), of a model that classifies (scores)."""
    s = scores(comm, model, params, x, y)
    return s["test_loss"], s["test_accuracy"]


def target_attrs(targets):
    """model.h5's attributes for the (mean, std) a regression model's targets were standardised with (eval
    and predict undo it); none for other models (targets None)."""
    return {} if targets is None else {"target_mean": targets[0], "target_std": targets[1]}


def model_targets(path):
    """The (mean, std) of target_attrs in the model file at path, or None."""
    import h5py

    with h5py.File(path, "r") as f:
        return (f.attrs["target_mean"], f.attrs["target_std"]) if "target_mean" in f.attrs else None


def check_compatible(spec, data, model_path, named=False):
    """One line where the file's samples are not what the model reads: the task (class labels, regression
    targets, tokens), the feature shape (an equal count is not enough: (16, 16, 3) is not (3, 16, 16)) and
    the number of classes or targets (named: the file's class names are among the model's, classes.label_map)."""
    held = {"classify": "class labels", "regress": "float regression targets", "lm": "a token stream"}
    if spec.task != data.task:
        model = {"classify": f"a classification model ({spec.n_out} classes)", "lm": "a language model",
                 "regress": f"a regression model ({spec.n_out} target(s))"}[spec.task]
        raise MpitrainError(f"{model_path}: {model} scores {held[spec.task]}; {data.path} holds {held[data.task]}")
    if spec.task == "lm":  # the same tokens must mean the same characters
        import h5py

        with h5py.File(model_path, "r") as f:
            mine = {k: str(f.attrs[k]) for k in ("tokenizer", "vocab") if k in f.attrs}
        theirs = {k: str(v) for k, v in data.tokenizer.attrs().items()}
        if mine != theirs:
            raise MpitrainError(f"{model_path}: the model's vocabulary ({spec.n_out} tokens, "
                                f"{mine.get('tokenizer', 'unknown')}) is not {data.path}'s ({data.n_out} tokens, "
                                f"{theirs['tokenizer']}); prepare the text with the model's tokenizer")
        return
    outputs = "targets" if spec.task == "regress" else "classes"
    if spec.feature_shape != data.feature_shape or spec.n_out != data.n_out and not named:
        raise MpitrainError(f"{model_path}: the model takes samples of shape {list(spec.feature_shape)} and "
                            f"{spec.n_out} {outputs}, {data.path} has {list(data.feature_shape)} and "
                            f"{data.n_out} {outputs}")


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
