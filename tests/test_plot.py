"""`python -m mpitrain plot`: train and federated (DP) runs overlaid, the PNG, and its one-line errors."""
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import mpirun
from mpitrain.errors import MpitrainError


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth):
    """Two tiny train runs (a, b) and one federated run with client-level DP (f)."""
    tmp = tmp_path_factory.mktemp("plot-runs")
    for name, lr in (("a", 0.05), ("b", 0.2)):
        r = mpirun(2, "train", "--quiet", "--out", tmp / name, "--data", synth, "--set", "model.hidden=[8]",
                   "--set", "train.steps=20", "--set", "train.eval_every=5", "--set", "train.log_every=5",
                   "--set", f"train.lr={lr}")
        assert r.returncode == 0, r.stderr
    parts = str(tmp / "parts.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", parts, "--partition", "iid", "--clients", 4).returncode == 0
    r = mpirun(3, "federate", "--quiet", "--out", tmp / "f", "--data", parts, "--set", "model.kind=softmax",
               "--set", "fed.rounds=3", "--set", "fed.dp.noise_multiplier=1", "--set", "fed.fraction=0.5",
               "--set", "fed.erase=false")  # the worst client's curve: one client's value, withheld under erase
    assert r.returncode == 0, r.stderr
    return tmp


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_train_and_federated_runs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from mpitrain.plot import Run, figure

    fig = figure([Run(str(runs / n)) for n in ("a", "b", "f")])
    labels = {t.get_text() for ax in fig.axes for leg in [ax.get_legend()] if leg for t in leg.get_texts()}
    assert {"a", "b", "f", "worst client"} <= labels
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("loss") == 2 and "privacy spent (δ = 1e-05)" in titles  # a row per kind, ε under DP
    lines = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {f"{n}: {k}" for n in "ab" for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")} <= lines
    assert {"f: train_loss", "f: test_accuracy", "f: worst_client_accuracy", "f: epsilon"} <= lines
    assert {ax.get_xlabel() for ax in fig.axes if ax.get_lines()} == {"step", "round"}
    (eps,) = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "f: epsilon"]
    assert list(eps.get_xdata()) == [1, 2, 3] and all(v > 0 for v in eps.get_ydata())

    out = tmp_path / "png" / "curves.png"  # its folder is made
    r = mpirun(1, "plot", runs / "a", runs / "b", runs / "f", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{out}: 3 federated and train run(s) plotted"
    width, height = png_size(out)
    assert 1000 <= width <= 3000 and 600 <= height <= 2000 and os.path.getsize(out) > 20_000
    assert os.listdir(out.parent) == ["curves.png"]  # written atomically: no temporary file left
    r = mpirun(1, "plot", runs / "nope")
    assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {runs / 'nope'}: no such run folder"]


def test_plot_default_out_is_the_current_folder(runs, tmp_path):
    pytest.importorskip("matplotlib")
    r = mpirun(1, "plot", runs / "f", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "plot.png: 1 federated run(s) plotted"
    width, height = png_size(tmp_path / "plot.png")
    assert width >= 1000 and height >= 400


def test_plot_errors_are_one_line(runs, tmp_path):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty"
    os.makedirs(empty)
    afile = tmp_path / "a.txt"
    afile.write_text("x\n", encoding="utf-8")
    bad = tmp_path / "bad"
    os.makedirs(bad)
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    for path, message in ((empty, "no metrics.jsonl (not a run folder, or a run that never started)"),
                          (afile, "not a folder (expected a run folder holding metrics.jsonl)")):
        r = mpirun(1, "plot", runs / "a", path, "--out", tmp_path / "x.png")
        assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {path}: {message}"]
    r = mpirun(1, "plot", bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {bad / 'metrics.jsonl'}, line 2: not a JSON record"]
    r = mpirun(1, "plot", runs / "a", "--out", tmp_path)
    assert r.returncode == 2 and len(r.error_lines()) == 1 and "is a folder" in r.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_resumed_and_cut_logs(tmp_path):
    """A resumed run repeats steps (the last record wins); a last line cut by a crash is left out."""
    from mpitrain.plot import Run

    run = tmp_path / "r"
    os.makedirs(run)
    rows = [{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": 9.0},  # round 2 redone after a resume
            {"round": 2, "train_loss": 1.0, "test_accuracy": 0.5, "worst_client_accuracy": None}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 3, "tr',
                                       encoding="utf-8")
    r = Run(str(run))
    assert r.kind == "federated" and r.points("train_loss") == ([1, 2], [2.0, 1.0])
    assert r.points("test_accuracy") == ([2], [0.5]) and r.points("worst_client_accuracy") == ([], [])


def test_plot_without_matplotlib_is_one_line(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\nfrom mpitrain.cli import main\n"
            f"sys.exit(main(['plot', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "mpitrain: error: plot needs matplotlib: pip install 'mpitrain[bench]'"


def test_out_without_suffix_gets_png_and_another_suffix_is_refused(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from mpitrain.plot import main

    assert main([str(runs / "f")], str(tmp_path / "new" / "p")) == str(tmp_path / "new" / "p.png")
    assert os.listdir(tmp_path / "new") == ["p.png"] and png_size(tmp_path / "new" / "p.png")[0] >= 1000
    with pytest.raises(MpitrainError, match=r"p\.jpg: plot writes PNG images; expected a name ending in \.png"):
        main([str(runs / "f")], str(tmp_path / "p.jpg"))
