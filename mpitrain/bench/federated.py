"""Federated round cost vs number of clients: seconds and bytes per round of the real `federate` loop on
a synthetic dataset partitioned IID over each client count (written by rank 0 into a temporary folder).
The aggregation is one Reduce of the model per client rank whatever the number of clients it hosts.

With --secure-aggregation every client count runs twice, plain and with secure aggregation (pairwise
masks over a sparse neighbour graph, Shamir-shared secrets, uint32 fixed point), and the table compares
seconds and bytes per round.  With --encryption ckks every client count runs plain, with secure aggregation
and with CKKS homomorphic encryption of the aggregate (TenSEAL, [fed.he] defaults), and the table compares
the encrypted round with both.  Also runnable on its own: ``mpiexec -n 3 python -m mpitrain.bench.federated
--secure-aggregation`` (or ``--encryption ckks``)."""
import os
import tempfile

from . import table


def add_arguments(f):
    """The options of `bench federated` (also the standalone `python -m mpitrain.bench.federated`)."""
    from . import mlp_arguments

    f.add_argument("--clients", default="16,64,256", help="client counts (default 16,64,256)")
    f.add_argument("--rounds", type=int, default=5)
    f.add_argument("--fraction", type=float, default=0.25, help="clients sampled per round")
    f.add_argument("--samples", type=int, default=20000)
    mlp_arguments(f, features=64, hidden="128", classes=None)
    f.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")
    f.add_argument("--secure-aggregation", action="store_true",
                   help="also run every client count with fed.secure_aggregation = true and compare")
    f.add_argument("--encryption", choices=("none", "ckks"), default="none",
                   help="ckks: also run every client count with fed.encryption = ckks (and secure aggregation) "
                        "and compare")
    f.add_argument("--dropout-rate", type=float, default=0.0, help="simulated dropout share (all runs)")
    f.add_argument("--neighbors", type=int, default=0, help="secure runs: mask-graph degree (0 = automatic)")
    f.add_argument("--repeats", type=int, default=1, help="runs per setting, alternating plain, secure (and ckks); "
                                                          "the fastest median round is reported")


def _run(args, comm, path, clients, mode, out):
    """One federate run: mode plain, secure (secure aggregation) or ckks (homomorphic encryption)."""
    from ..config import Config
    from ..federated.run import federate

    cfg = Config()
    cfg.data.path, cfg.model.hidden = path, [int(h) for h in args.hidden.split(",")]
    cfg.fed.rounds, cfg.fed.fraction, cfg.fed.local_epochs = args.rounds, args.fraction, 1
    cfg.checkpoint.every_seconds = 0
    cfg.fed.dropout_rate = args.dropout_rate  # both runs: the same clients train
    if mode == "secure":
        cfg.fed.secure_aggregation = True
        cfg.fed.secagg.neighbors = args.neighbors
    elif mode == "ckks":
        cfg.fed.encryption = "ckks"
    return federate(cfg.validate(), comm, out, quiet=True)


def bench_federated(args, comm):
    from ..data.partition import write_partition
    from ..data.prepare import prepare
    from ..federated.run import cohort_size

    he = getattr(args, "encryption", "none") == "ckks"
    secure = args.secure_aggregation or he
    modes = ("plain",) + ("secure",) * secure + ("ckks",) * he
    repeats = max(1, args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(comm.bcast_bytes(tmp.encode()).decode(), "fed.h5")
        for clients in (int(c) for c in args.clients.split(",")):
            if comm.rank == 0:
                prepare("synthetic", path, samples=max(args.samples, 4 * clients), features=args.features, classes=10)
                write_partition(path, "iid", clients)
            comm.barrier()
            runs = {m: [] for m in modes}
            for rep in range(repeats):
                for mode in modes:
                    out = os.path.join(os.path.dirname(path), f"run{clients}-{mode}-{rep}")
                    runs[mode].append(_run(args, comm, path, clients, mode, out))
                    comm.barrier()
            plain = min(runs["plain"], key=lambda s: s["seconds_per_round"])
            row = {"clients": clients, "client_ranks": comm.size - 1,
                   "per_round": cohort_size(clients, args.fraction, 2), "n_params": plain["n_params"],
                   "seconds_per_round": plain["seconds_per_round"], "bytes_per_round": plain["bytes_per_round"]}
            if secure:
                sec = min(runs["secure"], key=lambda s: s["seconds_per_round"])
                row.update(secure_seconds_per_round=sec["seconds_per_round"],
                           secure_bytes_per_round=sec["bytes_per_round"],
                           time_ratio=sec["seconds_per_round"] / plain["seconds_per_round"],
                           bytes_ratio=sec["bytes_per_round"] / plain["bytes_per_round"],
                           secure_test_accuracy=sec["test_accuracy"], test_accuracy=plain["test_accuracy"],
                           dropout_rate=sec.get("dropout_rate", 0.0), skipped_rounds=sec.get("skipped_rounds", 0))
            if he:
                enc = min(runs["ckks"], key=lambda s: s["seconds_per_round"])
                row.update(he_seconds_per_round=enc["seconds_per_round"], he_bytes_per_round=enc["bytes_per_round"],
                           he_time_ratio=enc["seconds_per_round"] / plain["seconds_per_round"],
                           he_bytes_ratio=enc["bytes_per_round"] / plain["bytes_per_round"],
                           he_vs_secure_time=enc["seconds_per_round"] / sec["seconds_per_round"],
                           he_vs_secure_bytes=enc["bytes_per_round"] / sec["bytes_per_round"],
                           he_test_accuracy=enc["test_accuracy"])
            rows.append(row)
    if comm.rank == 0:
        print(f"federate (fedavg, 1 local epoch, batch 10), {comm.size - 1} client rank(s)")
        cols = ["clients", "per_round", "n_params", "seconds_per_round", "bytes_per_round"]
        if secure:
            cols += ["secure_seconds_per_round", "secure_bytes_per_round", "time_ratio", "bytes_ratio"]
        if he:
            cols += ["he_seconds_per_round", "he_bytes_per_round", "he_time_ratio", "he_bytes_ratio",
                     "he_vs_secure_time", "he_vs_secure_bytes"]
        print(table(rows, cols))
    return rows


def main(argv=None):
    """``mpiexec -n 3 python -m mpitrain.bench.federated [--secure-aggregation] [--encryption ckks] ...``"""
    import argparse

    from ..threads import configure_env

    configure_env()  # before NumPy loads
    from ..comm import Comm, install_abort_hook
    from ..errors import MpitrainError

    p = argparse.ArgumentParser(prog="python -m mpitrain.bench.federated", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    comm = Comm()
    install_abort_hook(comm)
    try:
        rows = bench_federated(args, comm)
    except MpitrainError as exc:
        from ..comm import report_error

        return report_error(comm, exc)
    if comm.rank == 0:
        from . import save

        save(args.out or "bench-results", "federated", rows, vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
