"""`python -m mpitrain plot`: train and federated (DP) runs overlaid, the PNG, and its one-line errors."""
import os
import subprocess
import sys

from conftest import mpirun


def test_plot_train_and_federated_runs(tmp_path, synth):
    for name in ("a", "b"):
        r = mpirun(2, "train", "--quiet", "--out", tmp_path / name, "--data", synth, "--set", "model.hidden=[8]",
                   "--set", "train.steps=20", "--set", "train.eval_every=5", "--set", "train.log_every=5")
        assert r.returncode == 0, r.stderr
    parts = str(tmp_path / "parts.h5")
    assert mpirun(1, "prepare", "--source", "digits", "--out", parts, "--partition", "iid", "--clients", 4).returncode == 0
    r = mpirun(3, "federate", "--quiet", "--out", tmp_path / "f", "--data", parts, "--set", "model.kind=softmax",
               "--set", "fed.rounds=3", "--set", "fed.dp.noise_multiplier=1", "--set", "fed.fraction=0.5")
    assert r.returncode == 0, r.stderr
    from mpitrain.plot import Run, figure

    fig = figure([Run(str(tmp_path / n)) for n in ("a", "b", "f")])
    labels = {t.get_text() for ax in fig.axes for leg in [ax.get_legend()] if leg for t in leg.get_texts()}
    assert {"a", "b", "f", "worst client"} <= labels
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("loss") == 2 and "privacy spent (δ = 1e-05)" in titles  # a row per kind, ε under DP
    out = tmp_path / "curves.png"
    r = mpirun(1, "plot", tmp_path / "a", tmp_path / "b", tmp_path / "f", "--out", out)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 20_000
    r = mpirun(1, "plot", tmp_path / "nope")
    assert r.returncode == 2 and r.error_lines() == [f"mpitrain: error: {tmp_path / 'nope'}: no such run folder"]


def test_plot_without_matplotlib_is_one_line(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\nfrom mpitrain.cli import main\n"
            f"sys.exit(main(['plot', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "mpitrain: error: plot needs matplotlib: pip install 'mpitrain[bench]'"
