"""Training controls on top of the step: the classification loss's label smoothing and class weights
(train.label_smoothing, train.class_weights) and image augmentation (data.augment)."""
import numpy as np

from .errors import MpitrainError

AUGMENTS = {"flip": 0, "crop": 1}  # name → number of arguments
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SALT = np.uint64(0xA46E7A7105C0FFEE)  # keeps the augmentation's draws apart from dropout's (same seed)


def check(cfg):
    """The controls' values, as every rank loads the configuration: one line naming the key."""
    t = cfg.train
    if not 0 <= t.label_smoothing < 1:
        raise MpitrainError(f"train.label_smoothing = {t.label_smoothing!r}: expected in [0, 1)")
    w = t.class_weights
    if isinstance(w, str) and w != "balanced":
        raise MpitrainError(f"train.class_weights = {w!r}: expected \"balanced\" or a list of weights, one per class")
    if isinstance(w, list) and (any(v < 0 for v in w) or w and not sum(w) > 0):
        raise MpitrainError(f"train.class_weights = {w!r}: expected weights ≥ 0, not all 0")
    augments(cfg.data.augment)


def augments(items):
    """data.augment as [(name, args)]: "flip" (random horizontal flip), "crop P" (random crop of the image
    zero-padded by P on every side)."""
    out = []
    for item in items:
        name, *args = item.split()
        if name not in AUGMENTS or len(args) != AUGMENTS[name] or not all(a.isdigit() and int(a) > 0 for a in args):
            raise MpitrainError(f"data.augment: {item!r}: expected \"flip\" or \"crop P\" (P ≥ 1 pixels of padding)")
        out.append((name, [int(a) for a in args]))
    return out


class Controls:
    """What train applies around each step: set up once from the configuration and the data (every rank
    alike), then batch augments a batch as it comes from the shard."""

    def __init__(self, cfg, data, model):
        """model: the model the steps run (its task becomes the weighted one)."""
        t = cfg.train
        self.seed, self.ops = t.seed, augments(cfg.data.augment)
        self.shape = tuple(data.feature_shape or ())  # None: a token stream
        if self.ops and len(self.shape) != 3:
            held = f"samples of shape {self.shape}" if self.shape else "a token stream"
            raise MpitrainError(f"data.augment = {cfg.data.augment!r}: augments images (channels, height, width); "
                                f"{data.path} holds {held}")
        self.out = None
        if not (t.label_smoothing or t.class_weights):
            return
        if data.task != "classify":
            key = "train.label_smoothing" if t.label_smoothing else "train.class_weights"
            raise MpitrainError(f"{key}: applies to classification; {data.path} holds {data.task} data")
        if not hasattr(model.k, "softmax_xent_weighted"):
            raise MpitrainError(f"train.label_smoothing and train.class_weights have no {t.device.upper()} kernel "
                                "yet; train with train.device = 'cpu'")
        model.task = Weighted(model.task, model.ctx, class_weights(t.class_weights, data), t.label_smoothing)

    def batch(self, x, y, step, first):
        """(x, y) with this step's augmentation drawn per (seed, step, global sample index): p ranks read the
        same images as 1 rank, and a resumed run the same as an unbroken one.  first: the global sample index
        of the batch's first row (this rank's first stratum, as dropout keys its masks)."""
        if not self.ops:
            return x, y
        if self.out is None or self.out.shape != x.shape:
            self.out = np.empty_like(x)
        c, h, w = self.shape
        images = self.out.reshape(len(x), c, h, w)
        images[:] = x.reshape(images.shape)
        key = _mix(_mix(np.uint64(self.seed) ^ SALT) + np.uint64(step)) + np.arange(
            first, first + len(x), dtype=np.uint64) * GOLDEN
        for n, (name, args) in enumerate(self.ops):
            draw = _mix(key + np.uint64(n))
            if name == "flip":
                flip = (draw & np.uint64(1)).astype(bool)
                images[flip] = images[flip, :, :, ::-1]
            else:
                images[:] = _crop(images, args[0], draw)
        return self.out, y


def _crop(images, pad, draw):
    """Each image shifted by its own (dy, dx) in [−pad, pad]² with zeros where it leaves the frame."""
    n, c, h, w = images.shape
    span = np.uint64(2 * pad + 1)
    dy = ((draw >> np.uint64(8)) % span).astype(np.int64)
    dx = ((draw >> np.uint64(32)) % span).astype(np.int64)
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    rows = (dy[:, None] + np.arange(h))[:, None, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, None, :]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]


def _mix(z):
    """splitmix64's finaliser, elementwise on uint64 (wrapping): independent-looking bits from a counter."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def class_weights(given, data):
    """Per-class weights (float64): ones for none, the list given, or "balanced" = n / (C · n_c) from the file's
    training labels (scikit-learn's; every rank reads the same labels, so all agree)."""
    c = data.n_classes
    if not given:
        return np.ones(c)
    if isinstance(given, list):
        if len(given) != c:
            raise MpitrainError(f"train.class_weights: {len(given)} weights for the {c} classes of {data.path}; "
                                f"expected {c}")
        return np.array(given, np.float64)
    counts = np.bincount(data.f["train/y"][...], minlength=c)
    if not counts.all():
        raise MpitrainError(f"train.class_weights = \"balanced\": class {int(np.argmin(counts))} has no training "
                            f"sample in {data.path}; give the weights as a list")
    return counts.sum() / (c * counts)


class Weighted:
    """The classification task with class weights and label smoothing (PyTorch's CrossEntropyLoss with the
    mean reduction) in training; evaluation scores the plain cross-entropy, comparable across settings.  The
    weighted mean divides by the global batch's weight sum: each step sums it over the data group (ctx.comm,
    as BatchNorm sums its statistics), and the per-sample factor N / Σw turns the trainer's 1/N into it."""

    def __init__(self, task, ctx, weights, eps):
        self.task, self.ctx, self.eps = task, ctx, eps
        self.w, self.weighted = weights, bool((weights != 1).any())  # unweighted: no sum to exchange
        self.metrics, self.data = task.metrics, task.data

    def loss_grad(self, k, out, y):
        if not self.ctx.training:
            return self.task.loss_grad(k, out, y)
        sums = np.array([self.w[y].sum(), len(y)])
        if self.weighted and self.ctx.comm is not None:
            self.ctx.comm.allreduce_sum(sums)
        return k.softmax_xent_weighted(out, y, self.w, self.eps, sums[1] / sums[0] if self.weighted else 1.0)
