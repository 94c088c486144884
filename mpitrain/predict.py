"""`python -m mpitrain predict --model M --input FILE`: a trained model's predictions for a file of samples.

FILE is an .npz (array x: raw samples as given to prepare, (N, *feature_shape), flat (N, features), or with
--layout nhwc channels last), a folder of images (its PNG/JPEG files, or class folders of them as prepare's
images:DIR reads them; converted and resized to the model's channels and size), or a data file written by
prepare (--split; its rows are standardised with the file's statistics, so they are brought to the model's,
as eval does).  Every path ends in api.Predictor, which standardises raw rows with the model's statistics:
the CSV holds what `mpitrain.load_model(M).predict(x)` returns.

The CSV: `row` (the sample's index in FILE; `file`, an image's path within the folder), then `class` (the
class's name where the model has names, else its index), then with --top K the K most likely classes with
their probabilities (`class_1, p_1, …`); a regression model's `target_1, …` (its predict's values).
"""
import csv
import os

import numpy as np

from .errors import MpitrainError


def _images(predictor, root):
    """(x (N, C, H, W) raw pixels, the files' paths within root) of a folder's images, or of its class
    folders' (prepare's images:DIR), converted to the model's channels (1: grey, 3: RGB) and resized to its
    size as prepare --grayscale --image-size H W would."""
    from .data.prepare import IMAGE_SUFFIXES, _image_folder, _read_image, _visible

    fs = predictor.spec.feature_shape
    if len(fs) != 3 or fs[0] not in (1, 3):
        raise MpitrainError(f"--input {root}: a folder of images, but {predictor.path} takes samples of shape "
                            f"{list(fs)}; expected a model of images (1 or 3 channels)")
    files = sorted(e.path for e in _visible(root) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
    files = files or [path for path, _ in _image_folder(root)[1]]
    x = np.empty((len(files), *fs), np.uint8)
    for i, path in enumerate(files):
        a = _read_image(path, "L" if fs[0] == 1 else "RGB", fs[1:])
        if isinstance(a, str):
            raise MpitrainError(f"{path}: {a}; expected a readable PNG or JPEG image")
        x[i] = a
    return x, [os.path.relpath(path, root) for path in files]


def _data_file(predictor, path, split):
    """Rows of a prepare'd file's split, standardised as the model's training rows were."""
    from .data.shard import DataFile
    from .evaluate import as_trained

    data = DataFile(path)
    if data.task != predictor.spec.task:
        raise MpitrainError(f"--input {path}: a {data.task} data file; {predictor.path} is a "
                            f"{predictor.spec.task} model")
    if data.feature_shape != predictor.spec.feature_shape:
        raise MpitrainError(f"--input {path}: samples of shape {list(data.feature_shape)}; {predictor.path} "
                            f"takes {list(predictor.spec.feature_shape)}")
    if f"{split}/x" not in data.f:
        raise MpitrainError(f"--input {path}: no {split}/ split (--split names one of "
                            f"{', '.join(s for s in ('train', 'val', 'test') if s in data.f)})")
    x = np.asarray(data.f[f"{split}/x"][...], np.float32)
    if not np.isfinite(x).all():
        raise MpitrainError(f"--input {path}: {split}/x holds NaN or Inf (first at row "
                            f"{int(np.argmax(~np.isfinite(x).all(axis=1)))})")
    return as_trained(x, data.standardize, predictor.standardize)


def inputs(predictor, path, split=None, layout=None):
    """(x, standardized, files) of --input: see the module's docstring.  layout: npz only; split: a data
    file only (default test)."""
    import h5py

    if not os.path.exists(path):
        raise MpitrainError(f"--input {path}: no such file or folder")
    kind = "folder" if os.path.isdir(path) else "npz" if path.endswith(".npz") else "h5" if h5py.is_hdf5(path) else None
    if kind is None:
        raise MpitrainError(f"--input {path}: expected an .npz file (array x), a folder of images or an HDF5 data "
                            "file written by prepare")
    if layout is not None and kind != "npz":
        raise MpitrainError(f"--layout: only for an .npz --input, not {path}")
    if split is not None and kind != "h5":
        raise MpitrainError(f"--split: only for a data file written by prepare, not {path}")
    if kind == "folder":
        x, files = _images(predictor, path)
        return x, False, files
    if kind == "h5":
        return _data_file(predictor, path, split or "test"), True, None
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle an input
            if "x" not in z.files:
                raise MpitrainError(f"--input {path}: no array x (it holds {', '.join(z.files) or 'none'}); "
                                    "expected the samples as x")
            x = z["x"]
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"--input {path}: cannot read as .npz ({exc})") from None
    if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
        raise MpitrainError(f"--input {path}: x must hold finite real numbers (dtype {x.dtype})")
    return predictor.rows(x, layout or "nchw"), False, None


def table(predictor, x, standardized=False, files=None, top=0):
    """(header, rows) of the predictions for rows x (api.Predictor.rows' form)."""
    spec, n = predictor.spec, len(x)
    first = [["row"] + (["file"] if files else []), [[i] + ([files[i]] if files else []) for i in range(n)]]
    if spec.task == "regress":
        if top:
            raise MpitrainError(f"--top {top}: for classifiers; {predictor.path} is a regression model")
        values = np.asarray(predictor.predict(x, standardized)).reshape(n, -1)
        return (first[0] + [f"target_{j + 1}" for j in range(values.shape[1])],
                [r + [f"{v:.9g}" for v in vs] for r, vs in zip(first[1], values)])
    if not 0 <= top <= spec.n_out:
        raise MpitrainError(f"--top {top}: expected 1…{spec.n_out} (the model's classes)")
    names = predictor.class_names or list(range(spec.n_out))
    proba = predictor.predict_proba(x, standardized)
    best = np.argsort(-proba, axis=1, kind="stable")[:, :top]
    header = first[0] + ["class"] + [f"{c}_{j + 1}" for j in range(top) for c in ("class", "p")]
    rows = [r + [names[int(np.argmax(p))]] + [v for c in b for v in (names[c], f"{p[c]:.6g}")]
            for r, p, b in zip(first[1], proba, best)]
    return header, rows


def predict(model, path, output=None, top=0, layout=None, split=None):
    """The predict command (rank 0): the CSV written to output (atomically), or a short table; returns
    the text to print."""
    from .api import Predictor
    from .checkpoint import atomic_write

    predictor = Predictor(model)
    if predictor.spec.task not in ("classify", "regress"):
        raise MpitrainError(f"{model}: a {predictor.spec.task} model; predict is for classifiers and regression "
                            "models (a language model: python -m mpitrain generate)")
    x, standardized, files = inputs(predictor, path, split, layout)
    header, rows = table(predictor, x, standardized, files, top)
    if output is None:
        shown = [header] + [[str(v) for v in r] for r in rows[:20]]
        widths = [max(len(r[j]) for r in shown) for j in range(len(header))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in shown]
        if len(rows) > 20:
            lines.append(f"… {len(rows) - 20} more rows (--output FILE.csv writes them all)")
        return "\n".join(lines)
    if os.path.isdir(output):
        raise MpitrainError(f"--output {output}: is a folder; expected a file name such as "
                            f"{os.path.join(output, 'predictions.csv')}")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([header, *rows])

    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write(output, write)
    except OSError as exc:
        raise MpitrainError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
    return f"{output}: {len(rows)} predictions of {model} for {path}"
