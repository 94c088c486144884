"""OSU-style allreduce benchmark: raw mpi4py ``Allreduce(IN_PLACE)`` and mpitrain's gradient path
(Comm.allreduce_sum) on the same float32 buffers, measured alternately in one run."""
import time

import numpy as np

from . import table


def _latency(op, buf, iters, warmup, comm):
    """Average seconds per call on this rank; a barrier precedes every call, outside the timed region."""
    for _ in range(warmup):
        op(buf)
    total = 0.0
    for _ in range(iters):
        comm.barrier()
        t = time.perf_counter()
        op(buf)
        total += time.perf_counter() - t
    return total / iters


def bench_allreduce(args, comm):
    MPI = comm.MPI
    raw = comm.raw

    def raw_allreduce(buf):
        raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    p = comm.size
    rows = []
    size = max(4, args.min_bytes)
    while size <= args.max_bytes:
        buf = np.ones(size // 4, np.float32)
        iters = max(5, min(args.iters, int(args.iters * (1 << 16) / size)))
        paths = (("mpi4py", raw_allreduce), ("mpitrain", comm.allreduce_sum))
        best = {name: float("inf") for name, _ in paths}
        for _ in range(3):  # alternate the paths and keep each one's best round: drift hits both alike
            for name, op in paths:
                best[name] = min(best[name], _latency(op, buf, iters, args.warmup, comm))
        for name, t in best.items():
            avg = comm.allreduce([t], "sum")[0] / p
            tmin, tmax = comm.allreduce([t], "min")[0], comm.allreduce([t], "max")[0]
            algbw = size / avg / 1e9
            rows.append({"bytes": size, "path": name, "ranks": p, "iters": iters, "avg_us": avg * 1e6,
                         "min_us": tmin * 1e6, "max_us": tmax * 1e6, "algbw_GBps": algbw,
                         "busbw_GBps": algbw * 2 * (p - 1) / p})
        rows[-1]["vs_raw"] = rows[-1]["avg_us"] / rows[-2]["avg_us"]
        size *= 4
    if comm.rank == 0:
        print(f"Allreduce(IN_PLACE, SUM) float32, {p} ranks, {MPI.Get_library_version().splitlines()[0].strip()}")
        print(table(rows, ["bytes", "path", "avg_us", "min_us", "max_us", "algbw_GBps", "busbw_GBps", "vs_raw"]))
    return rows
