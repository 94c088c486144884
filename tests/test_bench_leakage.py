"""bench leakage: the DLG/iDLG attack rebuilds a client's digit from the plain update and fails on what DP-SGD and
secure aggregation hand rank 0; under CKKS it cannot start; the input gradient it is built on is right."""
import os

import numpy as np
import pytest

from conftest import mpirun, saved


def test_leakage_audit(tmp_path):
    png = tmp_path / "leakage.png"
    r = mpirun(1, "bench", "leakage", "--models", "mlp", "--hidden", "16", "--batches", "1", "--cohort", "8",
               "--iters", "150", "--png", png, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["protection"]: row for row in saved(tmp_path, "leakage")[1]}
    assert list(rows) == ["plain", "clip", "dpsgd", "secagg", "ckks"]
    for prot in ("plain", "clip"):  # no protection, and clipping before the server adds the noise: rebuilt
        assert rows[prot]["mse"] < 1e-3 and rows[prot]["within_0_1"] > 0.95, rows[prot]
        assert rows[prot]["labels_recovered"] == 1.0
    for prot in ("dpsgd", "secagg"):  # the same attack on what these protections send: nothing close
        assert rows[prot]["mse"] > 0.02 and rows[prot]["within_0_1"] < 0.8, rows[prot]
    assert rows["ckks"]["status"].startswith("cannot start") and rows["ckks"]["is_private"] is False
    assert "mse" not in rows["ckks"] and "decrypt() without the secret key" in rows["ckks"]["status"]
    assert os.path.getsize(png) > 1000

    bad = mpirun(2, "bench", "leakage", "--protections", "plain,rot13", "--out", tmp_path / "bad")
    assert bad.returncode != 0 and bad.error_lines() == [
        "mpitrain: error: --protections plain,rot13: unknown rot13; expected plain, clip, dpsgd, secagg, ckks"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("stack", [None, ("conv2d 4 3 same", "tanh", "avgpool2d 2", "flatten", "dense 10")])
def test_input_gradient(stack):
    """Model.loss_grad(dx=) against a central difference of the summed loss (smooth models: no kinks)."""
    from mpitrain.model import Model, ModelSpec

    spec = (ModelSpec("mlp", 64, 10, (16,), activation="tanh") if stack is None
            else ModelSpec("layers", 64, 10, layers=stack, feature_shape=(1, 8, 8)))
    model, rng = Model(spec), np.random.default_rng(0)
    params = model.init_params(1)
    x, y = rng.standard_normal((3, 64)).astype(np.float32), np.array([1, 7, 7])
    grad, dx = np.zeros(model.n_params, np.float32), np.zeros((3, 64), np.float32)
    model.loss_grad(params, grad, x, y, dx=dx)
    plain = np.zeros_like(grad)
    model.loss_grad(params, plain, x, y)
    np.testing.assert_array_equal(grad, plain)  # the parameter gradient is unchanged by asking for dx
    for _ in range(3):
        e = rng.standard_normal(x.shape).astype(np.float32)
        up = model.loss_grad(params, plain, x + 1e-2 * e, y)[0]
        down = model.loss_grad(params, plain, x - 1e-2 * e, y)[0]
        assert (up - down) / 2e-2 == pytest.approx(float((dx * e).sum()), rel=2e-3, abs=1e-4)
