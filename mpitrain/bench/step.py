"""Training-step throughput per rank: mpitrain's Numba kernels vs a plain NumPy step vs PyTorch CPU.

Same MLP, data, optimizer (SGD, momentum 0.9, lr 0.01) and thread count (--device cuda: mpitrain's CUDA
kernels and PyTorch CUDA on this rank's GPU, the NumPy step stays on the CPU); each implementation is timed
in blocks of about --seconds, the median block is reported.  Every rank measures at once (so an
oversubscribed node shows), rank 0 prints its own figures.
"""
import time

import numpy as np

from . import table

LR, MU = 0.01, 0.9


def _timed(step, seconds, repeats):
    """Median seconds per call of step() over `repeats` blocks of about `seconds` each."""
    for _ in range(3):
        step()
    t = time.perf_counter()
    step()
    per_block = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(per_block):
            step()
        times.append((time.perf_counter() - t) / per_block)
    return float(np.median(times))


def mpitrain_step(sizes, x, y, device="cpu"):
    from ..model import Model, ModelSpec
    from ..optim import Optimizer
    from ..train import Stepper

    model = Model(ModelSpec("mlp", sizes[0], sizes[-1], tuple(sizes[1:-1])), device)
    params = model.xp.to_device(model.init_params(0))
    x, y = model.xp.to_device(x), model.xp.to_device(y)  # the batch is resident, as PyTorch's is
    stepper = Stepper(model, Optimizer(model.k, "momentum", model.n_params, momentum=MU))
    scale = 1.0 / len(x)
    if device == "cpu":
        return lambda: stepper(params, x, y, LR, scale)
    from numba import cuda

    def step():  # the GPU runs asynchronously: a timed step ends when its kernels have
        stepper(params, x, y, LR, scale)
        cuda.synchronize()

    return step


def numpy_step(sizes, x, y):
    """The same step written with plain NumPy array operations."""
    rng = np.random.default_rng(0)
    ws = [rng.uniform(-np.sqrt(6 / a), np.sqrt(6 / a), (a, b)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    vel = [np.zeros_like(p) for p in ws + bs]
    n = len(x)
    onehot = np.eye(sizes[-1], dtype=np.float32)[y]

    def step():
        hs = [x]
        for i, (w, b) in enumerate(zip(ws, bs)):
            z = hs[-1] @ w + b
            hs.append(np.maximum(z, 0) if i < len(ws) - 1 else z)
        z = hs[-1] - hs[-1].max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        d = (p - onehot) / n
        grads_w, grads_b = [], []
        for i in range(len(ws) - 1, -1, -1):
            grads_w.insert(0, hs[i].T @ d)
            grads_b.insert(0, d.sum(axis=0))
            if i:
                d = (d @ ws[i].T) * (hs[i] > 0)
        for p_, g, v in zip(ws + bs, grads_w + grads_b, vel):
            v *= MU
            v += g
            p_ -= LR * v

    return step


def torch_step(sizes, x, y, threads, device="cpu"):
    import torch

    torch.set_num_threads(threads)
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MU)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(tx), ty).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, torch.__version__


def sgemm_rate(threads, n=1024):
    """GFLOP/s of a single-precision n³ matmul through NumPy's BLAS with `threads` threads."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads):
        return 2 * n ** 3 / _timed(lambda: np.matmul(a, a, out=c), 0.5, 3) / 1e9


def bench_step(args, comm):
    from ..threads import limit

    threads = limit(args.threads)
    if args.device == "cuda":
        from ..kernels import compiled

        comm.agree(compiled, comm, "cuda")  # a clear error without numba-cuda or a GPU; one GPU per rank
    sizes = [args.features, *[int(h) for h in args.hidden.split(",") if h], args.classes]
    pairs = list(zip(sizes, sizes[1:]))
    flops = 2 * sum(a * b for a, b in pairs) * 3 - 2 * pairs[0][0] * pairs[0][1]  # no dX for layer 1
    peak = sgemm_rate(threads)
    try:
        import torch
        have_torch = args.device == "cpu" or torch.cuda.is_available()
        if not have_torch and comm.rank == 0:
            print("PyTorch has no CUDA device here: skipping the PyTorch reference")
    except ImportError:
        have_torch = False
        if comm.rank == 0:
            print("PyTorch is not installed: skipping the PyTorch reference (pip install 'mpitrain[peers]')")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
        y = rng.integers(0, sizes[-1], batch).astype(np.int64)
        impls = {"mpitrain": mpitrain_step(sizes, x, y, args.device), "numpy": numpy_step(sizes, x, y)}
        if have_torch:
            impls["torch"], torch_version = torch_step(sizes, x, y, threads, args.device)
        measured = {name: _timed(fn, args.seconds, args.repeats) for name, fn in impls.items()}
        for name, sec in measured.items():
            rows.append({"batch": batch, "impl": name, "threads": threads, "ranks": comm.size,
                         "samples_per_s": batch / sec, "gflops": flops * batch / sec / 1e9,
                         "pct_sgemm": 100 * flops * batch / sec / 1e9 / peak,
                         "vs_torch": measured["torch"] / sec if have_torch else None,
                         "vs_numpy": measured["numpy"] / sec,
                         "version": torch_version if name == "torch" else ""})
    if comm.rank == 0:
        print(f"MLP {'-'.join(map(str, sizes))}, SGD momentum, {threads} thread(s) per rank, {comm.size} rank(s); "
              f"sgemm reference {peak:.1f} GFLOP/s")
        print(table(rows, ["batch", "impl", "samples_per_s", "gflops", "pct_sgemm", "vs_torch", "vs_numpy"]))
    return rows
