"""``python -m mpitrain bench {step,allreduce,federated,checkpoint,scaling,capacity,model,peers,leakage,stream}``:
print a table, save JSON and CSV into --out."""
import csv
import json
import os
import time


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", required=True,
                                metavar="{step,allreduce,federated,checkpoint,scaling,capacity,model,peers,"
                                        "leakage,stream}")
    s = sub.add_parser("step", help="training-step throughput per rank vs NumPy and PyTorch",
                       description="Samples/s of one training step (forward, backward, optimizer update) "
                                   "per rank, for mpitrain's kernels, a plain NumPy step (MLP only) and "
                                   "PyTorch CPU (when installed) on the same model with the same initial "
                                   "parameters, measured side by side; on the CPU also the floor: the GEMMs "
                                   "of mpitrain's step replayed on NumPy's BLAS, plus the update (MLP: also "
                                   "with weight rows padded by 16 floats), and the per-rank memory of a step.")
    s.add_argument("--batches", help="per-rank batch sizes (default 32,128; gpt 12; resnet8/resnet20 128)")
    mlp_arguments(s)
    model_arguments(s)
    family_arguments(s)
    s.add_argument("--optimizer", choices=("momentum", "adamw"),
                   help="SGD with momentum 0.9 (default) or AdamW (the default for gpt: nanoGPT's settings)")
    s.add_argument("--breakdown", action="store_true",
                   help="also time mpitrain's step per layer kind, forward and backward (with the GEMMs in "
                        "each), loss and update, and PyTorch's operators (torch.profiler) at every batch size: "
                        "where the step's time goes")
    s.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where mpitrain and PyTorch compute (default cpu; NumPy always on the CPU)")
    s.add_argument("--seconds", type=float, default=2.0,
                   help="seconds per timed block of the slowest implementation (default 2)")
    s.add_argument("--repeats", type=int, default=5,
                   help="timed blocks per implementation, round-robin; the median and the best are reported")
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
    from . import capacity, leakage, model, peers, scaling, stream

    scaling.add_parser(sub)
    capacity.add_parser(sub)
    model.add_parser(sub)
    peers.add_parser(sub)
    leakage.add_parser(sub)
    stream.add_parser(sub)


def mlp_arguments(p, features=784, hidden="1024,1024", classes=10):
    """--features, --hidden and (unless classes is None) --classes: the MLP a benchmark trains."""
    p.add_argument("--features", type=int, default=features, help=f"input features (default {features})")
    p.add_argument("--hidden", default=hidden, help=f"hidden layer sizes, comma-separated (default {hidden})")
    if classes is not None:
        p.add_argument("--classes", type=int, default=classes, help=f"classes (default {classes})")


def model_arguments(p):
    """--model and --input-shape: the network a benchmark trains (mlp: the --features/--hidden/--classes MLP)."""
    p.add_argument("--model", default="mlp", metavar="{mlp,lenet5,fedavg_cnn,JSON}",
                   help="mlp (default: --features, --hidden, --classes), a preset CNN (lenet5, fedavg_cnn: "
                        "--classes outputs; bench step also resnet8, resnet20 and gpt), or a stack as a JSON list "
                        "of layer strings, as model.layers, e.g. "
                        "'[\"conv2d 16 3 same\", \"relu\", \"maxpool2d 2\", \"flatten\", \"dense 10\"]'")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="feature shape of a CNN's samples, channels first: C,H,W for 2-d layers, C,L for 1-d "
                        "ones (default 1,28,28 for 2-d stacks, 3,32,32 for resnet8/20; a 1-d stack needs it)")


def family_arguments(p):
    """The settings of the gpt and resnet presets (model.n_layer, …): a benchmark offering them takes
    --model gpt, resnet8 and resnet20.  The gpt defaults are the issue's small config on Shakespeare's
    characters; nanoGPT's Shakespeare config is --n-layer 6 --n-head 6 --n-embd 384 --block-size 256."""
    g = p.add_argument_group("gpt and resnet presets")
    g.add_argument("--n-layer", type=int, default=4, help="gpt: blocks (default 4)")
    g.add_argument("--n-head", type=int, default=4, help="gpt: attention heads (default 4)")
    g.add_argument("--n-embd", type=int, default=128, help="gpt: width (default 128)")
    g.add_argument("--block-size", type=int, default=64, help="gpt: tokens per sample (default 64)")
    g.add_argument("--vocab", type=int, default=65, help="gpt: vocabulary (default 65, Shakespeare's characters)")
    g.add_argument("--dropout", type=float, default=0.0, help="gpt: dropout rate (default 0)")
    g.add_argument("--norm", choices=("batch", "group"), default="batch", help="resnet8/20: the norm (default batch)")


def model_spec(args):
    """The ModelSpec of --model/--input-shape (mlp: --features, --hidden, --classes), or one MpitrainError."""
    import json
    import math

    from ..errors import MpitrainError
    from ..model import FAMILIES, PRESETS, ModelSpec

    name = getattr(args, "model", "mlp") or "mlp"
    classes = getattr(args, "classes", 10)
    families = FAMILIES if hasattr(args, "n_layer") else ()  # offered where family_arguments are
    if name == "mlp":
        hidden = tuple(int(h) for h in str(args.hidden).split(",") if h)
        return ModelSpec("mlp", args.features, classes, hidden)
    if name == "gpt" and families:
        T = args.block_size
        return ModelSpec("gpt", T, args.vocab, feature_shape=(T,), task="lm", n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    if name in PRESETS or name in families:
        stack = PRESETS.get(name, ("conv2d",))  # a resnet starts with a conv2d
    else:
        try:
            stack = json.loads(name)
        except ValueError:
            stack = None
        if not isinstance(stack, list) or not stack or not all(isinstance(t, str) for t in stack):
            raise MpitrainError(f"--model {name}: expected mlp, {', '.join((*PRESETS, *families))} or a JSON list "
                                "of layer strings ending in 'dense <classes>'")
    first = stack[0].split()[0] if stack[0].split() else ""
    if args.input_shape:
        try:
            shape = tuple(int(d) for d in str(args.input_shape).split(","))
        except ValueError:
            shape = ()
        if not 1 <= len(shape) <= 3 or min(shape) < 1:
            raise MpitrainError(f"--input-shape {args.input_shape}: expected positive C,H,W (2-d) or C,L (1-d)")
    elif first.endswith("2d"):
        shape = (3, 32, 32) if name in families else (1, 28, 28)
    elif first.endswith("1d"):
        raise MpitrainError(f"--model {name}: a 1-d stack needs --input-shape C,L")
    else:
        shape = (args.features,)
    if name in families:
        return ModelSpec(name, math.prod(shape), classes, feature_shape=shape, norm=args.norm)
    if name in PRESETS:
        return ModelSpec(name, math.prod(shape), classes, feature_shape=shape)
    last = stack[-1].split()
    n_out = int(last[1]) if len(last) == 2 and last[0] == "dense" and last[1].isdigit() else classes
    return ModelSpec("layers", math.prod(shape), n_out, layers=tuple(stack), feature_shape=shape)


def comm_modes(text):
    """The comm.mode values of a --comm list, or one clear error naming the unknown ones."""
    from ..config import MODES
    from ..errors import MpitrainError

    modes = text.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MpitrainError(f"--comm {text}: unknown mode(s) {', '.join(bad)}; expected {', '.join(MODES)}")
    return modes


def loop_arguments(p, steps=30, warmup=5):
    """--steps, --warmup, --threads of a benchmark that times training steps."""
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")


def run(args, comm):
    from .allreduce import bench_allreduce
    from .capacity import bench_capacity
    from .checkpoint import bench_checkpoint
    from .federated import bench_federated
    from .leakage import bench_leakage
    from .model import bench_model
    from .peers import bench_peers
    from .scaling import bench_scaling
    from .step import bench_step
    from .stream import bench_stream

    benches = {"step": bench_step, "allreduce": bench_allreduce, "federated": bench_federated,
               "checkpoint": bench_checkpoint, "scaling": bench_scaling, "capacity": bench_capacity,
               "model": bench_model, "peers": bench_peers, "leakage": bench_leakage, "stream": bench_stream}
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
