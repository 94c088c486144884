"""eval's per-class view of a classifier: the confusion matrix over every rank's rows (one Allreduce of a
K×K int64 buffer), per-class precision, recall and F1 from it, and its PNG (eval --plot)."""
import os

import numpy as np

from .errors import MpitrainError


def confusion(comm, model, params, x, y, k):
    """counts[t, p]: rows of true class t predicted as p, summed over the ranks (each holds its own x, y)."""
    pred = np.argmax(model.logits(params, x), axis=1) if len(x) else np.zeros(0, np.int64)
    counts = np.bincount(y * k + pred, minlength=k * k).astype(np.int64).reshape(k, k)
    return comm.allreduce_sum(counts)


def report(counts, names):
    """The JSON fields of a confusion matrix: classes, per_class {class: precision, recall, f1, support},
    their unweighted means (macro) and the matrix (rows: true class, columns: predicted).  A class never
    predicted has precision 0, one absent from the rows recall 0 (scikit-learn's zero_division=0)."""
    k = len(counts)
    names = names or [str(i) for i in range(k)]
    hits, predicted, support = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    per_class = {n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for n, p, r, f, s in zip(names, precision, recall, f1, support)}
    macro = {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
    return {"classes": names, "per_class": per_class, "macro": macro, "confusion": counts.tolist()}


def check_png(path, classify=True):
    """--plot checked before any work: a classifier, matplotlib there, a file name ending in .png."""
    from .plot import _matplotlib

    if not classify:
        raise MpitrainError(f"--plot {path}: a confusion matrix is for classifiers; this model is not one")
    _matplotlib()
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() != ".png":
        raise MpitrainError(f"--plot {path}: expected a file name ending in .png")


def plot(counts, names, title, path):
    """The confusion matrix as a PNG (written atomically): cells coloured by the share of their true class
    (its row), labelled with their counts while the matrix is small enough to read them."""
    from .plot import _matplotlib, write

    FigureCanvasAgg, Figure, _ = _matplotlib()
    k = len(counts)
    names = names or [str(i) for i in range(k)]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * k, 24)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    if k <= 30:
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize="small",
                        color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=90 if k > 8 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    write(fig, path)
