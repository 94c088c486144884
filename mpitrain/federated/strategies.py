"""Server strategies: pure NumPy functions of (global model x, aggregate, state) → new x, state; and the
local schedule a strategy gives its clients.

`delta` is the weighted mean over sampled clients of Δ_k = x_k − x (FedNova: of Δ_k / a_k, with a_k the
‖a_k‖₁ of the client's local steps (step_norm), and `tau_eff` = Σ p_k a_k).  Equations:
../shared/reference.md (McMahan et al. 2017; Hsu et al. 2019; Reddi et al. 2020, Alg. 2; Wang et al. 2020).
"""
import numpy as np

from ..errors import MpitrainError

STRATEGIES = ("fedsgd", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova")
DEFAULT_SERVER_LR = {"fedadam": 0.1, "fedadagrad": 0.1, "fedyogi": 0.01}  # others: 1.0


def check(strategy):
    if strategy not in STRATEGIES:
        raise MpitrainError(f"fed.strategy = {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def local_schedule(f, n):
    """(batch, steps) of a client with n examples: FedSGD one full-batch step; the others batches of
    fed.local_batch for fed.local_steps steps, or fed.local_epochs epochs."""
    if f.strategy == "fedsgd":
        return n, 1
    batch = min(f.local_batch, n)
    return batch, f.local_steps or f.local_epochs * -(-n // batch)


def step_norm(f, t, steps):
    """The a_k a client reports after `steps` local steps at the constant lr train.lr.  FedNova: ‖a_k‖₁,
    the sum over the steps of each step's gradient coefficient in Δ_k / (−lr) (Wang et al. 2020; weight
    decay is part of the gradient), from kernels/cpu.py momentum_update: SGD τ; heavy ball with ρ =
    train.momentum (v ← ρv + g, x ← x − lr·v: step j's gradient moves x by 1 + ρ + … + ρ^(τ−j))
    [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ); Nesterov (x ← x − lr·(g + ρv): each coefficient is 1 + ρ·heavy
    ball's) τ + ρ times that.  Adam has no such coefficients: config.py refuses it with FedNova.  The other
    strategies: the step count."""
    if f.strategy != "fednova" or t.optimizer == "sgd":
        return steps
    rho = t.momentum
    heavy = (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)
    return steps + rho * heavy if t.optimizer == "nesterov" else heavy


def init_state(strategy, n):
    """Server state vectors: momentum for FedAvgM, first/second moments for FedOpt (zeros)."""
    slots = {"fedavgm": ("v",), "fedadam": ("m", "v"), "fedyogi": ("m", "v"), "fedadagrad": ("m", "v")}
    return {s: np.zeros(n, np.float32) for s in slots.get(strategy, ())}


def server_update(strategy, x, delta, state, lr, beta1=0.9, beta2=0.99, tau=1e-3, momentum=0.9, tau_eff=1.0):
    """Update x (and state) in place."""
    if strategy in ("fedsgd", "fedavg", "fedprox"):
        x += lr * delta
    elif strategy == "fednova":
        x += lr * tau_eff * delta
    elif strategy == "fedavgm":
        v = state["v"]
        v *= momentum
        v += delta
        x += lr * v
    else:
        m, v = state["m"], state["v"]
        m *= beta1
        m += (1 - beta1) * delta
        d2 = delta * delta
        if strategy == "fedadagrad":
            v += d2
        elif strategy == "fedadam":
            v *= beta2
            v += (1 - beta2) * d2
        else:  # fedyogi
            v -= (1 - beta2) * d2 * np.sign(v - d2)
        x += lr * m / (np.sqrt(v) + tau)
    return x
