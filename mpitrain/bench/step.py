"""Training-step throughput per rank: mpitrain's Numba kernels vs a plain NumPy step vs PyTorch CPU, and
the floor of any step built on NumPy's BLAS (the step's GEMMs and its update alone).

Same model, data, optimizer (SGD, momentum 0.9, lr 0.01) and thread count (--device cuda: mpitrain's CUDA
kernels and PyTorch CUDA on this rank's GPU, the NumPy step stays on the CPU); each implementation is timed
in blocks of about --seconds, round-robin, the median block is reported.  Every rank measures at once (so an
oversubscribed node shows), rank 0 prints its own figures.

--model picks the network: the MLP of --features/--hidden/--classes (default), a preset CNN (lenet5,
fedavg_cnn) or a JSON stack of layer strings.  PyTorch runs the same canonical stack (model.spec.stack) in
its native NCHW layout with the same GEMM FLOPs; a CNN has no NumPy row, and its floor is every layer's
GEMMs on the shapes mpitrain's im2col gives them (no im2col, col2im, pooling, bias or activation).
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


def mpitrain_step(spec, x, y, device="cpu"):
    """(step function, Stepper) of mpitrain's training step of the ModelSpec on the batch (x, y)."""
    from ..model import Model
    from ..optim import Optimizer
    from ..trainer import Stepper

    model = Model(spec, device)
    params = model.xp.to_device(model.init_params(0))
    x, y = model.xp.to_device(x), model.xp.to_device(y)  # the batch is resident, as PyTorch's is
    stepper = Stepper(model, Optimizer(model.k, "momentum", model.n_params, momentum=MU))
    scale = 1.0 / len(x)
    if device == "cpu":
        return (lambda: stepper(params, x, y, LR, scale)), stepper
    from numba import cuda

    def step():  # the GPU runs asynchronously: a timed step ends when its kernels have
        stepper(params, x, y, LR, scale)
        cuda.synchronize()

    return step, stepper


def step_memory(stepper, batch):
    """Bytes a rank holds for a step of `batch` samples: the model's per-batch buffers (Model._bufs: each
    layer's output, the im2col workspace `cols` (reused for dcols), max-pool arg-max indices, the gradient
    flowing into each layer, the NHWC copy of a channels-first batch) and the per-model state (parameters,
    the step buffer [gradient | loss | correct], optimizer vectors).  The batch itself is not counted."""
    model = stepper.model
    outs, scratch, downs, entry = model._bufs(batch)
    nbytes = lambda arrays: int(sum(a.nbytes for a in arrays if a is not None))  # noqa: E731
    mem = {"mem_outputs": nbytes(outs), "mem_im2col": nbytes(s["cols"] for s in scratch if "cols" in s),
           "mem_pool_arg": nbytes(s["arg"] for s in scratch if "arg" in s), "mem_grad_in": nbytes(downs),
           "mem_entry": nbytes([entry]),
           "mem_state": 4 * model.n_params + stepper.buf.nbytes + nbytes(stepper.opt.state.values())
                        + (stepper.grad.nbytes if stepper.staged else 0)}
    mem["mem_step"] = sum(mem.values())
    return mem


def flops_per_sample(spec):
    """GEMM FLOPs of one sample's step: forward, weight gradient and (every layer but the first) input
    gradient of each dense and conv layer, as mpitrain computes them (PyTorch does the same ones)."""
    from ..model.layers import Conv, Dense
    from ..model.stack import build

    total = 0
    for i, l in enumerate(build(list(spec.stack), spec.feature_shape, spec.n_out)):
        if isinstance(l, Dense):
            mac = l.n_in * l.units
        elif isinstance(l, Conv):
            mac = l.geom[6] * l.geom[7] * l.k_len * l.channels
        else:
            continue
        total += 2 * mac * (3 if i else 2)
    return total


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


def cnn_floor_step(spec, batch):
    """The floor of a CNN's step: each layer's GEMMs alone, on the shapes and parameter views mpitrain
    uses — conv: cols @ W.T, dz.T @ cols (dW) and, but for the first layer, dz @ W (dcols, into cols as
    mpitrain does); dense as in the MLP floor — plus the fused momentum update.  No im2col, col2im,
    pooling, bias, activation, loss or layer code: what this BLAS allows."""
    from ..kernels.cpu import momentum_update
    from ..model.layers import Conv, Dense
    from ..model.stack import build

    net = build(list(spec.stack), spec.feature_shape, spec.n_out)
    rng = np.random.default_rng(0)
    p = rng.uniform(-0.05, 0.05, spec.n_params).astype(np.float32)
    g, v = np.zeros_like(p), np.zeros_like(p)
    calls = []
    for i, l in enumerate(net):
        if isinstance(l, Conv):
            rows, k = batch * l.geom[6] * l.geom[7], l.k_len
            (w, _), (dw, _) = l.views(p), l.views(g)
            cols = rng.standard_normal((rows, k), dtype=np.float32)
            z, dz = np.empty((rows, l.channels), np.float32), np.ones((rows, l.channels), np.float32)
            calls += [(cols, w.T, z), (dz.T, cols, dw)] + ([(dz, w, cols)] if i else [])
        elif isinstance(l, Dense):
            (w, _), (dw, _) = l.views(p), l.views(g)
            a = rng.standard_normal((batch, l.n_in), dtype=np.float32)
            z, dz = np.empty((batch, l.units), np.float32), np.ones((batch, l.units), np.float32)
            calls += [(a, w, z), (a.T, dz, dw)] + ([(dz, w.T, a)] if i else [])

    def step():
        for a, b, out in calls:
            np.matmul(a, b, out=out)
        momentum_update(p, g, v, 0.0, 1.0 / batch, MU, 0.0, False)  # same traffic; lr 0 keeps values finite

    return step


def torch_net(torch, spec):
    """nn.Sequential of the spec's canonical stack in PyTorch's NCHW (1-d: NCL) layout: Conv2d/Conv1d,
    MaxPool/AvgPool, Flatten, Linear, ReLU/Tanh — the same GEMM FLOPs as mpitrain's NHWC layers (weights
    differ; a flatten orders C, H, W instead of H, W, C).  'same' padding is TensorFlow's output size
    ⌈in/stride⌉: PyTorch's own symmetric `padding` where it gives that size (even total padding, or stride
    > 1, where padding one more on top/left than TensorFlow reads the same number of positions), else an
    explicit ZeroPad (odd total at stride 1: the odd pixel at the bottom/right)."""
    from ..kernels.cpu import RELU, TANH
    from ..model.layers import Conv, Dense, Flatten, Pool
    from ..model.stack import build

    nn = torch.nn
    net = build(list(spec.stack), spec.feature_shape, spec.n_out)
    mods = []
    for l in net:
        if isinstance(l, Dense):
            mods.append(nn.Linear(l.n_in, l.units))
        elif isinstance(l, Conv):
            KH, KW, SH, SW, PH, PW, OH, OW = l.geom
            H, W, C = l.in_shape
            axes = [(H, KH, SH, PH, OH), (W, KW, SW, PW, OW)]
            total = [max((o - 1) * s + k - n, 0) if l.same else 0 for n, k, s, _, o in axes]
            sym = [t - t // 2 for t in total]  # the larger half on both sides
            fits = all((n + 2 * q - k) // s + 1 == o for (n, k, s, _, o), q in zip(axes, sym))
            pad = sym if fits else [0, 0]
            if not fits:  # (left, right, top, bottom)
                mods.append((nn.ZeroPad2d((PW, total[1] - PW, PH, total[0] - PH)) if l.dims == 2
                             else nn.ConstantPad1d((PW, total[1] - PW), 0.0)))
            if l.dims == 2:
                mods.append(nn.Conv2d(C, l.channels, (KH, KW), (SH, SW), padding=tuple(pad)))
            else:
                mods.append(nn.Conv1d(C, l.channels, KW, SW, padding=pad[1]))
        elif isinstance(l, Pool):
            KH, KW, SH, SW = l.win
            cls = {("max", 2): nn.MaxPool2d, ("avg", 2): nn.AvgPool2d, ("max", 1): nn.MaxPool1d,
                   ("avg", 1): nn.AvgPool1d}[l.kind, l.dims]
            mods.append(cls((KH, KW), (SH, SW)) if l.dims == 2 else cls(KW, SW))
        elif isinstance(l, Flatten):
            mods.append(nn.Flatten())
        if l.act == RELU:
            mods.append(nn.ReLU())
        elif l.act == TANH:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def torch_input_shape(spec):
    """The per-sample shape PyTorch's first layer reads: (C, H, W), (C, L) or (features,)."""
    from ..model.layers import input_shape

    nhwc, _ = input_shape(spec.feature_shape, spec.stack[0])
    if len(nhwc) == 1:
        return nhwc
    H, W, C = nhwc
    return (C, W) if spec.stack[0].split()[0].endswith("1d") else (C, H, W)


def torch_step(spec, x, y, threads, device="cpu"):
    """(step function, PyTorch version) of PyTorch's step of the spec's network on the batch (x: flat
    samples, channels first, as the datasets store them)."""
    import torch

    torch.set_num_threads(threads)
    net = torch_net(torch, spec).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MU)
    loss_fn = torch.nn.CrossEntropyLoss()  # the mean: mpitrain's summed loss × 1/B in its update
    tx = torch.from_numpy(x).reshape(len(x), *torch_input_shape(spec)).to(device)
    ty = torch.from_numpy(y).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(tx), ty).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, torch.__version__


def sgemm_rate(threads, n=1024, seconds=0.5):
    """GFLOP/s of a single-precision n³ matmul through NumPy's BLAS with `threads` threads (3 blocks of
    about `seconds`)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads):
        return 2 * n ** 3 / _timed({"sgemm": lambda: np.matmul(a, a, out=c)}, seconds, 3)["sgemm"] / 1e9


# -- where a step's time goes (--breakdown) --------------------------------------------------------------
# mpitrain: every leaf CPU kernel (kernels/cpu.py functions the layers, the loss and the optimizer reach
# through module globals) wrapped in a timer for a few steps; what the timers do not cover is "python":
# the layer loop, views, dispatch into the kernels and the timers' own ~0.3 µs per call.
PARTS = {"_gemm": "gemm", "im2col": "im2col", "col2im": "col2im", "bias_act": "bias+act fwd",
         "act_grad": "act grad + bias grad", "maxpool_forward": "pool", "maxpool_backward": "pool",
         "avgpool_forward": "pool", "avgpool_backward": "pool", "softmax_xent": "softmax xent",
         "momentum_update": "momentum update", "to_nhwc": "to NHWC"}


def mpitrain_breakdown(step, steps):
    """[(part, calls per step, seconds per step)] of `steps` calls of mpitrain's CPU step, and the step's
    seconds with the timers in place.  GEMMs are split into conv and dense ones."""
    from ..kernels import cpu

    acc, where = {}, []

    def timed(name, fn):
        def wrapper(*a, **kw):
            part = PARTS[name]
            if part == "gemm":
                part = f"gemm ({where[-1] if where else 'dense'})"
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                calls, sec = acc.get(part, (0, 0.0))
                acc[part] = calls + 1, sec + time.perf_counter() - t
        return wrapper

    def inside(fn):
        def wrapper(*a, **kw):
            where.append("conv")
            try:
                return fn(*a, **kw)
            finally:
                where.pop()
        return wrapper

    saved = {name: getattr(cpu, name) for name in [*PARTS, "conv_forward", "conv_backward"]}
    try:
        for name in PARTS:
            setattr(cpu, name, timed(name, saved[name]))
        for name in ("conv_forward", "conv_backward"):
            setattr(cpu, name, inside(saved[name]))
        step()
        acc.clear()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - t) / steps
    finally:
        for name, fn in saved.items():
            setattr(cpu, name, fn)
    parts = sorted(((k, c / steps, sec / steps) for k, (c, sec) in acc.items()), key=lambda r: -r[2])
    return parts + [("python (the rest)", 0.0, total - sum(r[2] for r in parts))], total


def torch_breakdown(step, steps, top=12):
    """[(operator, calls per step, self seconds per step)] of PyTorch's step under torch.profiler (its
    `top` operators by self CPU time, then the rest), and the profiled step's seconds."""
    import torch

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - t) / steps
    ops = sorted(((e.key, e.count / steps, e.self_cpu_time_total / 1e6 / steps) for e in prof.key_averages()),
                 key=lambda r: -r[2])
    rest = sum(r[2] for r in ops[top:])
    return ops[:top] + [("other operators", sum(r[1] for r in ops[top:]), rest),
                        ("python (the rest)", 0.0, total - sum(r[2] for r in ops))], total


def breakdown_rows(batch, impl, parts, total):
    return [{"batch": batch, "impl": impl, "part": part, "calls_per_step": calls, "us_per_step": sec * 1e6,
             "pct_step": 100 * sec / total} for part, calls, sec in parts]


def bench_step(args, comm):
    from ..threads import limit
    from . import model_spec

    threads = limit(args.threads)
    if args.device == "cuda":
        from ..kernels import compiled

        comm.agree(compiled, comm, "cuda")  # a clear error without numba-cuda or a GPU; one GPU per rank
    spec = comm.agree(model_spec, args)
    mlp = spec.kind == "mlp"
    sizes = spec.sizes
    flops = flops_per_sample(spec)
    peak = sgemm_rate(threads, seconds=min(0.5, args.seconds))
    try:
        import torch
        have_torch = args.device == "cpu" or torch.cuda.is_available()
        if not have_torch and comm.rank == 0:
            print("PyTorch has no CUDA device here: skipping the PyTorch reference")
    except ImportError:
        have_torch = False
        if comm.rank == 0:
            print("PyTorch is not installed: skipping the PyTorch reference (pip install 'mpitrain[peers]')")
    rows, memory, parts = [], [], []
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, spec.n_in), dtype=np.float32)
        y = rng.integers(0, spec.n_out, batch).astype(np.int64)
        mine, stepper = mpitrain_step(spec, x, y, args.device)
        impls = {"mpitrain": mine}
        if mlp:
            impls["numpy"] = numpy_step(sizes, x, y)
        if args.device == "cpu":
            if mlp:
                impls.update(floor=floor_step(sizes, x, 0), floor_padded=floor_step(sizes, x, 16))
            else:
                impls["floor"] = cnn_floor_step(spec, batch)
        if have_torch:
            impls["torch"], torch_version = torch_step(spec, x, y, threads, args.device)
        measured = _timed(impls, args.seconds, args.repeats)
        mem = step_memory(stepper, batch)
        memory.append((batch, mem))
        for name, sec in measured.items():
            rows.append({"batch": batch, "impl": name, "model": spec.kind, "threads": threads, "ranks": comm.size,
                         "samples_per_s": batch / sec, "gflops": flops * batch / sec / 1e9,
                         "pct_sgemm": 100 * flops * batch / sec / 1e9 / peak,
                         "vs_torch": measured["torch"] / sec if have_torch else None,
                         "vs_numpy": measured["numpy"] / sec if mlp else None,
                         "version": torch_version if name == "torch" else "",
                         **(mem if name == "mpitrain" else {})})
        if args.breakdown and args.device == "cpu":
            steps = max(3, min(200, int(args.seconds / measured["mpitrain"])))
            parts += breakdown_rows(batch, "mpitrain", *mpitrain_breakdown(mine, steps))
            if have_torch:
                steps = max(3, min(200, int(args.seconds / measured["torch"])))
                parts += breakdown_rows(batch, "torch", *torch_breakdown(impls["torch"], steps))
    if comm.rank == 0:
        if mlp:
            print(f"MLP {'-'.join(map(str, sizes))}, SGD momentum, {threads} thread(s) per rank, {comm.size} rank(s); "
                  f"sgemm reference {peak:.1f} GFLOP/s")
        else:
            print(f"{spec.kind} [{spec.describe()}] on {'×'.join(map(str, spec.feature_shape))}, "
                  f"{spec.n_params:,} parameters, {flops / 1e6:.3g} MFLOP of GEMMs per sample; SGD momentum, "
                  f"{threads} thread(s) per rank, {comm.size} rank(s); sgemm reference {peak:.1f} GFLOP/s; "
                  "no NumPy step for a CNN")
        print(table(rows, ["batch", "impl", "samples_per_s", "gflops", "pct_sgemm", "vs_torch", "vs_numpy"]))
        for batch, mem in memory:
            print(f"memory per rank, batch {batch}: {mem['mem_step'] / 2**20:.2f} MiB = outputs "
                  f"{mem['mem_outputs'] / 2**20:.2f} + im2col {mem['mem_im2col'] / 2**20:.2f} + pool arg-max "
                  f"{mem['mem_pool_arg'] / 2**20:.2f} + input gradients {mem['mem_grad_in'] / 2**20:.2f} + NHWC "
                  f"copy {mem['mem_entry'] / 2**20:.2f} + parameters, gradient and momentum "
                  f"{mem['mem_state'] / 2**20:.2f}")
        if args.breakdown and args.device != "cpu":
            print("--breakdown times the CPU kernels: not with --device cuda")
        for batch in dict.fromkeys(r["batch"] for r in parts):
            for impl in ("mpitrain", "torch"):
                mine = [r for r in parts if r["batch"] == batch and r["impl"] == impl]
                if mine:
                    print(f"where the step goes: {impl}, batch {batch}")
                    print(table(mine, ["part", "calls_per_step", "us_per_step", "pct_step"]))
    return rows + parts
