"""Learning-rate schedules, optimizers, configuration loading, and the sharded batch plan."""
import dataclasses
import math

import numpy as np
import pytest

from mpitrain import config
from mpitrain.config import Config, DataConfig, ModelConfig, TrainConfig
from mpitrain.data.prepare import prepare
from mpitrain.data.shard import DataFile, TrainShard, block
from mpitrain.errors import MpitrainError
from mpitrain.kernels import cpu
from mpitrain.optim import OPTIMIZERS, SCHEDULES, Optimizer, schedule


# --------------------------------------------------------------------------------------------------
# 1. schedule()
# --------------------------------------------------------------------------------------------------

def test_schedule_names():
    assert set(SCHEDULES) == {"constant", "step", "cosine"}


def test_constant():
    lr_at = schedule("constant", 0.3, total_steps=50)
    assert [lr_at(s) for s in (0, 1, 25, 49, 50, 1000)] == [0.3] * 6


@pytest.mark.parametrize("kind", SCHEDULES)
def test_warmup_ramps_linearly(kind):
    """As Hugging Face's get_linear_schedule_with_warmup: step i < W takes lr·i/W, step W the peak."""
    lr, w = 0.4, 8
    lr_at = schedule(kind, lr, total_steps=100, warmup_steps=w, step_size=10, gamma=0.5)
    ramp = np.array([lr_at(s) for s in range(w)])
    np.testing.assert_allclose(ramp, lr * np.arange(w) / w, rtol=1e-12)
    assert ramp[0] == 0.0  # from 0
    np.testing.assert_allclose(np.diff(ramp), lr / w, rtol=1e-12)  # linear
    assert ramp[-1] < lr  # the peak is not reached inside the warmup
    assert lr_at(w) == pytest.approx(lr)  # and the schedule proper starts from the base rate


@pytest.mark.parametrize("lr_min", [0.0, 0.01])
def test_warmup_then_cosine_exact_sequence(lr_min):
    lr, w, total = 0.8, 4, 8
    lr_at = schedule("cosine", lr, total_steps=total, warmup_steps=w, lr_min=lr_min)
    c = [lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * s / 4)) for s in range(5)]  # 4 steps left
    expected = [0.0, 0.2, 0.4, 0.6, *c]  # steps 0…8: the peak once (step 4), lr_min at step 8 = total
    got = [lr_at(s) for s in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert np.isclose(got, lr, rtol=1e-12, atol=0).sum() == 1


def test_step_decay():
    lr_at = schedule("step", 1.0, total_steps=100, step_size=10, gamma=0.5)
    got = [lr_at(s) for s in range(35)]
    expected = [1.0] * 10 + [0.5] * 10 + [0.25] * 10 + [0.125] * 5
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_step_decay_after_warmup():
    w = 5
    lr_at = schedule("step", 0.2, total_steps=100, warmup_steps=w, step_size=7, gamma=0.1)
    assert lr_at(w + 6) == pytest.approx(0.2)
    assert lr_at(w + 7) == pytest.approx(0.02)
    assert lr_at(w + 14) == pytest.approx(0.002)


@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize("lr_min", [0.0, 0.01])
def test_cosine(warmup, lr_min):
    lr, total = 0.5, 110
    lr_at = schedule("cosine", lr, total_steps=total, warmup_steps=warmup, lr_min=lr_min)
    assert lr_at(warmup) == pytest.approx(lr)
    mid = warmup + (total - warmup) // 2
    assert (total - warmup) % 2 == 0
    assert lr_at(mid) == pytest.approx((lr + lr_min) / 2)
    assert lr_at(total) == pytest.approx(lr_min, abs=1e-12)  # reaches lr_min at the end
    assert lr_at(total - 1) == pytest.approx(lr_min, abs=1e-3 * lr)  # the last step taken is ~lr_min
    assert lr_at(total + 50) == pytest.approx(lr_min, abs=1e-12)  # and stays there
    decay = np.array([lr_at(s) for s in range(warmup, total + 1)])
    assert np.all(np.diff(decay) <= 1e-15)  # monotone
    assert np.all(decay >= lr_min - 1e-15)
    # the cosine shape itself, at a quarter of the way
    q = warmup + (total - warmup) / 4
    if q == int(q):
        assert lr_at(int(q)) == pytest.approx(lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_name():
    with pytest.raises(MpitrainError, match=r"train\.schedule") as e:
        schedule("linear", 0.1, 100)
    assert "linear" in str(e.value)


# --------------------------------------------------------------------------------------------------
# 2. Optimizer
# --------------------------------------------------------------------------------------------------

def test_unknown_optimizer():
    with pytest.raises(MpitrainError, match=r"train\.optimizer") as e:
        Optimizer(cpu, "rmsprop", 10)
    assert "rmsprop" in str(e.value)


@pytest.mark.parametrize("name,slots", [("sgd", set()), ("momentum", {"v"}), ("nesterov", {"v"}),
                                        ("adam", {"m", "v"})])
def test_optimizer_state(name, slots):
    assert name in OPTIMIZERS
    opt = Optimizer(cpu, name, 17)
    assert set(opt.state) == slots
    for vec in opt.state.values():
        assert vec.shape == (17,) and vec.dtype == np.float32 and not vec.any()
    assert opt.t == 0


def _reference_steps(name, p, grads, lr, scale, wd, mu=0.9, b1=0.9, b2=0.999, eps=1e-8):
    p = p.astype(np.float64).copy()
    v = np.zeros_like(p)
    m = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = scale * g.astype(np.float64) + wd * p
        if name == "sgd":
            p -= lr * g
        elif name == "adam":
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        else:
            v = mu * v + g
            p -= lr * (g + mu * v if name == "nesterov" else v)
    return p


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if o != "adamw"])  # adamw: tests/test_adamw.py
def test_optimizer_update(name):
    r = np.random.default_rng(5)
    n = 13
    p0 = r.standard_normal(n).astype(np.float32)
    grads = [r.standard_normal(n).astype(np.float32) for _ in range(4)]
    opt = Optimizer(cpu, name, n, momentum=0.8, beta1=0.85, beta2=0.99, eps=1e-6, weight_decay=0.01)
    p = p0.copy()
    for g in grads:
        opt.update(p, g, np.float64(0.03), 0.5)
    assert opt.t == 4
    expected = _reference_steps(name, p0, grads, 0.03, 0.5, 0.01, mu=0.8, b1=0.85, b2=0.99, eps=1e-6)
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 3. config.load
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_defaults(tmp_path):
    cfg = config.load()
    assert cfg == Config()
    assert cfg.data.path == str(tmp_path / "cache" / "mpitrain" / "digits.h5")
    assert cfg.model == ModelConfig(kind="mlp", hidden=[128], activation="relu")
    t = cfg.train
    assert (t.global_batch, t.epochs, t.steps, t.lr, t.optimizer, t.schedule) == (64, 40, 0, 0.05, "momentum", "cosine")
    assert isinstance(t.lr, float) and isinstance(t.global_batch, int) and t.scale_lr is False
    assert config.load(None, []) == cfg


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_toml_file_overrides(tmp_path):
    path = write(tmp_path, """
[data]
path = "/data/x.h5"

[model]
kind = "mlp"
hidden = [32, 16]
activation = "tanh"

[train]
global_batch = 32
lr = 1
scale_lr = true
optimizer = "adam"
weight_decay = 0
""")
    cfg = config.load(path)
    assert cfg.data == DataConfig(path="/data/x.h5")
    assert cfg.model == ModelConfig(kind="mlp", hidden=[32, 16], activation="tanh")
    assert cfg.train.global_batch == 32
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is accepted for a float
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.scale_lr is True and cfg.train.optimizer == "adam"
    # everything else keeps its default
    untouched = {"global_batch", "lr", "scale_lr", "optimizer", "weight_decay"}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in untouched:
            assert getattr(cfg.train, f.name) == getattr(TrainConfig(), f.name), f.name

    # --set wins over the file
    cfg2 = config.load(path, ["train.global_batch=16", "model.hidden=[8]"])
    assert cfg2.train.global_batch == 16 and cfg2.model.kind == "mlp" and cfg2.model.hidden == [8]
    with pytest.raises(MpitrainError, match="model.activation has no effect: model.kind = 'softmax'"):
        config.load(path, ["model.kind=softmax"])  # the file's mlp settings would be ignored


def test_set_overrides_parse_values():
    cfg = config.load(overrides=[
        "train.global_batch=128",
        "train.lr=0.25",
        "train.momentum = 0.5",
        "train.scale_lr=true",
        "model.hidden=[64, 32]",
        "train.optimizer=nesterov",          # bare word → string
        'model.activation="tanh"',           # quoted TOML string
        "data.path=/tmp/some dir/d.h5",      # bare, with a space and slashes
        "train.weight_decay=0",              # int → float
        "train.steps=7",
    ])
    t = cfg.train
    assert t.global_batch == 128 and type(t.global_batch) is int
    assert t.lr == 0.25 and t.momentum == 0.5
    assert t.scale_lr is True
    assert cfg.model.hidden == [64, 32]
    assert t.optimizer == "nesterov" and cfg.model.activation == "tanh"
    assert cfg.data.path == "/tmp/some dir/d.h5"
    assert t.weight_decay == 0.0 and type(t.weight_decay) is float
    assert t.steps == 7
    assert config.load(overrides=["model.hidden=48"]).model.hidden == [48]  # a scalar becomes a list
    assert config.load(overrides=["data.path=/a=b.h5"]).data.path == "/a=b.h5"  # split on the first '='
    assert config.load(overrides=["train.scale_lr=false"]).train.scale_lr is False


@pytest.mark.parametrize("override,needles", [
    ("bogus.key=1", ["bogus"]),
    ("train.bogus=1", ["train.bogus"]),
    ("model.hiden=[3]", ["model.hiden"]),
    ("train.global_batch=x", ["train.global_batch", "integer"]),
    ('train.global_batch="64"', ["train.global_batch", "integer"]),
    ("train.global_batch=1.5", ["train.global_batch", "integer"]),
    ("train.seed=true", ["train.seed", "integer"]),
    ("train.lr=true", ["train.lr", "number"]),
    ("train.lr=fast", ["train.lr", "number"]),
    ("train.scale_lr=1", ["train.scale_lr", "true or false"]),
    ("train.scale_lr=yes", ["train.scale_lr"]),
    ('model.hidden=[1, "a"]', ["model.hidden", "integer"]),
    ("model.hidden=[1.5]", ["model.hidden"]),
    ("train.lr", ["train.lr", "section.key=value"]),
    ("lr=0.1", ["lr=0.1", "section.key=value"]),
    ("=3", ["section.key=value"]),
])
def test_set_errors(override, needles):
    with pytest.raises(MpitrainError) as e:
        config.load(overrides=[override])
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize("text,needles", [
    ("[bogus]\nx = 1\n", ["bogus"]),
    ("[train]\nbogus = 1\n", ["train.bogus"]),
    ('[train]\nglobal_batch = "x"\n', ["train.global_batch"]),
    ("[train]\nlr = true\n", ["train.lr"]),
    ("[model]\nhidden = [1, 2.5]\n", ["model.hidden"]),
    ("lr = 0.1\n", ["lr", "table"]),
])
def test_file_errors(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(MpitrainError) as e:
        config.load(path)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    if "table" in needles or "bogus" in text:
        assert path in str(e.value)  # the file is named too


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(MpitrainError, match="not found") as e:
        config.load(path)
    assert path in str(e.value)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[train\nlr = = 3\n")
    with pytest.raises(MpitrainError, match="TOML") as e:
        config.load(path)
    assert path in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("train.global_batch=0", "train.global_batch"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.momentum=1.0", "train.momentum"),
    ("train.beta2=-0.1", "train.beta2"),
    ("train.eps=-1e-8", "train.eps"),
    ("train.steps=-1", "train.steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.step_size=0", "train.step_size"),
    ("train.log_every=-2", "train.log_every"),
])
def test_validate_ranges(override, key):
    with pytest.raises(MpitrainError) as e:
        config.load(overrides=[override])
    assert key in str(e.value)
    cfg = Config()
    section, _, rest = override.partition(".")
    name, _, value = rest.partition("=")
    setattr(cfg.train, name, type(getattr(cfg.train, name))(float(value)))
    with pytest.raises(MpitrainError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_validate_epochs_or_steps():
    with pytest.raises(MpitrainError, match=r"train\.epochs"):
        config.load(overrides=["train.epochs=0"])
    cfg = config.load(overrides=["train.steps=5"])  # steps alone is enough: it replaces epochs
    assert cfg.train.steps == 5
    with pytest.raises(MpitrainError, match="train.epochs has no effect: train.steps = 5 sets the length"):
        config.load(overrides=["train.epochs=0", "train.steps=5"])
    assert Config().validate() is not None


@pytest.mark.parametrize("overrides", [
    [],
    ["train.lr=0.125", "train.eps=1e-08", "train.weight_decay=3e-05", "train.scale_lr=true",
     "model.hidden=[7, 5, 3]", "model.activation=tanh", "train.optimizer=adam", "train.seed=12345",
     "train.global_batch=1000", "train.lr=1"],
    ['data.path="C:\\\\runs\\\\a \\"quoted\\" dir\\\\d.h5"'],
    ["data.path=/tmp/ünïcødé/d.h5", "model.hidden=[]", "train.schedule=step", "train.gamma=0.3333333333333333"],
])
def test_to_toml_round_trip(tmp_path, overrides):
    cfg = config.load(overrides=overrides)
    text = config.to_toml(cfg)
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    back = config.load(str(path))
    assert back == cfg
    for sec in ("data", "model", "train"):
        a, b = getattr(cfg, sec), getattr(back, sec)
        for f in dataclasses.fields(a):
            assert type(getattr(a, f.name)) is type(getattr(b, f.name)), f"{sec}.{f.name}"
    assert config.to_toml(back) == text


def test_round_trip_quoted_path_value():
    cfg = config.load(overrides=['data.path="C:\\\\runs\\\\a \\"quoted\\" dir\\\\d.h5"'])
    assert cfg.data.path == 'C:\\runs\\a "quoted" dir\\d.h5'


# --------------------------------------------------------------------------------------------------
# 4. TrainShard / batch plan
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datafiles(tmp_path_factory):
    """Real prepared HDF5 files, keyed by their number of training samples."""
    d = tmp_path_factory.mktemp("data")
    files = {}
    for samples in (23, 50, 128):
        path = str(d / f"syn{samples}.h5")
        prepare("synthetic", path, samples=samples, features=3, classes=3, seed=1)
        df = DataFile(path)
        files[df.n_train] = df
    assert sorted(files) == [18, 40, 102]
    yield files
    for df in files.values():
        df.close()


PLAN_CASES = [  # (n, global_batch, size): even and uneven splits of samples, strata and ranks
    (40, 8, 1), (40, 8, 4), (40, 7, 3), (40, 10, 3), (40, 40, 7), (40, 13, 13),
    (102, 16, 5), (102, 13, 4), (102, 5, 5), (102, 64, 6), (102, 3, 2),
    (18, 18, 18), (18, 4, 3), (18, 5, 2),
]


@pytest.mark.parametrize("n,B,size", PLAN_CASES)
def test_batch_plan_independent_of_ranks(datafiles, n, B, size):
    data, seed = datafiles[n], 11
    x_all = data.f["train/x"][:]
    y_all = data.f["train/y"][:]
    shards = [TrainShard(data, B, r, size, seed) for r in range(size)]
    single = TrainShard(data, B, 0, 1, seed)
    assert (single.lo, single.hi, single.batch) == (0, n, B)

    # hyperslabs tile [0, n) contiguously, and each rank holds exactly its rows
    assert shards[0].lo == 0 and shards[-1].hi == n
    for a, b in zip(shards, shards[1:]):
        assert a.hi == b.lo
    for s in shards:
        assert s.lo < s.hi
        np.testing.assert_array_equal(s.x, x_all[s.lo:s.hi])
        np.testing.assert_array_equal(s.y, y_all[s.lo:s.hi])

    # per-step local batch: ⌊B/size⌋ or ⌈B/size⌉, summing to B
    sizes = [s.batch for s in shards]
    assert sum(sizes) == B and set(sizes) <= {B // size, -(-B // size)}
    assert all(s.steps_per_epoch == n // B for s in shards) and single.steps_per_epoch == n // B

    bounds = np.array([j * n // B for j in range(B + 1)])
    for epoch in range(3):
        ref = single.epoch_order(epoch)
        assert ref.shape == (n // B, B)
        orders = [s.epoch_order(epoch) for s in shards]
        for s, o in zip(shards, orders):
            assert o.shape == (n // B, s.batch)
            assert o.min() >= 0 and o.max() < s.hi - s.lo
        glob = np.concatenate([s.lo + o for s, o in zip(shards, orders)], axis=1)
        # the union over ranks of each step's samples is the single-rank step
        np.testing.assert_array_equal(np.sort(glob, axis=1), np.sort(ref, axis=1))
        # no sample twice in an epoch; each step takes one sample from every stratum
        assert len(np.unique(glob)) == glob.size
        strata = np.searchsorted(bounds, glob, side="right") - 1
        np.testing.assert_array_equal(np.sort(strata, axis=1), np.tile(np.arange(B), (n // B, 1)))
        # batch_at gathers exactly those rows; the union of the rank batches is the single-rank batch
        for step in (0, n // B - 1):
            xs, ys = [], []
            for s, o in zip(shards, orders):
                xb, yb = s.batch_at(o[step])
                assert xb.shape == (s.batch, data.n_features) and xb.dtype == np.float32
                np.testing.assert_array_equal(xb, x_all[s.lo + o[step]])
                np.testing.assert_array_equal(yb, y_all[s.lo + o[step]])
                xs.append(xb.copy())
                ys.append(yb.copy())
            xs1, ys1 = single.batch_at(ref[step])
            key = np.lexsort(np.column_stack([np.concatenate(xs), np.concatenate(ys)]).T)
            key1 = np.lexsort(np.column_stack([xs1, ys1]).T)
            np.testing.assert_array_equal(np.concatenate(xs)[key], xs1[key1])
            np.testing.assert_array_equal(np.concatenate(ys)[key], ys1[key1])


@pytest.mark.parametrize("n,B,size", [(102, 13, 4), (40, 7, 3), (18, 4, 3)])
def test_epoch_and_seed_change_the_order(datafiles, n, B, size):
    data = datafiles[n]

    def plan(seed, epoch):
        return np.concatenate([s.lo + s.epoch_order(epoch)
                               for s in (TrainShard(data, B, r, size, seed) for r in range(size))], axis=1)

    e0, e1, e2 = plan(3, 0), plan(3, 1), plan(3, 2)
    assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2) and not np.array_equal(e0, e2)
    np.testing.assert_array_equal(plan(3, 1), e1)  # same seed, same epoch: same order
    assert not np.array_equal(plan(4, 0), e0)  # another seed: another order
    # per rank too
    for r in range(size):
        s = TrainShard(data, B, r, size, 3)
        assert not np.array_equal(s.epoch_order(0), s.epoch_order(1))
        np.testing.assert_array_equal(s.epoch_order(0), TrainShard(data, B, r, size, 3).epoch_order(0))


def test_batch_plan_errors(datafiles):
    d40, d18 = datafiles[40], datafiles[18]
    with pytest.raises(MpitrainError, match=r"train\.global_batch = 3 .*4"):
        TrainShard(d40, 3, 0, 4, 0)  # global_batch < ranks
    with pytest.raises(MpitrainError, match=r"train\.global_batch"):
        TrainShard(d40, 3, 3, 4, 0)  # on every rank
    with pytest.raises(MpitrainError, match=r"40 samples.*train\.global_batch = 41") as e:
        TrainShard(d40, 41, 0, 1, 0)  # n < global_batch
    assert d40.path in str(e.value)
    with pytest.raises(MpitrainError, match=r"18 samples.*20 ranks") as e:
        TrainShard(d18, 20, 0, 20, 0)  # n < ranks
    assert d18.path in str(e.value)
    with pytest.raises(MpitrainError):
        TrainShard(d18, 19, 5, 19, 0)
    # the boundary cases are fine
    assert TrainShard(d40, 40, 0, 1, 0).steps_per_epoch == 1
    assert TrainShard(d18, 18, 17, 18, 0).batch == 1


@pytest.mark.parametrize("n,parts", [(10, 3), (7, 7), (100, 6), (5, 1), (3, 5)])
def test_block(n, parts):
    bounds = [block(n, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert {hi - lo for lo, hi in bounds} <= {n // parts, -(-n // parts)}


def test_to_toml_escapes_control_characters(tmp_path):
    cfg = config.Config()
    cfg.data.path = "/tmp/a\nb\t\"c\".h5"
    p = tmp_path / "c.toml"
    p.write_text(config.to_toml(cfg), encoding="utf-8")
    assert config.load(str(p)) == cfg


def test_set_string_key_takes_the_text_as_is():
    for text in ("123", "inf", "true", "2024-01-01"):
        assert config.load(None, [f"data.path={text}"]).data.path == text


# --------------------------------------------------------------------------------------------------
# 5. settings that would have no effect where they are given (config.READ_BY, config.ACTS)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,sets,needle", [
    ("federate", ["comm.mode=fp16"], "comm.mode has no effect: federate exchanges each round's update as [fed]"),
    ("federate", ["train.steps=10"], "train.steps has no effect: federate runs fed.rounds rounds"),
    ("federate", ["train.epochs=3"], "train.epochs has no effect: federate runs fed.rounds rounds"),
    ("federate", ["train.schedule=step"], "train.schedule has no effect: federate's clients step at the constant"),
    ("federate", ["train.global_batch=32"], "train.global_batch has no effect: federate's clients take batches"),
    ("federate", ["fed.strategy=fedsgd", "fed.local_steps=5"], "fed.local_steps has no effect: fed.strategy = "
                                                               "'fedsgd' takes one full-batch"),
    ("federate", ["fed.local_steps=5", "fed.local_epochs=2"], "fed.local_epochs has no effect: fed.local_steps = 5"),
    ("federate", ["fed.mu=0.1"], "fed.mu has no effect: fed.strategy = 'fedavg'; it acts under fedprox only"),
    ("federate", ["train.optimizer=adam", "train.momentum=0.5"], "train.momentum has no effect: train.optimizer = "
                                                                 "'adam'; it acts under momentum or nesterov only"),
    ("train", ["train.gamma=0.5"], "train.gamma has no effect: train.schedule = 'cosine'; it acts under step only"),
    ("train", ["model.kind=lenet5", "model.hidden=[64]"], "model.hidden has no effect: model.kind = 'lenet5'; it "
                                                          "acts under mlp only"),
    ("federate", ["fed.dp.noise_multiplier=1", "fed.min_clients=5"], "fed.min_clients has no effect: client-level "
                                                                      "DP with fed.dp.sampling = 'poisson'"),
    ("federate", ["fed.secagg.clip_range=2"], "fed.secagg.clip_range has no effect: secure aggregation is off"),
    ("federate", ["fed.robust.mixing=nnm"], "fed.robust.mixing has no effect: fed.aggregator = 'mean'"),
    ("train", ["fed.rounds=5"], "fed.rounds has no effect: train does not read [fed]"),
    ("train", ["fed.dp.clip=0.5"], "fed.dp.clip has no effect: train does not read [fed]"),
    ("train", ["train.epochs=3", "train.steps=10"], "train.epochs has no effect: train.steps = 10 sets the length"),
])
def test_a_setting_without_effect_is_refused(command, sets, needle):
    with pytest.raises(MpitrainError) as e:
        config.load(overrides=sets, command=command)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("command,sets", [
    ("federate", ["train.lr=0.1", "train.optimizer=adam", "train.seed=3", "train.weight_decay=0",
                  "fed.strategy=fedprox", "fed.mu=0.1", "fed.local_steps=5", "checkpoint.every=2"]),
    ("federate", ["fed.dp.noise_multiplier=1", "fed.dp.sampling=fixed", "fed.min_clients=5"]),
    ("federate", ["train.steps=0", "comm.mode=plain", "train.global_batch=64"]),  # given at their defaults
    ("train", ["comm.mode=fp16", "train.steps=10", "train.schedule=step", "parallel.tensor=1", "fed.rounds=50"]),
])
def test_settings_with_an_effect_load(command, sets):
    config.load(overrides=sets, command=command)


def test_a_saved_config_loads_again_for_its_command(tmp_path):
    """config.toml lists every key, each command's own non-defaults included: it loads for that command."""
    for command, sets in (("train", ["train.steps=10", "comm.mode=overlap"]),
                          ("federate", ["fed.rounds=3", "fed.dp.noise_multiplier=1", "fed.dp.clip=0.5"])):
        path = write(tmp_path, config.to_toml(config.load(overrides=sets, command=command)))
        config.load(path, command=command)
    with pytest.raises(MpitrainError, match="fed.dp.clip has no effect: train does not read"):
        config.load(path, command="train")  # federate's settings, given to train


def test_a_list_of_strings_is_not_taken_from_one_string(tmp_path):
    """model.layers is a list of layer strings: one string is refused with one line (it was wrapped into a
    one-layer list); a list of numbers still takes one number."""
    for where in ([], [write(tmp_path, '[model]\nkind = "layers"\nlayers = "conv2d 8 3"\n')]):
        with pytest.raises(MpitrainError) as e:
            config.load(*where, overrides=[] if where else ["model.layers=conv2d 8 3"])
        assert "model.layers = 'conv2d 8 3': expected a list of strings, e.g. model.layers = [\"conv2d 8 3\"]" \
            in str(e.value), str(e.value)
    assert config.load(overrides=['model.layers=["conv2d 8 3", "relu"]']).model.layers == ["conv2d 8 3", "relu"]
    assert config.load(overrides=["model.hidden=128"]).model.hidden == [128]
