"""``python -m mpitrain bench peers``: mpitrain against PyTorch DDP and Flower on the same work.

Every measurement is its own process tree, started from this one process:
- step throughput: mpitrain's side is `bench scaling`'s weak point (`mpiexec -n P … bench scaling --point`),
  the peer `python -m mpitrain.bench.peers.torch_ddp` with the same MLP, batches, optimizer and threads;
- time to target accuracy: `mpiexec -n P python -m mpitrain train` on a synthetic `prepare` file against
  torch_ddp --data on the same file, batches and initial parameters; both = steps until the test accuracy
  first reaches --target × mean training seconds per step (evaluation not counted);
- federated round: `mpiexec -n 1+C python -m mpitrain federate` against `python -m
  mpitrain.bench.peers.flower` with the same file, partition and --set settings; median seconds per
  round over rounds 2…;
- CNN step throughput (--cnn, default LeNet-5 on 1×28×28 random images): mpitrain's data-parallel step of
  the CNN (`bench scaling`'s weak point with `--model CNN`: per-rank random batches, the plain gradient
  allreduce, momentum update; the median step, max over ranks) against torch_ddp --model with the same CNN,
  batches, optimizer and threads.
--compare picks the comparisons (default all four: ddp = the MLP's step throughput, tta, flower, cnn).
A peer that is not installed is skipped, saying so; mpitrain's side is measured all the same.
speedup = how many times mpitrain is faster (samples/s ratio, or the peer's seconds over mpitrain's).
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

from ...errors import MpitrainError
from .. import loop_arguments, mlp_arguments, model_spec, table

COLUMNS = ["comparison", "peer_name", "ranks", "metric", "mpitrain", "peer", "speedup", "target"]
COMPARISONS = ("ddp", "tta", "flower", "cnn")
INSTALL = "(pip install 'mpitrain[peers]')"


def emit(result, path=None):
    """A peer script's result: one JSON line on stdout, and the same into `path` (its --json) if given."""
    print(json.dumps(result))
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return result


def add_parser(sub):
    s = sub.add_parser(
        "peers", help="mpitrain vs PyTorch DDP (samples/s, time to accuracy) and vs Flower (seconds per round)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--ranks", default="2", help="rank counts for the DDP comparison (default 2; more than "
                                                "the cores oversubscribe them)")
    s.add_argument("--batch-per-rank", type=int, default=64, help="samples per rank per step (default 64)")
    mlp_arguments(s)
    loop_arguments(s)  # --threads: also per Flower client process
    s.add_argument("--target", type=float, default=0.5, help="test accuracy to reach (default 0.5)")
    s.add_argument("--tta-samples", type=int, default=20000, help="synthetic samples to train on (default 20000)")
    s.add_argument("--tta-steps", type=int, default=1000, help="training steps of each side (default 1000)")
    s.add_argument("--eval-every", type=int, default=50, help="steps between test evaluations (default 50)")
    s.add_argument("--flower-clients", type=int, default=16, help="federated clients K (default 16)")
    s.add_argument("--rounds", type=int, default=5, help="federated rounds, ≥ 2 (default 5)")
    s.add_argument("--fraction", type=float, default=0.25, help="clients sampled per round (default 0.25)")
    s.add_argument("--client-ranks", type=int, default=2, help="mpitrain ranks hosting the clients (default 2)")
    s.add_argument("--fed-samples", type=int, default=20000)
    s.add_argument("--fed-features", type=int, default=64)
    s.add_argument("--fed-hidden", default="128")
    s.add_argument("--cnn", default="lenet5", metavar="{lenet5,fedavg_cnn,JSON}",
                   help="the CNN of the CNN step-throughput comparison: a preset or a JSON list of layer "
                        "strings (--classes outputs for a preset; default lenet5)")
    s.add_argument("--cnn-input-shape", metavar="C,H,W", help="its samples' shape (default 1,28,28 for 2-d stacks)")
    s.add_argument("--compare", default=",".join(COMPARISONS),
                   help="comparisons to run, comma-separated: ddp (MLP step throughput), tta (MLP time to "
                        "target), flower (federated round), cnn (CNN step throughput) (default all)")
    s.add_argument("--timeout", type=float, default=600, help="seconds before one run is killed (default 600)")
    s.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")


def _run(cmd, timeout, threads, what):
    """Run cmd in its own process group with `threads` threads per process; kill the group on timeout."""
    from ..scaling import _child_env

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(threads), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise MpitrainError(f"bench peers: {what} did not finish in {timeout:g} s (--timeout): "
                            f"{' '.join(cmd)}") from None
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise MpitrainError(f"bench peers: {what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _peer(module, args, out, what, *options):
    """Run `python -m mpitrain.bench.peers.MODULE OPTIONS --json F`; return what it wrote."""
    path = os.path.join(out, f"{module}.json")
    _run([sys.executable, "-m", f"{__name__}.{module}", *map(str, options), "--json", path],
         args.timeout, args.threads, what)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mpitrain(p, command, out, sets, args, what):
    """`mpiexec -n P python -m mpitrain COMMAND --set …` → (summary.json, metrics.jsonl records)."""
    from ..scaling import _mpiexec

    _run([_mpiexec(), "-n", str(p), sys.executable, "-m", "mpitrain", command, "--quiet", "--out", out,
          *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], args.timeout, args.threads, what)
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return summary, [json.loads(line) for line in f]


def _row(comparison, peer_name, ranks, metric, mine, theirs, target="", higher_is_better=False, **details):
    speedup = None
    if mine and theirs:
        speedup = mine / theirs if higher_is_better else theirs / mine
    return {"comparison": comparison, "peer_name": peer_name, "ranks": ranks, "metric": metric, "mpitrain": mine,
            "peer": theirs, "speedup": speedup, "target": target, **details}


def mpitrain_point(args, p, model, input_shape):
    """mpitrain's side of a step-throughput comparison: `bench scaling`'s weak point on p ranks (plain
    allreduce, SGD with momentum as torch_ddp's) with this model."""
    from ...config import CommConfig
    from ..scaling import run_point

    c = CommConfig()  # the plain allreduce; the other modes' settings at their defaults
    (point,) = run_point(argparse.Namespace(**vars(args), mode="weak", global_batch=args.batch_per_rank,
                                            comm=c.mode, bucket_mb=c.bucket_mb, topk_ratio=c.topk_ratio,
                                            local_steps=c.local_steps, group_size=c.group_size,
                                            optimizer="momentum", tensor="1", model=model, input_shape=input_shape), p)
    return point


def ddp_rows(args, p, data, tmp, have_torch, compare):
    """Throughput (ddp in compare) and time to target (tta in compare) of mpitrain vs PyTorch DDP on p ranks."""
    from .torch_ddp import LR, MU, SEED

    batch, rows = args.batch_per_rank * p, []
    if "ddp" in compare:
        point = mpitrain_point(args, p, "mlp", None)
    if "tta" in compare:
        sets = {"data.path": data, "model.hidden": f"[{args.hidden}]", "train.global_batch": batch,
                "train.steps": args.tta_steps, "train.eval_every": args.eval_every, "train.lr": LR,
                "train.optimizer": "momentum", "train.momentum": MU, "train.weight_decay": 0,
                "train.schedule": "constant", "train.seed": SEED}
        summary, records = _mpitrain(p, "train", os.path.join(tmp, f"train{p}"), sets, args,
                                     f"mpitrain train on {p} ranks")
        reached = next((r["step"] for r in records if r.get("test_accuracy", -1) >= args.target), None)
        per_step = batch / summary["samples_per_second"]
    peer, name = {}, "PyTorch DDP: not installed"
    if have_torch:  # one peer run measures its throughput, and its time to target with --data
        tta = ["--data", data, "--target", args.target, "--tta-steps", args.tta_steps, "--eval-every",
               args.eval_every] if "tta" in compare else []
        peer = _peer("torch_ddp", args, tmp, f"PyTorch DDP on {p} ranks", "--ranks", p,
                     "--batch-per-rank", args.batch_per_rank, "--features", args.features, "--hidden", args.hidden,
                     "--classes", args.classes, "--steps", args.steps, "--warmup", args.warmup,
                     "--threads", args.threads, *tta)
        name = f"PyTorch {peer['torch_version']} DDP (gloo)"
    common = {"global_batch": batch, "threads": args.threads}
    if "ddp" in compare:
        rows.append(_row("step throughput", name, p, "samples_per_s", point["samples_per_s"],
                         peer.get("samples_per_s"), "≥ 1.5× at 2 ranks" if p == 2 else "", higher_is_better=True,
                         **common))
    if "tta" in compare:
        rows.append(_row("time to target", name, p, f"seconds_to_{args.target:g}",
                         reached * per_step if reached else None, peer.get("seconds_to_target"),
                         steps_to_target=reached, peer_steps_to_target=peer.get("steps_to_target"), **common))
    return rows


def cnn_spec(args):
    """The ModelSpec of --cnn / --cnn-input-shape (--classes outputs for a preset)."""
    return model_spec(argparse.Namespace(model=args.cnn, input_shape=args.cnn_input_shape, features=args.features,
                                         hidden=args.hidden, classes=args.classes))


def cnn_row(args, p, tmp, have_torch):
    """Step throughput of mpitrain's data-parallel CNN step vs PyTorch DDP's on p ranks."""
    spec = cnn_spec(args)
    options = ["--batch-per-rank", args.batch_per_rank, "--features", args.features, "--hidden", args.hidden,
               "--classes", args.classes, "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads]
    shape = [args.cnn_input_shape] if args.cnn_input_shape else []
    point = mpitrain_point(args, p, args.cnn, args.cnn_input_shape)
    peer, name = {}, "PyTorch DDP: not installed"
    if have_torch:
        peer = _peer("torch_ddp", args, tmp, f"PyTorch DDP of the CNN on {p} ranks", "--ranks", p, "--model", args.cnn,
                     *[a for s in shape for a in ("--input-shape", s)], *options)
        name = f"PyTorch {peer['torch_version']} DDP (gloo)"
    target = "≥ 1.5× at 2 ranks" if p == 2 and spec.kind == "lenet5" else ""
    return _row("CNN step throughput", name, p, "samples_per_s", point["samples_per_s"], peer.get("samples_per_s"),
                target, higher_is_better=True, model=args.cnn, n_params=spec.n_params,
                global_batch=point["global_batch"], threads=args.threads, compute_ms=point["compute_ms"],
                allreduce_ms=point["allreduce_ms"], step_ms=point["step_ms"], peer_step_ms=peer.get("step_ms"))


def flower_row(args, tmp, have_flwr):
    """Seconds per federated round of mpitrain vs Flower on the same partitioned file and settings."""
    from ...data.partition import write_partition
    from ...data.prepare import prepare

    data = os.path.join(tmp, "fed.h5")
    prepare("synthetic", data, samples=args.fed_samples, features=args.fed_features, classes=10)
    write_partition(data, "iid", args.flower_clients)
    sets = {"fed.strategy": "fedavg", "fed.rounds": args.rounds, "fed.fraction": args.fraction,
            "fed.local_epochs": 1, "fed.eval_every": args.rounds, "model.hidden": f"[{args.fed_hidden}]"}
    p = 1 + args.client_ranks
    _, records = _mpitrain(p, "federate", os.path.join(tmp, "federate"), {"data.path": data, **sets}, args,
                           f"mpitrain federate on {p} ranks")
    mine = float(np.median([r["round_seconds"] for r in records[1:]]))  # rounds 2…, as for Flower
    peer, name = {}, "Flower: not installed"
    if have_flwr:
        peer = _peer("flower", args, tmp, f"Flower with {args.flower_clients} clients", "--data", data,
                     "--threads", args.threads, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
        name = f"Flower {peer['flwr_version']}"
    return _row("federated round", name, p, "seconds_per_round", mine, peer.get("seconds_per_round"),
                "≥ 10×", client_ranks=args.client_ranks, clients=args.flower_clients, fraction=args.fraction,
                rounds=args.rounds,
                flower_client_processes=args.flower_clients if have_flwr else None)


def bench_peers(args, comm):
    from ...data.prepare import prepare

    if comm.size > 1:
        raise MpitrainError("bench peers starts its own processes: launch it as one process "
                            "(python -m mpitrain bench peers ...), not under mpirun", agreed=True)
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    if ranks[0] < 1 or args.steps < 1 or args.rounds < 2:
        raise MpitrainError(f"--ranks {args.ranks} --steps {args.steps} --rounds {args.rounds}: expected rank "
                            "counts and steps ≥ 1, rounds ≥ 2 (round 1 is not timed)")
    compare = [c for c in args.compare.split(",") if c]
    if not compare or set(compare) - set(COMPARISONS):
        raise MpitrainError(f"--compare {args.compare}: expected some of {', '.join(COMPARISONS)}")
    if "cnn" in compare:
        spec = cnn_spec(args)  # a bad --cnn fails here, before anything runs
        if spec.kind == "mlp":
            raise MpitrainError("--cnn mlp: the CNN comparison takes a preset CNN or a JSON stack (the MLP's "
                                "is --compare ddp)")
    have_torch, have_flwr = (importlib.util.find_spec(m) is not None for m in ("torch", "flwr"))
    if not have_torch and {"ddp", "tta", "cnn"} & set(compare):
        print(f"PyTorch is not installed: skipping the PyTorch DDP comparison {INSTALL}", flush=True)
    if not have_flwr and "flower" in compare:
        print(f"flwr is not installed: skipping the Flower comparison {INSTALL}", flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if max(ranks[-1], args.client_ranks + 1 if "flower" in compare else 1) * args.threads > cores:
        print(f"note: more ranks × threads than the {cores} cores here: those runs time-share the cores",
              flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "tta.h5")
        if "tta" in compare:
            prepare("synthetic", data, samples=args.tta_samples, features=args.features, classes=args.classes)
        for p in ranks:
            if {"ddp", "tta"} & set(compare):
                rows += ddp_rows(args, p, data, tmp, have_torch, compare)
        if "flower" in compare:
            rows.append(flower_row(args, tmp, have_flwr))
        if "cnn" in compare:
            rows += [cnn_row(args, p, tmp, have_torch) for p in ranks]
    if {"ddp", "tta"} & set(compare):
        print(f"MLP {args.features}-{args.hidden.replace(',', '-')}-{args.classes}, {args.batch_per_rank} samples "
              f"per rank, SGD momentum 0.9 lr 0.01, {args.threads} thread(s) per rank")
    if "flower" in compare:
        print(f"federated: FedAvg, {args.flower_clients} clients, fraction {args.fraction}, "
              f"MLP {args.fed_features}-{args.fed_hidden.replace(',', '-')}-10, {args.client_ranks} mpitrain client "
              "rank(s)")
    if "cnn" in compare:
        print(f"CNN: {spec.kind} [{spec.describe()}] on {'×'.join(map(str, spec.feature_shape))} random samples, "
              f"{args.batch_per_rank} per rank, SGD momentum 0.9 lr 0.01, {args.threads} thread(s) per rank")
    print("speedup = times faster than the peer")
    print(table(rows, COLUMNS))
    for r in rows:
        if r["comparison"] == "time to target" and (r["mpitrain"] is None or have_torch and r["peer"] is None):
            print(f"note: {r['ranks']} rank(s): mpitrain reached {args.target} test accuracy at step "
                  f"{r['steps_to_target']}, PyTorch at {r['peer_steps_to_target']} of {args.tta_steps} "
                  "(None: not reached; raise --tta-steps)")
    return rows
