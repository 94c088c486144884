"""Training controls and logs people can open: class weights and label smoothing, image augmentation,
TensorBoard event files (train.log), plot --log-y."""
import json
import os

import numpy as np
import pytest

from conftest import mpirun, params
from mpitrain.controls import Controls, class_weights
from mpitrain.config import load
from mpitrain.data.shard import DataFile
from mpitrain.kernels.ops import softmax_xent_weighted

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
    assert set(want) == {"lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "samples_per_second",
                         "comm_seconds"}
    assert set(got) == set(want)
    for tag, points in want.items():
        assert close(got[tag], points), tag


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


# -- class weights and label smoothing ---------------------------------------------------------------------

def reference(z, y, w, eps):
    """PyTorch's CrossEntropyLoss(weight=w, label_smoothing=eps, reduction="mean"), in NumPy."""
    c = z.shape[1]
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    q = (1 - eps) * np.eye(c)[y] + eps / c
    return -(q * w * logp).sum() / w[y].sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("w", [[1, 1, 1, 1], [1, 2, 0.5, 3]])
def test_weighted_smoothed_cross_entropy_matches_the_numpy_reference(w, eps):
    rng = np.random.default_rng(0)
    z, y, w = rng.normal(size=(9, 4)), rng.integers(0, 4, 9), np.array(w, np.float64)
    g = z.copy()
    loss, hits = softmax_xent_weighted(g, y, w, eps, len(y) / w[y].sum())  # the factor N / Σw of a step
    assert loss / len(y) == pytest.approx(reference(z, y, w, eps), rel=1e-12)
    assert hits == (z.argmax(1) == y).sum()
    h, numeric = 1e-6, np.zeros_like(z)
    for i, j in np.ndindex(z.shape):
        d = np.zeros_like(z)
        d[i, j] = h
        numeric[i, j] = (reference(z + d, y, w, eps) - reference(z - d, y, w, eps)) / (2 * h)
    assert np.abs(g / len(y) - numeric).max() < 1e-8  # the trainer's scale 1/N gives the mean's gradient


def test_balanced_weights_come_from_the_training_labels(synth):
    data = DataFile(synth)
    counts = np.bincount(data.f["train/y"][...])
    assert np.allclose(class_weights("balanced", data), counts.sum() / (len(counts) * counts))
    assert np.array_equal(class_weights([1, 2, 3, 4], data), [1, 2, 3, 4])


WEIGHTED = [*TINY, "--set", "train.class_weights=[1, 3, 0.5, 2]", "--set", "train.label_smoothing=0.1"]


def test_class_weights_and_smoothing_train_the_same_on_1_and_2_ranks(tmp_path, synth):
    """The weighted mean divides by the global batch's weight sum, which 2 ranks sum between them."""
    for name, n, sets in (("one", 1, WEIGHTED), ("two", 2, WEIGHTED), ("plain", 1, TINY)):
        r = mpirun(n, "train", "--quiet", "--out", tmp_path / name, "--data", synth, *sets)
        assert r.returncode == 0, r.stderr
    one, two, plain = (params(tmp_path / n) for n in ("one", "two", "plain"))
    scale = np.abs(one).max()
    assert np.abs(one - two).max() <= 1e-5 * scale < np.abs(one - plain).max()


def test_class_weights_of_another_length_are_one_line(tmp_path, synth):
    r = mpirun(2, "train", "--quiet", "--out", tmp_path / "run", "--data", synth, *TINY,
               "--set", "train.class_weights=[1, 2]")
    assert r.returncode != 0 and not os.path.exists(tmp_path / "run" / "config.toml")
    assert r.error_lines() == [f"mpitrain: error: train.class_weights: 2 weights for the 4 classes of {synth}; "
                               "expected 4"]


def test_the_controls_are_trains_alone():
    from mpitrain.errors import MpitrainError

    for key, value in (("data.augment", ["flip"]), ("train.class_weights", "balanced"), ("train.label_smoothing", 0.1)):
        with pytest.raises(MpitrainError, match=f"^{key} has no effect: federate's clients train "):
            load(overrides={key: value}, command="federate")


# -- augmentation -------------------------------------------------------------------------------------------

def augmenter(ops):
    cfg = load(overrides={"data.augment": ops, "train.seed": 5})
    data = type("Images", (), {"feature_shape": (2, 5, 6), "task": "classify", "path": "x.h5"})()
    return Controls(cfg, data, None)


def test_augmentation_draws_per_global_sample_index():
    x = np.random.default_rng(1).normal(size=(16, 60)).astype(np.float32)
    y = np.arange(16)
    aug = augmenter(["flip", "crop 2"])
    whole = aug.batch(x, y, 7, 0)[0].copy()
    halves = np.concatenate([aug.batch(x[:5], y[:5], 7, 0)[0].copy(), aug.batch(x[5:], y[5:], 7, 5)[0].copy()])
    assert np.array_equal(whole, halves)  # 2 ranks' rows are 1 rank's
    assert not np.array_equal(whole, aug.batch(x, y, 8, 0)[0])  # another step, other draws
    assert aug.batch(x, y, 7, 0)[1] is y


def test_flip_mirrors_and_crop_shifts_with_zero_padding():
    x = np.random.default_rng(2).normal(size=(64, 60)).astype(np.float32)
    images = x.reshape(64, 2, 5, 6)
    flipped = augmenter(["flip"]).batch(x, None, 0, 0)[0].reshape(images.shape)
    mirrored = [np.array_equal(f, i[:, :, ::-1]) for f, i in zip(flipped, images)]
    kept = [np.array_equal(f, i) for f, i in zip(flipped, images)]
    assert all(a or b for a, b in zip(mirrored, kept)) and 10 < sum(mirrored) < 54
    cropped = augmenter(["crop 1"]).batch(x, None, 0, 0)[0].reshape(images.shape)
    shifts = set()
    for c, i in zip(cropped, images):
        padded = np.pad(i, ((0, 0), (1, 1), (1, 1)))
        (shift,) = [(dy, dx) for dy in range(3) for dx in range(3)
                    if np.array_equal(c, padded[:, dy:dy + 5, dx:dx + 6])]
        shifts.add(shift)
    assert len(shifts) == 9  # every offset of [−1, 1]² occurs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("digits") / "digits.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", path).returncode == 0
    return path


AUGMENT = ["--set", "model.hidden=[16]", "--set", "train.steps=20", "--set", "train.eval_every=10",
           "--set", 'data.augment=["flip", "crop 2"]']


def test_augmented_training_is_the_same_on_1_and_2_ranks_and_resumes_bit_exactly(tmp_path, digits):
    def train(n, name, *sets, resume=()):
        r = mpirun(n, "train", "--quiet", "--out", tmp_path / name, "--data", digits, *AUGMENT, *sets, *resume)
        assert r.returncode == 0, r.stderr
        return params(tmp_path / name)

    one, two = train(1, "one"), train(2, "two", "--set", "checkpoint.every=10")
    plain = train(1, "plain", "--set", "data.augment=[]")
    scale = np.abs(one).max()
    assert np.abs(one - two).max() <= 1e-5 * scale < np.abs(one - plain).max()
    ckpt = sorted(os.listdir(tmp_path / "two" / "checkpoints"))[0]  # step 10
    again = train(2, "again", resume=("--resume", str(tmp_path / "two" / "checkpoints" / ckpt)))
    assert np.array_equal(two, again)


def test_augmenting_samples_that_are_not_images_is_one_line(tmp_path, synth):
    r = mpirun(2, "train", "--quiet", "--out", tmp_path / "run", "--data", synth, *TINY,
               "--set", 'data.augment=["flip"]')
    assert r.returncode != 0 and not os.path.exists(tmp_path / "run" / "config.toml")
    assert r.error_lines() == [f"mpitrain: error: data.augment = ['flip']: augments images (channels, height, "
                               f"width); {synth} holds samples of shape (12,)"]


# -- lr-find ------------------------------------------------------------------------------------------------

def curve(stdout):
    rows = [line.split() for line in stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    return np.array([[float(v) for v in row[1:]] for row in rows])


def test_lr_find_stops_at_divergence_suggests_and_plots_the_same_on_1_and_2_ranks(tmp_path, synth):
    pytest.importorskip("matplotlib")
    args = ["lr-find", "--data", synth, "--set", "model.hidden=[8]", "--steps", 200, "--min-lr", 1e-4,
            "--max-lr", 1e4]
    one = mpirun(1, *args)
    two = mpirun(2, *args, "--plot", tmp_path / "lr")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = curve(one.stdout), curve(two.stdout)
    assert 10 < len(a) < 200 and abs(len(a) - len(b)) <= 1  # stopped when the loss diverged
    half = len(a) // 2  # before the blow-up, which amplifies the summation order's rounding
    assert np.allclose(a[:half], b[:half], rtol=1e-3, atol=1e-4)
    assert np.allclose(a[:, 0], 1e-4 * 1e8 ** (np.arange(len(a)) / 199), rtol=1e-3)  # exponential
    assert "stopped: the loss diverged at lr" in one.stdout
    (line,) = [x for x in one.stdout.splitlines() if x.startswith("suggested lr: ")]
    lr = float(line.split()[2])
    assert 1e-4 < lr < a[-1, 0] and np.isclose(a[:, 0], lr, rtol=5e-3).any()
    with open(tmp_path / "lr.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lr_find_bad_range_is_one_line(synth):
    r = mpirun(2, "lr-find", "--data", synth, "--min-lr", 1, "--max-lr", 0.1)
    assert r.returncode != 0
    assert r.error_lines() == ["mpitrain: error: lr-find: --min-lr 1 and --max-lr 0.1: expected 0 < min < max"]


def test_a_resumed_runs_events_hold_each_step_once(tmp_path, synth):
    """Resumed at step 10 of 20: TensorBoard drops the events past the checkpoint, as metrics.jsonl its lines."""
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    sets = [*TINY, *TB, "--set", "checkpoint.every=10"]
    assert mpirun(2, "train", "--quiet", "--out", out, "--data", synth, *sets).returncode == 0
    os.remove(out / "summary.json")
    os.remove(out / "model.h5")
    os.remove(out / "checkpoints" / sorted(os.listdir(out / "checkpoints"))[-1])  # back to step 10
    r = mpirun(2, "train", "--quiet", "--out", out, "--data", synth, *sets, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    got, want = scalars(out), logged(out, "step")
    assert [s for s, _ in want["train_loss"]] == [5, 10, 15, 20]
    for tag, points in want.items():
        assert close(got[tag], points), tag
