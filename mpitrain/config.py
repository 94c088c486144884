"""Configuration: dataclass defaults, a TOML file (--config) and ``--set section.key=value`` overrides.

Unknown sections/keys and values of the wrong type are errors that name the key and what was expected.
Choices (model kind, optimizer, schedule) are checked where they are used, with the same key names.
"""
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

from .errors import MpitrainError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def default_data_path():
    """The embedded default dataset (digits), prepared on first use."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mpitrain", "digits.h5")


@dataclass
class DataConfig:
    path: str = field(default_factory=default_data_path)


@dataclass
class ModelConfig:
    kind: str = "mlp"           # softmax | mlp
    hidden: list[int] = field(default_factory=lambda: [128])  # ignored by softmax
    activation: str = "relu"    # relu | tanh


@dataclass
class TrainConfig:
    global_batch: int = 64      # samples per step over all ranks
    epochs: int = 40
    steps: int = 0              # > 0: train this many steps instead of `epochs`
    lr: float = 0.05
    optimizer: str = "momentum"  # sgd | momentum | nesterov | adam
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4  # L2 term added to the gradient
    schedule: str = "cosine"    # constant | step | cosine
    warmup_steps: int = 0
    step_size: int = 1000       # step schedule: decay every step_size steps
    gamma: float = 0.1          # step schedule: decay factor
    scale_lr: bool = False      # linear scaling rule: lr × global_batch / 256
    seed: int = 0
    eval_every: int = 0         # steps between test evaluations; 0 = once per epoch
    log_every: int = 10         # steps between train-loss records in metrics.jsonl
    device: str = "cpu"


@dataclass
class FedConfig:
    """Federated rounds (`federate`); clients train locally with [train] optimizer, lr and seed."""
    rounds: int = 50
    strategy: str = "fedavg"    # fedsgd | fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad | fednova
    fraction: float = 0.1       # share of clients sampled per round
    min_clients: int = 2        # ... but at least this many
    local_epochs: int = 1
    local_batch: int = 10
    local_steps: int = 0        # > 0: this many local steps instead of local_epochs
    weighting: str = "samples"  # samples (n_k) | uniform
    server_lr: float = 0.0      # 0 = the strategy's default (1; fedadam/fedadagrad 0.1; fedyogi 0.01)
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9          # fedadam/fedyogi/fedadagrad
    beta2: float = 0.99
    tau: float = 1e-3
    mu: float = 0.01            # fedprox: proximal weight of (mu/2)·||w − w_t||²
    eval_every: int = 1         # rounds between evaluations
    target_accuracy: float = 0.95  # summary.json reports rounds_to_target for it


@dataclass
class CheckpointConfig:
    every: int = 0              # steps (train) or rounds (federate) between checkpoints; 0 = by time only
    every_seconds: float = 300.0  # also checkpoint when this much time has passed (0 = never by time)
    keep: int = 3               # newest checkpoints kept
    dir: str = ""               # default: <run dir>/checkpoints


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self):
        t = self.train
        _check(t.global_batch >= 1, "train.global_batch", t.global_batch, "an integer ≥ 1")
        _check(t.epochs >= 1 or t.steps >= 1, "train.epochs", t.epochs, "≥ 1 (or train.steps ≥ 1)")
        _check(t.steps >= 0, "train.steps", t.steps, "≥ 0")
        _check(t.lr > 0, "train.lr", t.lr, "> 0")
        for key in ("momentum", "beta1", "beta2"):
            _check(0 <= getattr(t, key) < 1, f"train.{key}", getattr(t, key), "in [0, 1)")
        for key in ("eps", "weight_decay", "gamma"):
            _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "≥ 0")
        for key in ("warmup_steps", "eval_every", "log_every"):
            _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "≥ 0")
        _check(t.step_size >= 1, "train.step_size", t.step_size, "≥ 1")
        f = self.fed
        _check(0 < f.fraction <= 1, "fed.fraction", f.fraction, "in (0, 1]")
        for key in ("rounds", "min_clients", "local_epochs", "local_batch", "eval_every"):
            _check(getattr(f, key) >= 1, f"fed.{key}", getattr(f, key), "≥ 1")
        for key in ("local_steps", "server_lr", "tau", "mu"):
            _check(getattr(f, key) >= 0, f"fed.{key}", getattr(f, key), "≥ 0")
        for key in ("server_momentum", "beta1", "beta2"):
            _check(0 <= getattr(f, key) < 1, f"fed.{key}", getattr(f, key), "in [0, 1)")
        _check(f.weighting in ("samples", "uniform"), "fed.weighting", f.weighting, "samples or uniform")
        c = self.checkpoint
        _check(c.every >= 0, "checkpoint.every", c.every, "≥ 0")
        _check(c.every_seconds >= 0, "checkpoint.every_seconds", c.every_seconds, "≥ 0")
        _check(c.keep >= 1, "checkpoint.keep", c.keep, "≥ 1")
        return self


def _check(ok, key, value, expected):
    if not ok:
        raise MpitrainError(f"{key} = {value!r}: expected {expected}")


def _coerce(key, value, typ):
    """Check a TOML value against a field type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(key, v, item) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise MpitrainError(f"{key} = {value!r}: expected {names[typ]}")
    return value


def _set(cfg, section, key, value, where, text=None):
    """Set section.key to a TOML value, or (text given) to the parse of a --set value."""
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise MpitrainError(f"{where}: unknown section [{section}] (known: {', '.join(sections)})")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise MpitrainError(f"{where}: unknown key {section}.{key} (known: {', '.join(fields)})")
    typ = typing.get_type_hints(type(sub))[key]
    if text is not None:
        value = _parse_value(text, typ)
    setattr(sub, key, _coerce(f"{section}.{key}", value, typ))


def _parse_value(text, typ):
    """A --set value is TOML (42, 0.1, true, [64, 32], "x"); for a string key, or when it is not valid
    TOML, the text itself is the value (so data.path=2024.h5 needs no quotes)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if typ is str and not isinstance(value, str) else value


def load(path=None, overrides=()):
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise MpitrainError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise MpitrainError(f"{path}: not valid TOML ({exc})") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise MpitrainError(f"{path}: {section} must be a [section] table")
            for key, value in table.items():
                _set(cfg, section, key, value, path)
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise MpitrainError(f"--set {item!r}: expected section.key=value")
        _set(cfg, section, key.strip(), None, f"--set {item}", text=text.strip())
    return cfg.validate()


def to_toml(cfg):
    """The effective configuration as TOML text (what config.toml in the run directory holds)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        sub = getattr(cfg, sec.name)
        lines += [f"{f.name} = {fmt(getattr(sub, f.name))}" for f in dataclasses.fields(sub)]
        lines.append("")
    return "\n".join(lines)
