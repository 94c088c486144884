"""Sampling from a trained language model (model.h5 of a gpt or an lm stack): `python -m mpitrain generate`
and the API's `load_model(path).generate(...)`.

The model was trained on windows of block_size tokens; a shorter context is padded on the right (causal
attention never lets position t see a later one, so the logits at the context's last position do not depend
on the padding), a longer one keeps its last block_size tokens."""
import json

import numpy as np

from .errors import MpitrainError


class Vocabulary:
    """The tokenizer stored with the data and the model: "chars" (a JSON list of characters) or "bytes"."""

    def __init__(self, kind, chars=None):
        self.kind, self.chars = kind, chars
        self.index = {c: i for i, c in enumerate(chars)} if chars is not None else None

    @classmethod
    def from_attrs(cls, attrs, where):
        kind = str(attrs.get("tokenizer", ""))
        if kind == "bytes":
            return cls("bytes")
        if kind == "chars" and "vocab" in attrs:
            return cls("chars", list(json.loads(str(attrs["vocab"]))))
        raise MpitrainError(f"{where}: no tokenizer stored (expected a language model trained on a file made by "
                            "prepare --source text:FILE)")

    def encode(self, text):
        if self.kind == "bytes":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        missing = sorted({c for c in text if c not in self.index})
        if missing:
            raise MpitrainError(f"the prompt holds {', '.join(map(repr, missing[:5]))}, not in the model's "
                                f"vocabulary of {len(self.chars)} characters")
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, tokens):
        if self.kind == "bytes":
            return bytes(np.asarray(tokens, np.uint8)).decode("utf-8", errors="replace")
        return "".join(self.chars[int(t)] for t in tokens)


def sample(model, params, context, tokens, temperature=1.0, top_k=0, seed=0):
    """`tokens` new token ids after the ids in `context`, each drawn from softmax(logits / temperature)
    (restricted to the top_k most likely when top_k > 0; temperature 0 = the most likely)."""
    T = model.spec.feature_shape[0]
    V = model.spec.n_out
    if len(context) == 0:
        raise MpitrainError("generate: the prompt is empty; give at least one character")
    rng = np.random.default_rng(seed)
    ids = list(int(t) for t in context)
    window = np.zeros((1, T), np.int32)
    for _ in range(tokens):
        ctx = ids[-T:]
        window[0, :len(ctx)] = ctx
        window[0, len(ctx):] = 0
        z = model.logits(params, window)[0, len(ctx) - 1].astype(np.float64)
        if temperature <= 0:
            ids.append(int(np.argmax(z)))
            continue
        z /= temperature
        if 0 < top_k < V:
            z[z < np.sort(z)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        ids.append(int(rng.choice(V, p=p / p.sum())))
    return ids[len(context):]


def generate(path, prompt, tokens=200, temperature=0.8, top_k=0, seed=0):
    """The prompt's continuation by the language model in model.h5 at path, as text."""
    import h5py

    from .checkpoint import load_model
    from .model import Model

    spec, params = load_model(path)
    if spec.task != "lm":
        raise MpitrainError(f"{path}: a {spec.task} model; generate needs a language model (model.kind = gpt)")
    with h5py.File(path, "r") as f:
        vocab = Vocabulary.from_attrs(f.attrs, path)
    if tokens < 0:
        raise MpitrainError(f"generate: --tokens {tokens}: expected ≥ 0")
    ids = sample(Model(spec), params, vocab.encode(prompt), tokens, temperature, top_k, seed)
    return vocab.decode(ids)
