"""The models, batches and optimiser settings of the PyTorch reference (make_reference.py writes it,
test_reference.py checks against it)."""
SEED, STEPS, LR, WD, CLIP, BETAS, EPS = 1, 10, 1e-3, 0.1, 1.0, (0.9, 0.999), 1e-8

# name: (spec keywords, batch size); tiny, so the file stays small and the test fast
MODELS = {
    "gpt": (dict(kind="gpt", n_in=8, n_out=11, feature_shape=(8,), task="lm", n_layer=2, n_head=2, n_embd=16), 4),
    "resnet8": (dict(kind="resnet8", n_in=3 * 8 * 8, n_out=5, feature_shape=(3, 8, 8), norm="batch"), 6),
    "resgroup": (dict(kind="layers", n_in=2 * 6 * 6, n_out=3, feature_shape=(2, 6, 6), layers=(
        "conv2d 4 3 same", "relu", "residual [conv2d 4 3 same stride=2 bias=false, groupnorm 2, tanh, "
        "conv2d 4 3 same bias=false, groupnorm 2] shortcut [conv2d 4 1 stride=2 bias=false, groupnorm 2]",
        "relu", "residual [layernorm, gelu]", "globalavgpool", "dense 3")), 5),
}
