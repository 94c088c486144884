"""The loss apart from the network: what a model's output is scored against, and the metrics that fit.

Every task returns (loss sum, hit sum) over a batch, per sample, and overwrites the output with
d(loss sum)/d(output), so the training step's buffer and its scale (1 / global batch) are the same for all:
  classify  softmax cross-entropy of the logits (N, classes) against integer labels; hits = correct
  lm        softmax cross-entropy at every position of (N, T, vocabulary) against the next tokens (N, T);
            a sample's loss and hits are the means over its T positions
  regress   mean squared error of (N, K) against float targets; a sample's loss is the mean over its K
            outputs, hits the squared-error sum (for RMSE and R²)
"""
import math


class Classify:
    data = "labelled"

    @staticmethod
    def loss_grad(k, out, y):
        return k.softmax_xent(out, y)

    @staticmethod
    def metrics(prefix, loss, hits, n, extra=None):
        return {f"{prefix}_loss": loss / n, f"{prefix}_accuracy": hits / n}


class LanguageModel:
    data = "token-stream"

    @staticmethod
    def loss_grad(k, out, y):
        n, T, V = out.shape
        loss, hits = k.softmax_xent(out.reshape(n * T, V), y.reshape(n * T))
        out *= 1.0 / T  # each sample's loss is the mean over its positions
        return loss / T, hits / T

    @staticmethod
    def metrics(prefix, loss, hits, n, extra=None):
        mean = loss / n
        return {f"{prefix}_loss": mean, f"{prefix}_accuracy": hits / n, f"{prefix}_bits_per_token": mean / math.log(2),
                f"{prefix}_perplexity": math.exp(min(mean, 700.0))}


class Regress:
    data = "regression"

    @staticmethod
    def loss_grad(k, out, y):
        return k.mse(out, y)

    @staticmethod
    def metrics(prefix, loss, hits, n, extra=None):
        """hits: the squared-error sum; extra: (the targets' total sum of squares about their means, the
        number of target values), both in the units hits is in, for RMSE and R² (evaluate.scores)."""
        out = {f"{prefix}_loss": loss / n}
        if extra is not None:
            ss_tot, m = extra
            out[f"{prefix}_rmse"] = math.sqrt(hits / m)
            out[f"{prefix}_r2"] = 1.0 - hits / ss_tot if ss_tot > 0 else float("nan")
        return out


TASKS = {"classify": Classify, "lm": LanguageModel, "regress": Regress}
