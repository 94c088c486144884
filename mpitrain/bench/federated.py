"""Federated round cost vs number of clients: seconds and bytes per round of the real `federate` loop on
a synthetic dataset partitioned IID over each client count (written by rank 0 into a temporary folder).
The aggregation is one Reduce of the model per client rank whatever the number of clients it hosts."""
import os
import tempfile

from . import table


def bench_federated(args, comm):
    from ..config import Config
    from ..data.partition import write_partition
    from ..data.prepare import prepare
    from ..federated.run import federate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(comm.bcast_bytes(tmp.encode()).decode(), "fed.h5")
        for clients in (int(c) for c in args.clients.split(",")):
            if comm.rank == 0:
                prepare("synthetic", path, samples=max(args.samples, 4 * clients), features=args.features, classes=10)
                write_partition(path, "iid", clients)
            comm.barrier()
            cfg = Config()
            cfg.data.path, cfg.model.hidden = path, [int(h) for h in args.hidden.split(",")]
            cfg.fed.rounds, cfg.fed.fraction, cfg.fed.local_epochs = args.rounds, args.fraction, 1
            s = federate(cfg.validate(), comm, os.path.join(os.path.dirname(path), f"run{clients}"), quiet=True)
            rows.append({"clients": clients, "client_ranks": comm.size - 1, "per_round": max(int(args.fraction * clients), 2),
                         "n_params": s["n_params"], "seconds_per_round": s["seconds_per_round"],
                         "bytes_per_round": s["bytes_per_round"]})
            comm.barrier()
    if comm.rank == 0:
        print(f"federate (fedavg, 1 local epoch, batch 10), {comm.size - 1} client rank(s)")
        print(table(rows, ["clients", "per_round", "n_params", "seconds_per_round", "bytes_per_round"]))
    return rows
