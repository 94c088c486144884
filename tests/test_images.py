"""`prepare --source images:DIR`: an ImageFolder tree of real PNG/JPEG files → the HDF5 layout."""
import hashlib
import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import mpirun
from mpitrain.data.prepare import prepare
from mpitrain.errors import MpitrainError

H, W = 4, 6  # not square, so that a swapped H and W shows


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)  # the mode follows the array: (h, w) L, (h, w, 3) RGB, (h, w, 4) RGBA
    return str(path)


def _folder(root, sizes=None, seed=0):
    """3 classes (b, a, c on disk: labels follow the sorted names) of RGB/RGBA/grey/palette PNGs and JPEGs,
    plus a hidden corrupt file, a hidden folder and a text file, all of which must be ignored."""
    rng = np.random.default_rng(seed)
    h, w = sizes or (H, W)
    pixels = lambda *shape: rng.integers(0, 256, (h, w) + shape, dtype=np.uint8)  # noqa: E731
    files = {}
    for cls in ("b", "a", "c"):
        files[cls] = [_save(root / cls / "0.png", pixels(3)),
                      _save(root / cls / "1.jpg", pixels(3)),
                      _save(root / cls / "2.png", pixels(4)),
                      _save(root / cls / "3.png", pixels())]
    palette = Image.fromarray(pixels(3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "a" / "4.png")
    files["a"].append(str(root / "a" / "4.png"))
    (root / "a" / ".hidden.png").write_bytes(b"not an image")
    (root / "a" / "notes.txt").write_text("ignored")
    _save(root / ".thumbnails" / "x.png", pixels(3))
    return files


def _read(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][...] for k in ("train/x", "train/y", "test/x", "test/y", "standardize/mean",
                                       "standardize/std")}
        return data, dict(f.attrs)


def _raw(data, channels):
    """Both splits with the per-channel standardisation undone, as a reader would: x · std[c] + mean[c]
    over (samples, C, H·W); and their labels."""
    mean, std = data["standardize/mean"], data["standardize/std"]
    assert mean.shape == std.shape == (channels,)
    x = np.concatenate([data["train/x"], data["test/x"]])
    return x.reshape(len(x), channels, -1) * std[:, None] + mean[:, None], np.concatenate([data["train/y"],
                                                                                          data["test/y"]])


def _rows_of(raw, expected):
    """The rows of raw (samples × C × H·W) equal to expected (C, H, W), an image as Pillow itself reads it."""
    return np.flatnonzero(np.all(np.abs(raw - expected.reshape(len(expected), -1)) < 1e-3, axis=(1, 2)))


@pytest.mark.parametrize("grayscale", [False, True])
def test_image_folder(tmp_path, grayscale):
    files = _folder(tmp_path / "imgs")
    out = str(tmp_path / "i.h5")
    line = prepare(f"images:{tmp_path / 'imgs'}", out, test_fraction=0.25, grayscale=grayscale)
    data, attrs = _read(out)
    channels = 1 if grayscale else 3
    assert list(attrs["feature_shape"]) == [channels, H, W] and attrs["n_classes"] == 3
    assert list(attrs["class_names"]) == ["a", "b", "c"]
    assert len(data["train/x"]) == 10 and len(data["test/x"]) == 3 and "10 train + 3 test" in line
    assert data["train/x"].shape[1] == channels * H * W
    pixels = data["train/x"].reshape(10, channels, -1)  # per channel over every training pixel
    assert np.allclose(pixels.mean(axis=(0, 2)), 0, atol=1e-5)
    assert np.allclose(pixels.std(axis=(0, 2)), 1, atol=1e-4)
    raw, labels = _raw(data, channels)
    mode = "L" if grayscale else "RGB"
    for label, path in ((0, files["a"][4]), (1, files["b"][2]), (2, files["c"][1]), (0, files["a"][3])):
        with Image.open(path) as im:  # palette, RGBA, JPEG, grey: Pillow's own conversion
            expected = np.asarray(im.convert(mode)).reshape(H, W, channels).transpose(2, 0, 1)
        (row,) = _rows_of(raw, expected)
        assert labels[row] == label


def test_image_size_resizes(tmp_path):
    files = _folder(tmp_path / "imgs")
    _save(tmp_path / "imgs" / "b" / "9.png", np.zeros((7, 3, 3), np.uint8))  # another size
    out = str(tmp_path / "i.h5")
    prepare(f"images:{tmp_path / 'imgs'}", out, image_size=(3, 5))
    data, attrs = _read(out)
    assert list(attrs["feature_shape"]) == [3, 3, 5] and data["train/x"].shape[1] == 45
    with Image.open(files["c"][0]) as im:
        expected = np.asarray(im.convert("RGB").resize((5, 3), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert len(_rows_of(_raw(data, 3)[0], expected)) == 1


def test_16_bit_grey_keeps_its_range(tmp_path):
    """Pillow's convert() clips 16-bit grey at 255; the high byte is kept instead."""
    grey = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 2700
    for cls in ("a", "b"):
        _save(tmp_path / "imgs" / cls / "0.png", grey)
        _save(tmp_path / "imgs" / cls / "1.png", np.zeros((H, W), np.uint8))
    out = str(tmp_path / "i.h5")
    prepare(f"images:{tmp_path / 'imgs'}", out, grayscale=True, test_fraction=0.25)
    data, _ = _read(out)
    assert len(_rows_of(_raw(data, 1)[0], (grey >> 8)[None])) == 2


def test_train_and_test_folders_are_the_splits(tmp_path):
    _folder(tmp_path / "imgs" / "train")
    test = _folder(tmp_path / "imgs" / "test", seed=1)
    _save(tmp_path / "imgs" / "extra" / "x.png", np.zeros((1, 1), np.uint8))  # no split: ignored
    out = str(tmp_path / "i.h5")
    with pytest.raises(MpitrainError, match=r"--test-fraction: images:.* has its own test split"):
        prepare(f"images:{tmp_path / 'imgs'}", out, test_fraction=0.5)  # it would be ignored
    prepare(f"images:{tmp_path / 'imgs'}", out)
    data, attrs = _read(out)
    assert len(data["train/x"]) == 13 and len(data["test/x"]) == 13
    assert list(attrs["class_names"]) == ["a", "b", "c"]
    assert sorted(data["test/y"]) == [0] * 5 + [1] * 4 + [2] * 4
    with Image.open(test["c"][0]) as im:
        expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    (row,) = _rows_of(_raw(data, 3)[0], expected)
    assert row >= 13 and data["test/y"][row - 13] == 2  # a test row
    os.rename(tmp_path / "imgs" / "test" / "c", tmp_path / "imgs" / "test" / "d")
    with pytest.raises(MpitrainError, match=r"imgs: the class folders of train/ and test/ differ "
                                            r"\(only in train/: c; only in test/: d\); expected the same"):
        prepare(f"images:{tmp_path / 'imgs'}", out)


def _corrupt(kind, path):
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(200))
    else:  # a real image cut in half: the header reads, the pixels do not
        _save(path, np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
        path.write_bytes(path.read_bytes()[:-400])


@pytest.mark.parametrize("kind, name, reason", [
    ("random bytes", "x.png", "not a PNG or JPEG image"),
    ("truncated", "x.png", "image file is truncated"),
    ("truncated", "x.jpg", r"image file is truncated \(\d+ bytes not processed\)"),
])
def test_corrupt_image_is_one_line(tmp_path, kind, name, reason):
    _folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "b" / name
    _corrupt(kind, bad)
    with pytest.raises(MpitrainError, match=rf"^{re.escape(str(bad))}: {reason}; expected a readable PNG or "
                                            rf"JPEG image \(or pass --skip-bad\)$"):
        prepare(f"images:{tmp_path / 'imgs'}", str(tmp_path / "i.h5"), image_size=(H, W))
    assert os.listdir(tmp_path) == ["imgs"]  # no output, no temporary file


def test_corrupt_image_from_the_command_line(tmp_path):
    _folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "b" / "x.png"
    _corrupt("random bytes", bad)
    out = tmp_path / "i.h5"
    r = mpirun(1, "prepare", "--source", f"images:{tmp_path / 'imgs'}", "--out", out)
    assert r.returncode == 2 and r.error_lines() == [
        f"mpitrain: error: {bad}: not a PNG or JPEG image; expected a readable PNG or JPEG image "
        f"(or pass --skip-bad)"]
    assert sorted(os.listdir(tmp_path)) == ["imgs"]  # nothing half-written
    r = mpirun(1, "prepare", "--source", f"images:{tmp_path / 'imgs'}", "--out", out, "--skip-bad",
               "--grayscale", "--image-size", 2, 3)
    assert r.returncode == 0, r.stderr
    assert f"(1 unreadable image(s) skipped, the first {bad})" in r.stdout
    data, attrs = _read(out)
    assert len(data["train/x"]) + len(data["test/x"]) == 13 and list(attrs["feature_shape"]) == [1, 2, 3]


def test_a_class_of_only_bad_files_is_refused_with_skip_bad(tmp_path):
    _folder(tmp_path / "imgs")
    os.makedirs(tmp_path / "imgs" / "d")
    _corrupt("random bytes", tmp_path / "imgs" / "d" / "x.png")
    with pytest.raises(MpitrainError, match=r"imgs/d: every image skipped as unreadable; expected at least one"):
        prepare(f"images:{tmp_path / 'imgs'}", str(tmp_path / "i.h5"), skip_bad=True)


def test_mismatched_sizes_are_one_line(tmp_path):
    _folder(tmp_path / "imgs")
    odd = _save(tmp_path / "imgs" / "b" / "5.png", np.zeros((5, 7, 3), np.uint8))
    first = tmp_path / "imgs" / "a" / "0.png"
    with pytest.raises(MpitrainError, match=rf"^{re.escape(odd)}: 5×7 pixels \(H×W\), but {re.escape(str(first))} "
                                            rf"is {H}×{W}; "
                                            rf"expected the same size \(or pass --image-size H W\)$"):
        prepare(f"images:{tmp_path / 'imgs'}", str(tmp_path / "i.h5"))


def test_bad_folders_are_one_line(tmp_path):
    root = tmp_path / "imgs"
    source = f"images:{root}"
    with pytest.raises(MpitrainError, match=rf"^{re.escape(str(root))}: cannot read \(No such file or directory\)"):
        prepare(source, str(tmp_path / "i.h5"))
    _save(root / "only" / "0.png", np.zeros((2, 2), np.uint8))
    os.makedirs(root / ".hidden")
    with pytest.raises(MpitrainError, match=rf"^{re.escape(str(root))}: 1 class folder\(s\); expected ≥ 2"):
        prepare(source, str(tmp_path / "i.h5"))
    os.makedirs(root / "empty")
    (root / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(MpitrainError, match=rf"^{re.escape(str(root / 'empty'))}: no \.png/\.jpg/\.jpeg files; "
                                            rf"expected at least one"):
        prepare(source, str(tmp_path / "i.h5"))
    _save(root / "empty" / "0.png", np.zeros((2, 2), np.uint8))
    for opts, message in ((dict(classes=3), r"--classes: not for images:.*\(its classes are its subfolders\)"),
                          (dict(image_size=(0, 2)), r"--image-size 0 2: expected H W ≥ 1")):
        with pytest.raises(MpitrainError, match=message):
            prepare(source, str(tmp_path / "i.h5"), **opts)
    with pytest.raises(MpitrainError, match=r"--grayscale: only for an images:DIR source, not 'digits'"):
        prepare("digits", str(tmp_path / "d.h5"), grayscale=True)
    assert not os.path.exists(tmp_path / "i.h5") and not os.path.exists(tmp_path / "d.h5")


def test_digits_is_one_channel_with_unchanged_data(tmp_path):
    """feature_shape [1, 8, 8]; train/x is bit-identical to the file prepared before images existed
    (sha256 recorded from `prepare("digits", ...)` with the defaults at commit 34ee97f)."""
    out = str(tmp_path / "d.h5")
    prepare("digits", out)
    with h5py.File(out, "r") as f:
        assert list(f.attrs["feature_shape"]) == [1, 8, 8] and "class_names" not in f.attrs
        assert f["standardize/mean"].shape == (64,)  # per feature, as before
        assert hashlib.sha256(f["train/x"][...].tobytes()).hexdigest() == \
            "610935ac2f33b658a34cc6979b3eca53ae9ebef645956c03e4525589ae616d1f"
        assert f.attrs["checksum"] == "5df189b11976417d2755a24761902ad0d5e915b92054f579c985a79b82eac809"
