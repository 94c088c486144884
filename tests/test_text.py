"""Language-model data (data/text.py): prepare text:FILE and pydoc as token streams, windows batched by
TrainShard's rule (p ranks ≡ 1 rank), the test split's windows, and one line for each bad input."""
import hashlib
import json

import h5py
import numpy as np
import pytest

from conftest import mpirun
from mpitrain.comm import Comm
from mpitrain.config import DataConfig
from mpitrain.data.prepare import prepare
from mpitrain.data.shard import DataFile, open_shard
from mpitrain.data.text import TokenShard, Tokenizer, prepare_text, pydoc_text, token_windows
from mpitrain.errors import MpitrainError

# non-ASCII characters of 2, 3 and 4 UTF-8 bytes, CRLF kept as two characters
TEXT = "Grüße aus Köln — 10 € for 🐍 snakes!\r\n" * 7 + "tail…\n"


def _tokens(path):
    with h5py.File(path, "r") as f:
        return f["train/tokens"][...], f["test/tokens"][...], dict(f.attrs)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_prepare_chars(tmp_path):
    src, out = _write(tmp_path, "t.txt", TEXT.encode("utf-8")), str(tmp_path / "c.h5")
    line = prepare(f"text:{src}", out)
    train, test, attrs = _tokens(out)
    vocab = sorted(set(TEXT))
    assert json.loads(attrs["vocab"]) == vocab and attrs["tokenizer"] == "chars" and attrs["task"] == "lm"
    assert attrs["n_classes"] == len(vocab) and f"vocabulary {len(vocab)} (chars)" in line
    assert train.dtype == np.uint8 and len(train) + len(test) == len(TEXT)
    assert len(test) == round(0.1 * len(TEXT))  # the default test split: the stream's last tenth
    tok = Tokenizer("chars", vocab)
    assert tok.decode(train) + tok.decode(test) == TEXT and tok.decode(test) == TEXT[-len(test):]
    digest = hashlib.sha256(train.tobytes() + test.tobytes() + b"chars" + attrs["vocab"].encode())
    assert attrs["checksum"] == digest.hexdigest()
    # read a few bytes at a time (characters cut between reads): the same file
    again = str(tmp_path / "c3.h5")
    prepare_text(f"text:{src}", again, str(tmp_path / ".tmp"), group=3)
    assert _tokens(again)[2]["checksum"] == attrs["checksum"]
    data = DataFile(out)
    assert (data.task, data.n_classes, data.n_tokens) == ("lm", len(vocab), {"train": len(train), "test": len(test)})
    assert data.tokenizer.vocab == vocab and data.feature_shape is None
    # more than 256 distinct characters: uint16 ids
    wide = "".join(map(chr, range(0x100, 0x100 + 300))) * 2
    prepare(f"text:{_write(tmp_path, 'w.txt', wide.encode('utf-8'))}", str(tmp_path / "w.h5"))
    train, test, attrs = _tokens(tmp_path / "w.h5")
    assert train.dtype == np.uint16 and attrs["n_classes"] == 300
    assert Tokenizer("chars", sorted(set(wide))).decode(np.r_[train, test]) == wide


def test_prepare_bytes(tmp_path):
    raw = TEXT.encode("utf-8")
    out = str(tmp_path / "b.h5")
    prepare(f"text:{_write(tmp_path, 't.txt', raw)}", out, test_fraction=0.25, tokenizer="bytes")
    train, test, attrs = _tokens(out)
    assert attrs["tokenizer"] == "bytes" and attrs["n_classes"] == 256 and "vocab" not in attrs
    assert train.dtype == np.uint8 and train.tobytes() + test.tobytes() == raw
    assert len(test) == round(0.25 * len(raw))
    assert DataFile(out).tokenizer.decode(np.r_[train, test]) == TEXT


def test_prepare_pydoc_cli(tmp_path):
    """The embedded text, through the command line on 2 ranks (one writer)."""
    from pydoc_data.topics import topics

    out = str(tmp_path / "p.h5")
    r = mpirun(2, "prepare", "--source", "pydoc", "--out", out)
    assert r.returncode == 0, r.stderr
    text = pydoc_text()
    train, test, attrs = _tokens(out)
    assert len(train) + len(test) == len(text) > 400_000 and attrs["n_classes"] == len(set(text))
    decoded = Tokenizer.from_attrs(attrs, out).decode(np.r_[train, test])
    assert decoded == text and decoded.startswith(topics[min(topics)])
    assert all(topics[k] in decoded for k in topics) and "\n\n" + topics[max(topics)] in decoded
    assert r.stdout.count("test tokens") == 1


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A token file of 1,000 characters in 40 distinct ones (train: 900 tokens, test: 100)."""
    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    text = "".join(np.array(list("abcdefghijklmnopqrstuvwxyz .,;ABCDEFGHIJ"))[rng.integers(0, 40, 1000)])
    (d / "s.txt").write_text(text, encoding="utf-8")
    prepare(f"text:{d / 's.txt'}", str(d / "s.h5"))
    data = DataFile(str(d / "s.h5"))
    yield data
    data.close()


@pytest.mark.parametrize("T,B,size", [(8, 16, 2), (8, 16, 3), (16, 5, 4), (1, 9, 2), (30, 32, 5)])
def test_token_shard_is_rank_independent(stream, T, B, size):
    data, seed = stream, 7
    tokens = data.f["train/tokens"][...].astype(np.int32)
    single = TokenShard(data, T, B, 0, 1, seed)
    shards = [TokenShard(data, T, B, r, size, seed) for r in range(size)]
    assert single.steps_per_epoch == (len(tokens) - T) // B
    for s in shards:  # each rank holds exactly the tokens its strata's windows cover
        np.testing.assert_array_equal(s.tokens, tokens[s.lo:s.hi + T])
    assert shards[0].lo == 0 and shards[-1].hi == len(tokens) - T
    for epoch in range(2):
        for step in (0, 1, single.steps_per_epoch - 1):
            x1, y1 = (a.copy() for a in single.get(epoch, step))
            assert x1.dtype == y1.dtype == np.int32 and x1.shape == y1.shape == (B, T)
            # x is a window of the stream starting where TrainShard's plan says; y is x shifted by one
            starts = single.epoch_order(epoch)[step]
            np.testing.assert_array_equal(x1, tokens[starts[:, None] + np.arange(T)])
            np.testing.assert_array_equal(y1, tokens[starts[:, None] + np.arange(1, T + 1)])
            parts = [s.get(epoch, step) for s in shards]
            assert sorted(len(x) for x, _ in parts) == sorted(s.batch for s in shards)
            # the ranks' batches in rank order are the one-rank batch
            np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), x1)
            np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), y1)
    assert not np.array_equal(single.epoch_order(0), single.epoch_order(1))


def test_open_shard_for_tokens(stream):
    comm, cfg = Comm(), DataConfig(path=stream.path)
    shard = open_shard(comm, stream, cfg, 16, 0, 0, 1, block_size=8)
    assert isinstance(shard, TokenShard) and not shard.streams
    with pytest.raises(MpitrainError, match="needs a block size") as e:
        open_shard(comm, stream, cfg, 16, 0, 0, 1, block_size=None)
    assert stream.path in str(e.value)


@pytest.mark.parametrize("size", [1, 3])
def test_streamed_windows_are_the_windows_in_memory(stream, size):
    """data.stream (or a part beyond data.memory_mb) reads each step's windows from the file: the same batches."""
    comm = Comm()
    for r in range(size):
        held = open_shard(comm, stream, DataConfig(), 12, 5, r, size, block_size=8)
        for cfg in (DataConfig(stream=True), DataConfig(memory_mb=1e-4)):
            streamed = open_shard(comm, stream, cfg, 12, 5, r, size, block_size=8)
            assert streamed.streams and not hasattr(streamed, "tokens") and "streaming" in streamed.note
            for epoch, s in ((0, 0), (0, 3), (1, 2)):
                for a, b in zip(held.get(epoch, s), streamed.get(epoch, s)):
                    np.testing.assert_array_equal(a, b)


def test_test_windows(stream):
    T, n = 7, stream.n_tokens["test"]
    tokens = stream.f["test/tokens"][...].astype(np.int32)
    x, y = token_windows(stream, "test", T, 0, 1)
    assert x.dtype == np.int32 and x.shape == y.shape == ((n - 1) // T, T)
    np.testing.assert_array_equal(x.ravel(), tokens[:x.size])  # non-overlapping, stride T
    np.testing.assert_array_equal(y.ravel(), tokens[1:x.size + 1])
    for size in (2, 5, 20):  # contiguous blocks: in rank order they are the one-rank windows
        parts = [token_windows(stream, "test", T, r, size) for r in range(size)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_errors(tmp_path, stream):
    with pytest.raises(MpitrainError, match=r"block size 100 .*test split's 100 tokens") as e:
        token_windows(stream, "test", 100, 0, 1)
    assert stream.path in str(e.value)
    with pytest.raises(MpitrainError, match=r"block size 900 .*train split's 900 tokens"):
        TokenShard(stream, 900, 1, 0, 1, 0)
    with pytest.raises(MpitrainError, match=r"train has 12 windows of 888 \+ 1 tokens, fewer than "
                                            r"train.global_batch = 13") as e:
        TokenShard(stream, 888, 13, 0, 1, 0)
    assert stream.path in str(e.value)
    empty = _write(tmp_path, "empty.txt", b"")
    with pytest.raises(MpitrainError, match=f"{empty}: empty; expected text"):
        prepare(f"text:{empty}", str(tmp_path / "e.h5"))
    with pytest.raises(MpitrainError, match="1 distinct character"):
        prepare(f"text:{_write(tmp_path, 'one.txt', b'aaaa')}", str(tmp_path / "o.h5"))
    with pytest.raises(MpitrainError, match="'é' .* not in the vocabulary of 2 characters"):
        Tokenizer("chars", ["a", "b"]).encode("abé")
    with pytest.raises(MpitrainError, match="--tokenizer: only for a text source"):
        prepare("digits", str(tmp_path / "d.h5"), tokenizer="bytes")
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*"))  # nothing half-written
    # a file that is not UTF-8: one line from the command line, suggesting bytes
    bad = _write(tmp_path, "latin1.txt", "Köln".encode("latin-1"))
    r = mpirun(1, "prepare", "--source", f"text:{bad}", "--out", str(tmp_path / "l.h5"))
    assert r.returncode != 0 and r.error_lines() == [
        f"mpitrain: error: {bad}: not UTF-8 text (invalid byte at offset 1); expected UTF-8, or pass --tokenizer bytes"]
    # a token file with a bad vocabulary or layout: one line naming the file
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["train/tokens"] = np.zeros(10, np.uint8)
        f["test/tokens"] = np.zeros(3, np.uint8)
        f.attrs.update(task="lm", n_classes=3, tokenizer="chars", vocab=json.dumps(["b", "a"]))
    with pytest.raises(MpitrainError, match=r"v\.h5: attribute vocab: expected a JSON list of distinct"):
        DataFile(str(tmp_path / "v.h5"))
