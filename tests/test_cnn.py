"""Convolutional networks end to end with real mpiexec: p ranks ≡ 1 rank, comm modes, accuracy, federated
rounds, resume and eval, on the embedded digits (1×8×8) and 1-d synthetic signals."""
import json
import os

import numpy as np
import pytest

from conftest import mpirun, params, summary

LENET = ["conv2d 6 3 same", "relu", "maxpool2d 2", "conv2d 12 3 valid", "relu", "flatten", "dense 32", "relu",
         "dense 10"]
CONV1D = ["conv1d 6 5 same", "relu", "maxpool1d 2", "conv1d 8 3 valid stride=2", "tanh", "flatten", "dense 4"]


def layers(stack):
    return ["model.kind=layers", "model.layers=" + json.dumps(stack)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """digits (feature_shape 1×8×8) and 40-long synthetic signals (4 classes)."""
    d = tmp_path_factory.mktemp("cnn")
    paths = {"digits": str(d / "digits.h5"), "signals": str(d / "signals.h5")}
    for args in (["--source", "digits", "--out", paths["digits"], "--partition", "dirichlet", "--clients", 8],
                 ["--source", "synthetic", "--samples", 1200, "--features", 40, "--classes", 4, "--out",
                  paths["signals"]]):
        r = mpirun(1, "prepare", *args)
        assert r.returncode == 0, r.stderr
    return paths


def run(n, command, out, data, *sets, resume=None, timeout=300):
    args = [command, "--quiet", "--out", out, "--set", f"data.path={data}"] + (["--resume", resume] if resume else [])
    for s in sets:
        args += ["--set", s]
    r = mpirun(n, *args, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return summary(out)


CASES = [("sgd", "digits", LENET, 4, "plain"), ("momentum", "signals", CONV1D, 3, "plain"),
         ("adam", "digits", LENET, 3, "plain"), ("momentum", "digits", LENET, 2, "overlap"),
         ("adam", "signals", CONV1D, 4, "sharded")]


@pytest.mark.parametrize("optimizer,data,stack,ranks,mode", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}-{c[4]}" for c in CASES])
def test_p_ranks_equal_one_rank_with_a_cnn(tmp_path, images, optimizer, data, stack, ranks, mode):
    sets = [*layers(stack), "train.steps=50", "train.global_batch=48", f"train.optimizer={optimizer}",
            "train.lr=0.005" if optimizer == "adam" else "train.lr=0.05"]
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    run(1, "train", one, images[data], *sets)
    s = run(ranks, "train", many, images[data], *sets, f"comm.mode={mode}")
    p1, pn = params(one), params(many)
    assert s["world_size"] == ranks and s["steps"] == 50
    assert np.max(np.abs(p1 - pn)) <= 1e-5 * np.abs(p1).max()
    from mpitrain.checkpoint import load_model
    from mpitrain.model import Model

    spec, _ = load_model(os.path.join(one, "model.h5"))  # not vacuous: the parameters moved
    assert np.max(np.abs(p1 - Model(spec).init_params(0))) > 1e-2 * np.abs(p1).max()


def test_a_small_cnn_learns_digits_resumes_bit_exactly_and_evaluates(tmp_path, images):
    stack = ["conv2d 32 3 same", "relu", "maxpool2d 2", "conv2d 64 3 same", "relu", "maxpool2d 2", "flatten",
             "dense 128", "relu", "dense 10"]
    sets = [*layers(stack), "train.epochs=40", "checkpoint.every=400"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    s = run(2, "train", full, images["digits"], *sets)
    assert s["test_accuracy"] >= 0.985, s["test_accuracy"]
    run(2, "train", cut, images["digits"], *sets)
    os.remove(os.path.join(cut, "model.h5"))
    ckpts = sorted(os.listdir(os.path.join(cut, "checkpoints")))
    os.remove(os.path.join(cut, "checkpoints", ckpts[-1]))  # back to step 400, then on to the end
    s2 = run(2, "train", cut, images["digits"], *sets, resume="auto")
    assert s2["resumed_from_step"] == int(ckpts[-2][5:14]) and np.array_equal(params(full), params(cut))
    r = mpirun(3, "eval", "--model", os.path.join(full, "model.h5"), "--data", images["digits"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-12)


def test_fedavg_with_a_cnn_on_a_dirichlet_partition(tmp_path, images):
    s = run(3, "federate", str(tmp_path / "f"), images["digits"], *layers(LENET), "fed.rounds=10",
            "fed.fraction=0.5", "fed.local_epochs=2", "train.optimizer=sgd", "train.lr=0.05")
    assert s["test_accuracy"] >= 0.8 and s["n_params"] > 0


def test_federated_cnn_with_secure_aggregation_and_record_level_dp_sgd(tmp_path, images):
    """The privacy layers see the CNN as one flat vector; DP-SGD clips each example's conv gradients."""
    s = run(3, "federate", str(tmp_path / "s"), images["digits"], *layers(LENET), "fed.rounds=2",
            "fed.fraction=0.5", "fed.local_epochs=1", "fed.secure_aggregation=true", "fed.dpsgd.noise_multiplier=1",
            "fed.dpsgd.clip=1", "fed.dp.noise_seed=3")
    assert s["secure_aggregation"] and s["record_epsilon"] > 0 and s["rounds"] == 2
