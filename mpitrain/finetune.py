"""Starting from a trained model (train.init) and keeping tensors fixed (train.freeze).

Both speak in the parameter table's names (model/table.py: "layers.0.weight", "layers.0.bias", …): a name
picks that tensor, a dotted prefix every tensor under it ("layers.3" picks layers.3.weight and layers.3.bias,
not layers.30.*), and "head" the tensors of the last layer with parameters (the classifier; where the output
layer uses another layer's tensors, as a GPT's uses its embedding layer's, that layer)."""
import numpy as np

from .checkpoint import load_model
from .errors import MpitrainError
from .model import Model


def _shape(e):
    return f"({', '.join(map(str, e.param.shape))})"


def select(model, names, key, tables=None):
    """The names of the entries of tables (default: the parameter table) that names pick; one line for a
    name that picks nothing."""
    tables = tables or (model.table,)
    last = next(l for l in reversed(model.net) if l.n_params or l.shares is not None)
    head = (last.shares or last).name  # a GPT's output layer computes with its embedding layer's tensors
    picked = set()
    for name in names:
        prefix = head if name == "head" else name
        hits = {e.name for table in tables for e in table if e.name == prefix or e.name.startswith(prefix + ".")}
        if not hits:
            layers = [l.name for l in model.with_params]
            raise MpitrainError(f"{key}: {name!r} names no tensor of this {model.spec.kind} model (expected 'head', "
                                f"a tensor name such as {model.table.entries[0].name!r} or a layer: "
                                f"{', '.join(layers[:3])}{' … ' + layers[-1] if len(layers) > 3 else ''})")
        picked |= hits
    return picked


def trainable(model, freeze):
    """One uint8 per entry of the flat parameter vector: 0 in the tensors train.freeze names, 1 elsewhere."""
    mask = np.ones(model.table.size, np.uint8)
    for name in select(model, freeze, "train.freeze"):
        e = model.table.by_name[name]
        mask[e.offset:e.offset + e.size] = 0
    if not mask.any():
        raise MpitrainError(f"train.freeze = {list(freeze)} freezes every tensor of the model: nothing would train")
    return mask


class Init:
    """The model train.init names, matched to this run's model tensor by tensor (same name, same shape) when
    the run is set up, so a misfit is refused before anything is written; apply() then copies it over the
    fresh parameters and BatchNorm statistics.  Tensors that init_skip picks keep their fresh values."""

    def __init__(self, path, model, data, skip):
        spec, self.params, self.standardize, self.state = load_model(path, standardize=True, state=True)
        if data.feature_shape is not None and spec.feature_shape != data.feature_shape:  # as eval refuses it
            raise MpitrainError(f"{path}: the model takes samples of shape {list(spec.feature_shape)}, "
                                f"{data.path} has {list(data.feature_shape)}")
        source = Model(spec)
        skipped = select(model, skip, "train.init_skip", (model.table, model.state_table))
        self.copies = []  # (vector, offset here, offset in the init model, size)
        for vector, mine, theirs in (("params", model.table, source.table),
                                     ("state", model.state_table, source.state_table)):
            for e in mine:
                if e.name in skipped:
                    continue
                there = theirs.by_name.get(e.name)
                if there is None or there.param.shape != e.param.shape:
                    has = "has no such tensor" if there is None else f"has {_shape(there)}"
                    raise MpitrainError(f"{path}: tensor {e.name} is {_shape(e)} in this {model.spec.kind} model, "
                                        f"the {spec.kind} model there {has} (leave it at its fresh "
                                        f"initialisation with --init-skip {e.name} or --init-skip head)")
                self.copies.append((vector, e.offset, there.offset, e.size))
        self.path, self.n_skipped = path, len(skipped)

    def apply(self, params, state):
        """Copy the matched tensors into params (the full fresh vector) and state (the model's statistics)."""
        for vector, here, there, n in self.copies:
            out, src = (params, self.params) if vector == "params" else (state, self.state)
            out[here:here + n] = src[there:there + n]

    def describe(self):
        n = sum(1 for c in self.copies if c[0] == "params")
        return (f"starting from {self.path}: {n} tensor(s) copied"
                + (f", {self.n_skipped} left at their fresh initialisation" if self.n_skipped else ""))
