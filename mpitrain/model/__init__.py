"""Models on one flat float32 parameter vector: a stack of layers (stack.py: the syntax; layers.py and nn.py:
the layers) whose named tensors the parameter table (table.py) lays out, and a task's loss on its output
(tasks.py).  Each layer owns a slice of the flat vector and sees views, so the optimizer, the allreduce, the
checkpoint, DP and secure aggregation each see one contiguous array.

model.kind names a preset (softmax, mlp, lenet5, fedavg_cnn, resnet8, resnet20, gpt) or `layers`
(model.layers, a list of layer strings); either way the model is the canonical stack `spec.stack`, stored in
model.h5 and checkpoints.
"""
import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import MpitrainError
from ..kernels import arrays, backend
from ..kernels.cpu import ACTIVATIONS
from .base import Context, Sequence
from .layers import Conv, input_shape
from .nn import Attention, Residual, texts
from .stack import build
from .table import ParameterTable
from .tasks import TASKS

FAMILIES = ("resnet8", "resnet20", "gpt")  # presets built from model.* settings
KINDS = ("softmax", "mlp", "lenet5", "fedavg_cnn", *FAMILIES, "layers")

PRESETS = {
    # LeCun et al. 1998 with ReLU and max-pooling: 61,706 parameters on 1×28×28, 10 classes
    "lenet5": ("conv2d 6 5 same", "relu", "maxpool2d 2", "conv2d 16 5 valid", "relu", "maxpool2d 2", "flatten",
               "dense 120", "relu", "dense 84", "relu"),
    # McMahan et al. 2017: 1,663,370 parameters on 1×28×28, 10 classes ('same' padding: 7·7·64 → 512)
    "fedavg_cnn": ("conv2d 32 5 same", "relu", "maxpool2d 2", "conv2d 64 5 same", "relu", "maxpool2d 2",
                   "flatten", "dense 512", "relu"),
}


def resnet(blocks, norm):
    """He et al. 2016's CIFAR ResNet of 6·blocks + 2 layers: a 3×3 conv of 16 channels, three stages of
    `blocks` residual blocks (16, 32, 64 channels; the first of the last two stages halves the map with
    stride 2 and a 1×1 projection shortcut), global average pooling; convs without bias before a norm."""
    n = "batchnorm" if norm == "batch" else "groupnorm 2"
    stack = ["conv2d 16 3 same bias=false", n, "relu"]
    for c in (16, 32, 64):
        for b in range(blocks):
            s = 2 if b == 0 and c > 16 else 1
            block = (f"residual [conv2d {c} 3 same stride={s} bias=false, {n}, relu, conv2d {c} 3 same bias=false, "
                     f"{n}]")
            stack += [block + (f" shortcut [conv2d {c} 1 stride={s} bias=false, {n}]" if s > 1 else ""), "relu"]
    return stack + ["globalavgpool"]


def gpt(n_layer, n_head, n_embd, dropout):
    """GPT-2 (Radford et al. 2019, as nanoGPT writes it): token and learned position embeddings, n_layer
    pre-LayerNorm blocks (causal self-attention, then a GELU MLP of 4·n_embd), a final LayerNorm and the
    output layer tied to the token embedding.  Normal(0, 0.02) weights, the residual projections
    0.02/√(2·n_layer)."""
    drop = [f"dropout {dropout:g}"] if dropout > 0 else []
    proj = f"std={0.02 / math.sqrt(2 * n_layer):.6g}"
    stack = [f"embedding {n_embd}", *drop]
    for _ in range(n_layer):
        stack += [f"residual [{', '.join(['layernorm', f'attention {n_head}', f'dense {n_embd} {proj}', *drop])}]",
                  f"residual [{', '.join(['layernorm', f'dense {4 * n_embd} std=0.02', 'gelu', f'dense {n_embd} {proj}', *drop])}]"]
    return stack + ["layernorm", "tied"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, independent of its parameters: the kind (and the hidden sizes and activation of an
    mlp, the user's layers, or a family's settings), the data's feature shape, the number of outputs (classes,
    targets, or the vocabulary of a language model) and the task.  stored: the canonical stack read back from
    a model file (a family is rebuilt exactly as saved)."""
    kind: str
    n_in: int
    n_out: int
    hidden: tuple = ()
    activation: str = "relu"
    layers: tuple = ()
    feature_shape: tuple = ()
    task: str = "classify"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    norm: str = "batch"
    stored: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MpitrainError(f"model.kind = {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.task not in TASKS:
            raise MpitrainError(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.activation not in ("relu", "tanh"):
            raise MpitrainError(f"model.activation = {self.activation!r}: expected relu or tanh")
        if self.kind == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise MpitrainError(f"model.hidden = {list(self.hidden)}: an mlp needs one or more positive sizes")
        if (self.kind == "layers") != bool(self.layers):
            raise MpitrainError("model.layers: " + ("model.kind = 'layers' needs a list of layers" if self.layers == ()
                                                    else f"only used with model.kind = 'layers' (not {self.kind!r})"))
        if self.norm not in ("batch", "group"):
            raise MpitrainError(f"model.norm = {self.norm!r}: expected batch or group")
        for key in ("n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise MpitrainError(f"model.{key} = {getattr(self, key)}: expected an integer ≥ 1")
        if not 0 <= self.dropout < 1:
            raise MpitrainError(f"model.dropout = {self.dropout}: expected a rate in [0, 1)")
        if (self.kind == "gpt") != (self.task == "lm") and self.kind != "layers":
            raise MpitrainError(f"model.kind = {self.kind!r} on {TASKS[self.task].data} data: " + (
                "gpt is a language model: it needs a token stream (prepare --source text:FILE)" if self.kind == "gpt"
                else "a language model needs model.kind = 'gpt' or 'layers' (starting with an embedding)"))
        shape = tuple(int(d) for d in self.feature_shape) or (self.n_in,)
        if math.prod(shape) != self.n_in:
            raise MpitrainError(f"feature_shape {shape} does not hold {self.n_in} features")
        object.__setattr__(self, "feature_shape", shape)
        if self.stored:
            stack = tuple(self.stored)
        elif self.kind == "softmax":
            stack = ()
        elif self.kind == "mlp":
            stack = tuple(x for h in self.hidden for x in (f"dense {h}", self.activation))
        elif self.kind == "gpt":
            stack = tuple(gpt(self.n_layer, self.n_head, self.n_embd, self.dropout))
        elif self.kind.startswith("resnet"):
            stack = tuple(resnet({"resnet8": 1, "resnet20": 3}[self.kind], self.norm))
        else:
            stack = PRESETS.get(self.kind, tuple(self.layers))
        if self.kind not in ("layers", "gpt") and not self.stored:
            stack += (f"dense {self.n_out}",)
        built = build(list(stack), shape, self.n_out, self.task)
        object.__setattr__(self, "stack", tuple(texts(built)))
        object.__setattr__(self, "n_params", sum(l.n_params for l in built))

    @property
    def sizes(self):
        """(inputs, outputs of every dense layer) of a stack of dense layers only; None otherwise."""
        if not all(t.startswith("dense") and "std=" not in t or t in ACTIVATIONS for t in self.stack):
            return None
        return (self.n_in, *(int(t.split()[1]) for t in self.stack if t.startswith("dense")))

    def describe(self):
        """For log lines: 64-128-10 for dense stacks, a family's settings, else the layers."""
        if self.sizes:
            return "-".join(map(str, self.sizes))
        if self.kind == "gpt":
            return (f"{self.n_layer} layer{'s' * (self.n_layer > 1)}, {self.n_head} head{'s' * (self.n_head > 1)}, "
                    f"{self.n_embd} wide, block {self.feature_shape[0]}, vocabulary {self.n_out}")
        if self.kind.startswith("resnet"):
            return f"{self.norm} norm"
        return ", ".join(self.stack)

    def attrs(self):
        """HDF5 attributes describing the model (stored beside the parameter vector): everything a reader
        needs to rebuild it; the hidden/activation pair keeps older readers of mlp files working."""
        return {"kind": self.kind, "n_in": self.n_in, "n_out": self.n_out,
                "hidden": np.array(self.hidden if self.kind == "mlp" else (), np.int64),
                "activation": self.activation, "layers": json.dumps(list(self.stack)),
                "feature_shape": np.array(self.feature_shape, np.int64), "task": self.task,
                "family": json.dumps({k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "dropout", "norm")})}

    @classmethod
    def from_attrs(cls, a):
        """From attrs(), or from a model.h5 written before the layer library (softmax/mlp, flat input)."""
        kind = str(a["kind"])
        stack = tuple(json.loads(str(a["layers"]))) if "layers" in a else ()
        return cls(kind=kind, n_in=int(a["n_in"]), n_out=int(a["n_out"]),
                   hidden=tuple(int(h) for h in a["hidden"]), activation=str(a["activation"]),
                   layers=stack if kind == "layers" else (),
                   feature_shape=tuple(int(d) for d in a.get("feature_shape", ())),
                   task=str(a.get("task", "classify")), **json.loads(str(a.get("family", "{}"))),
                   stored=stack if kind in FAMILIES else ())


class Model:
    """The layers of a spec with their per-batch-size buffers, on a kernel backend (cpu or cuda)."""

    def __init__(self, spec, device="cpu"):
        self.spec = spec
        self.k = backend(device)
        self.xp = arrays(self.k)  # buffers live where the kernels compute (host or GPU)
        self.net = build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)
        self.table = ParameterTable(self.net)
        self.ctx = Context()
        for l in (x for layer in self.net for x in layer.layers()):
            l.ctx = self.ctx
            if device != "cpu" and not l.cuda:
                raise MpitrainError(f"train.device = {device!r}: layer {l.name} ({l.text().split()[0]}) has no "
                                    f"{device.upper()} kernels yet; train this model with train.device = 'cpu'")
            if isinstance(l, Residual):
                l.bind(self.xp)
        if spec.task == "regress" and not hasattr(self.k, "mse"):
            raise MpitrainError(f"train.device = {device!r}: regression's squared-error kernel runs on the CPU only; "
                                "use train.device = 'cpu'")
        self.state_table = ParameterTable(self.net, state=True)
        self.ctx.state = self.state_table.init(0)  # BatchNorm running statistics: means 0, variances 1
        self.task = TASKS[spec.task]
        self.seq = Sequence(self.net, self.xp)
        self.with_params = [l for l in self.net if l.n_params]
        self.starts = [l.offset for l in self.with_params]  # layer slices (overlap buckets cut there)
        self.nhwc, self.transpose = input_shape(spec.feature_shape, spec.stack[0])
        self._entry = {}
        self.trace = []  # after loss_grad: (layer, input, dL/dz, scratch) of each layer with parameters (DP-SGD)

    @property
    def n_params(self):
        return self.spec.n_params

    def layers(self, flat):
        """[(W, b)] views into a flat vector (parameters or gradients), one per layer with parameters."""
        return [l.views(flat) for l in self.with_params]

    def init_params(self, seed, part=None):
        """The initial parameters (the table's rules; dense and conv weights He (relu) or Glorot uniform,
        biases zero), seeded.  A host array whatever the device (the caller broadcasts it, then moves it).
        part (a slice of the flat vector): only those entries, the same values (fsdp never holds them all)."""
        return self.table.init(seed, part)

    def buffers(self):
        """Every per-batch-size buffer (activations, scratch, gradients between layers, the NHWC copy of
        the input): what a batch leaves behind here (federated trace erasure zeroes them)."""
        yield from self.seq.buffers()
        yield from self._entry.values()

    def _forward(self, params, x):
        """Each layer's input, and the output."""
        n = len(x)
        if self.transpose:  # stored channels-first: one copy of the batch into NHWC
            if n not in self._entry:
                self._entry[n] = self.xp.empty((n, *self.nhwc))
            self.k.to_nhwc(x, self._entry[n])
            x = self._entry[n]
        elif self.spec.task != "lm":
            x = x.reshape(n, *self.nhwc)
        return self.seq.forward(self.k, lambda l, down: _weights(params, l, down), x)

    def loss_grad(self, params, grad, x, y, ready=None, dx=None):
        """grad ← d(summed loss)/d(params) over the batch (x, y).  Returns (loss sum, hit sum) (tasks.py).
        ready(offset), if given, is called as soon as grad[offset:] is final (after each layer).  dx, if
        given (x's shape; channels-last for multi-channel images), receives d(summed loss)/dx (bench leakage)."""
        self.ctx.training = True
        ins, out = self._forward(params, x)
        loss, hits = self.task.loss_grad(self.k, out, y)
        self.trace = []

        def done(l, a, dz, scratch):
            self.trace.append((l, a, dz, scratch))
            if ready is not None:
                ready(l.offset)

        store = hasattr(grad, "grad_of")  # sync.FSDP: the gradient leaves unit by unit
        self.seq.backward(self.k, lambda l, down: _weights(params, l, down),
                          lambda l: grad.grad_of(l) if store else l.views(grad), ins, out,
                          dx=None if dx is None else dx.reshape(len(x), *self.net[0].in_shape), done=done)
        return loss, hits

    def logits(self, params, x):
        """The outputs (N, *output shape) of host rows x, as a host array, in chunks like score."""
        self.ctx.training = False
        out = np.empty((len(x), *self.net[-1].out_shape), np.float32)
        chunk = self._chunk()
        for i in range(0, len(x), chunk):
            out[i:i + chunk] = self.xp.to_host(self._forward(params, self.xp.to_device(x[i:i + chunk]))[1])
        return out

    def _chunk(self):
        """Samples per chunk of evaluation: its buffers stay within ~64 MB."""
        per_sample = 0
        for l in (x for layer in self.net for x in layer.layers()):
            per_sample += 4 * math.prod(l.out_shape)
            if isinstance(l, Conv):
                per_sample += 4 * math.prod(l.geom[6:]) * l.k_len
            if isinstance(l, Attention):
                per_sample += 4 * (l.H * l.T * l.T + 6 * l.T * l.C)
        return max(1, min(4096, (64 << 20) // per_sample))

    def score(self, params, x, y, chunk=None):
        """(loss sum, hit sum) of the model on host arrays (x, y), in chunks (moved to the device)."""
        self.ctx.training = False
        chunk = chunk or self._chunk()
        loss, hits = 0.0, 0
        for i in range(0, len(x), chunk):
            _, out = self._forward(params, self.xp.to_device(x[i:i + chunk]))
            l, c = self.task.loss_grad(self.k, out, self.xp.to_device(y[i:i + chunk]))
            loss, hits = loss + l, hits + c
        return loss, hits


def _weights(params, l, down=False):
    """A layer's views of the flat vector, or gathered for it by a store that holds only a shard
    (sync.FSDP: fetch, and grad_of for the gradient); None for a layer without parameters."""
    if not l.n_params:
        return None
    return params.fetch(l, down) if hasattr(params, "fetch") else l.views(params)
