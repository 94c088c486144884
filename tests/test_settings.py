"""Settings that would do nothing where they are given, through the command line (config.READ_BY and ACTS
are tested in test_optim_config.py): one line and exit 2 on every rank, or a start-up line where a default
stands in for a value the user should choose.  And a misspelt command names the commands."""
import pytest

from conftest import mpirun


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A small synthetic dataset over 4 IID clients."""
    path = str(tmp_path_factory.mktemp("settings") / "parts.h5")
    r = mpirun(1, "prepare", "--source", "synthetic", "--samples", 400, "--features", 8, "--classes", 3,
               "--out", path, "--partition", "iid", "--clients", 4)
    assert r.returncode == 0, r.stderr
    return path


def one_line(r):
    lines = r.error_lines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mpitrain: error: "), r.stderr
    return lines[0][len("mpitrain: error: "):]


@pytest.mark.parametrize("command,sets,expected", [
    ("federate", ["comm.mode=fp16"], "comm.mode has no effect: federate exchanges each round's update"),
    ("federate", ["train.epochs=3"], "train.epochs has no effect: federate runs fed.rounds rounds"),
    ("federate", ["fed.min_clients=50"], "fed.min_clients = 50: expected at most the 4 clients of the partition"),
    ("train", ["fed.rounds=3"], "fed.rounds has no effect: train does not read [fed]"),
    ("train", ["model.layers=conv2d 8 3", "model.kind=layers"], "model.layers = 'conv2d 8 3': expected a list"),
])
def test_a_setting_without_effect_is_one_line(tmp_path, parts, command, sets, expected):
    args = [command, "--quiet", "--data", parts, "--out", tmp_path / "o"]
    r = mpirun(3, *args, *[a for s in sets for a in ("--set", s)], timeout=120)
    assert one_line(r).startswith(expected), r.stderr


def test_a_default_clip_under_dp_is_said_at_start_up(tmp_path, parts):
    """Client-level DP and DP-SGD without a clip norm run with C = 1 (each clip's default) and say so; a
    given clip is not remarked on."""
    sets = ["model.kind=softmax", "fed.rounds=1", "fed.fraction=1", "fed.dp.noise_multiplier=1",
            "fed.dpsgd.noise_multiplier=1"]
    r = mpirun(3, "federate", "--data", parts, "--out", tmp_path / "a", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    for key in ("fed.dp.clip", "fed.dpsgd.clip"):
        assert r.stdout.count(f"clip 1 (not given: the default of {key}; set it near the norms it clips)") == 1
    sets += ["fed.dp.clip=0.5", "fed.dpsgd.clip=2"]
    r = mpirun(3, "federate", "--data", parts, "--out", tmp_path / "b", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0 and "not given" not in r.stdout and "clip 0.5," in r.stdout, r.stderr


def test_a_misspelt_command_names_the_commands():
    r = mpirun(2, "trian", "--quiet", timeout=60)
    assert one_line(r) == ("unknown command 'trian' (did you mean train?): expected one of train, federate, "
                           "prepare, eval, predict, info, bench, plot, export, generate, lr-find, or options alone "
                           "(which train)")
