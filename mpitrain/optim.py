"""Optimizers and learning-rate schedules on flat buffers.

An optimizer is its hyper-parameters plus named state vectors (same length as the parameters), updated
by one fused kernel per step.  ``scale`` turns the summed gradient into the mean (1 / global batch).
Weight decay is an L2 term added to the gradient, except in adamw: decoupled (torch.optim.AdamW), on the
parameters its decay mask selects.
"""
import math

import numpy as np

from .errors import MpitrainError
from .kernels import arrays

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


class Optimizer:
    def __init__(self, kernels, name, n, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decay_mask=None, trainable=None):
        """decay_mask (adamw only; the others decay every parameter): a vector of n flags, 1 where weight decay
        applies, one per entry of the vector this optimizer updates (a rank's shard in comm.mode = sharded);
        None: decay everything.  trainable: n flags, 0 for the entries no update may change (train.freeze),
        laid out the same way; None: all of them."""
        if name not in OPTIMIZERS:
            raise MpitrainError(f"train.optimizer = {name!r}: expected one of {', '.join(OPTIMIZERS)}")
        if name == "adamw" and not hasattr(kernels, "adamw_update"):
            device = kernels.__name__.rsplit(".", 1)[-1]
            raise MpitrainError(f"train.optimizer = 'adamw' is not available with train.device = {device!r}; "
                                f"use train.device = 'cpu' or train.optimizer = 'adam'")
        self.k, self.name = kernels, name
        self.momentum, self.beta1, self.beta2 = float(momentum), float(beta1), float(beta2)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        if decay_mask is not None:
            decay_mask = np.ascontiguousarray(decay_mask, np.uint8)
            if decay_mask.shape != (n,):
                raise MpitrainError(f"optimizer decay_mask has shape {decay_mask.shape}; expected ({n},): one flag "
                                    f"per parameter this optimizer updates")
        self.decay_mask = decay_mask
        # the kernels run on each run of trainable entries (views): the frozen ones keep their bits, and their
        # state slots stay at zero
        self.runs = [(0, n)]
        if trainable is not None and not np.all(trainable):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(trainable, np.int8) != 0, [0]])))
            self.runs = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
        slots = {"sgd": (), "momentum": ("v",), "nesterov": ("v",), "adam": ("m", "v"), "adamw": ("m", "v")}[name]
        self.state = {s: arrays(kernels).zeros(n) for s in slots}  # beside the parameters (host or GPU)
        self.t = 0  # updates applied so far

    def reset(self):
        """Zero the state (a federated client starts every round afresh)."""
        for v in self.state.values():
            v[:] = 0.0
        self.t = 0

    def update(self, params, grad, lr, scale):
        self.t += 1
        for a, b in self.runs:
            self._update(params[a:b], grad[a:b], {k: v[a:b] for k, v in self.state.items()},
                         None if self.decay_mask is None else self.decay_mask[a:b], lr, scale)

    def _update(self, params, grad, state, decay_mask, lr, scale):
        lr, scale, wd = float(lr), float(scale), self.weight_decay
        if self.name == "sgd":
            self.k.sgd_update(params, grad, lr, scale, wd)
        elif self.name == "adam":
            self.k.adam_update(params, grad, state["m"], state["v"], lr, scale,
                               self.beta1, self.beta2, self.eps, wd, self.t)
        elif self.name == "adamw":
            self.k.adamw_update(params, grad, state["m"], state["v"], lr, scale,
                                self.beta1, self.beta2, self.eps, wd, self.t, decay_mask)
        else:
            self.k.momentum_update(params, grad, state["v"], lr, scale, self.momentum, wd,
                                   self.name == "nesterov")


def schedule(kind, lr, total_steps, warmup_steps=0, step_size=1000, gamma=0.1, lr_min=0.0):
    """Return step -> learning rate.  Linear warmup as Hugging Face's get_linear_schedule_with_warmup: step
    i < warmup_steps takes lr·i/warmup_steps (step 0 takes 0), step warmup_steps the peak lr; from there
    constant, a step decay (× gamma every step_size steps) or a cosine decay reaching lr_min at step
    total_steps, just past the last update."""
    if kind not in SCHEDULES:
        raise MpitrainError(f"train.schedule = {kind!r}: expected one of {', '.join(SCHEDULES)}")

    def lr_at(step):
        if step < warmup_steps:
            return lr * step / warmup_steps
        s = step - warmup_steps
        if kind == "step":
            return lr * gamma ** (s // step_size)
        if kind == "cosine":
            span = max(total_steps - warmup_steps, 1)
            return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * min(s, span) / span))
        return lr

    return lr_at
