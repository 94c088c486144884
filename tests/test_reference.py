"""mpitrain against PyTorch's numbers (tests/reference/reference.npz, written by make_reference.py from
mpitrain's initial weights, the llm.c way): the outputs, every tensor's gradient and the losses of ten AdamW
steps with global-norm clipping, for a tiny GPT, a resnet8 with BatchNorm and a residual stack with GroupNorm,
LayerNorm and GELU.  PyTorch is not needed here."""
import os
import sys

import numpy as np
import pytest

from mpitrain.model import Model, ModelSpec
from mpitrain.optim import Optimizer
from mpitrain.trainer import Stepper

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
sys.path.insert(0, HERE)
from cases import BETAS, CLIP, EPS, LR, MODELS, SEED, STEPS, WD  # noqa: E402

REF = np.load(os.path.join(HERE, "reference.npz"))


def relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(params=list(MODELS))
def case(request):
    name = request.param
    kw, n = MODELS[name]
    model = Model(ModelSpec(**kw))
    return name, model, model.init_params(SEED), REF[f"{name}/x"], REF[f"{name}/y"]


def test_outputs_match_pytorch(case):
    name, model, params, x, y = case
    model.ctx.training = True  # BatchNorm with the batch's statistics, as PyTorch's reference ran
    _, out = model._forward(params, x)
    assert relative(out, REF[f"{name}/logits"].reshape(out.shape)) <= 1e-4


def test_every_gradient_matches_pytorch(case):
    name, model, params, x, y = case
    grad = np.zeros_like(params)
    model.loss_grad(params, grad, x, y)
    grad /= len(x)  # PyTorch's is the gradient of the mean loss
    for e in model.table:
        got, want = (v[e.offset:e.offset + e.size] for v in (grad, REF[f"{name}/grad"]))
        assert relative(got, want) <= 1e-4, (e.name, relative(got, want))


def test_ten_adamw_steps_with_clipping_match_pytorch(case):
    name, model, params, x, y = case
    opt = Optimizer(model.k, "adamw", len(params), 0.0, *BETAS, EPS, WD, decay_mask=model.table.decay_mask())
    step = Stepper(model, opt, clip_norm=CLIP)
    losses = [step(params, x, y, LR, 1.0 / len(x))[0] / len(x) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, REF[f"{name}/losses"], rtol=1e-5, atol=1e-6)
