"""PyTorch DistributedDataParallel (gloo, CPU) peer of mpitrain's data-parallel training step.

    python -m mpitrain.bench.peers.torch_ddp --ranks 2 --batch-per-rank 64 --steps 30 [--data F.h5 --target 0.8]
    python -m mpitrain.bench.peers.torch_ddp --ranks 2 --model lenet5 [--input-shape 1,28,28]

Spawns --ranks processes on localhost.  The model (--model mlp, the default; a CNN: lenet5, fedavg_cnn or a
JSON stack, throughput only) is bench step's PyTorch model of the same canonical stack (torch_model.py: NCHW,
mpitrain's own initial parameters).  It trains with SGD (momentum 0.9, lr 0.01, no weight decay) on the
summed loss scaled to the global-batch mean — the step `bench scaling` times on mpitrain's side.
Throughput: per-rank random batches made exactly as `bench scaling --point` makes them, warm-up steps,
then the median step (gather + forward + backward with DDP's allreduce + update) on each rank, the max over
ranks; samples/s = global batch / that.
Time to target (--data, a `prepare` HDF5 file): the batches of mpitrain's TrainShard (identical to
`mpitrain train` on the same number of ranks), --tta-steps steps, the test accuracy every --eval-every steps;
time to target = steps until the accuracy first reaches --target × mean training seconds per step
(evaluation not counted), the way the driver reads mpitrain's run.
"""
import argparse
import multiprocessing
import os
import socket
import sys
import time

import numpy as np

from .. import loop_arguments, mlp_arguments, model_arguments, model_spec
from ..scaling import LR  # the learning rate of the step bench scaling times
from . import emit

MU, SEED = 0.9, 0  # mpitrain's Optimizer default momentum; the seed of its initial parameters


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    """DDP model, optimizer and one training step on a local batch."""

    def __init__(self, torch, spec, ranks, global_batch):
        from torch.nn.parallel import DistributedDataParallel

        from ...model import Model
        from ..torch_model import TorchModel

        self.net = DistributedDataParallel(TorchModel(spec, Model(spec).init_params(SEED)))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MU)
        self.loss = torch.nn.CrossEntropyLoss(reduction="sum")
        self.scale = ranks / global_batch  # DDP averages gradients over ranks: sum × p / B is the global mean

    def step(self, x, y):
        self.opt.zero_grad()
        (self.loss(self.net(x), y) * self.scale).backward()
        self.opt.step()


def throughput(torch, dist, args, rank, spec):
    from ..torch_model import torch_input_shape

    local, total = args.batch_per_rank, args.warmup + args.steps
    rng = np.random.default_rng(rank)  # the data of bench scaling's point on this rank
    shape = torch_input_shape(spec)  # (features,), or a CNN's (C, H, W) / (C, L): stored channels first
    x = torch.from_numpy(rng.standard_normal((local * total, spec.n_in), dtype=np.float32)).reshape(-1, *shape)
    y = torch.from_numpy(rng.integers(0, spec.n_out, local * total).astype(np.int64))
    order = torch.from_numpy(rng.permutation(local * total).reshape(total, local))
    xb, yb = torch.empty(local, *shape), torch.empty(local, dtype=torch.int64)
    trainer = Trainer(torch, spec, args.ranks, local * args.ranks)
    times = []
    for step in range(total):
        if step == args.warmup:
            dist.barrier()  # the timed steps start together
        t = time.perf_counter()
        torch.index_select(x, 0, order[step], out=xb)
        torch.index_select(y, 0, order[step], out=yb)
        trainer.step(xb, yb)
        times.append(time.perf_counter() - t)
    step_s = torch.tensor([float(np.median(times[args.warmup:]))])
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    return {"step_ms": step_s.item() * 1e3, "samples_per_s": local * args.ranks / step_s.item()}


def time_to_target(torch, dist, args, rank, spec):
    from ...data.shard import DataFile, TrainShard

    data = DataFile(args.data)
    global_batch = args.batch_per_rank * args.ranks
    shard = TrainShard(data, global_batch, rank, args.ranks, SEED)
    test_x, test_y = (torch.from_numpy(a) for a in data.read("test", 0, data.n_test, rank))
    trainer = Trainer(torch, spec, args.ranks, global_batch)
    seconds, reached = 0.0, None
    for step in range(args.tta_steps):
        t = time.perf_counter()
        epoch, s = divmod(step, shard.steps_per_epoch)
        if s == 0:
            order = shard.epoch_order(epoch)
        trainer.step(*(torch.from_numpy(a) for a in shard.batch_at(order[s])))
        seconds += time.perf_counter() - t
        if reached is None and ((step + 1) % args.eval_every == 0 or step + 1 == args.tta_steps):
            with torch.no_grad():  # every rank holds the same model: each scores the whole test split
                accuracy = (trainer.net(test_x).argmax(1) == test_y).double().mean().item()
            if accuracy >= args.target:
                reached = step + 1
    total = torch.tensor([seconds])
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    per_step = total.item() / args.tta_steps
    return {"steps_to_target": reached, "seconds_per_step": per_step,
            "seconds_to_target": reached * per_step if reached else None}


def worker(rank, args, port, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    try:
        spec = model_spec(args)
        result = {"ranks": args.ranks, "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                  "model": spec.kind, **throughput(torch, dist, args, rank, spec)}
        if args.data:
            result.update(time_to_target(torch, dist, args, rank, spec))
        if rank == 0:
            results.put(result)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench.peers.torch_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    p.add_argument("--batch-per-rank", type=int, default=64)
    mlp_arguments(p)
    model_arguments(p)
    loop_arguments(p)
    p.add_argument("--data", metavar="FILE.h5", help="also measure the time to --target test accuracy on this file")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tta-steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    from ...errors import MpitrainError

    try:
        spec = model_spec(args)  # a bad --model fails here, before any rank starts
    except MpitrainError as exc:
        p.error(str(exc))
    if args.data and spec.kind != "mlp":
        p.error("--data: the time to target is measured for --model mlp only (the peers share its weights)")

    from ...threads import THREAD_VARS

    os.environ.update({name: str(args.threads) for name in THREAD_VARS})  # before the ranks load torch
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters; this process never loads torch
    results, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=worker, args=(rank, args, port, results)) for rank in range(args.ranks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [rank for rank, proc in enumerate(procs) if proc.exitcode]
    if failed:
        sys.exit(f"torch_ddp: rank(s) {failed} failed")
    result = results.get()
    return emit(result, args.json)


if __name__ == "__main__":
    main()
