"""Training controls and logs people can open: TensorBoard event files (train.log), plot --log-y."""
import json
import os

import pytest

from conftest import mpirun, summary

TINY = ["--set", "model.hidden=[8]", "--set", "train.steps=20", "--set", "train.log_every=5",
        "--set", "train.eval_every=10"]
TB = ["--set", 'train.log=["tensorboard"]']


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def scalars(run_dir):
    """{tag: [(step, value)]} as TensorBoard itself reads the run folder's event files."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged(run_dir, unit):
    """{field: [(step or round, value)]} of metrics.jsonl's numbers."""
    out = {}
    for r in records(run_dir):
        for k, v in r.items():
            if k not in (unit, "epoch") and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r[unit], v))
    return out


def close(a, b):
    """float32 event values against metrics.jsonl's float64 ones."""
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= 1e-6 * max(1, abs(y))
                                                          for (_, x), (_, y) in zip(a, b))


def test_tensorboard_events_hold_the_train_scalars(tmp_path, synth):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    r = mpirun(2, "train", "--quiet", "--out", out, "--data", synth, *TINY, *TB)
    assert r.returncode == 0, r.stderr
    got, want = scalars(out), logged(out, "step")
    assert set(want) == {"lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    for tag, points in want.items():
        assert close(got[tag], points), tag
    s = summary(out)
    for tag in ("samples_per_second", "comm_seconds"):  # the run's totals, at its last step
        assert close(got[tag], [(20, s[tag])]), tag


def test_federate_logs_rounds_and_epsilon(tmp_path):
    pytest.importorskip("tensorboardX")
    parts = str(tmp_path / "parts.h5")
    assert mpirun(1, "prepare", "--source", "synthetic", "--samples", 400, "--features", 8, "--classes", 3,
                  "--out", parts, "--partition", "iid", "--clients", 4).returncode == 0
    out = tmp_path / "fed"
    r = mpirun(2, "federate", "--quiet", "--out", out, "--data", parts, "--set", "model.kind=softmax",
               "--set", "fed.rounds=3", "--set", "fed.dp.noise_multiplier=1", "--set", "fed.fraction=0.5", *TB)
    assert r.returncode == 0, r.stderr
    got, want = scalars(out), logged(out, "round")
    assert [s for s, _ in got["epsilon"]] == [1, 2, 3]
    for tag, points in want.items():
        assert close(got[tag], points), tag


def test_an_unknown_log_is_one_line(tmp_path, synth):
    r = mpirun(2, "train", "--quiet", "--out", tmp_path / "run", "--data", synth, *TINY,
               "--set", 'train.log=["wandb"]')
    assert r.returncode != 0
    assert r.error_lines() == ["mpitrain: error: train.log = ['wandb']: unknown log 'wandb' (known: tensorboard)"]


def test_plot_log_y(tmp_path, synth):
    pytest.importorskip("matplotlib")
    from mpitrain.plot import Run, figure

    out = tmp_path / "run"
    assert mpirun(1, "train", "--quiet", "--out", out, "--data", synth, *TINY).returncode == 0
    for log_y, scale in ((False, "linear"), (True, "log")):
        fig = figure([Run(str(out))], log_y=log_y)
        (loss,) = [ax for ax in fig.get_axes() if ax.get_ylabel() == "loss"]
        assert loss.get_yscale() == scale
