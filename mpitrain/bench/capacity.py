"""The largest MLP whose training steps fit one memory cap per rank, per comm mode: what model distribution buys.

Each try is a `bench scaling` point (`mpiexec -n P`, synthetic in-memory data, --warmup + --steps training
steps) with RLIMIT_AS set on every rank.  The cap is the address space of the same point on a tiny model
(max over ranks: Python, NumPy, Numba, MPI) plus --budget-mb, so it measures what the model, its gradient,
optimizer state, activations and the mode's buffers may add.  The width of the --layers hidden layers is
bisected: a try fits when every step ran, does not when a rank ran out of memory: mpitrain's out-of-memory
line, OpenBLAS's failed allocation, or an MPI error in a collective, which under the cap is MPICH failing to
allocate its temporary buffer (its error stack is cut before it says so; the same point ran without the cap
on the tiny model).  Any other failure stops the bench.
"""
import argparse
import math

from ..errors import MpitrainError
from . import comm_modes, table
from .scaling import point_arguments, run_point

OUT_OF_MEMORY = ("out of memory", "OpenBLAS error: Memory allocation", "mpi4py.MPI.Exception")
COLUMNS = ["comm", "ranks", "width", "n_params", "vs_first", "param_bytes_per_rank", "grad_bytes_per_rank",
           "optimizer_state_bytes_per_rank", "peak_rss_bytes", "address_space_bytes", "tries"]


def add_parser(sub):
    c = sub.add_parser(
        "capacity", help="the largest MLP that trains under one memory cap per rank, per comm mode (mpiexec)",
        description="Start as ONE process.  For each --comm mode, bisects the width of --layers equal hidden "
                    "layers (MLP --features-W-…-W---classes) to the largest whose training steps run on --ranks "
                    "ranks with an address-space limit (RLIMIT_AS) per rank of a tiny model's address space + "
                    "--budget-mb; reports its parameters, bytes per rank and the ratio to the first mode's.")
    c.add_argument("--ranks", type=int, default=4, help="ranks (default 4)")
    c.add_argument("--budget-mb", type=float, default=512,
                   help="MiB per rank above the tiny model's address space (default 512)")
    c.add_argument("--layers", type=int, default=8, help="hidden layers, all of the bisected width (default 8)")
    c.add_argument("--features", type=int, default=784, help="input features (default 784)")
    c.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    c.add_argument("--batch-per-rank", type=int, default=16, help="samples per rank per step (default 16)")
    c.add_argument("--precision", type=float, default=0.02,
                   help="stop when the width is known within this fraction (default 0.02)")
    point_arguments(c, comm="plain,fsdp", optimizer="adam", steps=2, warmup=1)
    c.set_defaults(mode="weak", global_batch=0, model="mlp", input_shape=None)  # MLPs of growing width


def largest(fits, guess, precision):
    """(the largest w ≥ 1 with fits(w) true, {w: fits(w)} of the tries), for fits monotone (true up to some
    width): doubles or halves from guess until it brackets, then bisects to within precision·w."""
    seen = {}

    def ok(w):
        if w not in seen:
            seen[w] = fits(w)
        return seen[w]

    lo, hi = (guess, 2 * guess) if ok(guess) else (guess // 2, guess)
    while lo >= 1 and not ok(lo):
        lo, hi = lo // 2, lo
    if lo < 1:
        return 0, seen
    while ok(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > max(1, precision * lo):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, seen


def bench_capacity(args, comm):
    if comm.size > 1:
        raise MpitrainError("bench capacity starts its own `mpiexec -n P` for every try: launch it as one "
                            "process (python -m mpitrain bench capacity ...), not under mpirun", agreed=True)
    modes = comm_modes(args.comm)
    if args.ranks < 1 or args.layers < 1 or args.budget_mb <= 0:
        raise MpitrainError(f"--ranks {args.ranks} --layers {args.layers} --budget-mb {args.budget_mb:g}: "
                            "expected positive values")

    def point(mode, width, limit=0):
        a = argparse.Namespace(**{**vars(args), "comm": mode, "hidden": ",".join([str(width)] * args.layers)})
        try:
            return run_point(a, args.ranks, limit)[0]
        except MpitrainError as exc:
            if limit and any(sign in str(exc) for sign in OUT_OF_MEMORY):
                return None
            raise

    base = point(modes[0], 8)["address_space_bytes"]
    limit = base + int(args.budget_mb * (1 << 20))
    print(f"bench capacity: {args.ranks} ranks, MLP {args.features}-W×{args.layers}-{args.classes}, "
          f"{args.optimizer}, {args.batch_per_rank} samples per rank, {args.warmup} + {args.steps} steps; "
          f"RLIMIT_AS per rank {limit / 2**20:.0f} MiB = tiny model's {base / 2**20:.0f} MiB + {args.budget_mb:g} MiB",
          flush=True)
    # first guess: plain's Adam footprint, 16 bytes per parameter, in the budget
    guess = max(8, int(math.sqrt(args.budget_mb * (1 << 20) / 16 / args.layers)))
    rows = []
    for mode in modes:
        found = {}

        def fits(w):
            found[w] = point(mode, w, limit)
            print(f"  {mode} width {w}: {'fits' if found[w] else 'out of memory'}", flush=True)
            return found[w] is not None

        width, seen = largest(fits, guess, args.precision)
        if not width:
            raise MpitrainError(f"bench capacity: {mode} on {args.ranks} ranks does not fit even width 1 in "
                                f"--budget-mb {args.budget_mb:g}")
        row = {**found[width], "width": width, "tries": len(seen), "limit_bytes": limit, "base_bytes": base}
        row["vs_first"] = row["n_params"] / (rows[0]["n_params"] if rows else row["n_params"])
        rows.append(row)
    print(table(rows, COLUMNS))
    return rows
