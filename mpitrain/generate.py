"""Sampling from a trained language model (model.h5 of a gpt or an lm stack): the API's
`load_model(path).generate(...)`, which `python -m mpitrain generate` runs.

The model was trained on windows of block_size tokens; a shorter context is padded on the right (causal
attention never lets position t see a later one, so the logits at the context's last position do not depend
on the padding), a longer one keeps its last block_size tokens."""
import numpy as np

from .errors import MpitrainError


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


def continuation(predictor, prompt, tokens, temperature, top_k, seed):
    """The text a Predictor's language model adds to prompt (api.Predictor.generate)."""
    import h5py

    from .data.text import Tokenizer

    spec = predictor.spec
    if spec.task != "lm":
        raise MpitrainError(f"{predictor.path}: a {spec.task} model; generate needs a language model "
                            "(model.kind = gpt)")
    if tokens < 0:
        raise MpitrainError(f"generate: tokens = {tokens}: expected ≥ 0")
    with h5py.File(predictor.path, "r") as f:
        tokenizer = Tokenizer.from_attrs(f.attrs, predictor.path)
    ids = sample(predictor.model, predictor.params, tokenizer.encode(prompt), tokens, temperature, top_k, seed)
    return tokenizer.decode(ids)
