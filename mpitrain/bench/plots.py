"""PNG plots of a `bench scaling` run (matplotlib, Agg renderer; optional: skipped when not installed)."""
import os


def _figure(title, ylabel, ranks=None):
    """A figure with one axes; with `ranks`, a log2 x axis ticked at the measured rank counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, no display needed
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="ranks", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if ranks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(p) for p in ranks])
        ax.minorticks_off()
    return fig, ax


def scaling_plots(rows, mode, out):
    """Speedup, efficiency, time per step and the per-part breakdown vs ranks → out/scaling-MODE-*.png
    (overwritten by the next run of the same mode; the JSON/CSV beside them are timestamped)."""
    try:
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    os.makedirs(out, exist_ok=True)
    ranks = sorted({r["ranks"] for r in rows})
    series = {}  # comm mode → its rows, by rank count
    for r in rows:
        series.setdefault(r.get("comm", "plain") + (f" tensor {r['tensor']}" if r.get("tensor", 1) > 1 else ""),
                          []).append(r)
    base = min(rows, key=lambda r: r["ranks"])
    ideal = [p / base["ranks"] for p in ranks]
    figs = {}

    fig, ax = figs["speedup"] = _figure(f"{mode} scaling: speedup", f"speedup vs {base['ranks']} rank(s)", ranks)
    ax.plot(ranks, ideal, "--", color="gray", label="ideal")
    for comm, rs in series.items():
        ax.plot([r["ranks"] for r in rs], [r["speedup"] for r in rs], "o-", label=comm)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 2 rather than 2⁻¹, 2⁰, 2¹
    ax.legend()

    fig, ax = figs["efficiency"] = _figure(f"{mode} scaling: efficiency", "efficiency", ranks)
    ax.axhline(1.0, ls="--", color="gray", label="ideal")
    for comm, rs in series.items():
        ax.plot([r["ranks"] for r in rs], [r["efficiency"] for r in rs], "o-", label=comm)
    ax.set_ylim(0, max(1.1, *(r["efficiency"] * 1.1 for r in rows)))
    ax.legend()

    # ideal time per step: flat in weak scaling, falling as 1/p in strong scaling
    fig, ax = figs["time"] = _figure(f"{mode} scaling: time per step", "ms per step", ranks)
    t_ideal = [base["step_ms"] * (1 if mode == "weak" else 1 / s) for s in ideal]
    ax.plot(ranks, t_ideal, "--", color="gray", label="ideal")
    for comm, rs in series.items():
        ax.plot([r["ranks"] for r in rs], [r["step_ms"] for r in rs], "o-", label=comm)
    ax.set_ylim(bottom=0)
    ax.legend()

    fig, ax = figs["breakdown"] = _figure(f"{mode} scaling: where a step goes (max over ranks)",
                                          "ms per step")
    labels = [f"{r['ranks']}" + (f" {r['comm']}" if len(series) > 1 else "")
              + (f" t{r['tensor']}" if r.get("tensor", 1) > 1 else "") for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("compute", "allreduce", "tensor", "data"):
        heights = [r.get(f"{part}_ms", 0.0) for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if len(series) > 1:
        ax.tick_params(axis="x", labelrotation=60)
    ax.legend()

    paths = []
    for name, (fig, _) in figs.items():
        paths.append(os.path.join(out, f"scaling-{mode}-{name}.png"))
        fig.savefig(paths[-1], dpi=100)
    print(f"saved {', '.join(paths)}")
    return paths
