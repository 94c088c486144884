"""Checkpoint cost vs model size: seconds to write (atomically, with checksum) and to load+verify a
checkpoint of params + Adam's two state vectors, and the overhead that implies at the default cadence."""
import tempfile
import time

import numpy as np

from . import table


def bench_checkpoint(args, comm):
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..config import CheckpointConfig

    every = CheckpointConfig().every_seconds
    rows = []
    if comm.rank == 0:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            index = 0  # increasing, so keep=1 prunes the previous file and never the new one
            for n in (int(s) for s in args.sizes.split(",")):
                arrays = {k: np.random.default_rng(0).random(n, dtype=np.float32) for k in ("params", "opt/m", "opt/v")}
                save, load = [], []
                for _ in range(args.repeats):
                    index += 1
                    t = time.perf_counter()
                    path = save_checkpoint(tmp, index, arrays, {"config": "x"}, keep=1)
                    save.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    load_checkpoint(path)
                    load.append(time.perf_counter() - t)
                s = float(np.median(save))
                rows.append({"n_params": n, "mbytes": 3 * 4 * n / 1e6, "save_s": s, "load_s": float(np.median(load)),
                             "overhead_pct_at_default": 100 * s / every})
        print(f"checkpoint = params + 2 optimizer vectors (float32), median of {args.repeats}; "
              f"default cadence every {every:.0f} s; folder {args.dir or tempfile.gettempdir()}")
        print(table(rows, ["n_params", "mbytes", "save_s", "load_s", "overhead_pct_at_default"]))
    comm.barrier()
    return rows
