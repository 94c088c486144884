"""``bench stream``: training steps/s and peak memory per rank with the training split in memory and
streamed (data.stream), on uncompressed and gzip/lzf-chunked copies of one synthetic file.  Each case is
its own `train` run (`mpiexec -n --ranks`), so its peak resident memory is its own."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from . import table

COLUMNS = ["model", "compression", "mode", "file_mb", "steps_per_s", "vs_memory", "runs", "peak_rss_mb",
           "reader_rss_mb", "data_mb"]
MODELS = {"mlp": ["model.kind=mlp", "model.hidden=[1024, 1024]"], "lenet5": ["model.kind=lenet5"]}


def add_parser(sub):
    s = sub.add_parser("stream", help="steps/s and memory per rank: training data in memory vs streamed",
                       description="Writes one synthetic 1×28×28 (784-feature) dataset uncompressed and gzip/lzf "
                                   "chunked (the chunks prepare writes, ~1 MiB), then trains each --models "
                                   "model on each file in memory and streamed, and reports training steps/s "
                                   "(the step loop, window waits included; the best of --repeat alternated "
                                   "runs), streamed/in-memory, and the peak resident memory per rank and of its "
                                   "reader process (the window buffers they share counted in both).")
    s.add_argument("--models", default="mlp,lenet5", help="mlp (784-1024-1024-10) and/or lenet5 (default both)")
    s.add_argument("--compression", default="none,gzip,lzf", help="file chunk filters (default none,gzip,lzf)")
    s.add_argument("--samples", type=int, default=40000, help="training samples (default 40000: 126 MB)")
    s.add_argument("--global-batch", type=int, default=128, help="global batch (default 128)")
    s.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    s.add_argument("--block-rows", type=int, default=20,
                   help="data.block_rows of the streamed runs (default 20: with 2 blocks a window, a new window "
                        "every 40 steps)")
    s.add_argument("--chunk-rows", type=int, default=0,
                   help="the files' chunk rows (default: --block-rows, a chunk a block, as data.block_rows = 0 "
                        "does; prepare writes ~1 MiB chunks, and a block shorter than its chunk decompresses "
                        "the whole chunk for its rows)")
    s.add_argument("--window-blocks", type=int, default=2, help="data.window_blocks of the streamed runs (default 2)")
    s.add_argument("--repeat", type=int, default=3,
                   help="runs per mode, alternated; the best of them is reported (default 3)")
    s.add_argument("--ranks", type=int, default=1, help="ranks per run (default 1)")
    s.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    s.add_argument("--dir", help="where the files are written (default: the system temp folder)")
    s.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")


def write(path, n, compression, chunk, seed=0):
    """A dataset in prepare's layout, chunks of `chunk` rows: n × 784 float32 (standard normal), labels 0…9,
    256 test samples."""
    import h5py

    rng = np.random.default_rng(seed)
    opts = {} if compression == "none" else {"compression": compression}
    with h5py.File(path, "w") as f:
        for split, rows in (("train", n), ("test", 256)):
            x = f.create_dataset(f"{split}/x", (rows, 784), np.float32, chunks=(min(rows, chunk), 784), **opts)
            for a in range(0, rows, 8192):
                x[a:a + 8192] = rng.standard_normal((min(8192, rows - a), 784), dtype=np.float32)
            f[f"{split}/y"] = rng.integers(0, 10, rows)
        f.attrs.update(n_classes=10, feature_shape=np.array([1, 28, 28], np.int64), checksum=f"bench-{compression}")


def run(args, mpiexec, data, model, mode, out):
    """One `train` run of `model` on `data`, in memory or streamed: its summary.json."""
    sets = [*MODELS[model], f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
            "train.eval_every=1000000", f"data.stream={str(mode == 'stream').lower()}",
            "data.memory_mb=0", f"data.block_rows={args.block_rows}", f"data.window_blocks={args.window_blocks}"]
    cmd = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpitrain", "train", "--quiet", "--data", data,
           "--out", out] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, env=dict(os.environ, NUMBA_NUM_THREADS=str(args.threads)))
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def bench_stream(args, comm):
    if comm.rank != 0:
        return []
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for compression in args.compression.split(","):
            data = os.path.join(tmp, f"{compression}.h5")
            write(data, args.samples, compression, args.chunk_rows or args.block_rows)
            size = os.path.getsize(data) / 2**20
            for model in args.models.split(","):
                runs = {"memory": [], "stream": []}
                for i in range(args.repeat):  # alternated, so a change in the machine's load hits both modes
                    for mode in runs:
                        out = os.path.join(tmp, f"{compression}-{model}-{mode}-{i}")
                        runs[mode].append(run(args, mpiexec, data, model, mode, out))
                for mode, summaries in runs.items():
                    best = max(summaries, key=lambda s: s["samples_per_second"])
                    steps = best["samples_per_second"] / args.global_batch
                    row, strata = 784 * 4 + 8, -(-args.global_batch // args.ranks)
                    held = (args.samples // args.ranks if mode == "memory" else 2 * strata * args.window_blocks
                            * args.block_rows) * row  # in memory: the rank's part; streamed: two windows
                    rows.append({"model": model, "compression": compression, "mode": mode, "file_mb": size,
                                 "steps_per_s": steps,
                                 "vs_memory": steps / rows[-1]["steps_per_s"] if mode == "stream" else 1.0,
                                 "runs": " ".join(f"{s['samples_per_second'] / args.global_batch:.1f}"
                                                  for s in summaries),
                                 "peak_rss_mb": best["peak_rss_bytes"] / 2**20,
                                 "reader_rss_mb": best["reader_peak_rss_bytes"] / 2**20,
                                 "data_mb": held / 2**20})
                    print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(table(rows, COLUMNS))
    return rows
