"""Training-step throughput per rank: mpitrain's Numba kernels vs a plain NumPy step vs PyTorch CPU, and
the floor of any step built on NumPy's BLAS (the step's GEMMs and its update alone).

Same MLP, data, optimizer (SGD, momentum 0.9, lr 0.01) and thread count (--device cuda: mpitrain's CUDA
kernels and PyTorch CUDA on this rank's GPU, the NumPy step stays on the CPU); each implementation is timed
in blocks of about --seconds, round-robin, the median block is reported.  Every rank measures at once (so an
oversubscribed node shows), rank 0 prints its own figures.
"""
import time

import numpy as np

from . import table

LR, MU = 0.01, 0.9


def _timed(steps, seconds, repeats):
    """{name: median seconds per call} of the step functions, timed in `repeats` rounds of one block of
    about `seconds` each, round-robin, so that a slow spell of the machine falls on every implementation."""
    per_block = {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        t = time.perf_counter()
        step()
        per_block[name] = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(per_block[name]):
                step()
            times[name].append((time.perf_counter() - t) / per_block[name])
    return {name: float(np.median(ts)) for name, ts in times.items()}


def mpitrain_step(sizes, x, y, device="cpu"):
    from ..model import Model, ModelSpec
    from ..optim import Optimizer
    from ..trainer import Stepper

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


def floor_step(sizes, x, pad):
    """Only the step's GEMMs (NumPy's BLAS) and the fused momentum update: no bias, activation, loss or
    layer code.  No step built on this BLAS runs faster, so its ratio to PyTorch bounds what any such
    implementation can claim.  pad > 0 strides every weight row by `pad` more floats, which keeps rows of
    1024 floats off 4 KiB multiples (cache-set aliasing)."""
    from ..kernels.cpu import momentum_update

    shapes = list(zip(sizes, sizes[1:]))
    lengths = [(a + 1) * (b + pad) for a, b in shapes]  # each layer: a padded weight rows, then its bias
    offsets = np.cumsum([0] + lengths[:-1])
    p = np.random.default_rng(0).uniform(-0.05, 0.05, sum(lengths)).astype(np.float32)
    g, v = np.zeros_like(p), np.zeros_like(p)

    def weights(flat):
        return [flat[o:o + a * (b + pad)].reshape(a, b + pad)[:, :b] for o, (a, b) in zip(offsets, shapes)]

    ws, dws = weights(p), weights(g)
    hs = [x] + [np.zeros((len(x), b), np.float32) for _, b in shapes]
    ds = [np.ones((len(x), b), np.float32) for _, b in shapes]

    def step():
        for i, w in enumerate(ws):
            np.matmul(hs[i], w, out=hs[i + 1])
        for i in range(len(ws) - 1, -1, -1):
            np.matmul(hs[i].T, ds[i], out=dws[i])
            if i:
                np.matmul(ds[i], ws[i].T, out=ds[i - 1])
        momentum_update(p, g, v, 0.0, 1.0 / len(x), MU, 0.0, False)  # same traffic; lr 0 keeps values finite

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
        return 2 * n ** 3 / _timed({"sgemm": lambda: np.matmul(a, a, out=c)}, 0.5, 3)["sgemm"] / 1e9


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
        if args.device == "cpu":
            impls.update(floor=floor_step(sizes, x, 0), floor_padded=floor_step(sizes, x, 16))
        if have_torch:
            impls["torch"], torch_version = torch_step(sizes, x, y, threads, args.device)
        measured = _timed(impls, args.seconds, args.repeats)
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
