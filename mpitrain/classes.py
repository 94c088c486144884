"""Class names: string labels become classes, the names travel from the data file into model.h5.

prepare turns string labels (a CSV label column with text in it, an npz/npy `y` of a unicode dtype) into
class indices by the sorted names (name → 0…K−1) and stores the names as the attribute `class_names` (an
HDF5 string array, as images:DIR does with its folder names); train copies it into model.h5; eval and
predict speak in names.
"""
import numpy as np

from .errors import MpitrainError


def encode(source, y, y_test, classes):
    """(class names sorted, y, y_test as int64 indices) of string labels (y_test may be None); numbers are
    returned as they are, with names None.  Both splits' names are classes (a test split may hold one the
    training split lacks: its score says so)."""
    named = [a for a in (y, y_test) if a is not None and np.asarray(a).dtype.kind == "U"]
    if not named:
        return None, y, y_test
    if len(named) != (1 if y_test is None else 2):
        raise MpitrainError(f"{source}: one of y and y_test holds class names, the other numbers; expected the "
                            "same kind")
    if classes is not None:
        raise MpitrainError(f"--classes: not for {source} (its labels are class names, and the names are the classes)")
    names = np.unique(np.concatenate([np.ravel(a) for a in named]))
    if len(names) < 2:
        raise MpitrainError(f"{source}: every label is {str(names[0])!r}, so the file would have 1 class; "
                            "expected ≥ 2")
    y, y_test = (None if a is None else np.searchsorted(names, a).astype(np.int64) for a in (y, y_test))
    return [str(n) for n in names], y, y_test


def names_of(attrs, n_classes, where):
    """The class names stored in HDF5 attributes (a data file's or a model.h5's), checked, or None."""
    if "class_names" not in attrs:
        return None
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(attrs["class_names"]).ravel()]
    if len(names) != n_classes:
        raise MpitrainError(f"{where}: attribute class_names holds {len(names)} names for {n_classes} classes")
    return names


def label_map(model_names, data_names, model_path, data_path):
    """The model's class index of each of the data file's labels (an int64 array), where both name their
    classes and the file's differ from the model's (a test file prepared apart may lack a class); None where
    the labels are the model's as they are.  A class of the file the model does not know: one line."""
    if model_names is None or data_names is None or model_names == data_names:
        return None
    index = {n: i for i, n in enumerate(model_names)}
    unknown = [n for n in data_names if n not in index]
    if unknown:
        raise MpitrainError(f"{data_path}: class {unknown[0]!r} is not one of the classes of {model_path} "
                            f"({', '.join(model_names[:10])}{', …' if len(model_names) > 10 else ''})")
    return np.array([index[n] for n in data_names], np.int64)


def model_names(path, n_classes):
    """The class names model.h5 carries (from its training data), or None."""
    import h5py

    with h5py.File(path, "r") as f:
        return names_of(f.attrs, n_classes, path)


def for_eval(model_path, spec, data):
    """(the model's class names or None, label_map of the data file's labels) for eval."""
    names = model_names(model_path, spec.n_out) if spec.task == "classify" else None
    return names, label_map(names, names_of(data.f.attrs, data.n_classes, data.path), model_path, data.path)
