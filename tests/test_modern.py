"""Modern networks end to end with real mpiexec: p ranks ≡ 1 rank for a GPT with dropout (AdamW, clipping)
and for residual networks with BatchNorm (SyncBatchNorm) and GroupNorm; a language model learns the embedded
text and its samples look like it; checkpoints resume bit-exactly with dropout and BatchNorm; combinations
that cannot work are one line."""
import collections
import json
import math
import os

import numpy as np
import pytest

from conftest import mpirun, params, summary

GPT = ["model.kind=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
       "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.1", "train.clip_norm=0.5",
       "train.global_batch=8", "train.steps=20", "train.eval_every=20"]
# lr 1e-3 with AdamW: a setting where float32 summation order stays at rounding level over 20 steps
# (a ReLU network at a high learning rate would amplify it tenfold every ten steps: chaos, not a defect)
RES = ["train.optimizer=adamw", "train.lr=0.001", "train.global_batch=24", "train.steps=20", "train.eval_every=20"]


def stack(norm):
    return ["model.kind=layers", "model.layers=" + json.dumps(
        ["conv2d 8 3 same bias=false", norm, "relu", f"residual [conv2d 8 3 same bias=false, {norm}, relu, "
         f"conv2d 8 3 same bias=false, {norm}]", "relu", f"residual [conv2d 16 3 same stride=2 bias=false, {norm}] "
         f"shortcut [conv2d 16 1 stride=2 bias=false, {norm}]", "relu", "dropout 0.1", "globalavgpool", "dense 10"])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 30,000-character text (the start of Python's documentation topics) and the digits (1×8×8)."""
    import pydoc_data.topics as topics

    d = tmp_path_factory.mktemp("modern")
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:30_000]
    (d / "text.txt").write_text(text, encoding="utf-8")
    paths = {"text": str(d / "text.h5"), "digits": str(d / "digits.h5")}
    for args in (["--source", f"text:{d / 'text.txt'}", "--out", paths["text"]],
                 ["--source", "digits", "--out", paths["digits"]]):
        r = mpirun(1, "prepare", *args)
        assert r.returncode == 0, r.stderr
    return paths


def run(n, out, data, *sets, resume=None, timeout=300):
    args = ["train", "--quiet", "--out", out, "--set", f"data.path={data}"] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return summary(out)


def close(one, many):
    p1, pn = params(one), params(many)
    return float(np.max(np.abs(p1 - pn)) / np.abs(p1).max())


@pytest.mark.parametrize("ranks,mode", [(2, "plain"), (4, "sharded")])
def test_p_ranks_equal_one_rank_with_a_gpt_and_dropout(tmp_path, data, ranks, mode):
    sets = [*GPT, "model.dropout=0.1"]
    run(1, str(tmp_path / "one"), data["text"], *sets)
    s = run(ranks, str(tmp_path / "many"), data["text"], *sets, f"comm.mode={mode}")
    assert s["world_size"] == ranks and close(str(tmp_path / "one"), str(tmp_path / "many")) <= 1e-5
    run(1, str(tmp_path / "nodrop"), data["text"], *GPT)  # not vacuous: dropout changes the result
    assert close(str(tmp_path / "one"), str(tmp_path / "nodrop")) > 1e-3


@pytest.mark.parametrize("norm,ranks,mode", [("batchnorm", 2, "plain"), ("batchnorm", 4, "overlap"),
                                             ("groupnorm 2", 3, "plain")])
def test_p_ranks_equal_one_rank_with_a_residual_network(tmp_path, data, norm, ranks, mode):
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    run(1, one, data["digits"], *RES, *stack(norm))
    run(ranks, many, data["digits"], *RES, *stack(norm), f"comm.mode={mode}")
    assert close(one, many) <= 1e-5
    if norm == "batchnorm":  # the running statistics too (SyncBatchNorm: the same batch statistics)
        import h5py

        with h5py.File(os.path.join(one, "model.h5")) as a, h5py.File(os.path.join(many, "model.h5")) as b:
            s1, s2 = a["state"][...], b["state"][...]
        assert np.abs(s1 - s2).max() <= 1e-5 * np.abs(s1).max() and np.abs(s1[:8]).max() > 0


def test_resume_is_bit_exact_with_dropout_and_batchnorm(tmp_path, data):
    sets = [*stack("batchnorm"), *RES]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    run(2, whole, data["digits"], *sets)
    run(2, part, data["digits"], *sets[:-2], "train.steps=20", "checkpoint.every=10", "train.eval_every=10")
    import h5py

    ckpt = sorted(os.listdir(os.path.join(part, "checkpoints")))[0]  # step 10: resume from it into a new run
    again = str(tmp_path / "again")
    run(2, again, data["digits"], *sets[:-2], "train.steps=20", "train.eval_every=10",
        resume=os.path.join(part, "checkpoints", ckpt))
    assert np.array_equal(params(whole), params(again))
    with h5py.File(os.path.join(whole, "model.h5")) as a, h5py.File(os.path.join(again, "model.h5")) as b:
        assert np.array_equal(a["state"][...], b["state"][...])


def test_a_language_model_learns_the_embedded_text(tmp_path, cache_home):
    """The default text: a 2-layer GPT beats the unigram model (3.25 nats/char) by a wide margin in 300 steps,
    and 3 of 5 character trigrams of its samples occur in the text (random characters: ~2 %)."""
    out = str(tmp_path / "gpt")
    args = ["train", "--quiet", "--out", out, "--set", "model.kind=gpt", "--set", "model.n_layer=2", "--set",
            "model.n_embd=64", "--set", "model.block_size=32", "--set", "train.steps=300", "--set",
            "train.global_batch=16", "--set", "train.lr=0.003", "--set", "train.warmup_steps=0", "--set",
            "train.eval_every=300"]
    r = mpirun(2, *args, env={"XDG_CACHE_HOME": cache_home}, timeout=600)
    assert r.returncode == 0, r.stderr
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    counts = collections.Counter(text)
    unigram = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())
    s = summary(out)
    assert s["test_loss"] < unigram - 0.8, (s["test_loss"], unigram)
    import mpitrain

    sample = mpitrain.load_model(os.path.join(out, "model.h5")).generate("The ", tokens=300, temperature=0.8)
    trigrams = {text[i:i + 3] for i in range(len(text) - 2)}
    assert len(sample) == 300 and sum(sample[i:i + 3] in trigrams for i in range(298)) / 298 >= 0.6


def test_combinations_that_cannot_work_are_one_line(tmp_path, data):
    for name, sets, needle in (("text", [*GPT, "comm.mode=fsdp"], "shares the parameters of"),
                               ("text", [*GPT, "parallel.tensor=2", "train.clip_norm=0"], "cannot be split yet"),
                               ("text", [*GPT, "model.block_size=20000"], "block"),
                               ("text", ["model.kind=resnet8"], "a language model needs model.kind = 'gpt'"),
                               ("digits", ["model.kind=gpt"], "it needs a token stream")):
        r = mpirun(2, "train", "--quiet", "--out", str(tmp_path / "x"), "--set", f"data.path={data[name]}",
                   *[a for s in sets for a in ("--set", s)])
        lines = r.error_lines()
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], r.stderr


def test_a_resnet_with_groupnorm_learns_the_digits(tmp_path, data):
    s = run(2, str(tmp_path / "r"), data["digits"], "model.kind=resnet8", "model.norm=group", "train.epochs=5",
            "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.01", "train.global_batch=32")
    assert s["test_accuracy"] >= 0.97


@pytest.mark.parametrize("mode", ["hierarchical", "fp16", "topk", "local_sgd"])
def test_every_comm_mode_trains_a_gpt(tmp_path, data, mode):
    """The exchanges that are not exact (16-bit, top-k, local SGD) still train: the loss falls."""
    sets = [*GPT, "train.steps=30", "train.eval_every=30", f"comm.mode={mode}"]
    if mode == "local_sgd":
        sets += ["train.clip_norm=0", "comm.local_steps=4"]
    out = str(tmp_path / mode)
    s = run(2, out, data["text"], *sets)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
    assert s["comm_mode"] == mode and losses[-1] < losses[0] - 0.3


def test_federated_rounds_with_a_residual_network(tmp_path, data):
    """GroupNorm federates (dropout keyed per client and step); BatchNorm's unaggregated statistics and DP-SGD
    on layers without per-example norms are one line each."""
    path = str(tmp_path / "parts.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", path, "--partition", "iid", "--clients", 4).returncode == 0
    base = ["federate", "--quiet", "--set", f"data.path={path}", "--set", "fed.rounds=2", "--set", "fed.fraction=1",
            "--set", "fed.local_steps=3", "--set", "train.optimizer=adamw", "--set", "train.lr=0.003"]
    kind, layers = stack("groupnorm 2")
    r = mpirun(3, *base, "--out", str(tmp_path / "gn"), "--set", kind, "--set", layers)
    assert r.returncode == 0, r.stderr
    assert summary(str(tmp_path / "gn"))["rounds"] == 2
    for sets, needle in ((["model.kind=resnet8"], "keeps running statistics"),
                         (["model.kind=resnet8", "model.norm=group", "fed.dpsgd.noise_multiplier=1"],
                          "has no per-example gradient norms")):
        r = mpirun(3, *base, "--out", str(tmp_path / "x"), *[a for s in sets for a in ("--set", s)])
        assert r.returncode != 0 and len(r.error_lines()) == 1 and needle in r.error_lines()[0], r.stderr
