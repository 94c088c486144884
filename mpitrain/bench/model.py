"""A cost MODEL, not a measurement: fit the ring allreduce model to `bench allreduce` timings, then
predict the allreduce and step time of weak scaling to many ranks on a chosen network.

Ring allreduce of n bytes on p ranks: T = 2(p−1)α + 2(p−1)/p·n·β + (p−1)/p·n·γ.  The γ term (reduction
arithmetic) has the same shape in n and p as the β term, (p−1)/p·n·(2β + γ), so no timing separates them:
the fit reports β + γ/2 as β, and the network prediction takes γ = 0 (arithmetic not counted).
Step time = per-rank work (compute + data, measured) + T, since the gradient allreduce is blocking and
starts after the whole backward pass; weak-scaling efficiency = work / step time (one rank: T = 0).

--comm adds the other comm.mode values of sync.py, each with its own T: fp16/bf16 a ring allreduce of half
the bytes; topk an allgather of p·8k bytes, (p−1)α + (p−1)·8k·β; sharded a reduce-scatter + allgather,
which is the ring allreduce; local_sgd the ring allreduce every H steps, T/H; hierarchical a reduce and
a broadcast inside nodes of --ranks-per-node ranks (fitted α, β: shared memory) around a ring allreduce
of the p/g leaders; overlap the best case, step = max(work, T) (backward hides the whole allreduce).

Model distribution.  A ring allgather or reduce-scatter of n bytes costs (p−1)α + (p−1)/p·n·β.  fsdp
(ZeRO-3) Allgathers each of the K layers with parameters before its forward and before its backward and
Reduce_scatters its gradient: 3K collectives moving 3(p−1)/p·Ψ per rank (Ψ = 4·params bytes: the ZeRO
paper's 3Ψ, against 2Ψ for data parallel), T = 3K(p−1)α + 3(p−1)/p·Ψ·β, plus the scalars' own allreduce;
no overlap is counted (sync.FSDP prefetches the next unit's gather, which can hide at most the gathers),
nor sync.FSDP's units (layers smaller than comm.bucket_mb gathered together: fewer α terms).
--tensor T: Megatron-style tensor parallelism on a (p/T data × T tensor) grid; the dense layers in pairs,
column-parallel then row-parallel, an odd last layer replicated.  Each pair allreduces its output (forward)
and its input's gradient (backward) over the T ranks of its tensor group: 2 ring allreduces per pair of
T·b × width floats (the group shares one data replica's batch, T·b samples for b per rank, so the global
batch and each rank's FLOPs are those of data parallel), then the gradient of this rank's parameters (each
pair's weights and first bias over T, the rest whole) is allreduced over the p/T ranks of its data group.
"""
import json

import numpy as np

from ..config import CommConfig
from ..errors import MpitrainError
from . import comm_modes, mlp_arguments, table

PREDICTION = ["model", "comm", "tensor", "ranks", "alpha_us", "beta_ns_per_byte", "allreduce_ms", "work_ms", "step_ms",
              "samples_per_s", "efficiency"]


def add_parser(sub):
    m = sub.add_parser(
        "model", help="MODEL (not measured): fit α, β to bench allreduce, predict weak scaling to many ranks",
        description="Fits α and β of the ring allreduce model T = 2(p−1)α + 2(p−1)/p·n·β by least squares "
                    "(relative error) to saved `bench allreduce` rows (γ cannot be separated from β: the fit "
                    "gives β + γ/2), then predicts allreduce time, step time, samples/s and weak-scaling "
                    "efficiency for the MLP's gradient on --ranks, both with the fitted α, β and with "
                    "α = --latency-us, β = 1/--network-gbps.  Per-rank work per step comes from --scaling or "
                    "--compute-ms.")
    m.add_argument("--from", dest="allreduce_json", nargs="+", required=True, metavar="FILE.json",
                   help="one or more saved `bench allreduce` results (several rank counts may be combined)")
    m.add_argument("--path", choices=("mpitrain", "mpi4py"), default="mpitrain",
                   help="which measured path to fit (default mpitrain, the one training uses)")
    m.add_argument("--network-gbps", type=float, default=100.0, help="link bandwidth in Gbit/s (default 100)")
    m.add_argument("--latency-us", type=float, default=1.0, help="per-message latency α in µs (default 1)")
    m.add_argument("--ranks", default="64,128,256,512,1024", help="rank counts to predict (default 64,…,1024)")
    m.add_argument("--comm", default="plain", help="comm.mode values to predict, comma-separated (default plain)")
    m.add_argument("--tensor", default="", metavar="T[,T...]",
                   help="also predict tensor parallelism with T ranks per tensor group (Megatron, plain data "
                        "parallel over the p/T groups), e.g. 2,4")
    m.add_argument("--ranks-per-node", type=int, default=8, help="hierarchical: ranks per node (default 8)")
    c = CommConfig()
    m.add_argument("--topk-ratio", type=float, default=c.topk_ratio,
                   help=f"topk: share of entries sent (default {c.topk_ratio:g})")
    m.add_argument("--local-steps", type=int, default=c.local_steps,
                   help=f"local_sgd: steps between averages (default {c.local_steps})")
    m.add_argument("--scaling", metavar="FILE.json",
                   help="a saved `bench scaling` result: the MLP and per-rank compute + data time of its "
                        "smallest rank count")
    m.add_argument("--compute-ms", type=float, help="per-rank compute + data ms per step (without --scaling)")
    m.add_argument("--batch-per-rank", type=int, default=64, help="samples per rank per step with --compute-ms")
    mlp_arguments(m)  # without --scaling
    m.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")


def ring_time(n, p, alpha, beta):
    """Seconds for a ring allreduce of n bytes over p ranks (γ folded into β)."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def comm_time(mode, n, p, net, fitted, args, sizes):
    """Seconds of one step's communication in comm.mode `mode` for an n-byte step buffer (gradient + 4
    float32 scalars) of the MLP `sizes` on p ranks, with (α, β) = net between nodes and `fitted` inside a
    node (hierarchical only)."""
    a, b = net
    if mode == "fsdp":
        k = len(sizes) - 1  # 2 Allgathers + 1 Reduce_scatter per layer; the scalars in an allreduce of their own
        return 3 * k * (p - 1) * a + 3 * (p - 1) / p * (n - 16) * b + ring_time(16, p, a, b)
    if mode in ("fp16", "bf16"):
        return ring_time(n / 2, p, a, b)
    if mode == "topk":
        k = max(1, round(args.topk_ratio * n / 4))
        return (p - 1) * a + (p - 1) * 8 * k * b
    if mode == "local_sgd":
        return ring_time(n, p, a, b) / args.local_steps
    if mode == "hierarchical":
        g = min(args.ranks_per_node, p)
        fa, fb = fitted
        inside = 2 * ((g - 1) * fa + (g - 1) / g * n * fb)  # reduce to the leader, broadcast back
        return inside + ring_time(n, -(-p // g), a, b)
    return ring_time(n, p, a, b)  # plain, overlap, sharded


def tensor_time(sizes, batch, t, p, net):
    """Seconds of one step's communication under tensor parallelism (module doc) for the MLP `sizes` with
    `batch` samples per rank, T = t ranks per tensor group, on p ranks."""
    a, b = net
    pairs = (len(sizes) - 1) // 2
    acts = sum(ring_time(4 * t * batch * sizes[2 * i + 2], t, a, b) + ring_time(4 * t * batch * sizes[2 * i], t, a, b)
               for i in range(pairs))
    mine = sum(((sizes[2 * i] + 1) * sizes[2 * i + 1] + sizes[2 * i + 1] * sizes[2 * i + 2]) / t + sizes[2 * i + 2]
               for i in range(pairs))
    if (len(sizes) - 1) % 2:
        mine += (sizes[-2] + 1) * sizes[-1]  # the odd last layer, whole on every rank of the group
    return acts + ring_time(4 * (mine + 4), p // t, a, b)


def fit_ring(rows):
    """(α, β) in seconds and seconds per byte from rows with bytes, ranks (≥ 2), avg_us, by least squares
    on the relative error so that small messages (α) count as much as large ones (β)."""
    pts = [(r["bytes"], r["ranks"], r["avg_us"] * 1e-6) for r in rows]
    if len({n / p for n, p, _ in pts}) < 2:  # else the α and β columns are proportional
        raise MpitrainError("bench model: the fit needs timings of at least two message sizes on ≥ 2 ranks")
    a = np.array([[2 * (p - 1), 2 * (p - 1) / p * n] for n, p, _ in pts]) / np.array([[t] for *_, t in pts])
    norms = np.linalg.norm(a, axis=0)  # columns scaled to unit norm: n spans 4 B … 64 MiB
    alpha, beta = np.linalg.lstsq(a / norms, np.ones(len(pts)), rcond=None)[0] / norms
    if beta <= 0:
        raise MpitrainError(f"bench model: the fitted β is {beta:.3g} s/byte: these timings do not grow with "
                            "message size, so the ring model does not describe them")
    return float(alpha), float(beta)


def _load(path, bench):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: cannot read a saved bench result ({exc})") from None
    if doc.get("bench") != bench:
        raise MpitrainError(f"{path}: a `bench {doc.get('bench')}` result; expected `bench {bench}`")
    return doc


def bench_model(args, comm):
    from ..model import ModelSpec
    from .scaling import mlp_sizes

    modes = comm_modes(args.comm)
    if not args.scaling and args.compute_ms is None:
        raise MpitrainError("bench model: give --scaling FILE.json or --compute-ms MS (per-rank work per step)")
    rows = [r for path in args.allreduce_json for r in _load(path, "allreduce")["results"]
            if r["path"] == args.path and r["ranks"] >= 2]  # one rank moves no data: T = 0 whatever α, β
    alpha, beta = fit_ring(rows)
    fit_rows = [{"bytes": r["bytes"], "ranks": r["ranks"], "measured_us": r["avg_us"],
                 "model_us": ring_time(r["bytes"], r["ranks"], alpha, beta) * 1e6} for r in rows]
    for r in fit_rows:
        r["error_pct"] = 100 * (r["model_us"] - r["measured_us"]) / r["measured_us"]

    if args.scaling:
        doc = _load(args.scaling, "scaling")
        plain = [r for r in doc["results"] if r.get("comm", "plain") == "plain"] or doc["results"]
        base = min(plain, key=lambda r: r["ranks"])
        sizes = mlp_sizes(doc["params"]["features"], doc["params"]["hidden"], doc["params"]["classes"])
        work_ms, batch, n = base["compute_ms"] + base["data_ms"], base["local_batch"], base["allreduce_bytes"]
        work_from = f"{args.scaling}, {base['ranks']} rank(s)"
    else:
        sizes = mlp_sizes(args.features, args.hidden, args.classes)
        n_params = ModelSpec("mlp", sizes[0], sizes[-1], tuple(sizes[1:-1])).n_params
        # train() reduces the gradient plus four float32 slots (loss, hit count, two flags) in one buffer
        work_ms, batch, n, work_from = args.compute_ms, args.batch_per_rank, 4 * (n_params + 4), "--compute-ms"

    network = (args.latency_us * 1e-6, 8 / (args.network_gbps * 1e9))
    counts = [int(r) for r in args.ranks.split(",")]
    tensors = [int(t) for t in args.tensor.split(",") if t]
    bad = [(p, t) for t in tensors for p in counts if t < 1 or p % t]
    if bad:
        raise MpitrainError(f"--tensor {args.tensor} --ranks {args.ranks}: the tensor group size must divide "
                            f"every rank count ({bad[0][1]} does not divide {bad[0][0]})")
    cases = [(mode, 1) for mode in modes] + [("tensor", t) for t in tensors]
    out = []
    for name, (a, b) in (("network", network), ("fitted", (alpha, beta))):
        for mode, t in cases:
            for p in counts:
                if mode == "tensor":
                    t_ms = tensor_time(sizes, batch, t, p, (a, b)) * 1e3
                else:
                    t_ms = comm_time(mode, n, p, (a, b), (alpha, beta), args, sizes) * 1e3
                step_ms = max(work_ms, t_ms) if mode == "overlap" else work_ms + t_ms
                out.append({"model": name, "comm": mode, "tensor": t, "ranks": p, "alpha_us": a * 1e6,
                            "beta_ns_per_byte": b * 1e9, "allreduce_bytes": n, "allreduce_ms": t_ms,
                            "work_ms": work_ms, "batch_per_rank": batch, "step_ms": step_ms,
                            "samples_per_s": p * batch / step_ms * 1e3, "efficiency": work_ms / step_ms})
    if comm.rank == 0:
        ranks = sorted({r["ranks"] for r in rows})
        print("MODEL (not measured): ring allreduce T(n, p) = 2(p−1)α + 2(p−1)/p·n·β, with γ folded into β "
              "(β here is β + γ/2: timings cannot separate them; the network rows take γ = 0)")
        print(f"fit to {len(fit_rows)} `{args.path}` timings on {ranks} ranks, least squares on relative error: "
              f"α = {alpha * 1e6:.4g} µs, β = {beta * 1e9:.4g} ns/byte (1/β = {1e-9 / beta:.4g} GB/s)")
        print(table(fit_rows, ["bytes", "ranks", "measured_us", "model_us", "error_pct"]))
        print(f"MODEL (not measured): weak scaling of MLP {'-'.join(map(str, sizes))}, {n} bytes allreduced per "
              f"step, per-rank work {work_ms:.4g} ms at {batch} samples per rank (from {work_from}); network "
              f"{args.network_gbps:g} Gbit/s, {args.latency_us:g} µs latency")
        if "fsdp" in modes:
            psi = n - 16
            print(f"fsdp (ZeRO-3) sends 3(p−1)/p·Ψ per rank per step, data parallel 2(p−1)/p·Ψ (Ψ = {psi} bytes "
                  f"of parameters, {len(sizes) - 1} layers: {3 * (len(sizes) - 1)} collectives per step)")
        if tensors:
            print(f"tensor parallelism: 2 allreduces of T·{batch} samples' activations per dense layer pair over "
                  "the tensor group, then the gradient of each rank's parameters over its data group (p/T ranks)")
        print(table(out, PREDICTION))
    return out
