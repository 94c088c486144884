"""train.optimizer = adamw: torch.optim.AdamW (decoupled weight decay) with a per-parameter decay mask."""
import numpy as np
import pytest

from mpitrain import config
from mpitrain.errors import MpitrainError
from mpitrain.kernels import cpu
from mpitrain.optim import Optimizer

# A fixed tiny case: 6 parameters, 4 steps with a changing learning rate, the summed gradient scaled by 0.5
P0 = [0.5, -1.25, 2.0, 0.75, -0.3, 1.5]
MASK = [1, 0, 1, 1, 0, 1]
GRADS = [[0.2, -0.4, 1.0, 0.0, 0.6, -0.8], [-0.1, 0.3, 0.5, -0.7, 0.2, 0.9],
         [0.4, 0.4, -0.6, 0.1, -0.3, 0.05], [0.0, -0.2, 0.3, 0.8, 0.1, -0.5]]
LRS, SCALE = [0.01, 0.02, 0.015, 0.005], 0.5
HYPER = dict(beta1=0.85, beta2=0.99, eps=1e-6, weight_decay=0.1)

# torch 2.13.0 (CPU) on this case: torch.optim.AdamW(lr per step as LRS, betas (0.85, 0.99), eps 1e-6) over two
# parameter groups, the MASK = 1 entries with weight_decay 0.1 and the others with 0, each step's .grad being
# SCALE·g in float32 (a one-off script run in a separate venv; torch is not needed to run this test)
TORCH = [0.46999436616897583, -1.2450693845748901, 1.9553920030593872, 0.7674311399459839, -0.33318546414375305,
         1.4984170198440552]


def adamw_reference(p, grads, lrs, scale, mask, beta1, beta2, eps, weight_decay):
    """PyTorch's documented AdamW algorithm in float64 (amsgrad off, not maximising)."""
    p = np.array(p, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    decay = np.ones_like(p) if mask is None else np.asarray(mask, np.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = scale * np.asarray(g, np.float64)
        p = p - lr * weight_decay * decay * p  # θ ← θ − γλθ
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run(mask, p0=P0, grads=GRADS, lrs=LRS, **hyper):
    opt = Optimizer(cpu, "adamw", len(p0), decay_mask=mask, **(hyper or HYPER))
    p = np.array(p0, np.float32)
    for g, lr in zip(grads, lrs):
        opt.update(p, np.array(g, np.float32), lr, SCALE)
    assert opt.t == len(grads) and set(opt.state) == {"m", "v"}
    return p


@pytest.mark.parametrize("mask", [MASK, None], ids=["mask", "all"])
def test_adamw_matches_the_documented_algorithm(mask):
    expected = adamw_reference(P0, GRADS, LRS, SCALE, mask, **HYPER)
    np.testing.assert_allclose(run(mask), expected, rtol=1e-6, atol=1e-7)


def test_adamw_matches_pytorch():
    np.testing.assert_allclose(run(MASK), TORCH, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run(np.array(MASK, bool)), TORCH, rtol=1e-6, atol=1e-7)  # a bool mask too


def test_adamw_decay_mask_matters():
    masked, everywhere, nowhere = run(MASK), run(None), run([0] * 6)
    on = np.array(MASK, bool)
    np.testing.assert_array_equal(masked[on], everywhere[on])  # decayed entries: as with no mask
    np.testing.assert_array_equal(masked[~on], nowhere[~on])  # the others: not decayed at all
    assert np.all(np.abs(masked[~on] - everywhere[~on]) > 1e-5)  # ... which makes a difference
    # decoupled: the decay scales the parameter and nothing else (Adam's L2 term would go through m and v)
    adam = Optimizer(cpu, "adam", 6, **HYPER)
    p = np.array(P0, np.float32)
    for g, lr in zip(GRADS, LRS):
        adam.update(p, np.array(g, np.float32), lr, SCALE)
    assert np.all(np.abs(p - everywhere) > 1e-5)


def test_adamw_bigger_vector():
    """Many entries (the parallel loop), a random mask and more steps against the reference."""
    r = np.random.default_rng(3)
    n = 1000
    p0, mask = r.standard_normal(n), r.integers(0, 2, n)
    grads, lrs = r.standard_normal((7, n)), np.linspace(1e-3, 3e-2, 7)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
    np.testing.assert_allclose(run(mask, p0, grads, lrs, **hyper),
                               adamw_reference(p0.astype(np.float32), grads.astype(np.float32), lrs, SCALE, mask,
                                               **hyper), rtol=1e-5, atol=1e-6)


def test_adamw_bad_mask():
    with pytest.raises(MpitrainError, match=r"decay_mask has shape \(5,\); expected \(6,\)"):
        Optimizer(cpu, "adamw", 6, decay_mask=np.ones(5, np.uint8))


def test_fednova_refuses_adamw(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(MpitrainError, match=r"fed\.strategy = 'fednova' with train\.optimizer = 'adamw'"):
        config.load(overrides=["fed.strategy=fednova", "train.optimizer=adamw"])
