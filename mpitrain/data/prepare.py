"""Sources → one HDF5 file (the layout every rank reads its shard from).

Layout: train/x, test/x (float32, samples × features, chunked along samples), train/y, test/y (int64),
standardize/mean, standardize/std (training-split statistics, already applied: one per feature, or for
images one per channel), optionally val/x, val/y (prepare --validation-fraction: drawn from the training
samples, standardised with the training statistics), and attributes n_classes, feature_shape, source,
checksum (sha256 of the four arrays, then val/'s two), format; images and sources with string labels also
class_names.  Regression (float y, or csv --target): the y arrays are float32 samples × targets,
standardised with the training split's target/mean, target/std; attributes task = "regress" and n_targets
instead of n_classes.

Bounded memory: sources larger than memory (npy:DIR, npz:DIR, images:DIR) are read a group of rows at a
time — npy files with positioned reads, a folder of npz files or of images first copied in storage order
into a raw temporary file beside the output — and the file is written group by group in two passes: the
shuffled training rows with their statistics (Chan et al.'s parallel variance, merged group by group), then
standardised in place.  Memory: a few groups (GROUP_BYTES) plus 16 bytes per sample (labels, the shuffle).
Everything is written under a temporary name and renamed at the end: a killed prepare leaves no output.
"""
import csv
import hashlib
import os

import numpy as np

from .. import __version__
from ..errors import MpitrainError

FORMAT = 1
SOURCES = "digits | diabetes | synthetic | npz:PATH | npz:DIR | npy:DIR | csv:PATH | images:DIR | text:FILE | pydoc"
GROUP_BYTES = 4 << 20  # rows gathered, checked and written at a time (a source under it: one group)
SYNTHETIC_CLASSES = 10  # --classes when the synthetic source is not given one
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-cased
LAYOUTS = ("nchw", "nhwc")  # --layout: a sample's channels first (stored as given) or last (moved first)
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the channel counts --layout's automatic rule recognises
# options only some sources read (given for another they would be ignored): option → (source kinds, which)
SOURCE_OPTIONS = {"--samples": (("synthetic",), "the synthetic source"),
                  "--features": (("synthetic",), "the synthetic source"),
                  "--label-column": (("csv",), "a csv:PATH source"),
                  "--target": (("csv",), "a csv:PATH source (npz and npy sources give float y for regression)"),
                  "--layout": (("npz", "npy"), "npz:PATH, npz:DIR and npy:DIR sources"),
                  "--image-size": (("images",), "an images:DIR source"),
                  "--grayscale": (("images",), "an images:DIR source"),
                  "--skip-bad": (("images",), "an images:DIR source")}


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    # one channel, as images:DIR --grayscale: feature_shape [1, 8, 8], the same 64 numbers in the same order
    return d.images.astype(np.float32)[:, None], d.target.astype(np.int64), None, None


def _diabetes():
    """scikit-learn's diabetes data (Efron et al. 2004, shipped in its wheel): 442 patients, 10 raw baseline
    variables, the target a measure of disease progression one year later (float: regression)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    return d.data, d.target, None, None


def _synthetic(samples, features, classes, seed):
    """A learnable task: labels are the argmax of a random two-layer tanh teacher network."""
    if samples < 2 or features < 1 or classes > samples:
        raise MpitrainError(f"synthetic source: --samples {samples}, --features {features}, --classes {classes}; "
                            "expected --samples ≥ 2, --features ≥ 1, --classes ≤ --samples")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E7]))
    x = rng.standard_normal((samples, features), dtype=np.float32)
    hidden = rng.standard_normal((features, 64)).astype(np.float32) * (2.0 / np.sqrt(features))
    head = rng.standard_normal((64, classes)).astype(np.float32)
    y = np.argmax(np.tanh(x @ hidden) @ head, axis=1).astype(np.int64)
    return x, y, None, None


class Rows:
    """Rows of an array stored raw in a file (a .npy's data, or a temporary copy), read on demand with
    positioned reads: never the whole array, and no memory map (a map takes the file's size of address
    space, which RLIMIT_AS and batch schedulers count)."""

    def __init__(self, path, offset, shape, dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self.row = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        need = offset + self.row * self.shape[0]
        if os.path.getsize(path) < need:
            raise MpitrainError(f"{path}: {os.path.getsize(path)} bytes, shorter than its header's shape "
                                f"{list(self.shape)} needs ({need}); expected a whole .npy file")

    def __len__(self):
        return self.shape[0]

    def take(self, rows):
        """The rows at the sorted indices `rows`, one read per run of consecutive rows."""
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(self.path, "rb", buffering=0) as f:
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
                f.seek(self.offset + int(rows[a]) * self.row)
                done, want = 0, (b - a) * self.row
                while done < want:
                    got = f.readinto(view[a * self.row + done:b * self.row])
                    if not got:
                        raise MpitrainError(f"{self.path}: ends early; expected a whole .npy file")
                    done += got
        return out


def _npy(path):
    """A .npy file's rows (Rows), after its header: C order, numbers (never objects: no unpickling)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: cannot read as .npy ({exc})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise MpitrainError(f"{path}: dtype {dtype}; expected numbers")
    if fortran and len(shape) > 1:
        raise MpitrainError(f"{path}: stored in Fortran order; expected C order (np.save of a C-contiguous array)")
    return Rows(path, offset, shape, dtype)


def _npy_dir(root):
    """npy:DIR — x.npy, y.npy and optionally x_test.npy, y_test.npy; x read in groups, labels loaded."""
    names = {k: os.path.join(root, k + ".npy") for k in ("x", "y", "x_test", "y_test")}
    missing = [k + ".npy" for k in ("x", "y") if not os.path.exists(names[k])]
    if missing:
        raise MpitrainError(f"{root}: missing {', '.join(missing)}; expected x.npy, y.npy (and optionally "
                            "x_test.npy, y_test.npy)")
    if os.path.exists(names["x_test"]) != os.path.exists(names["y_test"]):
        raise MpitrainError(f"{root}: x_test.npy and y_test.npy must be given together")

    def labels(k):
        try:
            return np.load(names[k], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MpitrainError(f"{names[k]}: cannot read as .npy ({exc})") from None

    test = os.path.exists(names["x_test"])
    return (_npy(names["x"]), labels("y"), _npy(names["x_test"]) if test else None,
            labels("y_test") if test else None)


class _Copy:
    """A raw temporary file that samples are appended to (dtype fixed by the first), read back as Rows."""

    def __init__(self, path):
        self.path, self.f, self.shape, self.n = path, open(path, "wb"), None, 0

    def add(self, a):
        self.shape, self.dtype = a.shape[1:], a.dtype
        self.f.write(np.ascontiguousarray(a).tobytes())
        self.n += len(a)

    def rows(self):
        self.f.close()
        return Rows(self.path, 0, (self.n,) + self.shape, self.dtype)


def _npz_dir(root, temp):
    """npz:DIR — every *.npz file in DIR (sorted), each as npz:PATH, concatenated one file at a time."""
    try:
        paths = sorted(e.path for e in os.scandir(root) if e.is_file() and e.name.endswith(".npz"))
    except OSError as exc:
        raise MpitrainError(f"{root}: cannot read ({exc.strerror})") from None
    if not paths:
        raise MpitrainError(f"{root}: no .npz files; expected files with arrays x, y (and optionally x_test, y_test)")
    copies, labels, test = [_Copy(temp("x")), _Copy(temp("x_test"))], [[], []], None
    for path in paths:
        x, y, x_test, y_test = _npz(path)
        if test is None:
            test, regress = x_test is not None, _is_float(y)
        elif test != (x_test is not None):
            raise MpitrainError(f"{path}: {'no' if test else 'an'} x_test, unlike {paths[0]}; expected the same arrays in every file")
        for c, lab, a, b, name in ((0, 0, x, y, "x"), (1, 1, x_test, y_test, "x_test")):
            if a is None:
                continue
            a = np.asarray(a)
            shape = copies[0].shape if copies[0].shape is not None else a.shape[1:]
            if a.shape[1:] != shape:
                raise MpitrainError(f"{path}: {name} samples have shape {a.shape[1:]}, {paths[0]}'s x {shape}; "
                                    "expected the same")
            copies[c].add(_features(a, f"{path} {name}"))
            like = (f"{paths[0]} y", labels[0][0]) if labels[0] else None
            labels[lab].append(_outputs(b, f"{path} y" if c == 0 else f"{path} y_test", len(a), regress, like))
    return (copies[0].rows(), np.concatenate(labels[0]), copies[1].rows() if test else None,
            np.concatenate(labels[1]) if test else None)


def _npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle a data file
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: cannot read as .npz ({exc})") from None
    expected = "expected x, y (and optionally x_test, y_test)"
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise MpitrainError(f"{path}: missing array(s) {', '.join(missing)}; {expected}")
    unknown = sorted(set(arrays) - {"x", "y", "x_test", "y_test"})
    if unknown:  # a misspelt x_test would otherwise be ignored and the test split drawn from x
        raise MpitrainError(f"{path}: unknown array(s) {', '.join(unknown)}; {expected}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise MpitrainError(f"{path}: x_test and y_test must be given together")
    return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")


def _is_number(cell):
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_rows(path):
    """(line number, cells) of each row that is not blank, as the csv module reads the file."""
    try:
        # utf-8-sig: a byte-order mark is no part of the first cell; skipinitialspace: `1, "2"` is quoted
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, skipinitialspace=True)
            for cells in reader:
                if len(cells) > 1 or "".join(cells).strip():
                    yield reader.line_num, cells
    except OSError as exc:
        raise MpitrainError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise MpitrainError(f"{path}: not UTF-8 text; expected a CSV file saved as UTF-8") from None
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise MpitrainError(f"{path}: line {reader.line_num}: {exc}") from None


def _column(path, name, header, width, option):
    """The index of column `name` (a header name, else an index) that option (--label-column, --target) gives."""
    if header and name in header:
        if header.count(name) > 1:
            raise MpitrainError(f"{path}: column name {name!r} appears {header.count(name)} times in the header")
        return header.index(name)
    try:
        col = int(name)
    except ValueError:
        known = (f"columns: {', '.join(header)}" if header else
                 f"no header row, so {option} must be a column index, 0…{width - 1}")
        raise MpitrainError(f"{path}: no column named {name!r} ({known})") from None
    if not -width <= col < width:
        what = "label" if option == "--label-column" else "target"
        raise MpitrainError(f"{path}: {what} column {name} is out of range for {width} columns")
    return col % width


def _csv_table(path, header, width, skip=None):
    """The table cell by cell: slower than np.loadtxt, but as lenient as the csv module, and it names the
    line and column of a bad cell (never its value: data values stay out of error messages).  Column skip
    (class names) is left out."""
    rows = _csv_rows(path)
    if header:
        next(rows)
    keep = [j for j in range(width) if j != skip]
    table = []
    for line, cells in rows:
        if len(cells) != width:
            raise MpitrainError(f"{path}: line {line} has {len(cells)} columns; expected {width}")
        try:
            table.append([float(cells[j]) for j in keep])
        except ValueError:
            j = next(j for j in keep if not _is_number(cells[j]))
            name = f" ({header[j]})" if header else ""
            what = "is empty" if not cells[j].strip() else "is not a number"
            raise MpitrainError(f"{path}: line {line}, column {j + 1}{name} {what}; expected a number") from None
    return np.array(table, dtype=np.float64).reshape(len(table), len(keep))


def _csv(path, label_column, target=None):
    """x and the label column (classification: numbers, or class names throughout), or with target
    (--target COL[,COL…]) the target columns (regression); every other column is a feature."""
    if target is not None and label_column is not None:
        raise MpitrainError("--target with --label-column: a csv source has one label column (classification) "
                            "or target columns (regression); give one of them")
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise MpitrainError(f"{path}: empty file; expected a CSV table (optional header row, then numbers)")
    header_line, cells = first
    names = [c.strip() for c in cells]
    # a header has a cell that is text (an empty one, as R writes above row names, does not decide)
    text = [bool(n) and not _is_number(n) for n in names]
    header = names if any(text) else None
    width = len(cells)
    if width < 2:
        raise MpitrainError(f"{path}: 1 column; expected a {'label' if target is None else 'target'} column and "
                            "at least one feature column")
    if target is not None:
        cols = [_column(path, t.strip(), header, width, "--target") for t in target.split(",")]
        if len(set(cols)) < len(cols):
            raise MpitrainError(f"--target {target}: names a column of {path} twice")
        if len(cols) == width:
            raise MpitrainError(f"--target {target}: every column of {path} is a target; expected at least one "
                                "feature column")
        if header and next(rows, None) is None:
            raise MpitrainError(f"{path}: a header row but no data rows")
        rows.close()
        table = _numbers(path, header, header_line, width)
        return np.delete(table, cols, axis=1), table[:, cols], None, None
    col = width - 1 if label_column is None else _column(path, label_column, header, width, "--label-column")
    rows.close()
    lines, labels = [], []
    for line, c in _csv_rows(path):
        if len(c) != width:  # checked here: loadtxt's usecols would pass over a longer row
            raise MpitrainError(f"{path}: line {line} has {len(c)} columns; expected {width}")
        lines.append(line)
        labels.append(c[col].strip())
    if header and text.count(True) == 1 and text[col] and names[col] in labels[1:] and label_column != names[col]:
        header = None  # text in the label column alone, a class name found below it: a row of data
    lines, labels = (lines[1:], labels[1:]) if header else (lines, labels)
    if not labels:
        raise MpitrainError(f"{path}: a header row but no data rows")
    numbers = [_is_number(n) for n in labels]
    named = not all(numbers)  # class names (classes.encode numbers them), in every row
    if named and (any(numbers) or not all(labels)):  # a typo among numbers (or names) is no class of its own
        odd = sum(numbers) * 2 < len(numbers)  # the minority's first cell: a number among names, or a name
        i = next(i for i, (n, v) in enumerate(zip(numbers, labels)) if not v or any(numbers) and n == odd)
        what = "is empty" if not labels[i] else "is a number" if odd else "is not a number"
        raise MpitrainError(f"{path}: line {lines[i]}, column {col + 1}{f' ({names[col]})' if header else ''} "
                            f"{what}; expected a label (numbers or class names throughout the column)")
    if named:
        return _numbers(path, header, header_line, width, col), np.array(labels), None, None
    table = _numbers(path, header, header_line, width)
    return np.delete(table, col, axis=1), table[:, col], None, None


def _numbers(path, header, header_line, width, skip=None):
    """The CSV's numeric table (column skip, class names, left out): np.loadtxt, fast and right for most
    files; what it refuses, _csv_table reads or explains."""
    try:
        table = np.loadtxt(path, delimiter=",", quotechar='"', comments=None, encoding="utf-8-sig",
                           skiprows=header_line if header else 0, dtype=np.float64, ndmin=2,
                           usecols=None if skip is None else [j for j in range(width) if j != skip])
    except ValueError:
        table = None
    if table is None or table.shape[1] != width - (skip is not None):
        table = _csv_table(path, header, width, skip)
    return table


def _visible(folder):
    """The entries of folder, without hidden ones (names starting with '.')."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as exc:
        raise MpitrainError(f"{folder}: cannot read ({exc.strerror}); expected a folder") from None


def _image_folder(root):
    """(class names, [(path, label), …]) of an ImageFolder tree: one subfolder per class (names sorted,
    label = index), its .png/.jpg/.jpeg files sorted; other files and deeper folders are ignored."""
    names = sorted(e.name for e in _visible(root) if e.is_dir())
    if len(names) < 2:
        raise MpitrainError(f"{root}: {len(names)} class folder(s); expected ≥ 2 (one subfolder of "
                            f"PNG/JPEG images per class)")
    files = []
    for label, name in enumerate(names):
        folder = os.path.join(root, name)
        try:
            name.encode("utf-8")  # class_names is stored as UTF-8; os.scandir passes other bytes through
        except UnicodeEncodeError:
            raise MpitrainError(f"{folder!r}: folder name is not UTF-8; expected a UTF-8 class name") from None
        found = sorted(e.path for e in _visible(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise MpitrainError(f"{folder}: no .png/.jpg/.jpeg files; expected at least one image per class")
        files += [(path, label) for path in found]
    return names, files


def _read_image(path, mode, size):
    """The image as uint8 (C, H, W), or as a string the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit grey: keep the high byte, as Pillow itself does with 16-bit colour PNGs
                # (its convert() would clip every value above 255 to white)
                im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
            im = im.convert(mode)  # RGBA/LA lose alpha; palette, 1-bit, grey and CMYK are expanded/mapped
            if size:
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(im)
    except UnidentifiedImageError:
        return "not a PNG or JPEG image"
    except Exception as exc:  # Pillow's decoders report bad data as OSError, SyntaxError, ValueError, …
        return " ".join((getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).split())
    return a[None] if mode == "L" else a.transpose(2, 0, 1)


def _images(root, image_size, grayscale, skip_bad, temp):
    """x (uint8 Rows, samples × C × H × W), y, x_test, y_test, class names, skipped paths of images:DIR,
    and (x_val, y_val) or None.

    DIR holds the class folders, or train/ and test/ that each hold them: the two splits, and optionally
    val/ beside them, the validation split (other folders there are ignored).
    """
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        held = ("test", "val") if os.path.isdir(os.path.join(root, "val")) else ("test",)
        folders = [os.path.join(root, s) for s in ("train", *held)]
        (names, train), *others = map(_image_folder, folders)
        for split, (other, _) in zip(held, others):
            if other != names:
                only = [", ".join(sorted(a - b)[:5]) or "none" for a, b in
                        ((set(names), set(other)), (set(other), set(names)))]
                raise MpitrainError(f"{root}: the class folders of train/ and {split}/ differ (only in train/: "
                                    f"{only[0]}; only in {split}/: {only[1]}); expected the same")
        splits = [train, *(files for _, files in others)]
    else:
        folders = [root]
        names, files = _image_folder(root)
        splits = [files]
    mode = "L" if grayscale else "RGB"
    xs, ys, skipped, first = [], [], [], None
    for folder, files, name in zip(folders, splits, ("x", "x_test", "x_val")):
        copy, y = _Copy(temp(name)), []
        for path, label in files:
            a = _read_image(path, mode, image_size)
            if isinstance(a, str):
                if not skip_bad:
                    raise MpitrainError(f"{path}: {a}; expected a readable PNG or JPEG image (or pass --skip-bad)")
                skipped.append(path)
                continue
            if first is None:  # the first image fixes the size
                first, size = path, a.shape
            elif a.shape != size:
                raise MpitrainError(f"{path}: {a.shape[1]}×{a.shape[2]} pixels (H×W), but {first} is "
                                    f"{size[1]}×{size[2]}; expected the same size (or pass --image-size H W)")
            copy.add(a[None])
            y.append(label)
        y = np.array(y, np.int64)
        empty = np.flatnonzero(np.bincount(y, minlength=len(names)) == 0)
        if len(empty):
            raise MpitrainError(f"{os.path.join(folder, names[empty[0]])}: every image skipped as unreadable; "
                                f"expected at least one readable image per class")
        xs.append(copy.rows())
        ys.append(y)
    test = (xs[1], ys[1]) if len(xs) >= 2 else (None, None)
    return xs[0], ys[0], *test, names, skipped, (xs[2], ys[2]) if len(xs) == 3 else None


def load_source(source, samples=10000, features=64, classes=SYNTHETIC_CLASSES, seed=0, label_column=None,
                target=None, temp=None):
    """x, y, x_test, y_test of a source (arrays, or Rows read in groups); temp(name): a temporary path."""
    kind, _, path = source.partition(":")
    if source == "digits":
        return _digits()
    if source == "diabetes":
        return _diabetes()
    if source == "synthetic":
        return _synthetic(samples, features, classes, seed)
    if kind == "npy" and path:
        return _npy_dir(path)
    if kind == "npz" and os.path.isdir(path):
        return _npz_dir(path, temp)
    if kind in ("npz", "csv") and path:
        return _npz(path) if kind == "npz" else _csv(path, label_column, target)
    raise MpitrainError(f"--source {source!r}: expected one of {SOURCES}")


def _labels(y, name, n):
    y = np.asarray(y)
    if y.shape != (n,):
        raise MpitrainError(f"{name}: expected {n} labels (one per sample), got shape {y.shape}")
    if y.dtype.kind == "U":  # class names: classes.encode numbers them
        return y
    if y.dtype.kind not in "biuf":  # bytes, complex numbers, times: no label ids
        raise MpitrainError(f"{name}: labels must be integers or class names (a unicode array), got dtype {y.dtype}")
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or y.min() < 0:
        raise MpitrainError(f"{name}: labels must be integers ≥ 0")
    return y.astype(np.int64)


def _is_float(y):
    return np.asarray(y).dtype.kind == "f"


def _targets(y, name, n):
    """Regression targets: floats (n,) or (n, targets), finite, as float64 (n, targets)."""
    y = np.asarray(y)
    if y.ndim not in (1, 2) or len(y) != n or y.size == 0:
        raise MpitrainError(f"{name}: expected {n} float targets, shape ({n},) or ({n}, targets), got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise MpitrainError(f"{name}: targets must be finite (found NaN or Inf)")
    return y.reshape(n, -1).astype(np.float64)


def _outputs(y, name, n, regress, like=None):
    """y as class labels (_labels) or, regress, as float targets (_targets); like: (name, array) of a y
    checked before that this one must match (its kind, and its number of targets)."""
    if like is not None and _is_float(y) != regress:
        kind = "float (regression targets)" if regress else "integer (class labels)"
        raise MpitrainError(f"{name}: dtype {np.asarray(y).dtype}, but {like[0]} is {kind}; expected the same kind")
    y = _targets(y, name, n) if regress else _labels(y, name, n)
    if like is not None and regress and y.shape[1] != like[1].shape[1]:
        raise MpitrainError(f"{name}: {y.shape[1]} target(s), {like[0]} {like[1].shape[1]}; expected the same")
    return y


def _features(x, name):
    """x checked, an array as float32 of its own shape (_gather flattens a group at a time); Rows are checked
    here for their shape and dtype, for finite values group by group as they are read (_gather)."""
    x = x if isinstance(x, Rows) else np.asarray(x)
    if x.ndim < 2:
        raise MpitrainError(f"{name}: expected samples × features (2 or more dimensions), got shape {x.shape}")
    if x.size == 0:
        raise MpitrainError(f"{name}: shape {x.shape} has no {'samples' if len(x) == 0 else 'features'}")
    if x.dtype.kind not in "biuf":  # complex numbers or times would be cast to float32 silently
        raise MpitrainError(f"{name}: features must be real numbers, got dtype {x.dtype}")
    if isinstance(x, Rows):
        return x
    if not np.all(np.isfinite(x)):
        raise MpitrainError(f"{name}: features must be finite (found NaN or Inf)")
    return x.astype(np.float32, copy=False)


def _class_count(source, classes, labels):
    """--classes if given (refusing labels beyond it), else the largest label + 1; never fewer than 2."""
    if classes is None:
        top = max(int(y.max()) for y in labels.values())
        if top == 0:  # train refuses a 1-class file: say so now, where the labels are
            raise MpitrainError(f"{source}: every label is 0, so the file would have 1 class; "
                                f"expected ≥ 2 (or pass --classes)")
        return top + 1
    for name, y in labels.items():
        beyond = int(np.count_nonzero(y >= classes))
        if beyond:
            raise MpitrainError(f"{source} {name}: {beyond} label(s) ≥ --classes {classes}; "
                                f"expected 0…{classes - 1}")
    return classes


def prepare(source, out, test_fraction=None, seed=0, classes=None, image_size=None, grayscale=False,
            skip_bad=False, layout=None, partition=None, samples=None, features=None, label_column=None,
            tokenizer=None, target=None, validation_fraction=None):
    """Write the HDF5 file for `source` to `out` (atomically).  Returns what was done, in lines.

    test_fraction: None = 0.2 where the source has no test split (refused where it has one; 0: no test rows);
    text sources (text:FILE, pydoc; data/text.py) 0.1, the stream's tail.  validation_fraction: the share of
    the source's training samples written as val/ (text: the slice before the test tail); None or 0: none.
    tokenizer (chars | bytes): text sources only.  classes: the n_classes attribute; None = the largest
    label + 1 (synthetic: SYNTHETIC_CLASSES; images:DIR: its class folders, and --classes is refused;
    regression: refused).  target: csv's target columns ("COL[,COL…]": names or indices), making a
    regression file, as a float y of npz/npy and diabetes do.  The options of SOURCE_OPTIONS (None/False:
    not given) are refused for other sources.  partition: write_partition's keyword arguments, to add a
    partition before the file is moved into place.
    """
    given = {"--samples": samples is not None, "--features": features is not None,
             "--label-column": label_column is not None, "--target": target is not None,
             "--layout": layout is not None,
             "--image-size": image_size is not None, "--grayscale": grayscale, "--skip-bad": skip_bad}
    kind = source.partition(":")[0]
    for option, (kinds, which) in SOURCE_OPTIONS.items():
        if given[option] and kind not in kinds:
            raise MpitrainError(f"{option}: only for {which}, not {source!r}")
    if layout is not None and layout not in LAYOUTS:
        raise MpitrainError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    from .text import is_text_source, prepare_text

    text = is_text_source(source)
    if tokenizer is not None and not text:
        raise MpitrainError(f"--tokenizer: only for a text source (text:FILE, pydoc), not {source!r}")
    if text and test_fraction is None:
        test_fraction = 0.1
    if seed < 0:
        raise MpitrainError(f"--seed {seed}: expected an integer ≥ 0")
    if os.path.isdir(out):
        raise MpitrainError(f"--out {out}: is a folder; expected a file name such as {os.path.join(out, 'data.h5')}")
    out_dir = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise MpitrainError(f"--out {out}: cannot create the folder {out_dir} ({exc.strerror or exc})") from None
    tmp = os.path.join(out_dir, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    temps = [tmp]

    def temp(name):  # raw copies of a folder source, beside the output, removed at the end
        temps.append(f"{tmp}-{name}")
        return temps[-1]

    opts = {k: v for k, v in (("samples", samples), ("features", features), ("label_column", label_column),
                              ("target", target)) if v is not None}
    try:
        if text:
            return prepare_text(source, out, tmp, test_fraction, tokenizer, validation_fraction, classes=classes,
                                image_size=image_size, grayscale=grayscale, skip_bad=skip_bad)
        return _prepare(source, out, tmp, temp, test_fraction, seed, classes, image_size, grayscale, skip_bad,
                        layout, partition, opts, validation_fraction or 0.0)
    except OSError as exc:  # the output's folder not writable, the disk full
        raise MpitrainError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    finally:
        for path in temps:
            if os.path.exists(path):
                os.remove(path)


def _channels(shape, layout, name):
    """(the axis order that puts a sample of `shape` channels first, None to keep it; the line saying what
    was decided, None where nothing was).  --layout nhwc: the last axis holds the channels and is moved
    first; nchw: the sample is channels first already.  Without --layout a sample of 3 axes whose last is
    1, 3 or 4 (grey, RGB, RGBA) and whose first is not — a numpy, PIL or Keras image (H, W, C) — is
    channels last; any other of 3 axes channels first; one whose first and last are both is refused.
    Samples of other ranks are stored as given."""
    why = ""
    if layout is None:
        if len(shape) != 3:
            return None, None
        if shape[0] in CHANNELS and shape[2] in CHANNELS:
            raise MpitrainError(f"{name}: samples of shape {shape} may have their channels first or last; pass "
                                f"--layout nchw (C, H, W) or --layout nhwc (H, W, C)")
        layout = "nhwc" if shape[2] in CHANNELS else "nchw"
        why = f" (by the shape; --layout {'nchw' if layout == 'nhwc' else 'nhwc'} if not)"
    elif len(shape) < 2:
        raise MpitrainError(f"--layout {layout}: {name} samples have shape {shape}, no channel axis; "
                            f"expected 2 or more axes")
    if layout == "nchw":
        return None, f"layout: {name} samples {shape} channels first, stored as given{why}"
    axes = (len(shape) - 1, *range(len(shape) - 1))
    return axes, f"layout: {name} samples {shape} channels last, stored as {tuple(shape[a] for a in axes)}{why}"


def _prepare(source, out, tmp, temp, test_fraction, seed, classes, image_size, grayscale, skip_bad, layout,
             partition, opts, validation_fraction):
    import h5py

    from ..classes import encode

    if classes is not None and classes < 2:
        raise MpitrainError(f"--classes {classes}: expected ≥ 2")
    if source == "synthetic" and classes is None:
        classes = SYNTHETIC_CLASSES
    kind, _, root = source.partition(":")
    class_names, skipped, own_val = None, [], None
    if kind == "images" and root:
        if classes is not None:
            raise MpitrainError(f"--classes: not for {source} (its classes are its subfolders)")
        if image_size is not None and min(image_size) < 1:
            raise MpitrainError(f"--image-size {' '.join(map(str, image_size))}: expected H W ≥ 1")
        x, y, x_test, y_test, class_names, skipped, own_val = _images(root, image_size, grayscale, skip_bad,
                                                                      temp)
        classes = len(class_names)  # every class folder holds a readable image (checked there)
    else:
        x, y, x_test, y_test = load_source(source, seed=seed, classes=classes, temp=temp, **opts)
        class_names, y, y_test = encode(source, y, y_test, classes)
    raw_shape = tuple(np.shape(x)[1:])
    axes, decided = (None, None) if kind not in ("npz", "npy") else _channels(raw_shape, layout, f"{source} x")
    feature_shape = raw_shape if axes is None else tuple(raw_shape[a] for a in axes)
    x = _features(x, f"{source} x")
    # csv cells are all read as numbers: --target says regression there; elsewhere y's dtype does
    regress = "target" in opts if kind == "csv" else _is_float(y)
    if regress and classes is not None:
        raise MpitrainError(f"--classes: {source} holds regression targets "
                            f"({'--target' if kind == 'csv' else 'float y'}), not class labels (integers)")
    y = _outputs(y, f"{source} y", len(x), regress)
    labels = {"y": y}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    order = rng.permutation(len(x))
    if x_test is None:
        test_fraction = 0.2 if test_fraction is None else test_fraction
        if not 0 <= test_fraction < 1:
            raise MpitrainError(f"--test-fraction {test_fraction}: expected a number in [0, 1)")
        n_test = max(1, int(round(test_fraction * len(x)))) if test_fraction else 0
        if n_test >= len(x):
            raise MpitrainError(f"{source}: {len(x)} samples are too few to split off a test set")
        order, test_order = order[n_test:], order[:n_test]
        x_test, y_test = x, y[test_order]
    else:
        if test_fraction is not None:
            raise MpitrainError(f"--test-fraction: {source} has its own test split, so nothing is held out")
        test_shape = tuple(np.shape(x_test)[1:])
        x_test = _features(x_test, f"{source} x_test")
        if test_shape != raw_shape:  # equal sizes are not enough: (3, 2) flattened is not (2, 3) flattened
            raise MpitrainError(f"{source}: x_test samples have shape {test_shape}, x samples {raw_shape}; "
                                f"expected the same")
        y_test = labels["y_test"] = _outputs(y_test, f"{source} y_test", len(x_test), regress, ("y", y))
        test_order = np.arange(len(x_test))
    if own_val is not None and validation_fraction:
        raise MpitrainError(f"--validation-fraction: {source} has its own validation split (val/), so nothing "
                            "is held out")
    val_order = order[:held_out(validation_fraction, len(x), len(order), source)]
    order = order[len(val_order):]
    n_classes = None if regress else _class_count(source, classes, labels)
    # split → (its source rows, the rows taken, their labels or targets)
    splits = {"train": (x, order, y[order]), "test": (x_test, test_order, y_test)}
    if own_val is not None:
        splits["val"] = (own_val[0], np.arange(len(own_val[1])), own_val[1])
    elif len(val_order):
        splits["val"] = (x, val_order, y[val_order])
    if regress:  # targets standardised as features are, with the training split's statistics
        t_mean, t_std = y[order].mean(axis=0).astype(np.float32), y[order].std(axis=0).astype(np.float32)
        t_std[t_std < 1e-6] = 1.0
        splits = {k: (a, r, ((v - t_mean) / t_std).astype(np.float32)) for k, (a, r, v) in splits.items()}
    features = int(np.prod(feature_shape))
    # images: one mean/std per channel over all its training pixels (as torchvision's Normalize)
    channels = feature_shape[0] if kind == "images" else 0
    digest = hashlib.sha256()
    with h5py.File(tmp, "w") as f:
        dsets = {}
        for split, (_, picked, _) in splits.items():
            n = len(picked)
            rows = max(1, min(n, (1 << 20) // (4 * features)))  # ~1 MiB chunks
            dsets[split] = f.create_dataset(f"{split}/x", (n, features), np.float32,
                                            chunks=(rows, features) if n else None)  # HDF5: no chunks when empty
        group = dsets["train"].chunks[0] * max(1, GROUP_BYTES // (4 * features * dsets["train"].chunks[0]))
        # pass 1: the shuffled training rows, unstandardised, and their statistics group by group
        moments = None
        for a in range(0, len(order), group):
            xs = _gather(x, order[a:a + group], f"{source} x", axes)
            moments = _merge(moments, _moments(xs, channels))
            dsets["train"][a:a + len(xs)] = xs
        count, mean, m2 = moments
        std = np.sqrt(m2 / count).astype(np.float32)
        mean = mean.astype(np.float32)
        std[std < 1e-6] = 1.0  # constant features (e.g. the corners of digits) stay at 0
        shift, scale = per_feature((mean, std), features)
        # pass 2: standardise in place (train), gather and standardise (test, val); the checksum in this order
        for split, (xs_all, rows, ys) in splits.items():
            d, name = dsets[split], f"{source} {'x' if split == 'val' and xs_all is x else 'x_' + split}"
            for a in range(0, len(d), group):
                xs = d[a:a + group] if split == "train" else _gather(xs_all, rows[a:a + group], name, axes)
                xs = (xs - shift) / scale
                d[a:a + len(xs)] = xs
                digest.update(xs.tobytes())
            chunks = (min(len(ys), 1 << 17), *ys.shape[1:]) if len(ys) else None  # HDF5: none when empty
            f.create_dataset(f"{split}/y", data=ys, chunks=chunks)
            digest.update(np.ascontiguousarray(ys).tobytes())
        f["standardize/mean"], f["standardize/std"] = mean, std
        if regress:
            f["target/mean"], f["target/std"] = t_mean, t_std
        outputs = {"task": "regress", "n_targets": len(t_mean)} if regress else {"n_classes": n_classes}
        f.attrs.update(**outputs, feature_shape=np.array(feature_shape, np.int64),
                       source=source, checksum=digest.hexdigest(), format=FORMAT,
                       created_by=f"mpitrain {__version__}")
        if class_names is not None:
            f.attrs["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
        if partition is not None:  # before the rename: a refused partition leaves no file, or the old one
            from .partition import add_partition

            parted = f"{out}: " + add_partition(f, **partition)
    os.replace(tmp, out)
    note = f" ({len(skipped)} unreadable image(s) skipped, the first {skipped[0]})" if skipped else ""
    val = f" + {len(splits['val'][1])} validation" if "val" in splits else ""
    lines = [decided, f"{out}: {len(order)} train{val} + {len(test_order)} test samples, {features} features "
                      f"{feature_shape}, "
                      + (f"{len(t_mean)} target(s) (regression)" if regress else f"{n_classes} classes")
                      + f", from {source}{note}",
             parted if partition is not None else None]
    return "\n".join(line for line in lines if line)


def held_out(fraction, total, left, source):
    """The number of samples --validation-fraction takes: its share of the source's `total` training
    samples, taken from the `left` ones the test split leaves (at least one remains for training)."""
    if not 0 <= fraction < 1:
        raise MpitrainError(f"--validation-fraction {fraction}: expected a number in [0, 1)")
    n = max(1, int(round(fraction * total))) if fraction else 0
    if n >= left:
        raise MpitrainError(f"{source}: {total} samples are too few to split off a validation set "
                            f"(--validation-fraction {fraction:g}, {left} left after the test split)")
    return n


def per_feature(stats, n):
    """(mean, std) of standardize/ (a data file's or a model.h5's) as n values each: a channel's pair
    applies to each of its n/C features (per feature: repeated once)."""
    return tuple(np.repeat(np.asarray(v, np.float32), n // len(v)) for v in stats)


def _gather(x, rows, name, axes=None):
    """Rows `rows` of x (an array already checked, or Rows checked here) as float32 samples × features,
    each sample's axes first put in the order `axes` (_channels; None: as stored)."""
    if isinstance(x, np.ndarray):
        return _flat(x[rows], axes)
    order = np.argsort(rows, kind="stable")
    got = _flat(x.take(rows[order]), axes)
    if not np.all(np.isfinite(got)):
        bad = np.sort(rows[order][~np.isfinite(got).all(axis=1)])
        raise MpitrainError(f"{name}: features must be finite (found NaN or Inf in row {bad[0]} of {x.path})")
    out = np.empty_like(got)
    out[order] = got
    return out


def _flat(xs, axes):
    if axes is not None:
        xs = xs.transpose(0, *(1 + a for a in axes))
    return xs.reshape(len(xs), -1).astype(np.float32, copy=False)


def _moments(xs, channels):
    """(count, mean, sum of squared deviations) of a group, per feature or per channel, in float64 — the
    same operations as NumPy's mean and std, so a source of one group gets NumPy's statistics exactly."""
    a, axes = (xs.reshape(len(xs), channels, -1), (0, 2)) if channels else (xs, 0)
    mean = a.mean(axis=axes, dtype=np.float64)
    dev = a - (mean[:, None] if channels else mean)
    return a.size // mean.size, mean, np.sum(dev * dev, axis=axes)


def _merge(a, b):
    """Chan, Golub and LeVeque's pairwise update of (count, mean, M2)."""
    if a is None:
        return b
    (na, ma, sa), (nb, mb, sb) = a, b
    n, delta = na + nb, mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta * delta * (na * nb / n)
