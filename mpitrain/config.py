"""Configuration: dataclass defaults, a TOML file (--config) and ``--set section.key=value`` overrides.

Unknown sections/keys and values of the wrong type are errors that name the key and what was expected.
Choices (model kind, optimizer, schedule) are checked where they are used, with the same key names.
A key given with a value that would have no effect where it is given (a [fed] key to train, a [comm] key
to federate, fed.dp.* with DP off, …) is refused with one line: the tables READ_BY and ACTS below.
"""
import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field

from . import controls, tblog
from .errors import MpitrainError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def default_data_path():
    """The embedded default dataset (digits), prepared on first use."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mpitrain", "digits.h5")


# federate's default when no data.path is given: the same digits, partitioned on first use into a file of
# its own (train's digits.h5 stays partition-free)
DEFAULT_PARTITION = {"scheme": "dirichlet", "clients": 16, "alpha": 0.5, "seed": 0}


def default_federated_data_path():
    """federate's embedded default: digits partitioned Dirichlet(0.5) over 16 clients (seed 0)."""
    p = DEFAULT_PARTITION
    return os.path.join(os.path.dirname(default_data_path()), f"digits-{p['scheme']}{p['clients']}.h5")


@dataclass
class DataConfig:
    path: str = field(default_factory=default_data_path)
    stream: bool = False        # read the training part window by window (also when it exceeds memory_mb)
    memory_mb: float = 1024.0   # per-rank budget for training data; a larger part streams; 0 = never automatically
    window_blocks: int = 8      # stream: blocks per shuffle window
    block_rows: int = 0         # stream: rows per block; 0 = the file's chunk rows, less if memory_mb asks
    augment: list[str] = field(default_factory=list)  # train on images: ["flip", "crop 4"] (controls.py)


@dataclass
class ModelConfig:
    kind: str = "mlp"           # softmax | mlp | lenet5 | fedavg_cnn | resnet8 | resnet20 | gpt | layers
    hidden: list[int] = field(default_factory=lambda: [128])  # mlp only
    activation: str = "relu"    # relu | tanh (mlp)
    layers: list[str] = field(default_factory=list)  # kind = layers: e.g. ["conv2d 16 3 same", "relu", …] (model/stack.py)
    norm: str = "batch"         # resnet8/resnet20: batch | group (GroupNorm, 2 groups)
    n_layer: int = 4            # gpt: transformer blocks
    n_head: int = 4             # gpt: attention heads
    n_embd: int = 128           # gpt: width
    block_size: int = 64        # language models: tokens per window (the context length)
    dropout: float = 0.0        # gpt: dropout rate after the embeddings and in every residual branch


EVAL_METRICS = tuple(f"{split}_{name}" for split in ("val", "test") for name in (  # what train's evaluations record
    "loss", "accuracy", "rmse", "r2", "bits_per_token", "perplexity"))


@dataclass
class EarlyStopConfig:
    """[train.early_stop]: watch an evaluation metric; stop after `patience` evaluations without improvement.
    train.keep_best watches the same metric."""
    metric: str = "val_loss"    # one of EVAL_METRICS (val_*: the file's val/ split; test_*: files without one)
    patience: int = 0           # evaluations without improvement before the run stops; 0 = never stop early
    min_delta: float = 0.0      # an improvement is a change beyond this
    mode: str = "auto"          # min | max | auto (max for *_accuracy and *_r2, min otherwise)


@dataclass
class TrainConfig:
    global_batch: int = 64      # samples per step over all ranks
    epochs: int = 40
    steps: int = 0              # > 0: train this many steps instead of `epochs`
    lr: float = 0.05
    optimizer: str = "momentum"  # sgd | momentum | nesterov | adam | adamw
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4  # L2 term added to the gradient; adamw: decoupled, p ← p·(1 − lr·weight_decay) on
                                # the parameter table's decay tensors (weights, not biases, norms, embeddings)
    clip_norm: float = 0.0      # > 0: clip the global L2 norm of the mean gradient to this
    decay: list[str] = field(default_factory=lambda: ["weight"])  # adamw: the groups decayed (weight|bias|norm|embedding)
    schedule: str = "cosine"    # constant | step | cosine
    warmup_steps: int = 0
    step_size: int = 1000       # step schedule: decay every step_size steps
    gamma: float = 0.1          # step schedule: decay factor
    scale_lr: bool = False      # linear scaling rule: lr × global_batch / 256
    seed: int = 0
    eval_every: int = 0         # steps between evaluations (val/, or test/ without it); 0 = once per epoch
    log_every: int = 10         # steps between train-loss records in metrics.jsonl
    label_smoothing: float = 0.0  # classification: PyTorch's CrossEntropyLoss(label_smoothing=…)
    class_weights: str | list[float] = field(default_factory=list)  # "balanced" or one weight per class; [] = none
    log: list[str] = field(default_factory=list)  # ["tensorboard"]: TensorBoard event files beside metrics.jsonl
    device: str = "cpu"
    keep_best: bool = False     # save best.h5 whenever train.early_stop.metric improves
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    init: str = ""              # a model.h5 to start from (fine-tuning; --init); a resumed run takes its checkpoint
    init_skip: list[str] = field(default_factory=list)  # tensors left at their fresh values: names, dotted
                                # prefixes ("layers.3") or "head" (the last layer with parameters); --init-skip
    freeze: list[str] = field(default_factory=list)  # tensors (names, prefixes, "head") no update changes


@dataclass
class SecAggConfig:
    """[fed.secagg]: secure aggregation (fed.secure_aggregation = true), Bonawitz et al. 2017 / SecAgg+."""
    threshold: int = 0          # Shamir threshold t within a client's neighbourhood; 0 = majority ⌊(k+1)/2⌋+1
    neighbors: int = 0          # mask-graph degree k; 0 = auto (complete up to 13 clients, else ~3·log2 n)
    clip_range: float = 4.0     # fixed point: each coordinate of Δ_k is clipped to ±clip_range (no DP)


@dataclass
class DPConfig:
    """[fed.dp]: client-level differential privacy (DP-FedAvg, McMahan et al. 2018); on when noise_multiplier > 0
    (or clip_only).  Its other keys are refused while it is off: a clip that silently does nothing would
    look like a protection."""
    noise_multiplier: float = 0.0  # z: noise std z·S on the sum of clipped updates; 0 = off
    clip_only: bool = False     # true: clipping, uniform weights and DP sampling without noise (ε = ∞; ablations)
    clip: float = 1.0           # S: L2 clip norm of each client update (initial value when adaptive)
    delta: float = 1e-5         # δ of the reported (ε, δ)
    target_epsilon: float = 0.0  # > 0: stop before a round would spend more than this ε
    sampling: str = "poisson"   # poisson (each client with probability fed.fraction) | fixed (fixed-size cohort)
    adaptive: bool = False      # adaptive clipping (Andrew et al. 2019)
    target_quantile: float = 0.5  # γ: fraction of updates meant to have norm ≤ C
    clip_lr: float = 0.2        # η_C: C ← C·exp(−η_C (b̄ − γ))
    count_stddev: float = 0.0   # σ_b of the clipped-count noise; 0 = expected cohort / 20
    noise_seed: int = -1        # ≥ 0: reproducible noise (experiments, tests); -1: secret OS randomness


@dataclass
class DPSGDConfig:
    """[fed.dpsgd]: record-level DP-SGD inside every client (per-example clipping + Gaussian noise); on when
    noise_multiplier > 0, its other keys refused while it is off."""
    noise_multiplier: float = 0.0  # σ: noise std σ·C on each step's sum of clipped per-example gradients; 0 = off
    clip: float = 1.0           # C: per-example gradient L2 clip norm
    delta: float = 1e-5         # δ of the reported record-level (ε, δ)


@dataclass
class RobustConfig:
    """[fed.robust]: parameters of the robust aggregators (fed.aggregator)."""
    fraction: float = 0.25      # β: trimmed_mean cuts ⌊β n⌋ per side; krum/multikrum assume f = ⌊β n⌋ attackers
    norm_bound: float = 0.0     # norm_bound: clip each update to this L2 norm; 0 = the round's median norm
    mixing: str = "none"        # none | nnm: nearest-neighbour mixing before the robust rule


@dataclass
class HEConfig:
    """[fed.he]: CKKS parameters of fed.encryption = "ckks" (TenSEAL; defaults as NVFlare's HE filter)."""
    poly_modulus_degree: int = 8192  # N: a power of two; N/2 values per ciphertext
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [60, 40, 40])  # first, middle(s), special prime
    scale_bits: int = 40        # the encoding scale 2^scale_bits


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
    weighting: str = "samples"  # samples (n_k) | uniform  (differential privacy always uses uniform weights)
    server_lr: float = 0.0      # 0 = the strategy's default (1; fedadam/fedadagrad 0.1; fedyogi 0.01)
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9          # fedadam/fedyogi/fedadagrad
    beta2: float = 0.99
    tau: float = 1e-3
    mu: float = 0.01            # fedprox: proximal weight of (mu/2)·||w − w_t||²
    eval_every: int = 1         # rounds between evaluations
    target_accuracy: float = 0.95  # summary.json reports rounds_to_target for it
    secure_aggregation: bool = False  # pairwise-masked uint32 sums (see [fed.secagg])
    dropout_rate: float = 0.0   # simulated: this share of each cohort drops after sending its keys
    aggregator: str = "mean"    # mean | median | trimmed_mean | krum | multikrum | norm_bound
    attack: str = "none"        # none | sign_flip | scale | label_flip (simulation)
    attack_fraction: float = 0.2  # share of clients that attack (a seeded set)
    attack_scale: float = 10.0  # scale attack: Δ → −attack_scale·Δ
    encryption: str = "none"    # none | ckks: the aggregate under homomorphic encryption (see [fed.he])
    erase: bool = True          # zero what a client's data leaves in memory when its work ends (docs/privacy.md)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    dpsgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    he: HEConfig = field(default_factory=HEConfig)


@dataclass
class CommConfig:
    """[comm]: how synchronous training exchanges gradients (sync.py)."""
    mode: str = "plain"         # plain | overlap | hierarchical | fp16 | bf16 | topk | sharded | local_sgd
    bucket_mb: float = 1.0      # overlap: bucket size in MiB (cut at layer boundaries); fsdp: smallest unit
    group_size: int = 0         # hierarchical: ranks per group; 0 = the shared-memory node
    topk_ratio: float = 0.01    # topk: share of the gradient's entries each rank sends
    local_steps: int = 8        # local_sgd: steps between parameter averages (H)


@dataclass
class ParallelConfig:
    """[parallel]: how the model itself is distributed (tensor.py)."""
    tensor: int = 1             # ranks per tensor-parallel group (T, dividing the world size); 1 = off


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
    comm: CommConfig = field(default_factory=CommConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, command=None):
        """Check every value; then, for the keys given (self.given, from load), that each has an effect:
        under `command` ("train" or "federate"; None: only the conditions that do not depend on it)."""
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
        _check(t.clip_norm >= 0, "train.clip_norm", t.clip_norm, "≥ 0 (0 = no clipping)")
        _check(set(t.decay) <= set(DECAY_GROUPS), "train.decay", t.decay, "a list of " + ", ".join(DECAY_GROUPS))
        e = t.early_stop
        _check(e.metric in EVAL_METRICS, "train.early_stop.metric", e.metric, "one of " + ", ".join(EVAL_METRICS))
        _check(e.patience >= 0, "train.early_stop.patience", e.patience, "an integer ≥ 0 (0 = off)")
        _check(e.min_delta >= 0, "train.early_stop.min_delta", e.min_delta, "≥ 0")
        _check(e.mode in ("min", "max", "auto"), "train.early_stop.mode", e.mode, "min, max or auto")
        if t.clip_norm and (self.comm.mode == "local_sgd" or self.parallel.tensor > 1):
            raise MpitrainError(f"train.clip_norm = {t.clip_norm:g} clips the norm of the whole gradient, which "
                                + ("comm.mode = 'local_sgd' never forms" if self.comm.mode == "local_sgd" else
                                   f"parallel.tensor = {self.parallel.tensor} does not compute yet")
                                + "; leave train.clip_norm = 0")
        tblog.check(t.log)
        controls.check(self)
        if t.clip_norm and t.freeze:
            raise MpitrainError(f"train.clip_norm = {t.clip_norm:g} with train.freeze: the norm would count the frozen "
                                "tensors' gradients, which every mode still computes; leave train.clip_norm = 0")
        mc = self.model
        _check(mc.block_size >= 1, "model.block_size", mc.block_size, "an integer ≥ 1")
        d = self.data
        _check(d.memory_mb >= 0, "data.memory_mb", d.memory_mb, "≥ 0 (0 = stream only when data.stream is set)")
        _check(d.window_blocks >= 1, "data.window_blocks", d.window_blocks, "≥ 1")
        _check(d.block_rows >= 0, "data.block_rows", d.block_rows, "≥ 0 (0 = from the file's chunks)")
        f = self.fed
        _check(0 < f.fraction <= 1, "fed.fraction", f.fraction, "in (0, 1]")
        for key in ("rounds", "min_clients", "local_epochs", "local_batch", "eval_every"):
            _check(getattr(f, key) >= 1, f"fed.{key}", getattr(f, key), "≥ 1")
        for key in ("local_steps", "server_lr", "tau", "mu"):
            _check(getattr(f, key) >= 0, f"fed.{key}", getattr(f, key), "≥ 0")
        for key in ("server_momentum", "beta1", "beta2"):
            _check(0 <= getattr(f, key) < 1, f"fed.{key}", getattr(f, key), "in [0, 1)")
        _check(f.weighting in ("samples", "uniform"), "fed.weighting", f.weighting, "samples or uniform")
        _validate_privacy(f)
        if f.strategy == "fednova" and t.optimizer in ("adam", "adamw"):
            raise MpitrainError(f"fed.strategy = 'fednova' with train.optimizer = {t.optimizer!r}: FedNova divides "
                                "each update by the sum of its steps' gradient coefficients, which Adam's per-"
                                "coordinate steps do not have; use sgd, momentum or nesterov")
        m = self.comm
        _check(m.mode in MODES, "comm.mode", m.mode, "one of " + ", ".join(MODES))
        _check(m.bucket_mb > 0, "comm.bucket_mb", m.bucket_mb, "> 0")
        _check(m.group_size >= 0, "comm.group_size", m.group_size, "≥ 0 (0 = the shared-memory node)")
        _check(0 < m.topk_ratio <= 1, "comm.topk_ratio", m.topk_ratio, "in (0, 1]")
        _check(m.local_steps >= 1, "comm.local_steps", m.local_steps, "≥ 1")
        _check(self.parallel.tensor >= 1, "parallel.tensor", self.parallel.tensor, "an integer ≥ 1 (1 = off)")
        c = self.checkpoint
        _check(c.every >= 0, "checkpoint.every", c.every, "≥ 0")
        _check(c.every_seconds >= 0, "checkpoint.every_seconds", c.every_seconds, "≥ 0")
        _check(c.keep >= 1, "checkpoint.keep", c.keep, "≥ 1")
        _check_effect(self, getattr(self, "given", set()), command)
        return self


DECAY_GROUPS = ("weight", "bias", "norm", "embedding")  # the parameter table's groups (model/base.py Param)
MODES = ("plain", "overlap", "hierarchical", "fp16", "bf16", "topk", "sharded", "local_sgd", "fsdp")  # comm.mode
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "norm_bound")
ATTACKS = ("none", "sign_flip", "scale", "label_flip")
ENCRYPTIONS = ("none", "ckks")
HE_DEGREES = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}  # N: max Σ bits at 128-bit security
HE_LINEAR = ("fedsgd", "fedavg", "fedprox", "fedavgm", "fednova")  # server steps linear in the aggregate
HE_REFUSED = ("fedadam", "fedyogi", "fedadagrad")  # adaptive: need the plaintext aggregate's squares


def _validate_privacy(f):
    """[fed] privacy/robustness keys and the combinations that cannot work (data-dependent checks, such as
    the cohort size against the secure-aggregation threshold, run at federate start)."""
    _check(0 <= f.dropout_rate < 1, "fed.dropout_rate", f.dropout_rate, "in [0, 1)")
    _check(f.aggregator in AGGREGATORS, "fed.aggregator", f.aggregator, "one of " + ", ".join(AGGREGATORS))
    _check(f.attack in ATTACKS, "fed.attack", f.attack, "one of " + ", ".join(ATTACKS))
    _check(0 <= f.attack_fraction <= 1, "fed.attack_fraction", f.attack_fraction, "in [0, 1]")
    _check(f.attack_scale > 0, "fed.attack_scale", f.attack_scale, "> 0")
    s, d, g, r = f.secagg, f.dp, f.dpsgd, f.robust
    _check(s.threshold >= 0, "fed.secagg.threshold", s.threshold, "≥ 0 (0 = majority of a neighbourhood)")
    _check(s.neighbors >= 0 and s.neighbors % 2 == 0, "fed.secagg.neighbors", s.neighbors,
           "an even number ≥ 0 (0 = automatic; the mask graph is a Harary graph of even degree; "
           "≥ the cohort − 1 = complete)")
    _check(s.clip_range > 0, "fed.secagg.clip_range", s.clip_range, "> 0")
    _check(d.noise_multiplier >= 0, "fed.dp.noise_multiplier", d.noise_multiplier, "≥ 0 (0 = off)")
    _check(d.clip > 0, "fed.dp.clip", d.clip, "> 0")
    _check(0 < d.delta < 1, "fed.dp.delta", d.delta, "in (0, 1)")
    _check(d.target_epsilon >= 0, "fed.dp.target_epsilon", d.target_epsilon, "≥ 0 (0 = no limit)")
    _check(d.sampling in ("poisson", "fixed"), "fed.dp.sampling", d.sampling, "poisson or fixed")
    _check(0 < d.target_quantile < 1, "fed.dp.target_quantile", d.target_quantile, "in (0, 1)")
    _check(d.clip_lr > 0, "fed.dp.clip_lr", d.clip_lr, "> 0")
    _check(d.count_stddev >= 0, "fed.dp.count_stddev", d.count_stddev, "≥ 0 (0 = expected cohort / 20)")
    _check(d.noise_seed >= -1, "fed.dp.noise_seed", d.noise_seed, "≥ 0, or -1 for secret randomness")
    _check(g.noise_multiplier >= 0, "fed.dpsgd.noise_multiplier", g.noise_multiplier, "≥ 0 (0 = off)")
    _check(g.clip > 0, "fed.dpsgd.clip", g.clip, "> 0")
    _check(0 < g.delta < 1, "fed.dpsgd.delta", g.delta, "in (0, 1)")
    _check(0 <= r.fraction < 0.5, "fed.robust.fraction", r.fraction, "in [0, 0.5)")
    _check(r.norm_bound >= 0, "fed.robust.norm_bound", r.norm_bound, "≥ 0 (0 = the round's median norm)")
    _check(r.mixing in ("none", "nnm"), "fed.robust.mixing", r.mixing, "none or nnm")
    h = f.he
    _check(f.encryption in ENCRYPTIONS, "fed.encryption", f.encryption, "one of " + ", ".join(ENCRYPTIONS))
    _check(h.poly_modulus_degree in HE_DEGREES, "fed.he.poly_modulus_degree", h.poly_modulus_degree,
           "a power of two from 1024 to 32768")
    bits = h.coeff_mod_bit_sizes
    _check(len(bits) >= 3 and all(20 <= b <= 60 for b in bits), "fed.he.coeff_mod_bit_sizes", bits,
           "at least 3 prime sizes (first, one per multiplication, special), each from 20 to 60 bits")
    _check(sum(bits) <= HE_DEGREES.get(h.poly_modulus_degree, 0), "fed.he.coeff_mod_bit_sizes", bits,
           f"at most {HE_DEGREES.get(h.poly_modulus_degree)} bits in all for 128-bit security at "
           f"fed.he.poly_modulus_degree = {h.poly_modulus_degree}")
    _check(20 <= h.scale_bits < bits[0] and h.scale_bits <= min(bits[1:-1]), "fed.he.scale_bits", h.scale_bits,
           f"from 20 to {min(bits[0] - 1, min(bits[1:-1]))} (below the first prime's {bits[0]} bits, which hold "
           "the integer part, and at most the middle primes' sizes)")
    dp = d.noise_multiplier > 0 or d.clip_only
    if d.clip_only and (d.noise_multiplier > 0 or d.target_epsilon > 0):
        raise MpitrainError(f"fed.dp.clip_only = true clips without noise (ε = ∞): it cannot be combined with "
                            f"fed.dp.noise_multiplier = {d.noise_multiplier:g} or fed.dp.target_epsilon = "
                            f"{d.target_epsilon:g}")
    if f.aggregator != "mean" and f.secure_aggregation:
        raise MpitrainError(f"fed.aggregator = {f.aggregator!r} needs every client's update at the server, "
                            "which fed.secure_aggregation = true hides by design; use fed.aggregator = mean "
                            "with secure aggregation, or turn it off")
    if f.aggregator != "mean" and dp:
        raise MpitrainError(f"fed.aggregator = {f.aggregator!r} with fed.dp.noise_multiplier > 0: the Gaussian "
                            "noise is calibrated to the sensitivity S/m of the clipped mean; use "
                            "fed.aggregator = mean with differential privacy")
    if f.encryption != "none":
        if f.secure_aggregation:
            raise MpitrainError(f"fed.encryption = {f.encryption!r} with fed.secure_aggregation = true: both hide "
                                "each client rank's contribution from the aggregator; choose one")
        if f.aggregator != "mean":
            raise MpitrainError(f"fed.aggregator = {f.aggregator!r} needs every client's update in plaintext at the "
                                f"server, which fed.encryption = {f.encryption!r} hides; use fed.aggregator = mean")
        if f.strategy in HE_REFUSED:
            raise MpitrainError(f"fed.strategy = {f.strategy!r} with fed.encryption = {f.encryption!r}: its server "
                                "step is not linear in the aggregate, so the aggregator would need plaintext values "
                                "beyond the global models; use " + ", ".join(HE_LINEAR))
    if dp and f.strategy == "fednova":
        raise MpitrainError("fed.strategy = 'fednova' with fed.dp.noise_multiplier > 0: FedNova normalises by "
                            "each client's local step count, which depends on its data size and is not "
                            "privatised; use fedavg, fedprox, fedavgm or a FedOpt strategy")


# Where each setting takes effect: two tables, checked once (Config.validate → _check_effect) for the keys
# the file and --set gave with a value other than the default (a saved config.toml, which lists every key,
# loads again).  A key is looked up from its full name up through its sections ("fed.dp.clip", "fed.dp",
# "fed"); the most specific entry of each table applies.
#   READ_BY: the one command that reads a key or section (unlisted: both), and why the other one does not.
#   ACTS:    a function of the configuration: why the key has no effect there, or a false value when it has.
READ_BY = {
    "fed": ("federate", "train does not read [fed]: federated settings are federate's (python -m mpitrain "
                        "federate)"),
    "comm": ("train", "federate exchanges each round's update as [fed] says (fed.secure_aggregation, "
                      "fed.encryption, fed.aggregator); [comm] is train's gradient exchange"),
    "train.global_batch": ("train", "federate's clients take batches of fed.local_batch"),
    "train.epochs": ("train", "federate runs fed.rounds rounds of fed.local_epochs per client"),
    "train.steps": ("train", "federate runs fed.rounds rounds of fed.local_steps (or fed.local_epochs) per client"),
    **dict.fromkeys(("train.schedule", "train.warmup_steps", "train.step_size", "train.gamma", "train.scale_lr"),
                    ("train", "federate's clients step at the constant train.lr")),
    "train.eval_every": ("train", "federate evaluates every fed.eval_every rounds"),
    "train.log_every": ("train", "federate records every round"),
    **dict.fromkeys(("train.early_stop", "train.keep_best"), ("train", "federate runs fed.rounds rounds")),
    **dict.fromkeys(("train.label_smoothing", "train.class_weights"),
                    ("train", "federate's clients train with the plain cross-entropy")),
    "data.augment": ("train", "federate's clients train on their rows as stored"),
    **dict.fromkeys(("train.init", "train.init_skip", "train.freeze"),
                    ("train", "federate starts from fed's seeded initialisation and updates every tensor")),
    "train.clip_norm": ("train", "federate's clients do not clip their gradients (fed.dp.clip bounds each client's "
                                 "update)"),
}


def _dp_off(c):
    d = c.fed.dp
    return not (d.noise_multiplier > 0 or d.clip_only) and ("client-level differential privacy is off (set "
                                                            "fed.dp.noise_multiplier > 0, or fed.dp.clip_only = "
                                                            "true to clip without noise)")


def _fedsgd(c):
    return c.fed.strategy == "fedsgd" and ("fed.strategy = 'fedsgd' takes one full-batch gradient step per client "
                                          "and round")


def _only(key, *names):
    """ACTS entry: the key acts only while `key` is one of names (it is their setting)."""
    def why(c):
        value = _value(c, key)
        return value not in names and f"{key} = {value!r}; it acts under {' or '.join(names)} only"
    return why


_strategies = functools.partial(_only, "fed.strategy")


ACTS = {
    "model.hidden": _only("model.kind", "mlp"),
    "model.activation": _only("model.kind", "mlp"),
    "train.init_skip": lambda c: not c.train.init and "train.init is not set (there is no model to start from)",
    "train.epochs": lambda c: c.train.steps > 0 and f"train.steps = {c.train.steps} sets the length of the run",
    "train.momentum": _only("train.optimizer", "momentum", "nesterov"),
    "train.early_stop": lambda c: not (c.train.early_stop.patience or c.train.keep_best) and (
        "train.early_stop.patience = 0 and train.keep_best = false: nothing watches the metric"),
    "train.early_stop.min_delta": lambda c: not c.train.early_stop.patience and (
        "train.early_stop.patience = 0 (early stopping is off; best.h5 follows every improvement)"),
    **dict.fromkeys(("train.beta1", "train.beta2", "train.eps"), _only("train.optimizer", "adam", "adamw")),
    "train.decay": _only("train.optimizer", "adamw"),
    "model.norm": _only("model.kind", "resnet8", "resnet20"),
    **dict.fromkeys(("model.n_layer", "model.n_head", "model.n_embd", "model.dropout"), _only("model.kind", "gpt")),
    **dict.fromkeys(("train.step_size", "train.gamma"), _only("train.schedule", "step")),
    "fed.local_batch": _fedsgd,
    "fed.local_steps": _fedsgd,
    "fed.local_epochs": lambda c: _fedsgd(c) or c.fed.local_steps > 0 and (
        f"fed.local_steps = {c.fed.local_steps} sets each client's local steps"),
    "fed.min_clients": lambda c: not _dp_off(c) and c.fed.dp.sampling == "poisson" and (
        "client-level DP with fed.dp.sampling = 'poisson' takes each client with probability fed.fraction (set "
        "fed.dp.sampling = \"fixed\" for cohorts of a fixed size)"),
    "fed.mu": _strategies("fedprox"),
    "fed.server_momentum": _strategies("fedavgm"),
    "fed.beta1": _strategies("fedadam", "fedyogi", "fedadagrad"),
    "fed.tau": _strategies("fedadam", "fedyogi", "fedadagrad"),
    "fed.beta2": _strategies("fedadam", "fedyogi"),
    "fed.attack_fraction": lambda c: c.fed.attack == "none" and "fed.attack = 'none' (no simulated attackers)",
    "fed.attack_scale": lambda c: c.fed.attack != "scale" and f"fed.attack = {c.fed.attack!r} (it is the scale "
                                                              "attack's factor)",
    "fed.secagg": lambda c: not c.fed.secure_aggregation and ("secure aggregation is off (set "
                                                              "fed.secure_aggregation = true)"),
    "fed.dp": _dp_off,
    "fed.dp.noise_seed": lambda c: _dp_off(c) and c.fed.dpsgd.noise_multiplier == 0 and (
        "neither kind of differential privacy is on (fed.dp.noise_multiplier, fed.dpsgd.noise_multiplier)"),
    **dict.fromkeys(("fed.dp.target_quantile", "fed.dp.clip_lr", "fed.dp.count_stddev"), lambda c: _dp_off(c) or (
        not c.fed.dp.adaptive and "fed.dp.adaptive = false (adaptive clipping is off)")),
    "fed.dpsgd": lambda c: c.fed.dpsgd.noise_multiplier == 0 and ("record-level DP-SGD is off (set "
                                                                  "fed.dpsgd.noise_multiplier > 0)"),
    "fed.he": lambda c: c.fed.encryption == "none" and "fed.encryption = 'none' (set fed.encryption = \"ckks\")",
    "fed.robust": lambda c: c.fed.aggregator == "mean" and (
        "fed.aggregator = 'mean' (choose a robust rule: " + ", ".join(AGGREGATORS[1:]) + ")"),
    "fed.robust.norm_bound": lambda c: c.fed.aggregator != "norm_bound" and (
        f"fed.aggregator = {c.fed.aggregator!r} (it is norm_bound's bound)"),
    "fed.robust.fraction": lambda c: c.fed.aggregator in ("mean", "median", "norm_bound") and (
        c.fed.robust.mixing == "none") and (f"fed.aggregator = {c.fed.aggregator!r} without fed.robust.mixing "
                                            "(β is trimmed_mean's, krum's, multikrum's and nnm mixing's)"),
}


def _entry(table, key):
    """The most specific entry of table for key (its own, else its section's, …), or None."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in table:
            return table[".".join(parts[:i])]
    return None


def _check_effect(cfg, given, command):
    """Refuse, with one line, the first given key (in sorted order) that has no effect under `command`."""
    default = Config()
    for key in sorted(k for k in given if _value(cfg, k) != _value(default, k)):
        read, acts = _entry(READ_BY, key), _entry(ACTS, key)
        if command is not None and read is not None and read[0] != command:
            why = read[1]
        else:
            why = acts(cfg) if acts else None
        if why:
            raise MpitrainError(f"{key} has no effect: {why}")


def _value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check(ok, key, value, expected):
    if not ok:
        raise MpitrainError(f"{key} = {value!r}: expected {expected}")


def _coerce(key, value, typ):
    """Check a TOML value against a field type; ints are accepted for floats.  A list of numbers also
    takes one number (model.hidden=128 → [128]); a list of strings needs the list, since a bare string
    is ambiguous (model.layers = "conv2d 8 3" is one layer, or the start of a stack written as one string)."""
    origin = typing.get_origin(typ)
    if origin is types.UnionType:  # the first type that takes the value
        for option in typing.get_args(typ):
            try:
                return _coerce(key, value, option)
            except MpitrainError:
                pass
        raise MpitrainError(f"{key} = {value!r}: expected a string or a list")
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            if item is str:
                raise MpitrainError(f"{key} = {value!r}: expected a list of strings, e.g. "
                                    f"{key} = [{json.dumps(str(value))}]")
            value = [value]
        return [_coerce(key, v, item) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise MpitrainError(f"{key} = {value!r}: expected {names[typ]}")
    return value


def _set(cfg, section, key, value, where, text=None):
    """Set section.key (key may be dotted into a nested section: fed.dp.clip) to a TOML value, or (text
    given) to the parse of a --set value.  Errors name the full key."""
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise MpitrainError(f"{where}: unknown section [{section}] (known: {', '.join(sections)})")
    sub, path = getattr(cfg, section), section
    *inner, key = key.split(".")
    for part in inner:
        nested = [f.name for f in dataclasses.fields(sub) if dataclasses.is_dataclass(getattr(sub, f.name))]
        if part not in nested:
            raise MpitrainError(f"{where}: unknown section [{path}.{part}]"
                                + (f" (known: {', '.join(path + '.' + n for n in nested)})" if nested else ""))
        sub, path = getattr(sub, part), f"{path}.{part}"
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise MpitrainError(f"{where}: unknown key {path}.{key} (known: {', '.join(fields)})")
    if dataclasses.is_dataclass(getattr(sub, key)):
        raise MpitrainError(f"{where}: {path}.{key} is a section; set its keys, e.g. {path}.{key}."
                            f"{dataclasses.fields(getattr(sub, key))[0].name}=...")
    typ = typing.get_type_hints(type(sub))[key]
    if text is not None:
        value = _parse_value(text, typ)
    setattr(sub, key, _coerce(f"{path}.{key}", value, typ))
    cfg.given.add(f"{path}.{key}")


def _set_table(cfg, path, table, where):
    """Apply a TOML table found at `path` (e.g. "fed" or "fed.dp"), recursing into nested tables."""
    section, _, prefix = path.partition(".")
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            _set_table(cfg, f"{path}.{key}", value, where)
        else:
            _set(cfg, section, full, value, where)


def _parse_value(text, typ):
    """A --set value is TOML (42, 0.1, true, [64, 32], "x"); for a string key, or when it is not valid
    TOML, the text itself is the value (so data.path=2024.h5 needs no quotes)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if typ is str and not isinstance(value, str) else value


def load(path=None, overrides=(), command=None):
    """The validated configuration: defaults, then the TOML file, then the overrides — "section.key=value"
    strings as --set takes them, or a mapping {"section.key": value} of Python values (the API's).
    command: "train" or "federate", the command it is for: a given key that command does not read is
    refused (validate)."""
    cfg = Config()
    cfg.given = set()  # the keys the file and --set gave: validation refuses those that would do nothing
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
            _set_table(cfg, section, table, path)
    if isinstance(overrides, dict):
        for name, value in overrides.items():
            section, _, key = str(name).partition(".")
            _set(cfg, section, key, value, f"override {name}")
        overrides = ()
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise MpitrainError(f"--set {item!r}: expected section.key=value")
        _set(cfg, section, key.strip(), None, f"--set {item}", text=text.strip())
    return cfg.validate(command)


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

    def table(name, sub):
        lines.append(f"[{name}]")
        nested = []
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            if dataclasses.is_dataclass(v):
                nested.append((f"{name}.{f.name}", v))
            else:
                lines.append(f"{f.name} = {fmt(v)}")
        lines.append("")
        for n, v in nested:  # [fed.dp] after the keys of [fed]
            table(n, v)

    for sec in dataclasses.fields(cfg):
        table(sec.name, getattr(cfg, sec.name))
    return "\n".join(lines)
