"""The CUDA kernels (kernels/cuda.py) against the CPU kernels, under Numba's CUDA simulator, on small sizes
that are not multiples of the GEMM tile; the CUDA model and optimizer against the CPU ones; and the error
that names what is missing when --device cuda cannot run.

The simulator has to be on before numba.cuda is first imported, which this pytest process may already
have done; so test_under_simulator reruns this file in a fresh pytest with NUMBA_ENABLE_CUDASIM=1, and the
kernel tests run there (here they are skipped, unless the whole session runs under the simulator)."""
import glob
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpitrain.kernels import cpu

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(not SIM, reason="runs in the simulator subprocess of test_under_simulator")
F32 = {"rtol": 2e-5, "atol": 2e-5}
SHAPES = [(5, 7, 9), (17, 18, 17)]  # (batch, in, out): one partial tile; two tiles along every axis
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, env):
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(SIM, reason="already under the simulator")
def test_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       check=False, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout + r.stderr


def no_sim_env():
    return {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


def test_missing_gpu_is_a_clear_error():
    code = ("from mpitrain.kernels import backend\nfrom mpitrain.errors import MpitrainError\n"
            "try:\n    backend('cuda')\nexcept MpitrainError as e:\n    print('ERROR', e)\nelse:\n    print('GPU')")
    r = run_py(code, no_sim_env())
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("GPU"):
        pytest.skip("this machine has a usable CUDA GPU")
    assert "device 'cuda': no usable CUDA GPU (numba.cuda.is_available() is False" in r.stdout, r.stdout


def test_missing_numba_cuda_is_a_clear_error():
    code = ("import sys\nsys.modules['numba.cuda'] = None  # as if numba-cuda were not installed\n"
            "from mpitrain.model import Model, ModelSpec\nfrom mpitrain.errors import MpitrainError\n"
            "try:\n    Model(ModelSpec('softmax', 3, 2), 'cuda')\nexcept MpitrainError as e:\n    print(e)")
    r = run_py(code, no_sim_env())
    assert "device 'cuda': numba-cuda is not installed (pip install 'mpitrain[cuda]')" in r.stdout, r.stdout + r.stderr


# -- under the simulator -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k():
    from mpitrain.kernels import backend

    return backend("cuda")


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def host(a):
    return a.copy_to_host()


@sim_only
@pytest.mark.parametrize("n,a,b,act", [(*SHAPES[0], cpu.IDENTITY), (*SHAPES[0], cpu.RELU), (*SHAPES[0], cpu.TANH),
                                       (*SHAPES[1], cpu.RELU)])
def test_dense_forward_backward(k, n, a, b, act):
    rng = np.random.default_rng([n, a, b, act])
    x, w, bias, dy = rand(rng, n, a), rand(rng, a, b), rand(rng, b), rand(rng, n, b)
    y = np.empty((n, b), np.float32)
    cpu.dense_forward(x, w, bias, act, y)
    dx, dw, db, dyc = np.empty((n, a), np.float32), np.empty((a, b), np.float32), np.empty(b, np.float32), dy.copy()
    cpu.dense_backward(x, w, y, dyc, act, dw, db, dx)

    gx, gw, gb, gy, gdy = map(k.to_device, (x, w, bias, np.zeros((n, b), np.float32), dy))
    k.dense_forward(gx, gw, gb, act, gy)
    np.testing.assert_allclose(host(gy), y, **F32)
    gy = k.to_device(y)  # the backward pass from identical activations (relu's kink decides on y > 0)
    gdx, gdw, gdb = k.empty((n, a)), k.empty((a, b)), k.empty(b)
    k.dense_backward(gx, gw, gy, gdy, act, gdw, gdb, gdx)
    for got, want in ((gdy, dyc), (gdw, dw), (gdb, db), (gdx, dx)):
        np.testing.assert_allclose(host(got), want, **F32)
    gdy2, gdw2, gdb2 = k.to_device(dy), k.zeros((a, b)), k.zeros(b)
    k.dense_backward_params(gx, gy, gdy2, act, gdw2, gdb2)
    np.testing.assert_allclose(host(gdw2), dw, **F32)
    np.testing.assert_allclose(host(gdb2), db, **F32)

    z = rand(rng, n, b)
    gz = k.to_device(z)
    cpu.bias_act(z, bias, act)
    k.bias_act(gz, gb, act)
    np.testing.assert_allclose(host(gz), z, **F32)


@sim_only
@pytest.mark.parametrize("n,c", [(5, 9), (19, 3)])
def test_softmax_xent(k, n, c):
    rng = np.random.default_rng([n, c])
    z = rand(rng, n, c) * 3
    labels = rng.integers(0, c, n)
    gz = k.to_device(z)
    loss, correct = cpu.softmax_xent(z, labels)
    gloss, gcorrect = k.softmax_xent(gz, k.to_device(labels))
    assert isinstance(gloss, float) and gcorrect == correct
    assert gloss == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(host(gz), z, **F32)


@sim_only
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_optimizer_updates(k, name):
    from mpitrain.optim import Optimizer

    rng = np.random.default_rng(len(name))
    p = rand(rng, 300)  # more than one block of the 1-d kernels
    cpu_opt, cuda_opt = Optimizer(cpu, name, p.size, weight_decay=1e-2), Optimizer(k, name, p.size, weight_decay=1e-2)
    gp = k.to_device(p)
    for _ in range(3):
        g = rand(rng, p.size)
        cpu_opt.update(p, g, 0.05, 0.25)
        cuda_opt.update(gp, k.to_device(g), 0.05, 0.25)
    np.testing.assert_allclose(host(gp), p, **F32)
    for s, v in cpu_opt.state.items():
        np.testing.assert_allclose(host(cuda_opt.state[s]), v, **F32)
    cuda_opt.reset()
    assert all(not host(v).any() for v in cuda_opt.state.values()) and cuda_opt.t == 0


@sim_only
@pytest.mark.parametrize("n,a,b", SHAPES)
def test_dp_clipping(k, n, a, b):
    rng = np.random.default_rng([n, a, b, 7])
    x, dz, factor = rand(rng, n, a), rand(rng, n, b), rng.uniform(0.1, 1.0, n).astype(np.float32)
    sq = rng.uniform(0, 1, n)
    gx, gdz, gsq = k.to_device(x), k.to_device(dz), k.to_device(sq)
    cpu.dp_sqnorms(x, dz, sq)
    k.dp_sqnorms(gx, gdz, gsq)
    np.testing.assert_allclose(host(gsq), sq, rtol=1e-6)
    dw, db = np.empty((a, b), np.float32), np.empty(b, np.float32)
    gdw, gdb = k.empty((a, b)), k.empty(b)
    cpu.dp_clipped_grad(x, dz, factor, dw, db)
    k.dp_clipped_grad(gx, gdz, k.to_device(factor), gdw, gdb)
    for got, want in ((gdz, dz), (gdw, dw), (gdb, db)):
        np.testing.assert_allclose(host(got), want, **F32)


@sim_only
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_model_on_device(k, activation):
    """Parameters, gradients and scratch on the device: loss_grad and score equal the CPU model's."""
    from mpitrain.model import Model, ModelSpec

    spec = ModelSpec("mlp", 7, 4, (9, 6), activation)
    cm, gm = Model(spec, "cpu"), Model(spec, "cuda")
    params = cm.init_params(3)
    assert isinstance(gm.init_params(3), np.ndarray)
    rng = np.random.default_rng(11)
    x, y = rand(rng, 5, 7), rng.integers(0, 4, 5)
    grad, gparams, ggrad = np.empty_like(params), k.to_device(params), k.zeros(params.size)
    loss, correct = cm.loss_grad(params, grad, x, y)
    gloss, gcorrect = gm.loss_grad(gparams, ggrad, k.to_device(x), k.to_device(y))
    assert gloss == pytest.approx(loss, rel=1e-5) and gcorrect == correct
    np.testing.assert_allclose(host(ggrad), grad, **F32)
    for (w, b), (gw, gb) in zip(cm.layers(params), gm.layers(gparams)):  # views into the device vector
        np.testing.assert_array_equal(host(gw), w)
        np.testing.assert_array_equal(host(gb), b)
    score, gscore = cm.score(params, x, y, chunk=3), gm.score(gparams, x, y, chunk=3)
    assert gscore[0] == pytest.approx(score[0], rel=1e-5) and gscore[1] == score[1]


@sim_only
def test_compiled_selects_a_gpu_per_local_rank(k, monkeypatch):
    """Ranks spread over the node's GPUs: launcher's local rank, else the node communicator's, modulo."""
    from numba import cuda

    from mpitrain.kernels import compiled

    class Node:
        rank = 5

        def barrier(self):
            pass

    class Comm:
        def node(self):
            return Node()

    chosen = []
    monkeypatch.setattr(cuda, "gpus", [None] * 4)
    monkeypatch.setattr(cuda, "select_device", chosen.append)
    for var in ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert compiled(Comm(), "cuda") is k
    monkeypatch.setattr(k, "warmup", lambda: None)  # compiled once is enough
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    compiled(Comm(), "cuda")
    monkeypatch.setenv("SLURM_LOCALID", "7")
    compiled(Comm(), "cuda")
    assert chosen == [1, 2, 3]


@sim_only
def test_bench_step_and_train_on_cuda(tmp_path):
    """`bench step --device cuda` times the CUDA step (PyTorch CUDA skipped without a GPU); `train --device
    cuda` trains with device-resident parameters and matches a CPU run."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "mpitrain", "bench", "step", "--device", "cuda", "--batches", "4",
                        "--features", "8", "--hidden", "8", "--classes", "3", "--seconds", "0.01", "--repeats", "1",
                        "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=300, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = glob.glob(str(tmp_path / "step-*.json"))
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["results"]
    assert {row["impl"] for row in rows} >= {"mpitrain", "numpy"} and all(row["samples_per_s"] > 0 for row in rows)
    from mpitrain.data.prepare import prepare

    data = str(tmp_path / "d.h5")
    prepare("synthetic", data, samples=120, features=6, classes=3, seed=1)
    got = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        r = subprocess.run([sys.executable, "-m", "mpitrain", "train", "--quiet", "--device", device, "--out", str(out),
                            "--set", f"data.path={data}", "--set", "model.hidden=[5]", "--set", "train.steps=2",
                            "--set", "train.global_batch=20"], check=False, capture_output=True, text=True,
                           timeout=300, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        with h5py.File(out / "model.h5", "r") as f:
            got[device] = f["params"][...]
    np.testing.assert_allclose(got["cuda"], got["cpu"], rtol=1e-4, atol=1e-5)


# -- convolution and pooling (NHWC) --------------------------------------------------------------------


def conv_geometry(H, W, KH, KW, SH, SW, same):
    """(KH, KW, SH, SW, PH, PW, OH, OW): 'same' as TensorFlow pads (the odd pixel at the bottom/right)."""
    def axis(n, k, s):
        if not same:
            return 0, (n - k) // s + 1
        out = -(-n // s)
        return max((out - 1) * s + k - n, 0) // 2, out

    (PH, OH), (PW, OW) = axis(H, KH, SH), axis(W, KW, SW)
    return KH, KW, SH, SW, PH, PW, OH, OW


# name, (N, H, W, C_in, C_out), (KH, KW, SH, SW), same, activation
CONV_CASES = [
    ("2d-same-3x3", (3, 5, 6, 2, 3), (3, 3, 1, 1), True, cpu.RELU),  # 90 rows: the partial sums of db
    ("2d-same-2x3-s2", (2, 5, 6, 2, 3), (2, 3, 2, 2), True, cpu.TANH),  # padding only at the bottom/right
    ("2d-valid-3x2-s2", (2, 5, 6, 3, 2), (3, 2, 2, 2), False, cpu.IDENTITY),
    ("1d-same-3", (2, 1, 7, 3, 2), (1, 4, 1, 1), True, cpu.RELU),  # even kernel: 1 left, 2 right
    ("1d-valid-3-s2", (3, 1, 7, 2, 3), (1, 3, 1, 2), False, cpu.TANH),
]


@sim_only
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_kernels(k, case):
    _, (N, H, W, C, CO), (KH, KW, SH, SW), same, act = case
    geom = conv_geometry(H, W, KH, KW, SH, SW, same)
    OH, OW = geom[6:]
    rng = np.random.default_rng([N, H, W, C, CO, KH, KW, SH, SW])
    x, w, b = rand(rng, N, H, W, C), rand(rng, CO, KH * KW * C), rand(rng, CO)
    rows, K = N * OH * OW, KH * KW * C
    cols, y = np.empty((rows, K), np.float32), np.empty((N, OH, OW, CO), np.float32)
    cpu.conv_forward(x, w, b, act, geom, cols, y)
    gx, gw, gb, gcols, gy = k.to_device(x), k.to_device(w), k.to_device(b), k.empty((rows, K)), k.empty(y.shape)
    k.conv_forward(gx, gw, gb, act, geom, gcols, gy)
    np.testing.assert_array_equal(host(gcols), cols)  # im2col: copies and zeros
    np.testing.assert_allclose(host(gy), y, **F32)

    dcols, gdx = rand(rng, rows, K), k.empty(x.shape)  # col2im on its own, from identical input
    dx = np.empty_like(x)
    cpu.col2im(dcols, *geom, dx)
    k.col2im(k.to_device(dcols), *geom, gdx)
    np.testing.assert_allclose(host(gdx), dx, **F32)

    dy = rand(rng, *y.shape)
    gy = k.to_device(y)  # the backward pass from identical activations (relu's kink decides on y > 0)
    for with_dx in (True, False):
        dyc, c2 = dy.copy(), cols.copy()
        dw, db, dx = np.empty_like(w), np.empty_like(b), np.empty_like(x) if with_dx else None
        cpu.conv_backward(c2, w, y, dyc, act, geom, dw, db, c2, dx)
        gdy, gc2, gdw, gdb = k.to_device(dy), k.to_device(cols), k.empty(w.shape), k.empty(b.shape)
        gdx = k.empty(x.shape) if with_dx else None
        k.conv_backward(gc2, gw, gy, gdy, act, geom, gdw, gdb, gc2, gdx)  # dcols is cols, as the model does
        pairs = [(gdy, dyc), (gdw, dw), (gdb, db)] + ([(gc2, c2), (gdx, dx)] if with_dx else [])
        for got, want in pairs:
            np.testing.assert_allclose(host(got), want, **F32)


# name, x shape (N, H, W, C), (KH, KW, SH, SW)
POOL_CASES = [
    ("2d-3x3-s2-overlap", (2, 5, 6, 2), (3, 3, 2, 2)),
    ("2d-2x2", (2, 5, 6, 3), (2, 2, 2, 2)),
    ("2d-2x3-s1-overlap", (2, 5, 6, 2), (2, 3, 1, 1)),
    ("1d-3-s2-overlap", (3, 1, 7, 2), (1, 3, 1, 2)),
]


@sim_only
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pool_kernels(k, case):
    _, (N, H, W, C), (KH, KW, SH, SW) = case
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    rng = np.random.default_rng([N, H, W, C, KH, KW, SH, SW])
    x = np.round(rand(rng, N, H, W, C))  # few distinct values: ties in most windows
    x[0, 0, 1, 0] = np.nan  # propagates (and its window's arg is the NaN)
    out, arg = np.empty((N, OH, OW, C), np.float32), np.empty((N, OH, OW, C), np.int32)
    cpu.maxpool_forward(x, KH, KW, SH, SW, out, arg)
    gx, gout, garg = k.to_device(x), k.empty(out.shape), k.ints(out.shape)
    assert garg.dtype == np.int32
    k.maxpool_forward(gx, KH, KW, SH, SW, gout, garg)
    np.testing.assert_array_equal(host(gout), out)
    np.testing.assert_array_equal(host(garg), arg)
    dy, dx, gdx = rand(rng, *out.shape), np.empty_like(x), k.empty(x.shape)
    cpu.maxpool_backward(dy, arg, dx)
    k.maxpool_backward(k.to_device(dy), garg, gdx)
    np.testing.assert_allclose(host(gdx), dx, **F32)

    x = rand(rng, N, H, W, C)
    cpu.avgpool_forward(x, KH, KW, SH, SW, out)
    k.avgpool_forward(k.to_device(x), KH, KW, SH, SW, gout)
    np.testing.assert_allclose(host(gout), out, **F32)
    cpu.avgpool_backward(dy, KH, KW, SH, SW, dx)
    k.avgpool_backward(k.to_device(dy), KH, KW, SH, SW, gdx)
    np.testing.assert_allclose(host(gdx), dx, **F32)


@sim_only
@pytest.mark.parametrize("shape", [(2, 5, 6, 2), (2, 1, 7, 3)])
def test_to_nhwc(k, shape):
    N, H, W, C = shape
    x = rand(np.random.default_rng(list(shape)), N, C * H * W)
    out, gout = np.empty(shape, np.float32), k.empty(shape)
    cpu.to_nhwc(x, out)
    k.to_nhwc(k.to_device(x), gout)
    np.testing.assert_array_equal(host(gout), out)
    np.testing.assert_array_equal(out, x.reshape(N, C, H, W).transpose(0, 2, 3, 1))


@sim_only
def test_cnn_model_on_device(k):
    """A CNN on 2-channel maps (the to_nhwc entry, conv, fused relu, max-pool, flatten, dense): loss_grad
    and score on the device equal the CPU model's."""
    from mpitrain.model import Model, ModelSpec

    spec = ModelSpec("layers", 2 * 5 * 6, 3, layers=("conv2d 3 3 same", "relu", "maxpool2d 2", "flatten", "dense 3"),
                     feature_shape=(2, 5, 6))
    cm, gm = Model(spec, "cpu"), Model(spec, "cuda")
    params = cm.init_params(5)
    rng = np.random.default_rng(12)
    x, y = rand(rng, 3, spec.n_in), rng.integers(0, 3, 3)
    grad, gparams, ggrad = np.empty_like(params), k.to_device(params), k.zeros(params.size)
    loss, correct = cm.loss_grad(params, grad, x, y)
    gloss, gcorrect = gm.loss_grad(gparams, ggrad, k.to_device(x), k.to_device(y))
    assert gloss == pytest.approx(loss, rel=1e-5) and gcorrect == correct
    np.testing.assert_allclose(host(ggrad), grad, **F32)
    score, gscore = cm.score(params, x, y), gm.score(gparams, x, y)
    assert gscore[0] == pytest.approx(score[0], rel=1e-5) and gscore[1] == score[1]
