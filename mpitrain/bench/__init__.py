"""``python -m mpitrain bench {step,allreduce,federated,checkpoint,scaling,model,peers}``: print a table, save JSON and
CSV into --out."""
import csv
import json
import os
import time


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", required=True,
                                metavar="{step,allreduce,federated,checkpoint,scaling,model,peers}")
    s = sub.add_parser("step", help="training-step throughput per rank vs NumPy and PyTorch",
                       description="Samples/s of one training step (forward, backward, optimizer update) "
                                   "per rank, for mpitrain's kernels, a plain NumPy step and PyTorch CPU "
                                   "(when installed), measured side by side; on the CPU also the floor: "
                                   "the step's GEMMs and update alone, with weight rows as stored and "
                                   "padded by 16 floats.")
    s.add_argument("--batches", default="32,128", help="per-rank batch sizes (default 32,128)")
    mlp_arguments(s)
    s.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where mpitrain and PyTorch compute (default cpu; NumPy always on the CPU)")
    s.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    s.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported")
    s.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")
    a = sub.add_parser("allreduce", help="OSU-style allreduce latency/bandwidth: raw mpi4py vs mpitrain",
                       description="Per message size: warm-up, then timed Allreduce calls with a barrier "
                                   "outside the timed region; latency avg/min/max over ranks; algorithm "
                                   "and bus bandwidth (bus = alg × 2(p−1)/p).")
    a.add_argument("--min-bytes", type=int, default=4)
    a.add_argument("--max-bytes", type=int, default=64 << 20)
    a.add_argument("--iters", type=int, default=200, help="timed iterations at small sizes (fewer when large)")
    a.add_argument("--warmup", type=int, default=20)
    a.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")
    f = sub.add_parser("federated", help="seconds and bytes per federated round vs number of clients",
                       description="Runs the federate loop on synthetic data partitioned IID over each "
                                   "client count; launch with ≥ 2 ranks (rank 0 aggregates).")
    from .federated import add_arguments as federated_arguments

    federated_arguments(f)
    c = sub.add_parser("checkpoint", help="seconds per checkpoint write/load vs model size",
                       description="Writes and reads back checkpoints (params + two optimizer vectors) of "
                                   "several sizes in a temporary folder under --dir.")
    c.add_argument("--sizes", default="10000,100000,1000000,10000000", help="parameter counts")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--dir", help="file system to measure (default: the system temp folder)")
    c.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")
    from . import model, peers, scaling

    scaling.add_parser(sub)
    model.add_parser(sub)
    peers.add_parser(sub)


def mlp_arguments(p, features=784, hidden="1024,1024", classes=10):
    """--features, --hidden and (unless classes is None) --classes: the MLP a benchmark trains."""
    p.add_argument("--features", type=int, default=features, help=f"input features (default {features})")
    p.add_argument("--hidden", default=hidden, help=f"hidden layer sizes, comma-separated (default {hidden})")
    if classes is not None:
        p.add_argument("--classes", type=int, default=classes, help=f"classes (default {classes})")


def comm_modes(text):
    """The comm.mode values of a --comm list, or one clear error naming the unknown ones."""
    from ..config import MODES
    from ..errors import MpitrainError

    modes = text.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MpitrainError(f"--comm {text}: unknown mode(s) {', '.join(bad)}; expected {', '.join(MODES)}")
    return modes


def loop_arguments(p):
    """--steps, --warmup, --threads of a benchmark that times training steps."""
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")


def run(args, comm):
    from .allreduce import bench_allreduce
    from .checkpoint import bench_checkpoint
    from .federated import bench_federated
    from .model import bench_model
    from .peers import bench_peers
    from .scaling import bench_scaling
    from .step import bench_step

    benches = {"step": bench_step, "allreduce": bench_allreduce, "federated": bench_federated,
               "checkpoint": bench_checkpoint, "scaling": bench_scaling, "model": bench_model,
               "peers": bench_peers}
    rows = benches[args.bench](args, comm)
    if comm.rank == 0:
        save(args.out or "bench-results", args.bench, rows, vars(args))


def save(out, name, rows, params):
    """rows (list of dicts) → out/NAME-<time>.json (with parameters) and .csv; returns the JSON path."""
    os.makedirs(out, exist_ok=True)
    from ..report import first_free  # a second run in the same second gets its own files

    base, f = first_free(os.path.join(out, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"),
                         lambda b: open(b + ".json", "x", encoding="utf-8"))
    with f:
        json.dump({"bench": name, "params": params, "results": rows}, f, indent=2, default=str)
    with open(base + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    print(f"saved {base}.json and .csv")
    return base + ".json"


def table(rows, columns):
    """A plain text table of the given columns."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
