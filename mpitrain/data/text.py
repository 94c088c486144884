"""Text for language models: a text → one token stream in HDF5, and a rank's windows of it.

Sources: text:FILE (a UTF-8 file, read a group of bytes at a time) and pydoc (Python's own documentation
topics, pydoc_data.topics, shipped with every CPython: the embedded default, no download).  Tokenizers:
chars (the vocabulary is the sorted distinct characters of the whole text) and bytes (the text's UTF-8
bytes; a fixed vocabulary of 256).

Layout: train/tokens, optionally val/tokens, test/tokens (1-d; uint8 when the vocabulary has ≤ 256
symbols, else uint16): the stream, its last --test-fraction the test split (a contiguous tail, as nanoGPT's
90/10 split), the --validation-fraction before it the val split; attributes task = "lm", n_classes (the
vocabulary's size), tokenizer ("chars" | "bytes"), vocab (chars only: a JSON list of the characters, token
i = vocab[i]), source, checksum (sha256 of the token arrays as stored, in stream order, the tokenizer and the
vocab), format, created_by.

Windows (TokenShard): training sample i is the window of T + 1 tokens starting at token i, i = 0 … n − T − 1
(n the training tokens, T the block size); x is its first T tokens, y its last T (the next token at every
position).  The n − T windows are cut into strata and batched by TrainShard's rule (shard.py's docstring), so
p ranks take exactly the windows one rank takes; a rank reads the tokens its strata's windows cover, one
contiguous range, in memory — or, with data.stream = true or a part beyond data.memory_mb, none of them:
each step then reads its own windows from the file (one hyperslab read of T + 1 tokens per window, a few per
rank and step, and nothing held between steps), which gives the same batches.  The test split is scored on
non-overlapping windows (stride T), each rank a contiguous block of them (token_windows).
"""
import codecs
import hashlib
import itertools
import json
import os

import numpy as np

from .. import __version__
from ..config import default_data_path
from ..errors import MpitrainError
from .prepare import FORMAT, held_out
from .shard import TrainShard, block

TOKENIZERS = ("chars", "bytes")
MAX_VOCAB = 1 << 16  # token ids are stored as uint16 at most


def default_text_path():
    """The embedded default text (pydoc), prepared on first use, beside the default digits."""
    return os.path.join(os.path.dirname(default_data_path()), "pydoc.h5")


def is_text_source(source):
    return source == "pydoc" or source.startswith("text:")


def _codepoints(text):
    # surrogatepass: a lone surrogate (from a command line's undecodable bytes) becomes an unknown character
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


class Tokenizer:
    """Text ↔ token ids.  chars: token i is vocab[i] (characters sorted by code point); bytes: token i is
    the byte i of the text's UTF-8 encoding."""

    def __init__(self, kind, vocab=None):
        self.kind = kind
        self.vocab = None if kind == "bytes" else list(vocab)
        self.size = 256 if kind == "bytes" else len(self.vocab)
        self.dtype = np.dtype(np.uint8 if self.size <= 256 else np.uint16)
        self._points = None if kind == "bytes" else _codepoints("".join(self.vocab))

    @classmethod
    def from_attrs(cls, attrs, where):
        """The tokenizer stored in attributes (a data file's, or a model file's), checked; where: the file."""
        kind = str(attrs.get("tokenizer", ""))
        if kind not in TOKENIZERS:
            raise MpitrainError(f"{where}: attribute tokenizer = {kind!r}: expected chars or bytes")
        if kind == "bytes":
            return cls(kind)
        try:
            vocab = json.loads(str(attrs["vocab"]))
        except (KeyError, ValueError):
            vocab = None
        if (not isinstance(vocab, list) or not all(isinstance(c, str) and len(c) == 1 for c in vocab)
                or vocab != sorted(set(vocab))):
            raise MpitrainError(f"{where}: attribute vocab: expected a JSON list of distinct characters, sorted")
        return cls(kind, vocab)

    def attrs(self):
        """What from_attrs reads back."""
        return {"tokenizer": self.kind} if self.kind == "bytes" else {"tokenizer": self.kind,
                                                                     "vocab": json.dumps(self.vocab)}

    def encode(self, text):
        """Token ids (self.dtype) of a str (or, for bytes, of bytes as they are)."""
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8") if isinstance(text, str) else text, np.uint8)
        points = _codepoints(text)
        ids = np.minimum(np.searchsorted(self._points, points), self.size - 1)
        unknown = np.flatnonzero(self._points[ids] != points)
        if len(unknown):
            c = int(points[unknown[0]])
            raise MpitrainError(f"character {chr(c)!r} (U+{c:04X}) is not in the vocabulary of {self.size} "
                                f"characters")
        return ids.astype(self.dtype)

    def decode(self, tokens):
        """The text of token ids (bytes: invalid UTF-8, such as a cut character, becomes U+FFFD)."""
        tokens = np.asarray(tokens)
        if self.kind == "bytes":
            return tokens.astype(np.uint8).tobytes().decode("utf-8", "replace")
        return self._points[tokens].tobytes().decode("utf-32-le", "surrogatepass")


def _file_bytes(path, group):
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise MpitrainError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        while chunk := f.read(group):
            yield chunk


def _file_chars(path, group):
    """The file's text, decoded group by group (a character cut between groups is decoded whole)."""
    decoder, at = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in itertools.chain(_file_bytes(path, group), [b""]):
        held = len(decoder.getstate()[0])  # bytes of a cut character, kept from the previous group
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise MpitrainError(f"{path}: not UTF-8 text (invalid byte at offset {at - held + exc.start}); "
                                "expected UTF-8, or pass --tokenizer bytes") from None
        at += len(chunk)
        yield text


def pydoc_text():
    """Python's documentation topics in sorted key order, a blank line between documents."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].rstrip("\n") for k in sorted(topics)) + "\n"


def _pieces(source, kind, group):
    """The text of a source, piece by piece: str (chars), or bytes (bytes)."""
    if source == "pydoc":
        text = pydoc_text()
        yield text if kind == "chars" else text.encode("utf-8")
        return
    path = source[len("text:"):]
    yield from (_file_chars if kind == "chars" else _file_bytes)(path, group)


def prepare_text(source, out, tmp, test_fraction=0.1, tokenizer=None, validation_fraction=None, group=4 << 20,
                 **refused):
    """Write the token file of a text source to tmp, then rename it to out (prepare's atomic write).
    Two passes over the text a group of bytes at a time: the vocabulary and the length, then the tokens.
    refused: prepare's options for other sources, each refused when given.  Returns a one-line description."""
    import h5py

    given = [f"--{k.replace('_', '-')}" for k, v in refused.items() if v not in (None, False)]
    if given:
        raise MpitrainError(f"{', '.join(given)}: not for a text source ({source}); its vocabulary is its "
                            "characters (or bytes)")
    kind = tokenizer or "chars"
    if kind not in TOKENIZERS:
        raise MpitrainError(f"--tokenizer {kind!r}: expected chars or bytes")
    if not 0 < test_fraction < 1:
        raise MpitrainError(f"--test-fraction {test_fraction}: expected a number in (0, 1)")
    if source == "text:":
        raise MpitrainError("--source text:FILE: expected a file name after text:")
    n, seen = 0, np.empty(0, np.uint32)
    for piece in _pieces(source, kind, group):
        n += len(piece)
        if kind == "chars":
            seen = np.union1d(seen, _codepoints(piece))
    name = source[len("text:"):] if source != "pydoc" else source
    if n == 0:
        raise MpitrainError(f"{name}: empty; expected text")
    if kind == "chars" and not 2 <= len(seen) <= MAX_VOCAB:
        raise MpitrainError(f"{name}: {len(seen)} distinct character(s); expected 2 … {MAX_VOCAB} "
                            "(or pass --tokenizer bytes)")
    tok = Tokenizer(kind, seen.tobytes().decode("utf-32-le", "surrogatepass") if kind == "chars" else None)
    n_test = max(1, int(round(test_fraction * n)))
    if n_test >= n:
        raise MpitrainError(f"{name}: {n} token(s) are too few to split off a test set")
    n_val = held_out(validation_fraction or 0.0, n, n - n_test, name)
    # the stream in order: train, then val (if any), then test, each a contiguous slice [start, start + size)
    sizes, digest, at = {"train": n - n_test - n_val, "val": n_val, "test": n_test}, hashlib.sha256(), 0
    sizes = {s: m for s, m in sizes.items() if m}
    starts = dict(zip(sizes, np.cumsum([0, *sizes.values()]).tolist()))
    with h5py.File(tmp, "w") as f:
        dsets = {s: f.create_dataset(f"{s}/tokens", (m,), tok.dtype, chunks=(min(m, 1 << 20),))
                 for s, m in sizes.items()}
        for piece in _pieces(source, kind, group):
            ids = tok.encode(piece)
            digest.update(ids.tobytes())  # in stream order, as stored
            for s, m in sizes.items():  # the piece's tokens that fall in each split
                lo, hi = max(starts[s], at), min(starts[s] + m, at + len(ids))
                if lo < hi:
                    dsets[s][lo - starts[s]:hi - starts[s]] = ids[lo - at:hi - at]
            at += len(ids)
        meta = tok.attrs()
        for value in meta.values():
            digest.update(value.encode("utf-8"))
        f.attrs.update(task="lm", n_classes=tok.size, source=source, checksum=digest.hexdigest(), format=FORMAT,
                       created_by=f"mpitrain {__version__}", **meta)
    os.replace(tmp, out)
    val = f" + {n_val} validation" if n_val else ""
    return (f"{out}: {sizes['train']} train{val} + {n_test} test tokens, vocabulary {tok.size} ({kind}), "
            f"from {source}")


def open_tokens(data):
    """Check a token file's layout (DataFile, task = "lm") and set its attributes: n_classes (the
    vocabulary's size), tokenizer (Tokenizer), n_tokens {split: count}, n_train and n_test (token counts),
    checksum; n_features, feature_shape and standardize are None (a sample's length is the block size)."""
    import h5py

    f, path = data.f, data.path
    for key in ("train/tokens", "test/tokens"):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            _fail(path, f"missing dataset {key} (a language-model file, task = 'lm')")
        if f[key].ndim != 1 or f[key].dtype.kind != "u":
            _fail(path, f"{key} has shape {f[key].shape} and dtype {f[key].dtype}: expected a 1-d unsigned "
                        "integer token stream")
    data.tokenizer = Tokenizer.from_attrs(f.attrs, path)
    data.n_classes = int(f.attrs.get("n_classes", -1))
    if data.n_classes != data.tokenizer.size:
        _fail(path, f"attribute n_classes = {data.n_classes}: expected the vocabulary's size, "
                    f"{data.tokenizer.size}")
    data.n_tokens = {s: len(f[f"{s}/tokens"]) for s in ("train", "test", "val") if f"{s}/tokens" in f}
    data.n_train, data.n_test, data.n_val = data.n_tokens["train"], data.n_tokens["test"], data.n_tokens.get("val", 0)
    if data.n_train == 0:
        _fail(path, "train/tokens is empty")
    data.checksum = str(f.attrs.get("checksum", ""))
    data.n_features = data.feature_shape = data.standardize = None


def _fail(path, what):
    raise MpitrainError(f"{path}: {what}")


def read_tokens(data, split, lo, hi, rank):
    """Tokens [lo, hi) of split/tokens (one hyperslab read), checked to lie in the vocabulary."""
    try:
        tokens = data.f[f"{split}/tokens"][lo:hi]
    except MemoryError:
        _fail(data.path, f"{split} tokens {lo}..{hi - 1} do not fit in the memory of rank {rank}")
    bad = np.flatnonzero(tokens >= data.n_classes)
    if len(bad):
        _fail(data.path, f"{split} tokens {lo}..{hi - 1} (rank {rank}): token ids must lie in "
                         f"0..{data.n_classes - 1} (n_classes) (first at token {lo + int(bad[0])})")
    return tokens


def _no_window(data, split, block_size):
    if not 1 <= block_size < data.n_tokens[split]:
        _fail(data.path, f"block size {block_size} (model.block_size): expected 1 … {data.n_tokens[split] - 1}, "
                         f"shorter than the {split} split's {data.n_tokens[split]} tokens")


class TokenShard(TrainShard):
    """This rank's strata of the training windows and TrainShard's batch plan over them (module docstring).
    get(epoch, s) → (x, y), int32 (local batch, T), in buffers reused from step to step."""

    def __init__(self, data, block_size, global_batch, rank, size, seed, stream=False):
        _no_window(data, "train", block_size)
        T = block_size
        self._strata(data, global_batch, rank, size, seed, data.n_train - T, f"windows of {T} + 1 tokens")
        self.data, self.rank, self.streams = data, rank, stream
        if stream:
            self.note = (f"{data.path}: streaming the training windows, each step reading its {self.batch} "
                         f"window(s) of {T + 1} tokens from the file")
        else:
            self.tokens = read_tokens(data, "train", self.lo, self.hi + T, rank)  # every window of its strata
            self.windows = np.lib.stride_tricks.sliding_window_view(self.tokens, T + 1)  # local window i: row i
        self.wb = np.empty((self.batch, T + 1), data.f["train/tokens"].dtype)
        self.xb, self.yb = np.empty((self.batch, T), np.int32), np.empty((self.batch, T), np.int32)
        self.order = (None, None)

    def batch_at(self, rows):
        if self.streams:
            for j, i in enumerate(rows):  # local window i starts at token lo + i
                self.wb[j] = read_tokens(self.data, "train", self.lo + i, self.lo + i + self.wb.shape[1], self.rank)
        else:
            np.take(self.windows, rows, axis=0, out=self.wb, mode="clip")  # "raise" gathers into a hidden copy
        self.xb[...] = self.wb[:, :-1]
        self.yb[...] = self.wb[:, 1:]
        return self.xb, self.yb


def token_shard(data, cfg, global_batch, seed, rank, p, block_size):
    """open_shard for a token file (task = "lm"): a TokenShard, in memory, or streamed with data.stream or
    when the largest rank's part exceeds data.memory_mb (0: never automatically) (module docstring)."""
    if block_size is None:
        _fail(data.path, "a token stream (task = 'lm'): the model needs a block size (model.block_size)")
    n, b, item = data.n_train - block_size, global_batch, data.f["train/tokens"].dtype.itemsize
    most = max(block(b, p, r)[1] * n // b - block(b, p, r)[0] * n // b for r in range(p)) + block_size
    stream = cfg.stream or (n >= b >= p and cfg.memory_mb > 0 and most * item > cfg.memory_mb * 2**20)
    return TokenShard(data, block_size, global_batch, rank, p, seed, stream)


def token_windows(data, split, block_size, rank, size):
    """This rank's contiguous block of the split's non-overlapping windows (stride T) of T + 1 tokens,
    as x, y int32 (windows, T); y is x shifted by one token.  The last (n − 1) mod T tokens are not scored."""
    _no_window(data, split, block_size)
    T = block_size
    lo, hi = block((data.n_tokens[split] - 1) // T, size, rank)
    if lo == hi:
        return np.empty((0, T), np.int32), np.empty((0, T), np.int32)
    tokens = read_tokens(data, split, lo * T, hi * T + 1, rank).astype(np.int32)
    return tokens[:-1].reshape(-1, T), tokens[1:].reshape(-1, T)


def read_token_part(comm, data, block_size, split="test"):
    """token_windows of this rank (all ranks agree on errors); evaluate.read_part's token variant."""
    return comm.agree(token_windows, data, split, block_size, comm.rank, comm.size)
