"""Command line: ``python -m mpitrain [train|federate|prepare|eval|predict|info|bench|plot|export|generate] ...``
(no subcommand = train)."""
import argparse
import json
import sys

from .errors import MpitrainError

COMMANDS = ("train", "federate", "prepare", "eval", "predict", "info", "bench", "plot", "export", "generate",
            "lr-find")


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m mpitrain",
        description="Data-parallel neural-network training over MPI. Launch with e.g. "
                    "`mpirun -n 4 python -m mpitrain`; without a subcommand it trains the default MLP on "
                    "the embedded digits dataset.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    t = sub.add_parser("train", help="synchronous data-parallel training (the default)",
                       description="Train with one Allreduce per step; writes config.toml, metrics.jsonl, "
                                   "summary.json and model.h5 into --out.")
    fe = sub.add_parser("federate", help="federated rounds: rank 0 aggregates, ranks 1… host the clients",
                        description="Federated learning over the partition stored in the data file "
                                    "(prepare --partition; without data.path: the embedded digits, "
                                    "partitioned Dirichlet(0.5) over 16 clients on first use); writes the "
                                    "same run files as train.")
    for p_ in (t, fe):
        p_.add_argument("--config", metavar="FILE", help="TOML file with [data], [model], [train], [fed] sections")
        p_.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=0.1 --set model.hidden=[256,128]")
        p_.add_argument("--out", metavar="DIR", help="run directory (default: runs/<timestamp>)")
        p_.add_argument("--quiet", action="store_true", help="print nothing but errors")
        p_.add_argument("--data", metavar="FILE.h5", help="shorthand for --set data.path=FILE.h5")
        p_.add_argument("--resume", metavar="auto|DIR|PATH",
                        help="continue from a checkpoint: auto = the newest good one of the run in --out (start "
                             "afresh if there is none), DIR = the newest good one of that run folder, or a "
                             "ckpt-*.h5 path; a finished run is left as it is")
        p_.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (its files and checkpoints); without it a folder holding "
                             "a run is refused unless --resume continues it")
        p_.add_argument("--checkpoint-every", metavar="N|Ns",
                        help="checkpoint every N steps (train) or rounds (federate), or every N seconds with "
                             "an s suffix (default: every 300 s and at the end)")
    lf = sub.add_parser("lr-find", help="learning-rate range test: the loss against an exponentially rising lr",
                        description="Smith's range test: from the model's initial parameters, train's step at a "
                                    "learning rate rising from --min-lr to --max-lr over --steps steps, until the "
                                    "loss diverges; prints the curve and the suggested lr (steepest descent).")
    lf.add_argument("--config", metavar="FILE", help="TOML file, as train's")
    lf.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one setting, as train's")
    lf.add_argument("--data", metavar="FILE.h5", help="shorthand for --set data.path=FILE.h5")
    lf.add_argument("--steps", type=int, default=100, help="steps of the test (default 100)")
    lf.add_argument("--min-lr", type=float, default=1e-7, help="the first step's learning rate (default 1e-7)")
    lf.add_argument("--max-lr", type=float, default=10.0, help="the last step's learning rate (default 10)")
    lf.add_argument("--plot", metavar="FILE.png", help="also write the curve as a PNG")
    t.add_argument("--init", metavar="MODEL.h5",
                   help="start from this model's parameters (fine-tuning), shorthand for --set train.init=…; "
                        "--resume, when it finds a checkpoint, wins")
    t.add_argument("--init-skip", metavar="head|NAME[,NAME…]",
                   help="tensors left at their fresh initialisation (head: the last layer, e.g. for another "
                        "number of classes), shorthand for --set train.init_skip=[…]")
    t.add_argument("--device", choices=("cpu", "cuda"),
                   help="kernel backend, shorthand for --set train.device=… (cuda: pip install 'mpitrain[cuda]', "
                        "one GPU per rank)")

    pr = sub.add_parser("prepare", help="write a dataset as HDF5 (train/test split, standardised)",
                        description="Turn a source into the HDF5 layout every rank reads its shard from "
                                    "(docs/data.md). An option that the source or the partition scheme does "
                                    "not read is refused.")
    pr.add_argument("--source", help="digits | diabetes | synthetic | npz:PATH | npz:DIR | npy:DIR | csv:PATH | "
                                     "images:DIR | text:FILE | pydoc (text: a token stream for language models; "
                                     "pydoc: Python's documentation, embedded; diabetes: scikit-learn's, regression; "
                                     "npz/npy with a float y: regression) (may be left out with --partition to "
                                     "re-partition an existing --out)")
    pr.add_argument("--out", required=True, metavar="FILE.h5", help="the file to write (its folder is created)")
    pr.add_argument("--test-fraction", type=float,
                    help="held-out share when the source has no test split (default 0.2, after a seeded shuffle; "
                         "text sources: 0.1, the last tenth of the token stream)")
    pr.add_argument("--validation-fraction", type=float,
                    help="share of the training samples written as val/, which train evaluates on (default 0: "
                         "none; text sources: the slice before the test tail)")
    pr.add_argument("--tokenizer", choices=("chars", "bytes"),
                    help="text sources: chars (default; the vocabulary is the text's distinct characters) or "
                         "bytes (UTF-8 bytes, a fixed vocabulary of 256)")
    pr.add_argument("--seed", type=int, default=0, help="shuffle/split/partition (and synthetic) seed, ≥ 0")
    pr.add_argument("--samples", type=int, help="synthetic: number of samples (default 10000)")
    pr.add_argument("--features", type=int, help="synthetic: number of features (default 64)")
    pr.add_argument("--classes", type=int,
                    help="number of classes (synthetic: default 10; other sources: default the largest "
                         "label + 1, and labels beyond --classes are refused)")
    pr.add_argument("--label-column", help="csv: label column name or index (default: the last column)")
    pr.add_argument("--target", metavar="COL[,COL…]",
                    help="csv: regression on these columns (names or indices; float targets, standardised); the "
                         "other columns are the features")
    pr.add_argument("--layout", choices=("nchw", "nhwc"),
                    help="npz/npy: the samples' channels are first (nchw: stored as given) or last (nhwc: moved "
                         "first); default: a 3-axis sample whose last axis is 1, 3 or 4 is channels last")
    pr.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                    help="images: resize every image to H×W pixels (Pillow's bilinear filter; default: keep "
                         "the size, which must then be the same for all)")
    pr.add_argument("--grayscale", action="store_true",
                    help="images: convert to one grey channel (default: three RGB channels)")
    pr.add_argument("--skip-bad", action="store_true",
                    help="images: skip (and count) unreadable or corrupt files instead of stopping at the first")
    pr.add_argument("--partition", choices=("iid", "dirichlet", "shards", "quantity"),
                    help="also store a federated partition of the training split over --clients clients")
    pr.add_argument("--clients", type=int, help="number of federated clients (default 16)")
    pr.add_argument("--alpha", type=float, help="dirichlet/quantity concentration (default 0.5)")
    pr.add_argument("--shards-per-client", type=int, help="shards: label shards per client (default 2)")
    pr.add_argument("--client-test-fraction", type=float,
                    help="share of each client's samples kept as its local test split (default 0.2)")

    e = sub.add_parser("eval", help="score a saved model on a dataset (distributed)",
                       description="Print the accuracy and mean loss of a saved model on a split of a data "
                                   "file as one JSON line (a classifier's also per class: precision, recall, F1, "
                                   "and the confusion matrix; regression: the mean loss, and the RMSE and R² in "
                                   "the targets' units; docs/configuration.md); each rank scores a part. The "
                                   "file's rows are standardised with the model's training statistics (model.h5), "
                                   "so a file prepared separately scores as the model's own would; its feature "
                                   "shape and classes (or targets) must be the model's (classes by name where both "
                                   "name them).")
    e.add_argument("--model", required=True, metavar="DIR/model.h5", help="the model.h5 of a run")
    e.add_argument("--data", required=True, metavar="FILE.h5", help="a file written by prepare")
    e.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split of --data to score (default: test)")
    e.add_argument("--plot", metavar="FILE.png", help="classifiers: also draw the confusion matrix as a PNG")

    pd = sub.add_parser("predict", help="a saved model's predictions for a file of samples (rank 0)",
                        description="Predict the class (its name where the model has class names; a regression "
                                    "model: its targets) of every sample of --input: an .npz file (array x, raw "
                                    "as given to prepare), a folder of images (or of class folders of images) or "
                                    "a data file written by prepare. Inputs are standardised with the model's "
                                    "statistics. Writes a CSV with --output, else prints a short table.")
    pd.add_argument("--model", required=True, metavar="DIR/model.h5")
    pd.add_argument("--input", required=True, metavar="FILE.npz|DIR|FILE.h5")
    pd.add_argument("--output", metavar="FILE.csv", help="write every prediction here (atomically)")
    pd.add_argument("--top", type=int, default=0, metavar="K",
                    help="also the K most likely classes with their probabilities")
    pd.add_argument("--layout", choices=("nchw", "nhwc"),
                    help="npz input: the samples' channels first (default) or last (nhwc)")
    pd.add_argument("--split", choices=("test", "train", "val"),
                    help="data-file input: the split to predict (default: test)")

    ex = sub.add_parser("export", help="write a saved model as ONNX or as PyTorch-layout weights (npz)",
                        description="Export model.h5 (rank 0 writes, atomically): --format onnx is an ONNX graph "
                                    "x [N, *feature_shape] → logits [N, classes] (a language model: tokens [N, T] → "
                                    "logits [N, T, vocabulary]; pip install 'mpitrain[export]'); --format npz the "
                                    "PyTorch state_dict plus a JSON description of its modules (docs/models.md).")
    ex.add_argument("--model", required=True, metavar="DIR/model.h5")
    ex.add_argument("--format", required=True, choices=("onnx", "npz"))
    ex.add_argument("--out", required=True, metavar="FILE")

    g = sub.add_parser("generate", help="sample text from a trained language model (model.kind = gpt)",
                       description="Continue --prompt with --tokens tokens drawn from the model's next-token "
                                   "distribution (rank 0 samples and prints the prompt and its continuation).")
    g.add_argument("--model", required=True, metavar="DIR/model.h5")
    g.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    g.add_argument("--tokens", type=int, default=200, help="how many tokens to add (default 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits before sampling: < 1 sharper, > 1 flatter, 0 = always the most "
                        "likely (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0 = all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    sub.add_parser("info", help="versions of mpitrain, MPI, mpi4py, numba, h5py; threads per rank")

    b = sub.add_parser("bench", help="benchmarks (print a table, save JSON/CSV into --out)")
    from .bench import add_arguments

    add_arguments(b)

    pl = sub.add_parser("plot", help="PNG of loss and accuracy curves from run directories",
                        description="Plot train/test loss and accuracy against steps (train runs) or rounds "
                                    "(federated runs, plus the worst client's accuracy without fed.erase and ε under DP) from "
                                    "each run's metrics.jsonl, several runs overlaid by folder name; train "
                                    "and federated runs together get separate panels.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", metavar="FILE.png", default="plot.png",
                    help="where to write the PNG (.png is added to a name without a suffix, another "
                         "suffix is refused; the folder is created; default: plot.png in the current folder)")
    pl.add_argument("--log-y", action="store_true", help="the loss panels on a logarithmic axis")
    return p


def _info(comm):
    import h5py
    import mpi4py
    import numba
    import numpy

    from . import __version__
    from .threads import limit, threads_per_rank

    threads = limit(threads_per_rank())
    if comm.rank == 0:
        lib = comm.MPI.Get_library_version().strip().splitlines()[0]
        for name, value in (("mpitrain", __version__), ("python", sys.version.split()[0]),
                            ("MPI library", lib), ("MPI standard", "%d.%d" % comm.MPI.Get_version()),
                            ("mpi4py", mpi4py.__version__), ("numpy", numpy.__version__),
                            ("numba", numba.__version__), ("h5py", h5py.__version__),
                            ("HDF5", h5py.version.hdf5_version), ("world size", comm.size),
                            ("threads per rank", threads)):
            print(f"{name:18} {value}")


def _eval(args, comm):
    from .checkpoint import load_model
    from .classes import for_eval
    from .confusion import check_png, confusion, plot, report
    from .data.shard import DataFile
    from .data.text import read_token_part
    from .evaluate import as_trained, check_compatible, model_targets, read_part, scores
    from .kernels import compiled
    from .model import Model

    spec, params, stats, state = comm.agree(load_model, args.model, standardize=True, state=True)
    data = comm.agree(DataFile, args.data)
    classify = spec.task == "classify"
    if args.plot:
        comm.agree(check_png, args.plot, classify)
    names, labels = (comm.agree(for_eval, args.model, spec, data) if classify and data.task == "classify"
                     else (None, None))
    comm.agree(check_compatible, spec, data, args.model, labels is not None)
    n = getattr(data, f"n_{args.split}")
    if not n:  # the same file on every rank: every rank refuses together
        raise MpitrainError(f"{args.data}: no {args.split} rows to score"
                            + (" (prepare --validation-fraction writes a val/ split)" if args.split == "val" else ""),
                            agreed=True)
    comm.agree(compiled, comm)
    if spec.task == "lm":  # windows of the model's block size
        x, y = read_token_part(comm, data, spec.feature_shape[0], args.split)
    else:
        x, y = read_part(comm, data, args.split)
        x = as_trained(x, data.standardize, stats)  # the model's statistics, not the file's
    if labels is not None:  # the file's classes numbered as the model's
        y = labels[y]
    targets = comm.agree(model_targets, args.model) if spec.task == "regress" else None
    if targets is not None:  # the file's targets as the model's were standardised
        y = as_trained(y, data.targets, targets)
    model = Model(spec)
    if state is not None:  # BatchNorm's running statistics
        model.ctx.state[:] = state
    metrics = {k[len(args.split) + 1:]: v for k, v in scores(comm, model, params, x, y, args.split, targets).items()}
    counts = confusion(comm, model, params, x, y, spec.n_out) if classify else None
    if comm.rank == 0:
        print(json.dumps({"split": args.split, "samples": n, **metrics, **(report(counts, names) if classify else {})}))
    if args.plot:  # rank 0 writes; every rank learns of a failure
        comm.agree(lambda: plot(counts, names, f"{args.data} {args.split}: accuracy {metrics['accuracy']:.4f}",
                                args.plot) if comm.rank == 0 else None)


def _lr_find(args, comm):
    from .config import load
    from .lrfind import lr_find, plot, report

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    cfg = comm.agree(load, args.config, overrides, "train")
    result = lr_find(cfg, comm, args.steps, args.min_lr, args.max_lr)
    if comm.rank == 0:
        print(report(result), flush=True)
    if args.plot:
        path = comm.agree(lambda: plot(result, args.plot) if comm.rank == 0 else None)  # one writer
        if path:
            print(f"{path}: the range test plotted", flush=True)


PARTITION_OPTIONS = {"clients": "--clients", "alpha": "--alpha", "shards_per_client": "--shards-per-client",
                     "test_fraction": "--client-test-fraction"}  # write_partition's keyword → option


def _prepare(args, prepare):
    """The prepare command: the file from --source (with its partition, if asked), or a new partition of
    --out; an option that has no effect there is refused."""
    from .data.partition import write_partition
    from .data.text import is_text_source

    partition = {k: getattr(args, "client_test_fraction" if k == "test_fraction" else k)
                 for k in PARTITION_OPTIONS}
    partition = {k: v for k, v in partition.items() if v is not None}
    if not args.partition and partition:
        raise MpitrainError(f"prepare: {', '.join(PARTITION_OPTIONS[k] for k in partition)}: only with --partition")
    if args.partition:
        partition.update(scheme=args.partition, seed=args.seed)
    if args.partition and args.source and is_text_source(args.source):
        raise MpitrainError(f"--partition: not for a text source ({args.source}); federated partitions hold "
                            "labelled samples")
    if not args.source:
        if not args.partition:
            raise MpitrainError("prepare: --source is required (unless --partition re-partitions --out)")
        given = [o for o, v in (("--test-fraction", args.test_fraction), ("--samples", args.samples),
                                ("--validation-fraction", args.validation_fraction),
                                ("--features", args.features), ("--classes", args.classes),
                                ("--label-column", args.label_column), ("--target", args.target),
                                ("--layout", args.layout),
                                ("--image-size", args.image_size), ("--grayscale", args.grayscale or None),
                                ("--skip-bad", args.skip_bad or None), ("--tokenizer", args.tokenizer))
                 if v is not None]
        if given:
            raise MpitrainError(f"prepare: {', '.join(given)}: only with --source (re-partitioning {args.out} "
                                "keeps its data)")
        return write_partition(args.out, **partition)
    return prepare(args.source, args.out, args.test_fraction, args.seed, args.classes, args.image_size,
                   args.grayscale, args.skip_bad, args.layout, partition or None, samples=args.samples,
                   features=args.features, label_column=args.label_column, tokenizer=args.tokenizer,
                   target=args.target, validation_fraction=args.validation_fraction)


def _federate_default(args, overrides, comm):
    """["data.path=…"] naming federate's own default file when neither --config nor --set/--data gives a
    data.path (train's digits.h5 has no partition); session.ensure_default_data prepares it."""
    from .config import DEFAULT_PARTITION as d, default_federated_data_path, load

    if "data.path" in comm.agree(load, args.config, overrides).given:
        return []
    path = default_federated_data_path()
    if comm.rank == 0 and not args.quiet:
        print(f"federate: no data.path given, using the embedded digits partitioned {d['scheme'].capitalize()}"
              f"({d['alpha']:g}) over {d['clients']} clients: {path}", flush=True)
    return [f"data.path={path}"]


def _dispatch(args, comm):
    if args.command in ("train", "federate"):
        from . import api, preempt

        overrides = list(args.overrides)
        if getattr(args, "data", None):
            overrides.append(f"data.path={args.data}")
        if getattr(args, "device", None):
            overrides.append(f"train.device={args.device}")
        if getattr(args, "init", None):
            overrides.append(f"train.init={args.init}")
        if getattr(args, "init_skip", None):
            overrides.append(f"train.init_skip={json.dumps(args.init_skip.split(','))}")
        n = args.checkpoint_every
        if n:  # one cadence replaces the other
            overrides += ([f"checkpoint.every_seconds={n[:-1]}", "checkpoint.every=0"] if n.endswith("s")
                          else [f"checkpoint.every={n}", "checkpoint.every_seconds=0"])
        if args.command == "federate":
            overrides += _federate_default(args, overrides, comm)
        preempt.install()
        run = api.train if args.command == "train" else api.federate
        try:
            run(args.config, overrides, args.out, comm, args.resume, args.quiet, args.overwrite)
        except preempt.Preempted:
            return preempt.EXIT_PREEMPTED
    elif args.command == "prepare":
        from .data.prepare import prepare

        def prepare_on_root():  # one writer, however the command was launched
            return _prepare(args, prepare) if comm.rank == 0 else None

        text = comm.agree(prepare_on_root)
        if text:
            print(text)
    elif args.command == "eval":
        _eval(args, comm)
    elif args.command == "export":
        from .export import export

        def export_on_root():  # one writer, however the command was launched
            return export(args.model, args.format, args.out) if comm.rank == 0 else None

        text = comm.agree(export_on_root)
        if text:
            print(text)
    elif args.command == "predict":
        from .predict import predict

        text = comm.agree(lambda: predict(args.model, args.input, args.output, args.top, args.layout, args.split)
                          if comm.rank == 0 else None)  # one process predicts, however it was launched
        if text:
            print(text)
    elif args.command == "generate":
        from .api import load_model

        text = comm.agree(lambda: load_model(args.model).generate(args.prompt, args.tokens, args.temperature,
                                                                  args.top_k, args.seed) if comm.rank == 0 else None)
        if text is not None:
            print(args.prompt + text)
    elif args.command == "lr-find":
        _lr_find(args, comm)
    elif args.command == "info":
        _info(comm)
    elif args.command == "plot":
        from .plot import main as plot

        comm.agree(lambda: plot(args.runs, args.out, args.log_y) if comm.rank == 0 else None)  # one writer
    else:
        from .bench import run

        run(args, comm)


def unknown_command(word):
    """The one line for a first argument that is neither a command nor an option (a misspelt command:
    without this, it became train's "unrecognized arguments")."""
    import difflib

    close = difflib.get_close_matches(word, COMMANDS, 1)
    return MpitrainError(f"unknown command {word!r}" + (f" (did you mean {close[0]}?)" if close else "")
                         + f": expected one of {', '.join(COMMANDS)}, or options alone (which train)", agreed=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    comm = None
    try:
        from .comm import Comm, install_abort_hook

        comm = Comm()
        install_abort_hook(comm)
        if argv[0] not in (*COMMANDS, "-h", "--help"):
            raise unknown_command(argv[0])
        args = _parser().parse_args(argv)
        return _dispatch(args, comm) or 0
    except MpitrainError as exc:
        from .comm import report_error

        return report_error(comm, exc)
    except MemoryError as exc:  # one line, and the whole job ends (the other ranks may be in a collective)
        from .comm import report_error

        return report_error(comm, MpitrainError(
            f"out of memory ({exc}): the model with its gradient and optimizer state, or a batch, does not fit "
            "in this rank's memory; comm.mode = fsdp keeps 1/p of the model on each rank"))
