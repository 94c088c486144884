"""Gradient-leakage audit: what an honest-but-curious aggregator (rank 0) can rebuild of one client's
samples from what it receives in one round, per protection.

The client takes one FedSGD step (fed.strategy = fedsgd: one full-batch step of SGD on its B samples, the
setting most favourable to the attacker) from the global model at initialisation, through the project's
federated Client, Stepper, DP and secure-aggregation code.  Rank 0 receives:

  plain    the update Δ (MPI Reduce is no protection: with one client rank, or in a robust rule's Gather,
           rank 0 holds Δ itself; in a reduction tree the inner ranks hold partial sums);
  clip     client-level DP with central noise: Δ clipped to L2 norm C; rank 0 adds the noise itself, after
           it has seen the clipped Δ;
  dpsgd    record-level DP-SGD: per-example gradients clipped to C plus N(0, (σC)²) per coordinate;
  secagg   the secure-aggregation sum over a cohort of --cohort clients (fixed point encode, uint32 sum,
           decode, as rank 0 gets it once the masks cancel);
  ckks     CKKS ciphertexts under a key rank 0 does not hold: its context is secret-free, decryption
           raises, and the attack cannot start.

The attack is Deep Leakage from Gradients (Zhu et al. 2019, arXiv:1906.08935) with the labels first read off
the last layer's bias gradient as in iDLG (Zhao et al. 2020, arXiv:2001.02610): softmax − one-hot is negative
only at the true labels (batches: counts from the entries and the mean softmax, see recover_labels).
Dummy samples x' are optimised by L-BFGS-B (scipy) within the data's pixel range so that the dummy gradient
g(x') points where the observed update points: 1 − cos(g(x'), −Δ) (scale-free, as in Geiping et al. 2020,
so clipping and the unknown learning rate do not matter).  The gradient of that objective is a mixed second
derivative, J_x(g)ᵀu with u = ∂(1 − cos)/∂g, computed without a second copy of the model's math as the
central difference of the model's input gradient at θ ± εu:
∇ₓ[u·∇_θL] = (∇ₓL(θ + εu) − ∇ₓL(θ − εu)) / 2ε (Model.loss_grad's dx).
For a sum over a cohort the attacker rebuilds all n·B samples jointly and each of the client's samples is
matched to its closest reconstruction (Hungarian assignment on the MSE).

Reported per model, batch size and protection: the MSE of the reconstructed pixels (0…1 scale) against the
client's samples, the share of pixels within 0.1, the share of labels recovered, the final 1 − cos, and a PNG
of originals vs reconstructions."""
import os
import tempfile
import time

import numpy as np

from ..errors import MpitrainError
from . import table

PROTECTIONS = ("plain", "clip", "dpsgd", "secagg", "ckks")
CNN = '["conv2d 8 3 same", "tanh", "avgpool2d 2", "flatten", "dense 10"]'


def add_parser(sub):
    p = sub.add_parser("leakage", help="gradient-leakage audit: DLG/iDLG reconstruction of a client's digits "
                                       "from what rank 0 receives, per protection",
                       description=__doc__.split("\n\n")[0] + " Runs on rank 0 alone.")
    p.add_argument("--models", default="mlp,cnn", help="mlp (--hidden), cnn (--cnn) or both (default mlp,cnn)")
    p.add_argument("--hidden", default="64", help="the MLP's hidden sizes (default 64, relu)")
    p.add_argument("--cnn", default=CNN, help=f"the small CNN's layers on 1×8×8 digits (default {CNN})")
    p.add_argument("--batches", default="1,4", help="the client's batch sizes B (default 1,4)")
    p.add_argument("--protections", default=",".join(PROTECTIONS),
                   help=f"which of {', '.join(PROTECTIONS)} (default all)")
    p.add_argument("--clip", type=float, default=1.0, help="clip: C of client-level DP (default 1)")
    p.add_argument("--dpsgd-noise", type=float, default=1.0, help="dpsgd: σ (default 1, C = --dpsgd-clip)")
    p.add_argument("--dpsgd-clip", type=float, default=1.0, help="dpsgd: per-example clip norm (default 1)")
    p.add_argument("--cohort", type=int, default=16, help="secagg: clients in the summed cohort (default 16)")
    p.add_argument("--lr", type=float, default=0.05, help="the client's SGD learning rate (default 0.05)")
    p.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per restart (default 300)")
    p.add_argument("--restarts", type=int, default=2, help="L-BFGS restarts from the last point (default 2)")
    p.add_argument("--seed", type=int, default=0, help="model init, the client's samples and the dummies")
    p.add_argument("--png", metavar="FILE", help="the figure (default OUT/leakage-<time>.png)")
    p.add_argument("--out", metavar="DIR", help="results folder (default bench-results)")


# -- what rank 0 receives -----------------------------------------------------------------------------

def _client(model, args, dpsgd_noise=0.0):
    """The project's federated Client for one FedSGD step of plain SGD (with DP-SGD when σ > 0)."""
    from ..config import Config
    from ..federated.dp import DPSGD, noise_key
    from ..federated.run import Client

    cfg = Config()
    t, f = cfg.train, cfg.fed
    t.optimizer, t.lr, t.seed, f.strategy = "sgd", args.lr, args.seed, "fedsgd"
    dpsgd = None
    if dpsgd_noise > 0:
        f.dpsgd.noise_multiplier, f.dpsgd.clip = dpsgd_noise, args.dpsgd_clip
        dpsgd = DPSGD(model, model.k, f.dpsgd, noise_key(args.seed))  # reproducible: the attacker never sees it
    return Client(model, model.k, t, f, dpsgd), f


def observe(protection, model, params, x, y, others, args):
    """What rank 0 receives from client 0 (samples x, y) in the round: a float64 vector, or for ckks a
    dict saying why there is nothing to attack.  others: the other cohort clients' (x, y) (secagg)."""
    if protection == "ckks":
        return ckks_view(model, params, x, y, args)
    client, f = _client(model, args, args.dpsgd_noise if protection == "dpsgd" else 0.0)
    delta = client.train(0, 0, x, y, params)[0].copy()
    if protection == "clip":
        from ..federated.dp import clip_norm

        delta = clip_norm(delta, args.clip)[0]
    if protection != "secagg":
        return delta.astype(np.float64)
    from ..federated import secagg

    n, w, clip = 1 + len(others), len(x), f.secagg.clip_range  # every client holds B samples: ω_k = B
    bounds = np.array([w * clip])  # as SecureAggregator: Δ_k clipped to ±R per coordinate, then weighted
    scales = secagg.scales_for(bounds, n)
    rng = np.random.default_rng(args.seed)
    total = np.zeros(len(delta), np.uint32)
    for k, (cx, cy) in enumerate([(x, y), *others]):
        d = delta if k == 0 else client.train(k, 0, cx, cy, params)[0]
        total += secagg.encode(w * np.clip(d, -clip, clip), scales, bounds, rng, head=len(d))  # masks cancel here
    return secagg.decode(total, scales[0])


def ckks_view(model, params, x, y, args):
    """Rank 0's side of fed.encryption = ckks: the secret-free context, the client's ciphertexts, and the
    decryption it cannot do."""
    from ..config import Config
    from ..federated import he

    h = Config().fed.he
    try:
        client_ctx = he.make_context(h)
    except MpitrainError as exc:
        return {"status": f"not run: {exc}"}
    client, _ = _client(model, args)
    delta = client.train(0, 0, x, y, params)[0]
    chunks = he.encrypt(client_ctx, delta, h.poly_modulus_degree // 2)
    ctx = he.load_context(he.public_bytes(client_ctx), h.scale_bits)  # all rank 0 is ever sent
    vec = he.tenseal().ckks_vector_from(ctx, chunks[0])
    try:
        vec.decrypt()
        start, why = "LEAKS", "rank 0 decrypted the update: its context holds a secret key"
    except Exception as exc:  # TenSEAL raises ValueError without a secret key
        start, why = "cannot start", f"decrypt() without the secret key: {type(exc).__name__}"
    return {"status": f"{start}: rank 0 holds {len(chunks)} ciphertext(s) ({sum(map(len, chunks))} bytes) and a "
                      f"context with is_private() = {ctx.is_private()}; {why}", "is_private": ctx.is_private()}


# -- the attack ---------------------------------------------------------------------------------------

def recover_labels(model, params, target, count):
    """iDLG for `count` samples from the last layer's bias gradient (target ∝ +gradient): its entry c is
    s·(Σᵢ pᵢ_c − count_c) for an unknown scale s (learning rate, clipping).  The attacker estimates the mean
    softmax p̄ on random inputs near the data mean, s from the classes with positive entries (mostly absent
    ones: s·count·p̄_c), and apportions count labels by count·p̄ − entry/s (largest remainder)."""
    db = np.asarray(model.layers(target)[-1][1], np.float64)
    rng = np.random.default_rng(0)
    logits = model.logits(params, (0.5 * rng.standard_normal((256, model.spec.n_in))).astype(np.float32))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_bar = (p / p.sum(axis=1, keepdims=True)).mean(axis=0, dtype=np.float64)
    pos = db > 0
    share = np.ones_like(db)
    if pos.any():
        share = np.maximum(count * p_bar - db * (count * p_bar[pos].sum() / db[pos].sum()), 0.0)
    share = share / share.sum() * count if share.sum() > 0 else np.full_like(db, count / len(db))
    counts = np.floor(share).astype(int)
    for c in np.argsort(counts - share)[:count - counts.sum()]:
        counts[c] += 1
    return np.repeat(np.arange(len(db)), counts).astype(np.int64)


def attack(model, params, target, labels, lo, hi, args):
    """DLG: dummy samples (len(labels) × features, standardised) whose gradient at params points along
    target; returns (samples, final 1 − cos)."""
    from scipy.optimize import minimize

    n, feats = len(labels), model.spec.n_in
    t = target / np.linalg.norm(target)
    g = np.zeros(model.n_params, np.float32)
    dx_plus, dx_minus = np.zeros((n, feats), np.float32), np.zeros((n, feats), np.float32)
    scale = np.linalg.norm(params)

    def objective(z):
        x = z.reshape(n, feats).astype(np.float32)
        model.loss_grad(params, g, x, labels)
        gd = g.astype(np.float64)
        norm = max(np.linalg.norm(gd), 1e-30)
        cos = gd @ t / norm
        u = -(t - cos * gd / norm) / norm  # ∂(1 − cos)/∂g
        eps = 1e-3 * scale / max(np.linalg.norm(u), 1e-30)
        model.loss_grad((params + eps * u).astype(np.float32), g, x, labels, dx=dx_plus)
        model.loss_grad((params - eps * u).astype(np.float32), g, x, labels, dx=dx_minus)
        return 1.0 - cos, ((dx_plus.astype(np.float64) - dx_minus) / (2 * eps)).ravel()

    rng = np.random.default_rng(args.seed + 1)
    bounds = list(zip(np.tile(lo, n), np.tile(hi, n)))
    z = np.clip(0.5 * rng.standard_normal(n * feats), np.tile(lo, n), np.tile(hi, n))  # near the data mean
    for _ in range(args.restarts):  # L-BFGS stalls on the finite-difference curvature: restart it
        r = minimize(objective, z, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": args.iters})
        z = r.x
    return z.reshape(n, feats), float(r.fun)


def score(original, rebuilt, true_labels, labels):
    """Each original sample matched to its closest reconstruction: (MSE, share of pixels within 0.1,
    share of labels recovered, matched reconstructions), on pixels scaled to 0…1."""
    from scipy.optimize import linear_sum_assignment

    cost = ((original[:, None, :] - rebuilt[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    matched = rebuilt[cols[np.argsort(rows)]]
    err = np.abs(matched - original)
    ok = labels[cols[np.argsort(rows)]] == true_labels
    return float((err ** 2).mean()), float((err < 0.1).mean()), float(ok.mean()), matched


# -- the benchmark ------------------------------------------------------------------------------------

def _digits():
    """The embedded digits as the project prepares them (standardised), with the mean and std that map them back."""
    import h5py

    from ..data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.h5")
        prepare("digits", path)
        with h5py.File(path, "r") as f:
            x, y = f["train/x"][...], f["train/y"][...].astype(np.int64)
            mean, std = f["standardize/mean"][...].astype(np.float64), f["standardize/std"][...].astype(np.float64)
    return x, y, mean, std


def _spec(name, args):
    import json

    from ..model import ModelSpec

    if name == "mlp":
        return ModelSpec("mlp", 64, 10, tuple(_ints(args.hidden, "--hidden")))
    if name == "cnn":
        try:
            layers = json.loads(args.cnn)
        except ValueError:
            layers = None
        if not isinstance(layers, list) or not layers or not all(isinstance(t, str) for t in layers):
            raise MpitrainError(f"--cnn {args.cnn}: expected a JSON list of layer strings, as model.layers")
        return ModelSpec("layers", 64, 10, layers=tuple(layers), feature_shape=(1, 8, 8))
    raise MpitrainError(f"--models {args.models}: expected mlp and/or cnn, not {name!r}")


def _ints(text, option):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MpitrainError(f"{option} {text}: expected positive integers, comma-separated")
    return values


def _check(args):
    """The models and batch sizes of the arguments, or one MpitrainError naming the option."""
    protections = args.protections.split(",")
    bad = [p for p in protections if p not in PROTECTIONS]
    if bad:
        raise MpitrainError(f"--protections {args.protections}: unknown {', '.join(bad)}; expected "
                            f"{', '.join(PROTECTIONS)}")
    if args.cohort < 2:
        raise MpitrainError(f"--cohort {args.cohort}: a secure-aggregation cohort has ≥ 2 clients")
    for option, value in (("--iters", args.iters), ("--restarts", args.restarts), ("--lr", args.lr),
                          ("--clip", args.clip), ("--dpsgd-clip", args.dpsgd_clip)):
        if not value > 0:
            raise MpitrainError(f"{option} {value}: expected > 0")
    if args.dpsgd_noise < 0:
        raise MpitrainError(f"--dpsgd-noise {args.dpsgd_noise}: expected ≥ 0")
    specs = [(name, _spec(name, args)) for name in args.models.split(",")]
    return protections, specs, _ints(args.batches, "--batches")


def bench_leakage(args, comm):
    from ..model import Model

    protections, specs, batches = comm.agree(_check, args)  # one line, every rank ends
    if comm.rank != 0:  # the audit is one process: rank 0 plays the client and the aggregator
        return []
    x_all, y_all, mean, std = _digits()
    if max(batches) * args.cohort > len(x_all):
        raise MpitrainError(f"--batches {args.batches} × --cohort {args.cohort}: more samples than the "
                            f"{len(x_all)} training digits")

    def pixels(a):  # standardised features → pixels on 0…1 (digits' are 0…16)
        return (a * std + mean) / 16.0

    lo, hi = -mean / std, (16.0 - mean) / std
    rng = np.random.default_rng(args.seed)
    rows, panels = [], []
    for name, spec in specs:
        model = Model(spec)
        params = model.init_params(args.seed)
        for b in batches:
            pick = rng.choice(len(x_all), b * args.cohort, replace=False)
            x, y = x_all[pick[:b]], y_all[pick[:b]]
            others = [(x_all[pick[i:i + b]], y_all[pick[i:i + b]]) for i in range(b, b * args.cohort, b)]
            panel = {"title": f"{name} B={b}", "original": pixels(x), "rows": {}}
            for prot in protections:
                row = {"model": name, "batch": b, "protection": prot, "n_params": model.n_params}
                t0 = time.perf_counter()
                seen = observe(prot, model, params, x, y, others, args)
                if isinstance(seen, dict):
                    row.update(seen)
                else:
                    count = b * (args.cohort if prot == "secagg" else 1)
                    labels = recover_labels(model, params, -seen, count)
                    rebuilt, loss = attack(model, params, -seen, labels, lo, hi, args)
                    mse, within, lab, matched = score(pixels(x), pixels(rebuilt), y, labels)
                    row.update(mse=mse, within_0_1=within, labels_recovered=lab, one_minus_cos=loss,
                               status="attacked", seconds=time.perf_counter() - t0)
                    panel["rows"][prot] = matched
                rows.append(row)
            panels.append(panel)
    print(f"gradient-leakage audit: DLG + iDLG labels on one FedSGD step (lr {args.lr}), digits 8×8; "
          f"clip C = {args.clip}, dpsgd σ = {args.dpsgd_noise} C = {args.dpsgd_clip}, secagg cohort {args.cohort}")
    print(table(rows, ["model", "batch", "protection", "mse", "within_0_1", "labels_recovered", "one_minus_cos",
                       "seconds"]))
    for r in rows:
        if "mse" not in r:
            print(f"{r['model']} B={r['batch']} {r['protection']}: {r['status']}")
    figure(panels, protections, args)
    return rows


def figure(panels, protections, args):
    """Originals (top row) and each protection's matched reconstructions, one column per sample."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: figure skipped (pip install matplotlib)")
        return None
    if args.png:
        path = args.png
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    else:
        from ..report import first_free

        out = args.out or "bench-results"
        os.makedirs(out, exist_ok=True)
        base, f = first_free(os.path.join(out, f"leakage-{time.strftime('%Y%m%d-%H%M%S')}"),
                             lambda b: open(b + ".png", "xb"))
        f.close()
        path = base + ".png"
    cols = [(p, i) for p in panels for i in range(len(p["original"]))]
    names = ["original", *protections]
    fig = Figure(figsize=(0.9 * len(cols) + 1.2, 1.0 * len(names) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), len(cols), squeeze=False)
    for j, (p, i) in enumerate(cols):
        for r, name in enumerate(names):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = p["original"] if name == "original" else p["rows"].get(name)
            if img is None:  # an empty square: the cells keep their shape
                ax.imshow(np.full((8, 8), np.nan), vmin=0, vmax=1)
                ax.text(0.5, 0.5, "cannot\nstart" if name == "ckks" else "—", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(np.clip(img[i], 0, 1).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and i == 0:
                ax.set_title(p["title"], fontsize=8, loc="left")
    fig.suptitle("What rank 0 rebuilds of one client's digits from one round (DLG + iDLG labels)", fontsize=9)
    fig.savefig(path, dpi=110)
    print(f"saved {path}")
    return path
