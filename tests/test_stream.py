"""Out-of-core data (data.stream, prepare from sources larger than memory): bounded memory under a per-rank
address-space limit, p ranks ≡ 1 rank, bit-exact resume, and a bad block named on every rank at once."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from conftest import MPIEXEC, launch, mpirun, params, summary
from test_fsdp import LIMITED

MiB = 2**20
ONE = {"NUMBA_NUM_THREADS": "1"}  # tiny models: one thread per rank is faster, and steady on a busy machine
STREAM = ["data.stream=true", "data.block_rows=8", "data.window_blocks=2", "model.hidden=[16]",
          "train.global_batch=16", "train.optimizer=adam", "train.lr=0.01", "train.steps=90"]


def _npy_dir(folder, n, features, seed):
    """x.npy (n × features float32, written a slab at a time), y.npy and a small x_test/y_test."""
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    x = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), "w+", np.float32, (n, features))
    for a in range(0, n, 16384):
        x[a:a + 16384] = rng.standard_normal((min(16384, n - a), features), dtype=np.float32)
    x.flush()
    del x
    np.save(os.path.join(folder, "y.npy"), rng.integers(0, 4, n))
    np.save(os.path.join(folder, "x_test.npy"), rng.standard_normal((64, features), dtype=np.float32))
    np.save(os.path.join(folder, "y_test.npy"), rng.integers(0, 4, 64))


def test_a_file_several_times_the_memory_limit_trains_in_stream_mode(tmp_path):
    """RLIMIT_AS on each process = its baseline + HEADROOM, the baseline being the peak address space
    (VmPeak) of the same command on a tiny file of the same row size: importing NumPy, Numba, h5py and
    mpi4py and starting OpenBLAS already take ~1 GB of address space, far more than
    any file this test could write quickly.  What the limit then bounds is the memory a process may add for
    the data, so the source and the training file are made several (≥ 5) times larger than HEADROOM:
    prepare reads the memory-mapped-size npy source in groups, train streams it in windows for a full epoch,
    and the same file in memory fails with one line that says to stream."""
    headroom, features = 32 * MiB, 256
    rows = 6 * headroom // (4 * features)  # x.npy: 192 MiB
    _npy_dir(str(tmp_path / "big"), rows, features, 0)
    _npy_dir(str(tmp_path / "small"), 256, features, 1)
    script = tmp_path / "limited.py"
    script.write_text(LIMITED, encoding="utf-8")

    def run(limit, tag, *args):
        cmd = [MPIEXEC, "-n", "1", sys.executable, str(script), str(limit), str(tmp_path / f"peak-{tag}"), *args]
        return launch(cmd, timeout=300, env=ONE)

    def peak(tag):
        (path,) = tmp_path.glob(f"peak-{tag}.*")
        return int(path.read_text()) * 1024

    def prepare(limit, tag, source):
        return run(limit, tag, "prepare", "--source", f"npy:{tmp_path / source}", "--out", str(tmp_path / f"{source}.h5"))

    assert prepare(0, "prepare-base", "small").returncode == 0
    r = prepare(peak("prepare-base") + headroom, "prepare", "big")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert f["train/x"].shape == (rows, features) and f["train/x"].nbytes >= 5 * headroom

    sets = ["data.stream=true", "data.memory_mb=24", "data.window_blocks=2", "model.hidden=[8]",
            "train.global_batch=128", "train.epochs=1", "train.lr=0.01"]

    def train(limit, tag, data, *extra):
        args = ["train", "--quiet", "--out", str(tmp_path / tag), "--data", str(tmp_path / data)]
        for s in sets + list(extra):
            args += ["--set", s]
        return run(limit, tag, *args)

    assert train(0, "train-base", "small.h5").returncode == 0
    limit = peak("train-base") + headroom
    r = train(limit, "stream", "big.h5")
    assert r.returncode == 0, r.stderr
    s = summary(str(tmp_path / "stream"))
    assert s["data_stream"] and s["steps"] == rows // 128  # one whole epoch: every block read once
    assert peak("stream") <= limit
    # the rank's reader process (a child: the same limit, a smaller baseline) holds a bounded share too
    reader_base = summary(str(tmp_path / "train-base"))["reader_peak_rss_bytes"]
    assert 0 < s["reader_peak_rss_bytes"] <= reader_base + headroom
    # in memory, against its own baseline (streaming's maps its window buffers and starts the reader)
    in_memory = ["data.stream=false", "data.memory_mb=0"]
    assert train(0, "memory-base", "small.h5", *in_memory).returncode == 0
    r = train(peak("memory-base") + headroom, "memory", "big.h5", *in_memory)
    assert r.returncode != 0
    assert r.error_lines() == [f"mpitrain: error: {tmp_path / 'big.h5'}: train rows 0..{rows - 1} ({rows * (4 * features + 8) / MiB:.0f} MiB) do not "
                               f"fit in the memory of rank 0; set data.stream = true to read them block by block"]


def _train(n, out, data, *sets, resume=None):
    args = ["train", "--quiet", "--out", out, "--data", data] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    return mpirun(n, *args, env=ONE)


def test_stream_ranks_equal_one_rank_resume_bit_exact_and_a_bad_block_stops_every_rank(tmp_path, synth):
    """Windows of 2 blocks of 8 rows (16 steps), 60 steps an epoch, 90 steps: windows and an epoch change,
    and the resumed run starts mid-window (step 45).  The one-rank run streams by itself: its part (960 rows
    of 12 features, 0.05 MiB) exceeds data.memory_mb."""
    one, two, again = (str(tmp_path / k) for k in ("one", "two", "again"))
    r = _train(1, one, synth, *STREAM, "data.stream=false", "data.memory_mb=0.04")
    assert r.returncode == 0, r.stderr
    assert summary(one)["data_stream"]
    r = _train(2, two, synth, *STREAM, "checkpoint.every=45")
    assert r.returncode == 0, r.stderr
    assert summary(two)["data_stream"]
    ref = params(one)
    assert np.max(np.abs(ref - params(two))) <= 1e-5 * np.abs(ref).max()
    r = _train(2, again, synth, *STREAM, resume=os.path.join(two, "checkpoints", "ckpt-000000045.h5"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(params(two), params(again))
    # the stream plan is not the in-memory one (so the comparisons above compare stream runs), except where
    # a window holds a whole stratum (60 rows): then it is, bit for bit — the reader delivers the same rows
    memory, whole = str(tmp_path / "memory"), str(tmp_path / "whole")
    r = _train(1, memory, synth, *STREAM, "data.stream=false")
    assert r.returncode == 0 and not summary(memory)["data_stream"]
    assert not np.allclose(params(memory), ref, atol=1e-3)
    r = _train(1, whole, synth, *STREAM, "data.block_rows=32")
    assert r.returncode == 0 and summary(whole)["data_stream"]
    assert np.array_equal(params(memory), params(whole))

    bad = str(tmp_path / "bad.h5")
    shutil.copy(synth, bad)
    with h5py.File(bad, "r+") as f:
        n = len(f["train/y"])
        f["train/x"][700, 3] = np.nan  # in rank 1's strata (rows 480…959 of 960 with a global batch of 16)
    r = _train(2, str(tmp_path / "stopped"), bad, *STREAM)
    assert r.returncode == 2 and n == 960
    (line,) = r.error_lines()
    m = re.fullmatch(rf"mpitrain: error: {re.escape(bad)}: train rows (\d+)\.\.(\d+) \(rank 1\): features contain "
                     rf"NaN or Inf \(first at row 700\)", line)
    assert m and int(m[1]) <= 700 <= int(m[2]) < int(m[1]) + 8, line  # the block, not the loss, stopped it
    assert not os.path.exists(os.path.join(str(tmp_path / "stopped"), "model.h5"))


def test_blocks_shorter_than_a_compressed_chunk_are_noted_in_the_log(tmp_path, synth):
    """Each block read decompresses its whole chunk: blocks of 8 rows in gzip chunks of 50 say so."""
    data = str(tmp_path / "gzip.h5")
    with h5py.File(synth, "r") as src, h5py.File(data, "w") as f:
        for key in src:
            if key != "train":
                src.copy(key, f)
        f.create_dataset("train/x", data=src["train/x"][...], chunks=(50, 12), compression="gzip")
        f["train/y"] = src["train/y"][...]
        f.attrs.update(src.attrs)
    args = ["train", "--out", str(tmp_path / "run"), "--data", data]
    r = mpirun(1, *args, *[a for s in STREAM[:3] + ["train.steps=2"] for a in ("--set", s)], env=ONE)
    assert r.returncode == 0, r.stderr
    assert (f"note: {data}: train/x is gzip-compressed in chunks of 50 rows and the stream reads blocks of 8, so "
            "each chunk is decompressed up to 7 times an epoch; data.memory_mb ≥ ") in r.stdout, r.stdout


def test_streamed_federated_clients_do_not_depend_on_their_host_and_a_bad_block_ends_the_job(tmp_path, synth):
    """A client's stream plan is seeded by (seed, round, client) only: 1 or 2 client ranks give the same
    model.  A NaN in a client's rows ends every rank with one line naming the file and the rows."""
    data = str(tmp_path / "parts.h5")
    shutil.copy(synth, data)
    assert mpirun(1, "prepare", "--out", data, "--partition", "iid", "--clients", 4).returncode == 0
    sets = ["data.stream=true", "data.block_rows=8", "data.window_blocks=2", "model.hidden=[16]", "fed.rounds=3",
            "fed.local_batch=12", "fed.local_epochs=2"]

    def federate(n, out, path):
        args = ["federate", "--quiet", "--out", str(tmp_path / out), "--data", path]
        for s in sets:
            args += ["--set", s]
        return mpirun(n, *args, env=ONE)

    for n, out in ((2, "one"), (3, "two")):
        r = federate(n, out, data)
        assert r.returncode == 0, r.stderr
    ref = params(str(tmp_path / "one"))
    assert np.max(np.abs(ref - params(str(tmp_path / "two")))) <= 1e-5 * np.abs(ref).max()
    with h5py.File(data, "r+") as f:
        f["partition/x"][500, 0] = np.inf  # client 2's rows (240 each), hosted by rank 2
    r = federate(3, "bad", data)
    assert r.returncode != 0
    (line,) = [line for line in r.error_lines() if not line.startswith("Abort(")]  # MPICH's own line
    m = re.fullmatch(rf"mpitrain: error on rank 2: {re.escape(data)}: partition rows (\d+)\.\.(\d+) \(rank 2\): "
                     rf"features contain NaN or Inf \(first at row 500\)", line)
    assert m and int(m[1]) <= 500 <= int(m[2]) < int(m[1]) + 8, line


def test_prepare_from_folders_and_in_groups_matches_one_array(tmp_path, monkeypatch):
    """npy:DIR and npz:DIR (three files) write the file npz:PATH writes from the same arrays, bit for bit;
    in groups of one 512-row chunk (statistics merged group by group) within float rounding of it."""
    import mpitrain.data.prepare as prep

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1500, 4, 128)) * 3 + 7).astype(np.float32)  # chunks of 512 rows
    y = rng.integers(0, 3, 1500)
    os.makedirs(tmp_path / "npy")
    os.makedirs(tmp_path / "npzs")
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "npy" / "y.npy", y)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    for i, a in enumerate(range(0, 1500, 600)):
        np.savez(tmp_path / "npzs" / f"{i}.npz", x=x[a:a + 600], y=y[a:a + 600])

    def arrays(path):
        with h5py.File(path, "r") as f:
            return {k: f[k][...] for k in ("train/x", "test/x", "train/y", "standardize/mean", "standardize/std")}

    outs = {s: str(tmp_path / f"{s.replace(':', '-').replace('/', '_')}.h5") for s in
            (f"npz:{tmp_path / 'all.npz'}", f"npy:{tmp_path / 'npy'}", f"npz:{tmp_path / 'npzs'}")}
    for source, out in outs.items():
        prep.prepare(source, out)
    ref, *others = (arrays(out) for out in outs.values())
    for other in others:
        assert all(np.array_equal(ref[k], other[k]) for k in ref)
    monkeypatch.setattr(prep, "GROUP_BYTES", 1)  # one chunk a group: 3 groups of train rows
    prep.prepare(f"npy:{tmp_path / 'npy'}", str(tmp_path / "groups.h5"))
    grouped = arrays(str(tmp_path / "groups.h5"))
    assert np.array_equal(ref["train/y"], grouped["train/y"])
    for k in ("train/x", "test/x", "standardize/mean", "standardize/std"):
        assert np.allclose(ref[k], grouped[k], rtol=0, atol=1e-5), k
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # no temporary copy left


def _reader_of(rank_pid):
    """The pid of the reader process a rank started."""
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == rank_pid and b"mpitrain.data.reader" in cmd:
            return int(d)
    return None


WINDOW_A_STEP = ["data.block_rows=1", "data.window_blocks=1", "train.steps=2000000"]


def test_preemption_signals_to_the_reader_process_too_checkpoint_and_its_death_ends_the_run(tmp_path, synth):
    """SLURM signals every process of a job step: SIGTERM to a streaming rank and to its reader process
    checkpoints and exits 75, as in memory (the reader ignores the signal and ends with its rank).  What that
    protects against: a reader that dies (SIGKILL here) ends its rank with one line naming it, not a hang.
    A window a step, so the step after the signal needs the reader (without the protection, the test fails)."""
    from test_checkpoint import _rank_pids, checkpoints

    def start(out):
        cmd = [MPIEXEC, "-n", "1", sys.executable, "-m", "mpitrain", "train", "--quiet", "--out", out, "--data", synth,
               *[a for s in (*STREAM, *WINDOW_A_STEP) for a in ("--set", s)]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=dict(os.environ, **ONE))
        deadline = time.time() + 120
        while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and _rank_pids(out)
                   and _reader_of(_rank_pids(out)[0])):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        rank = _rank_pids(out)[0]
        return proc, rank, _reader_of(rank)

    def wait(proc):
        try:
            return proc.communicate(timeout=60)[1]
        finally:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None

    out = str(tmp_path / "term")
    proc, rank, reader = start(out)
    os.kill(reader, signal.SIGTERM)
    os.kill(rank, signal.SIGTERM)
    err = wait(proc)
    assert proc.returncode == 75, err
    assert len(checkpoints(out)) == 1 and not os.path.exists(os.path.join(out, "summary.json"))
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{reader}"):  # it ends at the end of its input: when its rank has ended
        assert time.time() < deadline, "the reader process outlived its rank"
        time.sleep(0.1)

    out = str(tmp_path / "kill")
    proc, rank, reader = start(out)
    os.kill(reader, signal.SIGKILL)
    err = wait(proc)
    assert proc.returncode == 2
    assert err.splitlines() == [f"mpitrain: error: {synth}: the reader process of rank 0 ended (killed by signal 9)"]


def test_a_killed_prepare_leaves_the_previous_output_whole(tmp_path):
    """prepare writes under a hidden temporary name and renames at the end: SIGKILL while it writes leaves
    the file of an earlier prepare to the same path as it was (only the hidden temporary stays behind)."""
    out = str(tmp_path / "data.h5")
    _npy_dir(str(tmp_path / "small"), 256, 64, 1)
    _npy_dir(str(tmp_path / "big"), 200000, 64, 0)  # 49 MiB: seconds to standardise and write
    assert mpirun(1, "prepare", "--source", f"npy:{tmp_path / 'small'}", "--out", out).returncode == 0
    with h5py.File(out, "r") as f:
        before = f.attrs["checksum"]
    proc = subprocess.Popen([sys.executable, "-m", "mpitrain", "prepare", "--source", f"npy:{tmp_path / 'big'}",
                             "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".data.h5.tmp-*")):
        assert time.time() < deadline and proc.poll() is None, "prepare ended before its temporary file was seen"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    with h5py.File(out, "r") as f:
        assert f.attrs["checksum"] == before and f["train/x"].shape[1] == 64
        assert len(f["train/y"]) + len(f["test/y"]) == 256 + 64
