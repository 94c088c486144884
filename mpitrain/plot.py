"""`python -m mpitrain plot RUN_DIR [RUN_DIR …] [--out FILE.png]`: loss and accuracy curves of runs.

Reads each run folder's metrics.jsonl (report.RunLog; fields from trainer.py and federated/run.py):

* train runs — x = step: `train_loss`, `train_accuracy` (every train.log_every steps) and `val_loss`,
  `val_accuracy` or `test_loss`, `test_accuracy` (separate records, at every evaluation);
* federated runs — x = round: `train_loss` every round, `test_loss`, `test_accuracy`, `federated_accuracy`
  and `worst_client_accuracy` (null without local test splits, and under fed.erase) at evaluations, `epsilon` (and
  `record_epsilon` under DP-SGD) when differential privacy is on; a round with no client sampled
  records a train_loss of 0, which is left out.

One row of panels per kind (train runs against steps, federated runs against rounds; a mix gets both
rows): loss, accuracy and, when a federated run has DP, ε.  Colours are runs (named by their folder),
line styles are metrics.  A resumed run repeats the steps after its checkpoint in metrics.jsonl: the
last record of a step wins.  Agg renderer without pyplot (no display, no global state); the PNG is
written atomically.
"""
import json
import math
import os

from .errors import MpitrainError

NEEDS = "plot needs matplotlib: pip install 'mpitrain[bench]'"
# metric → (legend text, line style); the style legend of a row explains them for all its panels
STYLES = {"train": ("train", "-"), "test": ("test", "--"), "federated": ("federated (clients' local test)", "-."),
          "worst": ("worst client", ":"), "record": ("record-level ε (DP-SGD)", ":"), "val": ("validation", ":")}
PANELS = {  # kind → [(panel title, y label, [(metric field, style key)])]
    "train": [("loss", "loss", [("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")]),
              ("accuracy", "accuracy", [("train_accuracy", "train"), ("val_accuracy", "val"),
                                        ("test_accuracy", "test")])],
    "federated": [("loss", "loss", [("train_loss", "train"), ("test_loss", "test")]),
                  ("accuracy", "accuracy", [("test_accuracy", "test"), ("federated_accuracy", "federated"),
                                            ("worst_client_accuracy", "worst")])],
}
PRIVACY = ("privacy spent", "ε", [("epsilon", "train"), ("record_epsilon", "record")])
XLABEL = {"train": "step", "federated": "round"}


class Run:
    """One run folder: name (the folder's name), kind (train | federated), records by x."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(os.path.normpath(os.path.abspath(path)))
        if not os.path.exists(path):
            raise MpitrainError(f"{path}: no such run folder")
        if not os.path.isdir(path):
            raise MpitrainError(f"{path}: not a folder (expected a run folder holding metrics.jsonl)")
        metrics = os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(metrics):
            raise MpitrainError(f"{path}: no metrics.jsonl (not a run folder, or a run that never started)")
        records = _read(metrics)
        kinds = {"federated" if "round" in r else "train" if "step" in r else None for r in records}
        if None in kinds or len(kinds) != 1:
            raise MpitrainError(f"{metrics}: expected records with a step (train) or a round (federate)"
                                + (", not both" if len(kinds) > 1 else ""))
        (self.kind,) = kinds
        x = "round" if self.kind == "federated" else "step"
        self.series = {}  # field → {x: value}; later records of the same x (a resumed run) replace earlier
        for r in records:
            if r.get("clients") == 0:  # a round that sampled no client (DP's Poisson draw) trained nothing
                r.pop("train_loss", None)
            for key, value in r.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != x:
                    self.series.setdefault(key, {})[r[x]] = value
        self.delta = None
        try:
            with open(os.path.join(path, "summary.json"), encoding="utf-8") as f:
                self.delta = json.load(f).get("delta")
        except (OSError, ValueError, AttributeError):
            pass  # a run still going (or stopped early) has no summary yet

    def length(self):
        """The number of points in the run's longest series."""
        return max(map(len, self.series.values()), default=0)

    def points(self, key):
        """(xs, ys) of one field, sorted by x; null values (e.g. no local test split) are left out."""
        items = sorted(self.series.get(key, {}).items())
        return [x for x, _ in items], [y for _, y in items]


def _read(metrics):
    try:
        with open(metrics, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise MpitrainError(f"{metrics}: cannot read ({exc})") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline after it: a line cut by a crash mid-write; the rest is good
                break
            raise MpitrainError(f"{metrics}, line {i}: not a JSON record") from None
        if not isinstance(r, dict):
            raise MpitrainError(f"{metrics}, line {i}: not a JSON object")
        records.append(r)
    if not records:
        raise MpitrainError(f"{metrics}: no records yet")
    return records


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise MpitrainError(NEEDS) from None
    return FigureCanvasAgg, Figure, Line2D


def figure(runs, log_y=False):
    """The matplotlib Figure of loaded Runs: a row per kind present (train, then federated).  Each line's
    label is "RUN: FIELD" (e.g. "a: test_accuracy").  log_y: the loss panels on a logarithmic axis."""
    FigureCanvasAgg, Figure, Line2D = _matplotlib()
    names = [r.name for r in runs]
    for r in runs:  # two folders of the same name (runs/a/run, runs/b/run): the paths tell them apart
        if names.count(r.name) > 1:
            r.name = os.path.normpath(r.path)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    rows = [(kind, [(r, c) for r, c in zip(runs, colors) if r.kind == kind]) for kind in ("train", "federated")]
    rows = [(kind, members) for kind, members in rows if members]
    cols = max(len(PANELS[k]) + (k == "federated" and any("epsilon" in r.series for r, _ in m)) for k, m in rows)
    fig = Figure(figsize=(4.6 * cols, 3.9 * len(rows) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, (kind, members) in zip(subfigs, rows):
        panels = list(PANELS[kind])
        if kind == "federated" and any("epsilon" in r.series for r, _ in members):
            panels.append(PRIVACY)
        sub.suptitle(f"{kind} runs, by {XLABEL[kind]}", fontsize="large")
        axes = sub.subplots(1, cols, squeeze=False)[0]
        used = set()
        for ax, (title, ylabel, fields) in zip(axes, panels):
            low = 1.0
            for run, color in members:
                few = run.length() <= 30  # a short run: mark its points, a line alone hides them
                for key, style in fields:
                    xs, ys = run.points(key)
                    if not xs:
                        continue
                    low = min(low, *ys)
                    ax.plot(xs, ys, STYLES[style][1], color=color, marker="o" if few else None, markersize=3,
                            linewidth=1.6 if style != "train" or kind == "federated" else 1.0,
                            alpha=0.75 if style == "train" and kind == "train" else 1.0,
                            label=f"{run.name}: {key}")
                    used.add(style)
            if title == PRIVACY[0]:
                deltas = {r.delta for r, _ in members if r.delta is not None}
                title += f" (δ = {deltas.pop():g})" if len(deltas) == 1 else ""
            ax.set(title=title, xlabel=XLABEL[kind], ylabel=ylabel)
            if ylabel == "accuracy":  # from a tenth below the lowest point to 1: high accuracies stay apart
                bottom = max(0.0, math.floor(low * 10 - 0.5) / 10)
                ax.set_ylim(bottom - 0.02 * (1 - bottom), 1 + 0.02 * (1 - bottom))
            elif ylabel == "loss" and log_y:
                ax.set_yscale("log")
            elif ylabel == "loss":
                ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.margins(x=0.02)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        # colours = runs (in the loss panel), styles = metrics (in the accuracy panel), each where it hides
        # the fewest points
        axes[0].legend([Line2D([], [], color=c, linewidth=2) for _, c in members], [r.name for r, _ in members],
                       title="run", fontsize="small", loc="best")
        order = [s for s in STYLES if s in used and s != "record"]
        axes[1].legend([Line2D([], [], color="0.35", linestyle=STYLES[s][1]) for s in order],
                       [STYLES[s][0] for s in order], title="metric", fontsize="small", loc="best")
        if len(panels) > 2 and "record" in used:
            axes[2].legend([Line2D([], [], color="0.35", linestyle=s) for s in ("-", ":")],
                           ["client-level ε", STYLES["record"][0]], fontsize="small", loc="upper left")
    return fig


def png_path(out):
    """--out checked: a file name ending in .png, which a name without a suffix is given."""
    if os.path.isdir(out):
        raise MpitrainError(f"--out {out}: is a folder; expected a file name such as {os.path.join(out, 'plot.png')}")
    suffix = os.path.splitext(out)[1]
    if suffix.lower() not in ("", ".png"):  # another suffix would name a PNG as something else
        raise MpitrainError(f"--out {out}: plot writes PNG images; expected a name ending in .png")
    return out if suffix else out + ".png"


def write(fig, out):
    """Save the figure as a PNG at out, atomically (temporary file, fsync, rename)."""
    from .checkpoint import atomic_write

    directory = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(directory, exist_ok=True)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise MpitrainError(f"--out {out}: cannot write ({exc.strerror or exc})") from None


def main(paths, out="plot.png", log_y=False):
    """The plot command: load the runs, draw them, write the PNG; returns its path."""
    _matplotlib()  # the one line about matplotlib before anything else
    out = png_path(out)
    runs = [Run(p) for p in paths]
    write(figure(runs, log_y), out)
    kinds = sorted({r.kind for r in runs})
    print(f"{out}: {len(runs)} {' and '.join(kinds)} run(s) plotted", flush=True)
    return out
