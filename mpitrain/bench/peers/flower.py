"""Flower (flwr) peer of mpitrain's federated round.

    python -m mpitrain.bench.peers.flower --data fed.h5 [--set fed.rounds=5 --set fed.fraction=0.25 ...]

Takes the same partitioned file and `--set` settings as `mpitrain federate` (fedavg, samples weighting).
This process runs Flower's gRPC server on localhost (`flwr.server.start_server`, no Ray) with FedAvg:
fraction_fit = fed.fraction, at least fed.min_clients, no federated evaluation, mpitrain's initial model.
It starts one client process per partition client (`flwr.client.start_client`, Flower's one-process-per-
client deployment), a NumPyClient whose fit() is mpitrain's own client training (federated.run.Client:
same Model, Stepper, optimizer, local epochs and batch), so each client does the same work as in
`mpitrain federate`.  Flower samples its own cohort, of the same size m = max(⌊fraction·K⌋, min_clients).
A round is timed from FedAvg.configure_fit to the end of aggregate_fit (send the model, local training,
return, aggregate); seconds per round = median over rounds 2…, since round 1 also waits for the clients
to connect.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ...errors import MpitrainError
from . import emit
from .torch_ddp import free_port

# the client processes and this one: no usage events sent to flower.ai (and no waiting on the network)
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


def setup(args):
    """Config, data file and model spec from the same --data/--set as `mpitrain federate`."""
    from ...config import load
    from ...data.shard import DataFile
    from ...model import ModelSpec

    cfg = load(None, [*args.overrides, f"data.path={args.data}"])
    if cfg.fed.strategy != "fedavg" or cfg.fed.weighting != "samples":
        raise MpitrainError("the Flower peer runs FedAvg weighted by samples: "
                            "fed.strategy=fedavg, fed.weighting=samples")
    data = DataFile(cfg.data.path)
    if "partition" not in data.f:
        raise MpitrainError(f"{data.path}: no partition (prepare --partition iid --clients K)")
    spec = ModelSpec(cfg.model.kind, data.n_features, data.n_classes, tuple(cfg.model.hidden), cfg.model.activation,
                     tuple(cfg.model.layers), data.feature_shape)
    return cfg, data, spec


def client_main(args):
    """One Flower client: partition client --client of --data, trained by mpitrain's federated Client."""
    from flwr.client import NumPyClient, start_client

    from ...federated.run import Client
    from ...kernels import backend
    from ...model import Model
    from ...threads import limit

    cfg, data, spec = setup(args)
    limit(args.threads)
    k = args.client
    lo = int(data.f["partition/offsets"][k])
    x, y = data.read("partition", lo, lo + int(data.f["partition/n_train"][k]), k)
    kernels = backend(cfg.train.device)
    kernels.warmup()  # loads the Numba cache the server process wrote
    trainer = Client(Model(spec, cfg.train.device), kernels, cfg.train, cfg.fed)

    class MpitrainClient(NumPyClient):
        def fit(self, parameters, config):
            trainer.train(k, int(config["round"]), x, y, parameters[0])
            return [trainer.params], len(x), {}

    start_client(server_address=args.server, client=MpitrainClient().to_client(), insecure=True)


def timed_fedavg(cfg, initial, clients):
    import flwr
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seconds, self.started = [], None

        def configure_fit(self, server_round, parameters, client_manager):
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed: {failures[0]!r}")
            aggregated = super().aggregate_fit(server_round, results, failures)
            self.seconds.append(time.perf_counter() - self.started)
            return aggregated

    f = cfg.fed
    return TimedFedAvg(fraction_fit=f.fraction, min_fit_clients=f.min_clients, min_available_clients=clients,
                       fraction_evaluate=0.0, min_evaluate_clients=0,
                       initial_parameters=flwr.common.ndarrays_to_parameters([initial]),
                       on_fit_config_fn=lambda rnd: {"round": rnd - 1})  # mpitrain counts rounds from 0


def watch(procs, logs, done):
    """A client that dies would leave the server waiting for it forever: end everything instead."""
    while not done.wait(0.5):
        for proc, log in zip(procs, logs):
            if proc.poll():
                with open(log, encoding="utf-8", errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
                print(f"flower: client process {proc.args[-1]} failed (exit {proc.returncode}):\n{tail}",
                      file=sys.stderr, flush=True)
                for other in procs:
                    other.kill()
                os._exit(1)


def server_main(args):
    import flwr
    from flwr.server import ServerConfig, start_server

    from ...kernels import backend
    from ...model import Model
    from ...threads import THREAD_VARS

    cfg, data, spec = setup(args)
    clients = len(data.f["partition/n_train"])
    backend(cfg.train.device).warmup()  # compile once here, not in K client processes at once
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{name: str(args.threads) for name in THREAD_VARS})
    same = ["--data", args.data, "--threads", str(args.threads), *[a for o in args.overrides for a in ("--set", o)]]
    strategy = timed_fedavg(cfg, Model(spec).init_params(cfg.train.seed), clients)
    with tempfile.TemporaryDirectory() as tmp:
        logs = [os.path.join(tmp, f"client{k}.log") for k in range(clients)]
        procs = []
        for k, log in enumerate(logs):
            with open(log, "w", encoding="utf-8") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", __spec__.name, *same, "--server", address, "--client", str(k)],
                    stdout=out, stderr=subprocess.STDOUT, env=env))
        done = threading.Event()
        threading.Thread(target=watch, args=(procs, logs, done), daemon=True).start()
        try:
            start_server(server_address=address, config=ServerConfig(num_rounds=cfg.fed.rounds), strategy=strategy)
            for proc in procs:  # the server's last message tells every client to disconnect
                proc.wait(timeout=60)
        finally:
            done.set()
            for proc in procs:
                proc.kill()
    seconds = strategy.seconds
    if len(seconds) != cfg.fed.rounds or len(seconds) < 2:
        sys.exit(f"flower: {len(seconds)} of {cfg.fed.rounds} rounds timed (fed.rounds must be ≥ 2)")
    return {"clients": clients, "rounds": cfg.fed.rounds, "seconds_per_round": float(np.median(seconds[1:])),
            "round_seconds": seconds, "flwr_version": flwr.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench.peers.flower", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="FILE.h5", help="a partitioned dataset (prepare --partition)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="the same settings as `mpitrain federate --set`")
    p.add_argument("--threads", type=int, default=1, help="threads per client process (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    # internal: what the server starts for each client
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.client is not None:
            return client_main(args)
        result = server_main(args)
    except MpitrainError as exc:
        sys.exit(f"flower: {exc}")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
