"""Weak/strong scaling of the real training step over rank counts, each point a fresh ``mpiexec -n P``.

A point builds the MLP and per-rank random in-memory batches (no HDF5), runs warm-up steps, then times
each step in three parts: data (the row gather ``TrainShard.batch_at`` does), compute (``loss_grad`` +
optimizer update, through ``train.Stepper``) and allreduce (the time in the step's collectives: one
``Allreduce`` of the flat gradient buffer, or what each ``--comm`` mode of sync.py does instead; every
mode is measured in the same ``mpiexec``, one after another; ``--tensor`` adds tensor-parallel runs of
each, T ranks sharing a data rank's batch and splitting every layer, with tensor_ms the time in the tensor
group's Allreduces, taken out of compute).  There is no barrier inside the timed loop, as in training, so
waiting for a slower rank counts as allreduce time.  Each part is the median over the timed steps on each
rank, then the max over ranks.

Memory per rank, per mode: the bytes of parameters, gradient and optimizer state that the live sync and
optimizer objects hold (as summary.json reports them), and the peak resident memory of the mode's steps
(Linux's VmHWM, reset before each mode through /proc/self/clear_refs; elsewhere the process's peak so far),
max over ranks.
"""
import argparse
import gc
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..config import MODES, CommConfig
from ..errors import MpitrainError
from ..memory import status_bytes
from . import comm_modes, loop_arguments, mlp_arguments, model_arguments, model_spec, table

LR = 0.01
COLUMNS = ["ranks", "comm", "tensor", "global_batch", "local_batch", "data_ms", "compute_ms", "allreduce_ms",
           "tensor_ms", "step_ms",
           "samples_per_s", "comm_bytes", "speedup", "efficiency"]
MEMORY = ["ranks", "comm", "tensor", "n_params", "param_bytes_per_rank", "grad_bytes_per_rank",
          "optimizer_state_bytes_per_rank", "peak_rss_bytes"]


def add_parser(sub):
    s = sub.add_parser(
        "scaling", help="weak/strong scaling of the training step over rank counts (launches mpiexec)",
        description="Start as ONE process (python -m mpitrain bench scaling ...): every rank count runs as "
                    "its own `mpiexec -n P` with synthetic in-memory data.  Per point: data, compute and "
                    "allreduce milliseconds per step (median over the timed steps, max over ranks), time per "
                    "step, global samples/s, and speedup and efficiency relative to the smallest rank count "
                    "(strong: speedup = t1/tp, efficiency = speedup/p; weak: efficiency = t1/tp, speedup = "
                    "samples/s ratio).  Saves JSON, CSV and PNG plots into --out.")
    s.add_argument("--ranks", default="1,2,4,8", help="rank counts (default 1,2,4,8)")
    s.add_argument("--mode", choices=("weak", "strong"), default="weak",
                   help="weak: fixed batch per rank; strong: fixed global batch split over the ranks (default weak)")
    s.add_argument("--batch-per-rank", type=int, default=64, help="weak mode: samples per rank per step (default 64)")
    s.add_argument("--global-batch", type=int, default=256, help="strong mode: samples per step in all (default 256)")
    mlp_arguments(s)
    model_arguments(s)
    point_arguments(s)
    # internal: what the driver's `mpiexec -n P` runs to measure one rank count on its world
    s.add_argument("--point", action="store_true", help=argparse.SUPPRESS)


def point_arguments(s, comm="plain", optimizer="momentum", steps=30, warmup=5):
    """The options of a point (besides the MLP and the batch), shared with bench capacity."""
    loop_arguments(s, steps, warmup)
    s.add_argument("--comm", default=comm, help=f"comm.mode values to measure at every point, comma-separated "
                                                f"(default {comm}; any of {', '.join(MODES)})")
    s.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=optimizer,
                   help=f"train.optimizer of the steps (default {optimizer})")
    c = CommConfig()
    s.add_argument("--bucket-mb", type=float, default=c.bucket_mb,
                   help=f"comm.bucket_mb for overlap (default {c.bucket_mb:g})")
    s.add_argument("--topk-ratio", type=float, default=c.topk_ratio,
                   help=f"comm.topk_ratio for topk (default {c.topk_ratio:g})")
    s.add_argument("--local-steps", type=int, default=c.local_steps,
                   help=f"comm.local_steps for local_sgd (default {c.local_steps})")
    s.add_argument("--group-size", type=int, default=c.group_size,
                   help=f"comm.group_size for hierarchical (default {c.group_size}: the node)")
    s.add_argument("--tensor", default="1", help="parallel.tensor values to measure at every point, comma-"
                                                 "separated (default 1; a T > 1 runs where it divides the ranks, "
                                                 "with plain, sharded or fsdp; its ranks share the batch of a "
                                                 "data rank)")
    s.add_argument("--timeout", type=float, default=600, help="seconds before a point is killed (default 600)")
    s.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")
    # internal: the address-space limit (RLIMIT_AS, bytes) a point sets on each rank (bench capacity)
    s.add_argument("--memory-limit", type=int, default=0, help=argparse.SUPPRESS)


def mlp_sizes(features, hidden, classes):
    """Layer sizes from the command line's --features, --hidden (comma-separated) and --classes."""
    return [features, *[int(h) for h in str(hidden).split(",") if h], classes]


def bench_scaling(args, comm):
    if args.point:
        if args.memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
        from ..tensor import MODES as TENSOR_MODES

        return [measure_point(args, comm, mode, t) for t in tensors(args.tensor) for mode in comm_modes(args.comm)
                if comm.size % t == 0 and (t == 1 or mode in TENSOR_MODES)]
    if comm.size > 1:
        raise MpitrainError("bench scaling starts its own `mpiexec -n P` for every point: launch it as one "
                            "process (python -m mpitrain bench scaling ...), not under mpirun", agreed=True)
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    if ranks[0] < 1 or args.steps < 1:
        raise MpitrainError(f"--ranks {args.ranks} --steps {args.steps}: rank counts and steps must be ≥ 1")
    comm_modes(args.comm)  # unknown modes fail here, before any point starts
    tensors(args.tensor)
    if args.mode == "strong" and args.global_batch < ranks[-1]:
        raise MpitrainError(f"--global-batch {args.global_batch} is smaller than {ranks[-1]} ranks: every rank "
                            "needs at least one sample per step")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spec = model_spec(args)  # a bad --model fails here, before any point starts
    batch = f"{args.batch_per_rank} samples per rank" if args.mode == "weak" else f"global batch {args.global_batch}"
    print(f"bench scaling ({args.mode}, {batch}): {spec.kind} {spec.describe()}, {args.threads} thread(s) per "
          f"rank, median of {args.steps} steps after {args.warmup} warm-up, max over ranks; {cores} core(s) here",
          flush=True)
    if ranks[-1] * args.threads > cores:
        print(f"note: {ranks[-1]} ranks × {args.threads} thread(s) > {cores} cores: oversubscribed points measure "
              "time-sharing of the cores, not scaling", flush=True)
    rows = []
    for p in ranks:
        rows += run_point(args, p)
        print(f"  {p} rank(s): " + ", ".join(f"{r['comm']}{'' if r['tensor'] == 1 else ' tensor ' + str(r['tensor'])} "
                                            f"{r['step_ms']:.4g}" for r in rows if r["ranks"] == p)
              + " ms/step", flush=True)
    add_speedup(rows, args.mode)
    print(table(rows, COLUMNS))
    if any("allgather_ms" in r for r in rows):
        print("fsdp's allreduce_ms is its allgather_ms (waiting for and starting the prefetched gathers) + "
              "reduce_scatter_ms + the scalars' allreduce:")
        print(table([r for r in rows if "allgather_ms" in r], ["ranks", "comm", "allgather_ms", "reduce_scatter_ms"]))
    print("memory per rank (bytes; peak RSS max over ranks):")
    print(table(rows, MEMORY))
    from .plots import scaling_plots

    scaling_plots(rows, args.mode, args.out or "bench-results")
    return rows


def add_speedup(rows, mode):
    """Speedup and efficiency of every row relative to the smallest rank count of the plain mode when it
    was measured (so that the modes compare with one reference), else of the row's own mode."""
    ref = "plain" if any(r["comm"] == "plain" for r in rows) else None
    for r in rows:
        base = min((b for b in rows if b["comm"] == (ref or r["comm"]) and b["tensor"] == 1) or
                   (b for b in rows if b["comm"] == (ref or r["comm"])), key=lambda b: b["ranks"])
        if mode == "strong":
            r["speedup"] = base["step_ms"] / r["step_ms"]
            r["efficiency"] = r["speedup"] * base["ranks"] / r["ranks"]
        else:
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
            r["efficiency"] = base["step_ms"] / r["step_ms"]


def _mpiexec():
    from shutil import which

    path = which("mpiexec", path=os.path.dirname(sys.executable)) or which("mpiexec")
    if not path:
        raise MpitrainError("bench scaling needs mpiexec (pip install 'mpitrain[mpi]' or a site MPI on PATH)")
    return path


def _child_env(threads):
    """This environment less the launcher's variables (when the driver itself runs under mpirun -n 1, the
    child mpiexec must not take them as its own), with the thread count fixed for every rank."""
    from ..threads import THREAD_VARS

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_"))}
    env.update({name: str(threads) for name in THREAD_VARS})
    return env


def run_point(args, p, memory_limit=0):
    """Launch one point as `mpiexec -n P python -m mpitrain bench scaling --point`; returns its rows (one per
    comm mode).  memory_limit: RLIMIT_AS per rank in bytes (0: none)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [_mpiexec(), "-n", str(p), sys.executable, "-m", "mpitrain", "bench", "scaling", "--point",
               "--mode", args.mode, "--batch-per-rank", str(args.batch_per_rank),
               "--global-batch", str(args.global_batch), "--features", str(args.features),
               "--hidden", str(args.hidden), "--classes", str(args.classes), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--comm", args.comm,
               "--bucket-mb", str(args.bucket_mb), "--topk-ratio", str(args.topk_ratio),
               "--local-steps", str(args.local_steps), "--group-size", str(args.group_size), "--out", tmp,
               "--tensor", args.tensor, "--optimizer", args.optimizer, "--memory-limit", str(memory_limit),
               "--model", args.model, *(["--input-shape", args.input_shape] if args.input_shape else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_child_env(args.threads), start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank
            proc.communicate()
            raise MpitrainError(f"bench scaling: {p} ranks did not finish in {args.timeout:g} s "
                                f"(--timeout): {' '.join(cmd)}") from None
        saved = glob.glob(os.path.join(tmp, "scaling-*.json"))
        if proc.returncode != 0 or len(saved) != 1:
            tail = "\n".join(output.strip().splitlines()[-20:])
            raise MpitrainError(f"bench scaling: {p} ranks failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        with open(saved[0], encoding="utf-8") as f:
            return json.load(f)["results"]


def tensors(text):
    """The parallel.tensor values of a --tensor list, or one clear error."""
    try:
        values = [int(t) for t in str(text).split(",")]
    except ValueError:
        values = [0]
    if min(values) < 1:
        raise MpitrainError(f"--tensor {text}: expected integers ≥ 1, comma-separated")
    return values


def measure_point(args, comm, mode, tensor=1):
    """One point on this world, comm mode and parallel.tensor: time warm-up + timed training steps, return
    the row (same on all ranks)."""
    from ..config import Config
    from ..data.shard import block
    from ..kernels import compiled
    from ..model import Model
    from ..optim import Optimizer
    from ..sync import make
    from ..tensor import Grid
    from ..threads import limit
    from ..trainer import Stepper

    limit(args.threads)
    spec = comm.agree(model_spec, args)
    kernels = comm.agree(compiled, comm)
    gc.collect()  # the previous mode's buffers
    _reset_peak_rss()
    cfg = Config()
    c = cfg.comm
    c.mode, c.bucket_mb, c.topk_ratio, c.local_steps, c.group_size = (mode, args.bucket_mb, args.topk_ratio,
                                                                      args.local_steps, args.group_size)
    cfg.parallel.tensor = tensor
    full = Model(spec)
    grid = comm.agree(Grid, cfg.validate(), comm, full)
    world, comm, model = comm, grid.dp, grid.model  # the data group exchanges gradients and owns the batches
    if args.mode == "weak":
        local, global_batch = args.batch_per_rank, args.batch_per_rank * comm.size
    else:  # the global batch split as TrainShard splits it: ⌊B/p⌋ or ⌈B/p⌉ per rank
        lo, hi = block(args.global_batch, comm.size, comm.rank)
        local, global_batch = hi - lo, args.global_batch
    sync = make(cfg, comm, model)
    # seeded: identical on every rank, as after train()'s broadcast (fsdp alone draws just its shard)
    params = sync.init(model, 0) if tensor == 1 else sync.own(grid.take(full.init_params(0)))
    part = sync.part
    opt = Optimizer(kernels, args.optimizer, part.stop - part.start)
    stepper = Stepper(model, opt, sync, flags=2)

    # This rank's data: one distinct row per sample of the run, visited in a seeded random order.
    total = args.warmup + args.steps
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((local * total, spec.n_in), dtype=np.float32)
    y = rng.integers(0, spec.n_out, local * total).astype(np.int64)
    order = rng.permutation(local * total).reshape(total, local)
    xb, yb = np.empty((local, spec.n_in), np.float32), np.empty(local, np.int64)

    split = getattr(sync, "split", {})  # fsdp: its allgather and reduce-scatter seconds apart
    times = np.zeros((args.steps, 5 + len(split)))  # data, compute, allreduce, tensor group, whole[, the split]
    for step in range(total):
        if step == args.warmup:
            world.barrier()  # the timed steps start together
        t0 = time.perf_counter()
        np.take(x, order[step], axis=0, out=xb)
        np.take(y, order[step], out=yb)
        t1 = time.perf_counter()
        c, tc, parts = sync.seconds, getattr(model, "seconds", 0.0), list(split.values())
        stepper(params, xb, yb, LR, 1.0 / global_batch)
        t2 = time.perf_counter()
        if step >= args.warmup:
            reduce, tp = sync.seconds - c, getattr(model, "seconds", 0.0) - tc
            times[step - args.warmup] = (t1 - t0, t2 - t1 - reduce - tp, reduce, tp, t2 - t0,
                                         *(v - b for v, b in zip(split.values(), parts)))
    data, compute, reduce, tp, whole, *split_ms = world.allreduce(np.median(times, axis=0), "max") * 1e3
    memory = [sum(v.nbytes for v in opt.state.values()), *sync.bytes_per_rank(params, stepper.grad),
              status_bytes("VmHWM"), status_bytes("VmPeak")]
    state, param, grad, rss, space = (int(v) for v in world.allreduce(memory, "max"))
    return {"ranks": world.size, "model": spec.kind, "comm": mode, "tensor": tensor, "mode": args.mode,
            "global_batch": global_batch,
            "local_batch": int(world.allreduce([local], "max")[0]),  # strong: ⌈B/p⌉, the busiest rank's
            "n_params": spec.n_params, "allreduce_bytes": stepper.buf.nbytes, "threads": args.threads,
            "data_ms": data, "compute_ms": compute, "allreduce_ms": reduce, "tensor_ms": tp, "step_ms": whole,
            "samples_per_s": global_batch / whole * 1e3, "comm_bytes": sync.bytes / sync.steps,
            "param_bytes_per_rank": param, "grad_bytes_per_rank": grad, "optimizer_state_bytes_per_rank": state,
            "peak_rss_bytes": rss, "address_space_bytes": space,
            **{f"{name}_ms": ms for name, ms in zip(split, split_ms)}}


def _reset_peak_rss():
    """Start VmHWM afresh (Linux ≥ 4.0), so that each comm mode's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the process's peak so far (status_bytes falls back likewise)
