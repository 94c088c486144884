"""Training-step throughput per rank: mpitrain's Numba kernels vs a plain NumPy step vs PyTorch CPU, and
the floor of any step built on NumPy's BLAS (the step's GEMMs and its update alone).

Same model, initial parameters, data, optimizer and thread count (--device cuda: mpitrain's CUDA kernels
and PyTorch CUDA on this rank's GPU, the NumPy step stays on the CPU).  Every implementation is timed in
--repeats rounds, round-robin, each round one block of the same number of full steps (forward, backward,
update) per implementation, about --seconds for the slowest; the median block and the best are reported.
Every rank measures at once (so an oversubscribed node shows), rank 0 prints its own figures.

--model picks the network: the MLP of --features/--hidden/--classes (default), a preset (lenet5,
fedavg_cnn, resnet8, resnet20 on --input-shape, gpt of --n-layer/--n-head/--n-embd/--block-size/--vocab on
random tokens) or a JSON stack of layer strings.  PyTorch runs the same canonical stack with mpitrain's
initial parameters (torch_model.py).  The optimizer is SGD with momentum 0.9 (lr 0.01), or for a language
model AdamW as nanoGPT trains Shakespeare (lr 1e-3, betas 0.9/0.99, weight decay 0.1 on the weights).

The floor is every GEMM of mpitrain's step, recorded with its operands (every GEMM a CPU step makes is an
np.matmul call: kernels/cpu.py's _gemm, the attention kernels, the tied output layer) and replayed on
NumPy's BLAS, plus the optimizer's update: no im2col, pooling, norm, softmax, bias, activation or layer
code.  Those GEMMs are also the step's FLOP count.  The MLP has a plain NumPy step beside it, and the floor
with weight rows padded by 16 floats.
"""
import time
from types import SimpleNamespace

import numpy as np

from . import table

LR, MU = 0.01, 0.9
ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}  # nanoGPT's Shakespeare


def _timed(steps, seconds, repeats):
    """{name: (median, best) seconds per call} of the step functions, timed in `repeats` rounds of one
    block each, round-robin (a slow spell of the machine falls on every implementation); every block is the
    same number of calls, about `seconds` for the slowest implementation."""
    single = {}
    for name, step in steps.items():
        step()  # warm-up: compiled kernels, allocated buffers
        t = time.perf_counter()
        step()
        single[name] = time.perf_counter() - t
    per_block = max(1, int(seconds / max(max(single.values()), 1e-6)))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(per_block):
                step()
            times[name].append((time.perf_counter() - t) / per_block)
    return {name: (float(np.median(ts)), min(ts)) for name, ts in times.items()}


def optimizer_name(args, spec):
    """--optimizer, else AdamW for a language model and SGD with momentum for the rest."""
    return args.optimizer or ("adamw" if spec.task == "lm" else "momentum")


def make_optimizer(name, model):
    """The bench's optimizer `name` (momentum or adamw) for all of model's parameters."""
    from ..optim import Optimizer

    if name == "adamw":
        a = ADAMW
        return Optimizer(model.k, "adamw", model.n_params, 0.0, a["beta1"], a["beta2"], a["eps"], a["weight_decay"],
                         decay_mask=model.table.decay_mask())
    return Optimizer(model.k, "momentum", model.n_params, momentum=MU)


def batch_of(spec, n, seed):
    """Random samples (x, y) of the spec's data: token windows (x the first T tokens of T + 1, y the last T)
    for a language model, else normal features (channels first, as stored) and uniform labels."""
    rng = np.random.default_rng(seed)
    if spec.task == "lm":
        tokens = rng.integers(0, spec.n_out, (n, spec.feature_shape[0] + 1)).astype(np.int32)
        return tokens[:, :-1].copy(), tokens[:, 1:].copy()
    return rng.standard_normal((n, spec.n_in), dtype=np.float32), rng.integers(0, spec.n_out, n).astype(np.int64)


def mpitrain_step(spec, x, y, device="cpu", optimizer="momentum"):
    """(step function, Stepper) of mpitrain's training step of the ModelSpec on the batch (x, y)."""
    from ..model import Model
    from ..trainer import Stepper

    model = Model(spec, device)
    params = model.xp.to_device(model.init_params(0))
    x, y = model.xp.to_device(x), model.xp.to_device(y)  # the batch is resident, as PyTorch's is
    stepper = Stepper(model, make_optimizer(optimizer, model))
    lr, scale = ADAMW["lr"] if optimizer == "adamw" else LR, 1.0 / len(x)
    if device == "cpu":
        return (lambda: stepper(params, x, y, lr, scale)), stepper
    from numba import cuda

    def step():  # the GPU runs asynchronously: a timed step ends when its kernels have
        stepper(params, x, y, lr, scale)
        cuda.synchronize()

    return step, stepper


def _sequences(seq):
    """A Sequence and those of every residual branch inside it."""
    yield seq
    for l in seq.net:
        for inner in getattr(l, "branches", ()):
            yield from _sequences(inner)


def step_memory(stepper, batch):
    """Bytes a rank holds for a step of `batch` samples: the model's per-batch buffers (every Sequence's,
    residual branches included: each layer's output, the im2col workspace `cols` (reused for dcols),
    max-pool arg-max indices, the other layers' scratch (attention probabilities, norm statistics, a
    residual block's gradients), the gradient flowing into each layer, the NHWC copy of a channels-first
    batch) and the per-model state (parameters, the step buffer [gradient | loss | correct], optimizer
    vectors).  The batch itself is not counted."""
    model = stepper.model
    nbytes = lambda arrays: int(sum(a.nbytes for a in arrays if hasattr(a, "nbytes")))  # noqa: E731
    mem = dict.fromkeys(("mem_outputs", "mem_im2col", "mem_pool_arg", "mem_scratch", "mem_grad_in"), 0)
    for seq in _sequences(model.seq):
        outs, scratch, downs = seq.bufs(batch)
        mem["mem_outputs"] += nbytes(outs)
        mem["mem_grad_in"] += nbytes(downs)
        for s in scratch:
            for key, a in s.items():
                mem[{"cols": "mem_im2col", "arg": "mem_pool_arg"}.get(key, "mem_scratch")] += nbytes([a])
    mem["mem_entry"] = nbytes([model._entry.get(batch)])
    mem["mem_state"] = (4 * model.n_params + stepper.buf.nbytes + nbytes(stepper.opt.state.values())
                        + (stepper.grad.nbytes if stepper.staged else 0))
    mem["mem_step"] = sum(mem.values())
    return mem


def record_gemms(step):
    """[(args, kwargs, result size)] of every np.matmul call one call of step makes (its GEMMs: module doc)."""
    calls, matmul = [], np.matmul

    def record(*args, **kwargs):
        out = matmul(*args, **kwargs)
        calls.append((args, kwargs, out.size))
        return out

    np.matmul = record
    try:
        step()
    finally:
        np.matmul = matmul
    return calls


def gemm_flops(calls):
    """FLOPs of recorded GEMMs: 2·k per output element (batched ones count every matrix)."""
    return sum(2 * size * int(args[0].shape[-1]) for args, _, size in calls)


def gemm_floor_step(calls, stepper):
    """The floor: the recorded GEMMs again on the same operands (views of the model's buffers: every one
    a GEMM writes, the model's next step writes again first), then the optimizer's update on vectors of its
    own (lr 0 keeps the values finite; the memory traffic is the same)."""
    opt = make_optimizer(stepper.opt.name, stepper.model)
    p, g = stepper.model.init_params(0), np.zeros(stepper.model.n_params, np.float32)

    def step():
        with np.errstate(all="ignore"):
            for args, kwargs, _ in calls:
                np.matmul(*args, **kwargs)
        opt.update(p, g, 0.0, 1.0)

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
    """The MLP's floor with every weight row strided by `pad` more floats, which keeps rows of 1024 floats off
    4 KiB multiples (cache-set aliasing): the step's GEMMs (NumPy's BLAS) and the fused momentum update
    alone, on a padded layout of its own."""
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


def torch_step(spec, x, y, threads, device="cpu", optimizer="momentum"):
    """(step function, PyTorch version) of PyTorch's step of the spec's network (torch_model.py, mpitrain's
    initial parameters) on the batch (x: flat samples, channels first, as the datasets store them; tokens)
    with the same optimizer, PyTorch's fused implementation of it."""
    import torch

    from ..model import Model
    from .torch_model import TorchModel

    torch.set_num_threads(threads)
    net = TorchModel(spec, Model(spec).init_params(0)).to(device)
    if optimizer == "adamw":
        a = ADAMW
        opt = torch.optim.AdamW(net.decay_groups(a["weight_decay"]), lr=a["lr"], betas=(a["beta1"], a["beta2"]),
                                eps=a["eps"], fused=True)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MU, fused=True)
    tx, ty = (t.to(device) for t in net.inputs(x, y))

    def step():
        opt.zero_grad(set_to_none=True)
        net.loss(net(tx), ty).backward()  # the mean: mpitrain's summed loss × 1/B in its update
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, torch.__version__


def sgemm_rate(threads, n=1024, seconds=0.5):
    """GFLOP/s of a single-precision n³ matmul through NumPy's BLAS with `threads` threads (the best of 3
    blocks of about `seconds`)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads):
        return 2 * n ** 3 / _timed({"sgemm": lambda: np.matmul(a, a, out=c)}, seconds, 3)["sgemm"][1] / 1e9


# -- where a step's time goes (--breakdown) --------------------------------------------------------------

def mpitrain_breakdown(stepper, step, steps):
    """[(part, calls, seconds, GEMM calls, GEMM seconds), each per step] of `steps` calls of mpitrain's CPU
    step, and the step's seconds with the timers in place.  Parts: each layer kind's forward and backward
    (its own time: a residual block's is its add and copy, its branches' layers count as theirs; a
    fused activation is its dense or conv layer's), the loss, the optimizer update, and the rest (the
    step's Python, the NHWC copy of a channels-first batch, the timers' own ~1 µs per call).  GEMMs (every
    np.matmul: module doc) are timed too and counted in the part that calls them."""
    model, opt = stepper.model, stepper.opt
    acc, frames = {}, []  # part → [calls, own seconds, GEMM calls, GEMM seconds]; open parts: [part, inner s]

    def timed(part, fn):
        def wrapper(*a, **kw):
            frames.append([part, 0.0])
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                r = acc.setdefault(part, [0, 0.0, 0, 0.0])
                r[0] += 1
                r[1] += dt - frames.pop()[1]
                if frames:
                    frames[-1][1] += dt
        return wrapper

    matmul = np.matmul

    def gemm(*a, **kw):
        t = time.perf_counter()
        try:
            return matmul(*a, **kw)
        finally:
            r = acc.setdefault(frames[-1][0] if frames else "the rest", [0, 0.0, 0, 0.0])
            r[2] += 1
            r[3] += time.perf_counter() - t

    layers = [x for layer in model.net for x in layer.layers() if not x.view]  # a flatten is a view: no call
    task = model.task
    try:
        for l in layers:
            kind = l.text().split()[0]
            l.forward, l.backward = timed(f"{kind} forward", l.forward), timed(f"{kind} backward", l.backward)
        model.task = SimpleNamespace(loss_grad=timed("loss", task.loss_grad))
        opt.update = timed("optimizer update", opt.update)
        np.matmul = gemm
        step()
        acc.clear()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - t) / steps
    finally:
        np.matmul = matmul
        model.task = task
        for obj in (*layers, opt):  # the class's methods again
            for name in ("forward", "backward", "update"):
                obj.__dict__.pop(name, None)
    rest = acc.pop("the rest", [0, 0.0, 0, 0.0])
    parts = sorted(((k, c / steps, sec / steps, gc / steps, gs / steps) for k, (c, sec, gc, gs) in acc.items()),
                   key=lambda r: -r[2])
    return parts + [("the rest", 0.0, total - sum(r[2] for r in parts), rest[2] / steps, rest[3] / steps)], total


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
                        ("the rest", 0.0, total - sum(r[2] for r in ops))], total


def breakdown_rows(batch, impl, parts, total):
    return [{"batch": batch, "impl": impl, "part": part, "calls_per_step": calls, "us_per_step": sec * 1e6,
             "pct_step": 100 * sec / total,
             **({"gemms_per_step": gemm[0], "gemm_us_per_step": gemm[1] * 1e6} if gemm else {})}
            for part, calls, sec, *gemm in parts]


def bench_step(args, comm):
    from ..threads import limit
    from . import model_spec

    threads = limit(args.threads)
    if args.device == "cuda":
        from ..kernels import compiled

        comm.agree(compiled, comm, "cuda")  # a clear error without numba-cuda or a GPU; one GPU per rank
    spec = comm.agree(model_spec, args)
    mlp, lm = spec.kind == "mlp", spec.task == "lm"
    optimizer = optimizer_name(args, spec)
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
    batches = args.batches or {"gpt": "12", "resnet8": "128", "resnet20": "128"}.get(spec.kind, "32,128")
    rows, memory, parts, flops = [], [], [], {}
    for batch in (int(b) for b in batches.split(",")):
        x, y = batch_of(spec, batch, batch)
        mine, stepper = mpitrain_step(spec, x, y, args.device, optimizer)
        on_cpu = (mine, stepper) if args.device == "cpu" else mpitrain_step(spec, x, y, "cpu", optimizer)
        calls = record_gemms(on_cpu[0])  # the step's GEMMs: its FLOPs, and the floor
        flops[batch] = gemm_flops(calls)
        impls = {"mpitrain": mine}
        if mlp:
            impls["numpy"] = numpy_step(spec.sizes, x, y)
        if args.device == "cpu":
            impls["floor"] = gemm_floor_step(calls, stepper)
            if mlp:
                impls["floor_padded"] = floor_step(spec.sizes, x, 16)
        if have_torch:
            impls["torch"], torch_version = torch_step(spec, x, y, threads, args.device, optimizer)
        measured = _timed(impls, args.seconds, args.repeats)
        mem = step_memory(stepper, batch)
        memory.append((batch, mem))
        for name, (sec, best) in measured.items():
            rows.append({"batch": batch, "impl": name, "model": spec.kind, "optimizer": optimizer,
                         "threads": threads, "ranks": comm.size, "samples_per_s": batch / sec,
                         "best_samples_per_s": batch / best,
                         **({"tokens_per_s": batch * spec.feature_shape[0] / sec} if lm else {}),
                         "gflops": flops[batch] / sec / 1e9, "pct_sgemm": 100 * flops[batch] / sec / 1e9 / peak,
                         "vs_torch": measured["torch"][0] / sec if have_torch else None,
                         "best_vs_torch": measured["torch"][1] / best if have_torch else None,
                         "vs_numpy": measured["numpy"][0] / sec if mlp else None,
                         "version": torch_version if name == "torch" else "",
                         **(mem if name == "mpitrain" else {})})
        if args.breakdown and args.device == "cpu":
            steps = max(1, min(200, int(args.seconds / measured["mpitrain"][0])))
            parts += breakdown_rows(batch, "mpitrain", *mpitrain_breakdown(stepper, mine, steps))
            if have_torch:
                steps = max(1, min(200, int(args.seconds / measured["torch"][0])))
                parts += breakdown_rows(batch, "torch", *torch_breakdown(impls["torch"], steps))
    if comm.rank == 0:
        per_sample = ", ".join(f"{f / b / 1e6:.4g}" for b, f in flops.items())
        what = (f"MLP {'-'.join(map(str, spec.sizes))}" if mlp else f"{spec.kind} [{spec.describe()}]"
                + ("" if lm else f" on {'×'.join(map(str, spec.feature_shape))}"))
        print(f"{what}, {spec.n_params:,} parameters, {per_sample} MFLOP of GEMMs per sample; "
              f"{'AdamW' if optimizer == 'adamw' else 'SGD momentum'}, {threads} thread(s) per rank, "
              f"{comm.size} rank(s); sgemm reference {peak:.1f} GFLOP/s")
        print(table(rows, ["batch", "impl", "samples_per_s", *(["tokens_per_s"] if lm else []), "gflops",
                           "pct_sgemm", "vs_torch", "best_vs_torch", *(["vs_numpy"] if mlp else [])]))
        for batch, mem in memory:
            mib = {k: v / 2**20 for k, v in mem.items()}
            print(f"memory per rank, batch {batch}: {mib['mem_step']:.2f} MiB = outputs {mib['mem_outputs']:.2f} + "
                  f"im2col {mib['mem_im2col']:.2f} + pool arg-max {mib['mem_pool_arg']:.2f} + other scratch "
                  f"{mib['mem_scratch']:.2f} + input gradients {mib['mem_grad_in']:.2f} + NHWC copy "
                  f"{mib['mem_entry']:.2f} + parameters, gradient and optimizer state {mib['mem_state']:.2f}")
        if args.breakdown and args.device != "cpu":
            print("--breakdown times the CPU kernels: not with --device cuda")
        for batch in dict.fromkeys(r["batch"] for r in parts):
            for impl in ("mpitrain", "torch"):
                mine = [r for r in parts if r["batch"] == batch and r["impl"] == impl]
                if mine:
                    print(f"where the step goes: {impl}, batch {batch}")
                    print(table(mine, ["part", "calls_per_step", "us_per_step", "pct_step",
                                       *(["gemms_per_step", "gemm_us_per_step"] if impl == "mpitrain" else [])]))
    return rows + parts
