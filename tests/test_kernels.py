"""The Numba CPU kernels against NumPy references, finite differences, and Model.loss_grad / Model.score."""
import numpy as np
import pytest

from mpitrain.kernels import cpu
from mpitrain.model import Model, ModelSpec
from conftest import central_diff

ACT_NAMES = ("identity", "relu", "tanh")
F32 = dict(rtol=1e-5, atol=1e-5)  # float32 kernels vs float64 references


def rng_for(*key):
    return np.random.default_rng(np.random.SeedSequence([20240601, *key]))


def act_ref(name, z):
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    return z


def act_grad_from_output(name, y):
    """d act / d z expressed through the output y = act(z), as the kernels do."""
    if name == "relu":
        return (y > 0).astype(np.float64)
    if name == "tanh":
        return 1.0 - y * y
    return np.ones_like(y)


def softmax_xent_ref(z, labels):
    z = np.asarray(z, np.float64)
    n = len(z)
    shifted = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    loss = float(np.sum(lse - shifted[np.arange(n), labels]))
    p = np.exp(shifted - lse[:, None])
    grad = p.copy()
    grad[np.arange(n), labels] -= 1.0
    correct = int(np.sum(np.argmax(z, axis=1) == labels))
    return loss, correct, grad


def test_activation_codes():
    assert cpu.ACTIVATIONS == {"identity": cpu.IDENTITY, "relu": cpu.RELU, "tanh": cpu.TANH}
    assert len({cpu.IDENTITY, cpu.RELU, cpu.TANH}) == 3


# --------------------------------------------------------------------------------------------------
# 1. Each kernel against NumPy, float32 inputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ACT_NAMES)
def test_bias_act(name):
    r = rng_for(1, ACT_NAMES.index(name))
    z = (r.standard_normal((9, 7)) * 2).astype(np.float32)
    b = r.standard_normal(7).astype(np.float32)
    pre = z.astype(np.float64) + b
    expected = act_ref(name, pre)
    out = z.copy()
    assert cpu.bias_act(out, b, cpu.ACTIVATIONS[name]) is None  # in place
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    if name == "relu":
        assert np.any(pre < 0) and np.all(out[pre <= 0] == 0.0)
    if name == "identity":
        assert np.any(out < 0)  # identity must not clip
    if name == "tanh":
        assert np.any(np.abs(pre) > 1.5) and np.all(np.abs(out) < 1)


@pytest.mark.parametrize("name", ACT_NAMES)
def test_dense_forward(name):
    r = rng_for(2, ACT_NAMES.index(name))
    x = r.standard_normal((8, 5)).astype(np.float32)
    w = r.standard_normal((5, 6)).astype(np.float32)
    b = r.standard_normal(6).astype(np.float32)
    out = np.full((8, 6), np.nan, np.float32)
    cpu.dense_forward(x, w, b, cpu.ACTIVATIONS[name], out)
    expected = act_ref(name, x.astype(np.float64) @ w.astype(np.float64) + b)
    np.testing.assert_allclose(out, expected, **F32)


def _backward_case(name, key):
    r = rng_for(3, ACT_NAMES.index(name), key)
    x = r.standard_normal((7, 4)).astype(np.float32)
    w = r.standard_normal((4, 6)).astype(np.float32)
    b = r.standard_normal(6).astype(np.float32)
    y = np.empty((7, 6), np.float32)
    cpu.dense_forward(x, w, b, cpu.ACTIVATIONS[name], y)
    dy = r.standard_normal((7, 6)).astype(np.float32)
    dz = dy.astype(np.float64) * act_grad_from_output(name, y.astype(np.float64))
    return x, w, y, dy, dz


@pytest.mark.parametrize("name", ACT_NAMES)
def test_dense_backward_params(name):
    x, w, y, dy, dz = _backward_case(name, 0)
    # Garbage in the outputs: the kernel must overwrite, not accumulate.
    dw = np.full(w.shape, 7.0, np.float32)
    db = np.full(w.shape[1], -3.0, np.float32)
    cpu.dense_backward_params(x, y, dy, cpu.ACTIVATIONS[name], dw, db)
    np.testing.assert_allclose(dy, dz, **F32)  # dy ← dL/dz in place
    np.testing.assert_allclose(dw, x.astype(np.float64).T @ dz, **F32)
    np.testing.assert_allclose(db, dz.sum(axis=0), **F32)
    if name == "relu":
        assert np.all(dy[y <= 0] == 0.0) and np.any(y <= 0)


@pytest.mark.parametrize("name", ACT_NAMES)
def test_dense_backward(name):
    x, w, y, dy, dz = _backward_case(name, 1)
    dw = np.full(w.shape, 7.0, np.float32)
    db = np.full(w.shape[1], -3.0, np.float32)
    dx = np.full(x.shape, 5.0, np.float32)
    cpu.dense_backward(x, w, y, dy, cpu.ACTIVATIONS[name], dw, db, dx)
    np.testing.assert_allclose(dy, dz, **F32)
    np.testing.assert_allclose(dw, x.astype(np.float64).T @ dz, **F32)
    np.testing.assert_allclose(db, dz.sum(axis=0), **F32)
    np.testing.assert_allclose(dx, dz @ w.astype(np.float64).T, **F32)


def test_softmax_xent():
    r = rng_for(4)
    z = (r.standard_normal((12, 5)) * 3).astype(np.float32)
    z[3] = [1.0, 2.0, 2.0, -1.0, 0.5]  # a tie for the top logit: the first index wins (like np.argmax)
    labels = r.integers(0, 5, 12).astype(np.int64)
    labels[:4] = np.argmax(z[:4].astype(np.float64), axis=1)  # some correct ones, guaranteed
    labels[3] = 2  # ... but row 3 is a wrong prediction (tie resolved to index 1)
    loss_ref, correct_ref, grad_ref = softmax_xent_ref(z, labels)
    zz = z.copy()
    loss, correct = cpu.softmax_xent(zz, labels)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert int(correct) == correct_ref
    assert 3 <= correct_ref < 12
    np.testing.assert_allclose(zz, grad_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zz.sum(axis=1), 0.0, atol=1e-6)


def test_softmax_xent_large_logits_stable():
    z = np.array([[1000.0, 0.0, -1000.0], [-500.0, 500.0, 499.0]], np.float32)
    labels = np.array([1, 1], np.int64)
    loss_ref, correct_ref, grad_ref = softmax_xent_ref(z, labels)
    zz = z.copy()
    loss, correct = cpu.softmax_xent(zz, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(zz))
    assert loss == pytest.approx(loss_ref, rel=1e-6)  # ≈ 1000 + log(1 + e^-1)
    assert int(correct) == correct_ref == 1
    np.testing.assert_allclose(zz, grad_ref, atol=1e-6)


def test_sgd_update():
    r = rng_for(5)
    p = r.standard_normal(37).astype(np.float32)
    g = r.standard_normal(37).astype(np.float32)
    lr, scale, wd = 0.1, 1.0 / 16, 0.01
    expected = p.astype(np.float64) - lr * (scale * g.astype(np.float64) + wd * p.astype(np.float64))
    g0 = g.copy()
    cpu.sgd_update(p, g, lr, scale, wd)
    np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(g, g0)  # the gradient is not touched


def torch_sgd_ref(p, grads, lr, scale, mu, wd, nesterov):
    """NumPy transcription of torch.optim.SGD(momentum=mu, dampening=0, weight_decay=wd, nesterov=...)
    applied to the gradients scale·g_t; returns the parameter and momentum buffer after each step."""
    p = p.astype(np.float64).copy()
    buf = None
    out = []
    for g in grads:
        d_p = scale * g.astype(np.float64)
        if wd != 0:
            d_p = d_p + wd * p
        if buf is None:
            buf = d_p.copy()
        else:
            buf = mu * buf + d_p
        if nesterov:
            d_p = d_p + mu * buf
        else:
            d_p = buf
        p = p - lr * d_p
        out.append((p.copy(), buf.copy()))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update(nesterov):
    r = rng_for(6, nesterov)
    p0 = r.standard_normal(29).astype(np.float32)
    grads = [r.standard_normal(29).astype(np.float32) for _ in range(5)]
    lr, scale, mu, wd = 0.05, 0.5, 0.9, 0.01
    ref = torch_sgd_ref(p0, grads, lr, scale, mu, wd, nesterov)
    p, v = p0.copy(), np.zeros_like(p0)
    for g, (p_ref, v_ref) in zip(grads, ref):
        cpu.momentum_update(p, g, v, lr, scale, mu, wd, nesterov)
        np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)


def test_momentum_nesterov_differ():
    r = rng_for(7)
    p0 = r.standard_normal(16).astype(np.float32)
    g = r.standard_normal(16).astype(np.float32)
    pa, pb = p0.copy(), p0.copy()
    va, vb = np.zeros_like(p0), np.zeros_like(p0)
    for _ in range(2):
        cpu.momentum_update(pa, g, va, 0.1, 1.0, 0.9, 0.0, False)
        cpu.momentum_update(pb, g, vb, 0.1, 1.0, 0.9, 0.0, True)
    np.testing.assert_allclose(va, vb)  # same buffer either way
    # heavy ball: p0 - lr (g + 1.9 g); nesterov: p0 - lr (1.9 g + 2.71 g)
    np.testing.assert_allclose(pa, p0 - 0.1 * 2.9 * g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pb, p0 - 0.1 * 4.61 * g, rtol=1e-5, atol=1e-6)


def torch_adam_ref(p, grads, lr, scale, beta1, beta2, eps, wd):
    """NumPy transcription of torch.optim.Adam (amsgrad=False, weight_decay as L2 in the gradient)."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = scale * g.astype(np.float64)
        if wd != 0:
            g = g + wd * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step_size = lr / bias_correction1
        denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps
        p = p - step_size * m / denom
        out.append((p.copy(), m.copy(), v.copy()))
    return out


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_update(eps):
    r = rng_for(8, int(eps * 1e8))
    p0 = r.standard_normal(31).astype(np.float32)
    grads = [r.standard_normal(31).astype(np.float32) for _ in range(5)]
    lr, scale, beta1, beta2, wd = 0.01, 0.25, 0.9, 0.999, 0.05
    ref = torch_adam_ref(p0, grads, lr, scale, beta1, beta2, eps, wd)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, (g, (p_ref, m_ref, v_ref)) in enumerate(zip(grads, ref), start=1):
        cpu.adam_update(p, g, m, v, lr, scale, beta1, beta2, eps, wd, t)
        np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
    if eps == 1e-8:
        # Bias correction: the first step moves every parameter by ≈ lr (|m̂ / √v̂| = 1).
        p1 = p0.copy()
        cpu.adam_update(p1, grads[0], np.zeros_like(p0), np.zeros_like(p0), lr, scale, beta1, beta2,
                        eps, 0.0, 1)
        np.testing.assert_allclose(np.abs(p1.astype(np.float64) - p0), lr, rtol=1e-3)


def test_optimizer_kernels_match_torch():
    """The same comparison against torch.optim itself, where torch is installed."""
    torch = pytest.importorskip("torch")
    r = rng_for(9)
    p0 = r.standard_normal(23).astype(np.float32)
    grads = [r.standard_normal(23).astype(np.float32) for _ in range(5)]
    lr, scale, wd = 0.02, 0.5, 0.01
    cases = {
        "momentum": lambda q: torch.optim.SGD([q], lr=lr, momentum=0.9, weight_decay=wd),
        "nesterov": lambda q: torch.optim.SGD([q], lr=lr, momentum=0.9, weight_decay=wd, nesterov=True),
        "adam": lambda q: torch.optim.Adam([q], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd),
    }
    for name, make in cases.items():
        q = torch.tensor(p0.astype(np.float64), requires_grad=True)
        opt = make(q)
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for t, g in enumerate(grads, start=1):
            q.grad = torch.tensor(scale * g.astype(np.float64))
            opt.step()
            if name == "adam":
                cpu.adam_update(p, g, m, v, lr, scale, 0.9, 0.999, 1e-8, wd, t)
            else:
                cpu.momentum_update(p, g, v, lr, scale, 0.9, wd, name == "nesterov")
            np.testing.assert_allclose(p, q.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------------
# 2. Finite-difference gradient checks, float64, through the kernels
# --------------------------------------------------------------------------------------------------

def kernel_forward(layers, acts, x, start=0):
    """Activations of layers[start:] applied to x (float64, via cpu.dense_forward)."""
    outs, inp = [], x
    for (w, b), act in zip(layers[start:], acts[start:]):
        out = np.empty((len(inp), w.shape[1]), inp.dtype)
        cpu.dense_forward(inp, w, b, act, out)
        outs.append(out)
        inp = out
    return outs


def kernel_loss(layers, acts, x, labels, start=0):
    logits = kernel_forward(layers, acts, x, start)[-1].copy()
    loss, _ = cpu.softmax_xent(logits, labels)
    return loss


def kernel_loss_grad(layers, acts, x, labels):
    """Summed loss and its gradients: [(dW, db)] per layer and [dL/d(input of layer l)] per layer."""
    outs = kernel_forward(layers, acts, x)
    loss, _ = cpu.softmax_xent(outs[-1], labels)
    d = outs[-1]
    grads, dinputs = [None] * len(layers), [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        inp = x if i == 0 else outs[i - 1]
        dw, db, dx = np.empty_like(w), np.empty(w.shape[1]), np.empty_like(inp)
        cpu.dense_backward(inp, w, outs[i], d, acts[i], dw, db, dx)
        grads[i], dinputs[i] = (dw, db), dx.copy()  # dx is overwritten with dz by the layer below
        d = dx
    return loss, grads, dinputs


FD_CASES = [
    ("softmax", (5, 3), "identity"),
    ("identity", (5, 6, 4, 3), "identity"),
    ("relu", (5, 6, 4, 3), "relu"),
    ("tanh", (5, 6, 4, 3), "tanh"),
    ("relu-wide", (3, 8, 4), "relu"),
]


@pytest.mark.parametrize("case,sizes,hidden_act", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_finite_differences_float64(case, sizes, hidden_act):
    r = rng_for(10, FD_CASES.index((case, sizes, hidden_act)))
    n = 6
    layers = [(r.standard_normal((a, b)) * 0.8, r.standard_normal(b) * 0.5) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [cpu.ACTIVATIONS[hidden_act]] * (len(layers) - 1) + [cpu.IDENTITY]
    x = r.standard_normal((n, sizes[0]))
    labels = r.integers(0, sizes[-1], n).astype(np.int64)
    assert x.dtype == np.float64 and layers[0][0].dtype == np.float64

    if hidden_act == "relu":
        # Stay away from the kink: no hidden pre-activation within 1e-3 of 0 (an FD step moves it by ~1e-5).
        h = x
        for w, b in layers[:-1]:
            z = h @ w + b
            assert np.min(np.abs(z)) > 1e-3, "pick another seed: a pre-activation sits on the relu kink"
            assert np.any(z < 0) and np.any(z > 0)  # both branches exercised
            h = np.maximum(z, 0.0)

    loss, grads, dinputs = kernel_loss_grad(layers, acts, x, labels)
    assert loss == pytest.approx(kernel_loss(layers, acts, x, labels), rel=1e-12)
    tol = dict(rtol=1e-5, atol=1e-7)
    for i, ((w, b), (dw, db)) in enumerate(zip(layers, grads)):
        f = lambda: kernel_loss(layers, acts, x, labels)  # noqa: E731
        np.testing.assert_allclose(dw, central_diff(f, w), err_msg=f"dW layer {i}", **tol)
        np.testing.assert_allclose(db, central_diff(f, b), err_msg=f"db layer {i}", **tol)
    # Gradient w.r.t. the input of every layer (x for layer 0, the hidden activations above it).
    outs = kernel_forward(layers, acts, x)
    for i in range(len(layers)):
        inp = x.copy() if i == 0 else outs[i - 1].copy()
        f = lambda: kernel_loss(layers, acts, inp, labels, start=i)  # noqa: E731
        np.testing.assert_allclose(dinputs[i], central_diff(f, inp), err_msg=f"dx layer {i}", **tol)
    assert max(np.abs(dw).max() for dw, _ in grads) > 1e-3  # not a trivially zero gradient


def test_finite_differences_loss_logits():
    r = rng_for(11)
    z = r.standard_normal((5, 4)) * 2
    labels = r.integers(0, 4, 5).astype(np.int64)
    g = z.copy()
    cpu.softmax_xent(g, labels)

    def f():
        return cpu.softmax_xent(z.copy(), labels)[0]

    np.testing.assert_allclose(g, central_diff(f, z), rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# 3. Model.loss_grad / Model.score against a NumPy MLP
# --------------------------------------------------------------------------------------------------

def numpy_mlp_loss_grad(sizes, act, flat, x, labels):
    """Forward/backward in float64 from the documented layout: [W_l (in×out, row-major) | b_l] per layer."""
    flat = flat.astype(np.float64)
    layers, o = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers.append((flat[o:o + a * b].reshape(a, b), flat[o + a * b:o + a * b + b]))
        o += a * b + b
    assert o == flat.size
    hs, zs, h = [x.astype(np.float64)], [], x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        z = h @ w + b
        zs.append(z)
        h = act_ref(act, z) if i < len(layers) - 1 else z
        hs.append(h)
    loss, correct, d = softmax_xent_ref(hs[-1], labels)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        if i < len(layers) - 1:
            d = d * act_grad_from_output(act, hs[i + 1])
        grads.append(np.concatenate([(hs[i].T @ d).ravel(), d.sum(axis=0)]))
        d = d @ w.T
    grad = np.concatenate(grads[::-1])
    return loss, correct, grad, zs


MODEL_CASES = [("mlp", (8, 5), "relu"), ("mlp", (8, 5), "tanh"), ("mlp", (12,), "relu"), ("softmax", (), "relu")]


@pytest.mark.parametrize("kind,hidden,act", MODEL_CASES, ids=["relu", "tanh", "relu1", "softmax"])
def test_model_loss_grad_matches_numpy(kind, hidden, act):
    r = rng_for(12, MODEL_CASES.index((kind, hidden, act)))
    spec = ModelSpec(kind, n_in=6, n_out=4, hidden=hidden, activation=act)
    model = Model(spec)
    sizes = spec.sizes
    assert sizes == (6, *hidden, 4)
    params = model.init_params(seed=3)
    assert params.dtype == np.float32 and params.shape == (spec.n_params,)
    params += (r.standard_normal(spec.n_params) * 0.1).astype(np.float32)  # nonzero biases too
    n = 32
    x = r.standard_normal((n, 6)).astype(np.float32)
    y = r.integers(0, 4, n).astype(np.int64)

    loss_ref, correct_ref, grad_ref, zs = numpy_mlp_loss_grad(sizes, act, params, x, y)
    for z in zs[:-1]:  # no hidden unit so close to the relu kink that float32 could flip its side
        assert np.min(np.abs(z)) > 1e-5
    p_before = params.copy()
    grad = np.full(spec.n_params, np.nan, np.float32)
    loss, correct = model.loss_grad(params, grad, x, y)
    np.testing.assert_array_equal(params, p_before)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert int(correct) == correct_ref
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=2e-5 * np.abs(grad_ref).max())

    # Calling again (reused scratch buffers) gives the same, overwritten (not accumulated) gradient.
    grad2 = np.full(spec.n_params, 123.0, np.float32)
    assert model.loss_grad(params, grad2, x, y) == (loss, correct)
    np.testing.assert_array_equal(grad2, grad)

    # A different batch size uses other buffers and still agrees.
    loss7_ref, correct7_ref, grad7_ref, _ = numpy_mlp_loss_grad(sizes, act, params, x[:7], y[:7])
    grad7 = np.empty(spec.n_params, np.float32)
    loss7, correct7 = model.loss_grad(params, grad7, x[:7], y[:7])
    assert loss7 == pytest.approx(loss7_ref, rel=1e-5) and int(correct7) == correct7_ref
    np.testing.assert_allclose(grad7, grad7_ref, rtol=1e-4, atol=2e-5 * np.abs(grad7_ref).max())

    # score: same loss and correct count as loss_grad, whole batch or in uneven chunks.
    s_loss, s_correct = model.score(params, x, y)
    assert s_loss == pytest.approx(loss, rel=1e-6) and int(s_correct) == int(correct)
    c_loss, c_correct = model.score(params, x, y, chunk=7)
    assert c_loss == pytest.approx(loss, rel=1e-5) and int(c_correct) == int(correct)
    np.testing.assert_array_equal(params, p_before)


def test_model_layers_are_views():
    spec = ModelSpec("mlp", n_in=3, n_out=2, hidden=(4,))
    model = Model(spec)
    flat = np.zeros(spec.n_params, np.float32)
    assert spec.n_params == 3 * 4 + 4 + 4 * 2 + 2
    (w0, b0), (w1, b1) = model.layers(flat)
    assert w0.shape == (3, 4) and b0.shape == (4,) and w1.shape == (4, 2) and b1.shape == (2,)
    w0[...], b0[...], w1[...], b1[...] = 1, 2, 3, 4
    np.testing.assert_array_equal(flat, [1] * 12 + [2] * 4 + [3] * 8 + [4] * 2)


# --------------------------------------------------------------------------------------------------
# 4. warmup
# --------------------------------------------------------------------------------------------------

def test_warmup_compiles_float32():
    assert cpu.warmup() is None
    for kernel in (cpu.bias_act, cpu.act_grad, cpu.softmax_xent, cpu.sgd_update, cpu.momentum_update, cpu.adam_update):
        assert kernel.signatures, kernel
        assert any("float32" in str(sig) for sig in kernel.signatures), (kernel, kernel.signatures)
