"""Atomic HDF5 files: the trained model (model.h5) written as temp file → fsync → os.replace."""
import os

import numpy as np

from . import __version__
from .errors import MpitrainError
from .model import ModelSpec


def atomic_write(path, write):
    """Call write(tmp_path), then move the finished file into place: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(path, spec, params, **attrs):
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=params)
            f.attrs.update(spec.attrs())
            f.attrs.update(attrs, mpitrain_version=__version__)

    atomic_write(path, write)


def load_model(path):
    """(ModelSpec, flat float32 parameters) from a model.h5."""
    import h5py

    if not os.path.exists(path):
        raise MpitrainError(f"{path}: no such model file")
    try:
        with h5py.File(path, "r") as f:
            if "params" not in f:
                raise MpitrainError(f"{path}: missing dataset params (expected a model.h5 written by mpitrain)")
            missing = [k for k in ("kind", "n_in", "n_out", "hidden", "activation") if k not in f.attrs]
            if missing:
                raise MpitrainError(f"{path}: missing model attribute(s) {', '.join(missing)}")
            spec = ModelSpec.from_attrs(f.attrs)
            params = np.asarray(f["params"][...], np.float32)
    except OSError:
        raise MpitrainError(f"{path}: not an HDF5 file (expected a model.h5 written by mpitrain)") from None
    if params.shape != (spec.n_params,):
        raise MpitrainError(f"{path}: params has shape {params.shape}, the model described needs ({spec.n_params},)")
    return spec, params
