"""Writes tests/reference/reference.npz: PyTorch's numbers for mpitrain's transformer and residual networks,
the way llm.c's test_gpt2.c checks its C code against a PyTorch debug state.

For each model of MODELS, PyTorch builds the same network from mpitrain's initial weights (its parameter
table: names, shapes, layouts) in float64 with mpitrain/bench/torch_model.py, the builder `bench step` times,
and records the batch, the outputs, the gradient of the mean loss (laid out as mpitrain's flat vector) and
the losses of STEPS AdamW steps with global-norm clipping.
tests/test_reference.py checks mpitrain against the file without needing PyTorch.

Rerun (needs torch; mpitrain is imported from this checkout):
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy numba scipy h5py
    PYTHONPATH=. /tmp/torchenv/bin/python tests/reference/make_reference.py
"""
import os
import sys

import numpy as np
import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
               os.path.dirname(os.path.abspath(__file__))]
from mpitrain.bench.torch_model import TorchModel  # noqa: E402
from mpitrain.model import ModelSpec  # noqa: E402
from mpitrain.model.stack import build  # noqa: E402
from mpitrain.model.table import ParameterTable  # noqa: E402

from cases import BETAS, CLIP, EPS, LR, MODELS, SEED, STEPS, WD  # noqa: E402

def batch(spec, n, rng):
    if spec.task == "lm":
        tokens = rng.integers(0, spec.n_out, (n, spec.feature_shape[0] + 1))
        return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    return rng.standard_normal((n, spec.n_in)).astype(np.float32), rng.integers(0, spec.n_out, n).astype(np.int64)


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    out = {}
    for name, (kw, n) in MODELS.items():
        spec = ModelSpec(**kw)
        flat = ParameterTable(build(list(spec.stack), spec.feature_shape, spec.n_out, spec.task)).init(SEED)
        x, y = batch(spec, n, rng)
        net = TorchModel(spec, flat, torch.float64)
        tx, ty = net.inputs(x, y)
        logits = net(tx)
        net.loss(logits, ty).backward()
        out.update({f"{name}/x": x, f"{name}/y": y, f"{name}/logits": logits.detach().numpy().astype(np.float32),
                    f"{name}/grad": net.flat_grad().astype(np.float32)})
        # AdamW with PyTorch's decoupled decay on the table's decay entries only, global-norm clipping
        opt = torch.optim.AdamW(net.decay_groups(WD), lr=LR, betas=BETAS, eps=EPS)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = net.loss(net(tx), ty)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), CLIP)
            opt.step()
            losses.append(loss.item())
        out[f"{name}/losses"] = np.array(losses)
        print(f"{name}: {net.table.size} parameters, loss {losses[0]:.6f} → {losses[-1]:.6f}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.npz")
    np.savez_compressed(path, **out)
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
