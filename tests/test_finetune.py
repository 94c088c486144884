"""Fine-tuning (train.init, --init-skip) and frozen tensors (train.freeze): a trained model is a better start
than the seeded one, a new head for another number of classes, frozen tensors keep their bits on 2 ranks,
the init model's standardisation travels, and a model that does not fit is one line."""
import sys

import h5py
import numpy as np
import pytest

from conftest import MPIEXEC, launch, params, summary

MLP = {"model.hidden": [16], "train.global_batch": 32, "train.lr": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a: 4 classes of a linear teacher on 6 features; b: a's classes 0-2 (3 classes, other statistics);
    c: a's samples as (2, 3); a model trained on a for 60 steps."""
    import mpitrain
    from mpitrain.data.prepare import prepare

    d = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(6, 4))
    x = rng.normal(size=(1200, 6)) * 2 + 1
    y = np.argmax((x - 1) @ teacher, axis=1)
    np.savez(d / "a.npz", x=x, y=y)
    np.savez(d / "b.npz", x=x[y < 3], y=y[y < 3])
    np.savez(d / "c.npz", x=x.reshape(-1, 2, 3), y=y)
    for name in "abc":
        prepare(f"npz:{d / name}.npz", str(d / f"{name}.h5"))
    s = mpitrain.train(overrides={"data.path": str(d / "a.h5"), "train.steps": 60, **MLP}, out=str(d / "a"))
    return {name: str(d / f"{name}.h5") for name in "abc"} | {"model": str(d / "a" / "model.h5"),
                                                            "accuracy": s["test_accuracy"], "dir": d}


def test_init_reaches_the_models_accuracy_sooner_than_scratch(files, tmp_path):
    import mpitrain

    run = {"data.path": files["a"], "train.steps": 3, **MLP}
    tuned = mpitrain.train(overrides={**run, "train.init": files["model"]}, out=str(tmp_path / "tuned"))
    scratch = mpitrain.train(overrides=run, out=str(tmp_path / "scratch"))
    assert files["accuracy"] > 0.8
    assert tuned["test_accuracy"] >= files["accuracy"] - 0.03 > scratch["test_accuracy"]


def test_init_skip_head_for_another_class_count_keeps_the_models_standardisation(files, tmp_path):
    """b has 3 classes: the head is fresh, the hidden layer comes from a, and b's rows are read in a's
    standardisation, which the new model.h5 keeps."""
    import mpitrain

    out = str(tmp_path / "b")
    s = mpitrain.train(overrides={"data.path": files["b"], "train.steps": 30, **MLP, "train.init": files["model"],
                                  "train.init_skip": ["head"], "train.freeze": ["layers.0"]}, out=out)
    assert s["test_accuracy"] > 0.8
    with h5py.File(files["model"], "r") as a, h5py.File(f"{out}/model.h5", "r") as b:
        for key in ("standardize/mean", "standardize/std"):
            np.testing.assert_array_equal(a[key][...], b[key][...])
        np.testing.assert_array_equal(a["params"][:6 * 16 + 16], b["params"][:6 * 16 + 16])  # layers.0, frozen
        with h5py.File(files["b"], "r") as f:  # b's own statistics differ
            assert not np.array_equal(f["standardize/mean"][...], a["standardize/mean"][...])
            raw = f["test/x"][...] * f["standardize/std"][...] + f["standardize/mean"][...]
            labels = f["test/y"][...]
    # trained on b's rows as a's were standardised: the model scores b's raw samples as train scored them
    assert np.mean(mpitrain.load_model(f"{out}/model.h5").predict(raw) == labels) == s["test_accuracy"]


def _tune(files, out, *args):
    r = launch([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data", files["a"], "--out", out,
                "--init", files["model"], "--set", "train.steps=5", "--set", "model.hidden=[16]",
                "--set", "train.optimizer=adamw", "--set", "train.weight_decay=0.1", "--set", "train.lr=0.01", *args])
    assert r.returncode == 0, r.stderr
    return summary(out), params(out)


HEAD = 6 * 16 + 16  # layers.0 (weight, bias) comes first in the flat vector, then layers.1 (the head)


@pytest.mark.parametrize("mode", ["plain", "sharded"])
def test_freeze_keeps_the_named_tensors_bit_identical_on_two_ranks(files, tmp_path, mode):
    """AdamW with weight decay on 2 ranks: the frozen head (layers.1) keeps the init model's bits; layers.0
    moves."""
    _, after = _tune(files, tmp_path / mode, "--set", 'train.freeze=["layers.1"]', "--set", f"comm.mode={mode}")
    before = params(files["dir"] / "a")
    np.testing.assert_array_equal(before[HEAD:], after[HEAD:])
    assert not np.any(before[:HEAD] == after[:HEAD])


def test_a_frozen_bottom_is_left_out_of_the_exchange(files, tmp_path):
    """Plain and hierarchical modes reduce only the gradient above the frozen tensors at the bottom of the
    vector, and train as sharded mode, which exchanges all of it, does."""
    plain, p = _tune(files, tmp_path / "plain", "--set", 'train.freeze=["layers.0"]')
    hier, h = _tune(files, tmp_path / "hier", "--set", 'train.freeze=["layers.0"]', "--set", "comm.mode=hierarchical")
    _, q = _tune(files, tmp_path / "sharded", "--set", 'train.freeze=["layers.0"]', "--set", "comm.mode=sharded")
    n = HEAD + 16 * 4 + 4
    # the head and [loss | hits | 2 flags] on 2 ranks; hierarchical: a Reduce and a Bcast in the one node
    assert plain["comm_bytes_per_step"] == hier["comm_bytes_per_step"] == 4 * (n - HEAD + 4)
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(h, q)
    np.testing.assert_array_equal(p[:HEAD], params(files["dir"] / "a")[:HEAD])
    assert not np.any(p[HEAD:] == params(files["dir"] / "a")[HEAD:])


def _refused(tmp_path, **overrides):
    """The one line of a run refused in-process (the 2-rank test below shows every rank ends with it)."""
    import mpitrain

    with pytest.raises(mpitrain.MpitrainError) as e:
        mpitrain.train(overrides={"train.steps": 2, **overrides}, out=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # refused before the run folder is made
    return str(e.value)


def test_a_model_of_another_architecture_is_one_line_on_every_rank(files, tmp_path):
    m = files["model"]
    r = launch([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data", files["a"], "--out",
                tmp_path / "x", "--init", m, "--set", "model.hidden=[8]"])
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: {m}: tensor layers.0.weight is (6, 8) in this mlp model, the mlp model there has "
        "(6, 16) (leave it at its fresh initialisation with --init-skip layers.0.weight or --init-skip head)"]
    assert not (tmp_path / "x").exists()


def test_a_model_that_does_not_fit_is_one_line(files, tmp_path):
    m = files["model"]
    # another number of classes without --init-skip head
    assert _refused(tmp_path, **{"data.path": files["b"], "train.init": m, "model.hidden": [16]}) == (
        f"{m}: tensor layers.1.weight is (16, 3) in this mlp model, the mlp model there has (16, 4) (leave it at "
        "its fresh initialisation with --init-skip layers.1.weight or --init-skip head)")
    # a softmax model has no hidden layer: its one tensor pair sits where the mlp's first layer was
    assert _refused(tmp_path, **{"data.path": files["a"], "train.init": m, "model.kind": "softmax"}).startswith(
        f"{m}: tensor layers.0.weight is (6, 4) in this softmax model, the mlp model there has (6, 16)")
    assert _refused(tmp_path, **{"data.path": files["c"], "train.init": m}) == (
        f"{m}: the model takes samples of shape [6], {files['c']} has [2, 3]")


def test_unknown_names_are_one_line(files, tmp_path):
    expected = ("names no tensor of this mlp model (expected 'head', a tensor name such as 'layers.0.weight' or "
                "a layer: layers.0, layers.1)")
    run = {"data.path": files["a"], "model.hidden": [16]}
    assert _refused(tmp_path, **run, **{"train.freeze": ["layers.0", "layer.1"]}) == (
        f"train.freeze: 'layer.1' {expected}")
    assert _refused(tmp_path, **run, **{"train.init": files["model"], "train.init_skip": ["layers.2"]}) == (
        f"train.init_skip: 'layers.2' {expected}")
    assert _refused(tmp_path, **run, **{"train.freeze": ["layers"]}) == (
        "train.freeze = ['layers'] freezes every tensor of the model: nothing would train")


def test_batchnorm_statistics_come_along_by_name(tmp_path):
    """A resnet8's parameters and running statistics are copied tensor by tensor; --init-skip of a BatchNorm
    layer leaves its statistics fresh, head leaves the classifier fresh."""
    from mpitrain.checkpoint import save_model
    from mpitrain.data.prepare import prepare
    from mpitrain.data.shard import DataFile
    from mpitrain.finetune import Init
    from mpitrain.model import Model, ModelSpec

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "img.npz", x=rng.normal(size=(40, 3, 8, 8)), y=np.arange(40) % 3)
    prepare(f"npz:{tmp_path / 'img.npz'}", str(tmp_path / "img.h5"))
    model = Model(ModelSpec("resnet8", 192, 3, feature_shape=(3, 8, 8)))
    source = Model(ModelSpec("resnet8", 192, 10, feature_shape=(3, 8, 8)))  # trained on 10 classes
    theirs = rng.normal(size=source.spec.n_params).astype(np.float32)
    stats = rng.normal(size=len(source.ctx.state)).astype(np.float32)
    save_model(str(tmp_path / "m.h5"), source.spec, theirs, None, stats)
    init = Init(str(tmp_path / "m.h5"), model, DataFile(str(tmp_path / "img.h5")), ["head", "layers.1"])
    params, state = model.init_params(0), model.ctx.state.copy()
    fresh_params, fresh_state = params.copy(), state.copy()
    init.apply(params, state)
    for e in model.table:  # layers.1 is the first BatchNorm (weight, bias and statistics), layers.10 the head
        mine = model.table.view(params, e.name)
        there = (model.table.view(fresh_params, e.name) if e.name.startswith(("layers.1.", "layers.10."))
                 else source.table.view(theirs, e.name))
        np.testing.assert_array_equal(mine, there, err_msg=e.name)
    for e in model.state_table:
        mine = model.state_table.view(state, e.name)
        there = (model.state_table.view(fresh_state, e.name) if e.name.startswith("layers.1.")
                 else source.state_table.view(stats, e.name))
        np.testing.assert_array_equal(mine, there, err_msg=e.name)
    assert init.describe() == f"starting from {tmp_path / 'm.h5'}: {len(model.table.entries) - 4} tensor(s) " \
                              "copied, 6 left at their fresh initialisation"


def test_a_resume_wins_over_init(files, tmp_path):
    """Resumed from step 2 of a fine-tuning run, with train.init still set: the checkpoint's parameters, not
    the init model's, and the same model as the run that went through."""
    import mpitrain

    run = {"data.path": files["a"], "train.steps": 4, **MLP, "train.init": files["model"], "checkpoint.every": 2,
           "checkpoint.keep": 2}
    mpitrain.train(overrides=run, out=str(tmp_path / "through"))
    mpitrain.train(overrides=run, out=str(tmp_path / "resumed"),
                   resume=str(tmp_path / "through" / "checkpoints" / "ckpt-000000002.h5"))
    np.testing.assert_array_equal(params(tmp_path / "through"), params(tmp_path / "resumed"))


@pytest.mark.parametrize("stream", [False, True])
def test_training_batches_come_in_the_models_standardisation(files, stream):
    """Every row of every batch, read in memory or by the stream reader process, is b's row restandardised
    with a's statistics."""
    from mpitrain.comm import Comm
    from mpitrain.config import DataConfig
    from mpitrain.data.shard import DataFile, open_shard

    data = DataFile(files["b"])
    with h5py.File(files["model"], "r") as f:
        stats = f["standardize/mean"][...], f["standardize/std"][...]
    data.adopt(stats)
    rows = {r.tobytes() for r in data.read("train", 0, data.n_train, 0)[0]}
    shard = open_shard(Comm(), data, DataConfig(path=files["b"], stream=stream), 32, 0, 0, 1)
    try:
        for s in range(shard.steps_per_epoch):
            assert all(r.tobytes() in rows for r in shard.get(0, s)[0])
    finally:
        shard.close()


def test_head_is_the_layer_whose_tensors_the_output_uses():
    """An MLP's head is its last dense layer; a GPT's output layer computes with the embedding layer's
    tensors (tied), so its head is that layer, not the final LayerNorm."""
    from mpitrain.finetune import select
    from mpitrain.model import Model, ModelSpec

    assert select(Model(ModelSpec("mlp", 6, 4, (16,))), ["head"], "k") == {"layers.1.weight", "layers.1.bias"}
    gpt = Model(ModelSpec("gpt", 16, 20, feature_shape=(16,), task="lm", n_layer=1, n_embd=8, n_head=2))
    assert select(gpt, ["head"], "k") == {"layers.0.wte", "layers.0.wpe"}
