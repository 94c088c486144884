"""Federated partitions: which training samples each client holds.

`write_partition` stores the training split again in client order under partition/ (x, y), so that
client k's samples are the contiguous rows offsets[k] … offsets[k+1]-1 — one hyperslab that only its host
rank reads; the first n_train[k] of them are its training data, the rest its local test split.
"""
import hashlib
import os

import numpy as np

from ..errors import MpitrainError
from .prepare import GROUP_BYTES

SCHEMES = ("iid", "dirichlet", "shards", "quantity")


def split_clients(y, scheme, clients, alpha=0.5, shards_per_client=2, seed=0):
    """A list of `clients` index arrays into y (seeded; every client gets at least 2 samples)."""
    n = len(y)
    if scheme not in SCHEMES:
        raise MpitrainError(f"--partition {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if clients < 1 or 2 * clients > n:
        raise MpitrainError(f"--clients {clients}: expected 1 … {n // 2} (2 samples per client at least)")
    if seed < 0:
        raise MpitrainError(f"--seed {seed}: expected an integer ≥ 0")
    if not 0 < alpha < np.inf:  # NaN too
        raise MpitrainError(f"--alpha {alpha}: expected > 0 and finite")
    if scheme == "shards" and not 1 <= shards_per_client <= n // clients:
        raise MpitrainError(f"--shards-per-client {shards_per_client}: expected 1 … {n // clients} "
                            f"({clients} clients share {n} samples)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFED]))
    # every client's indices come in random order: write_partition takes a client's local test split from
    # its tail, which must be a random sample of the client (a shard's tail would hold one label)
    if scheme == "iid":
        return np.array_split(rng.permutation(n), clients)
    if scheme == "shards":
        shards = np.array_split(np.argsort(y, kind="stable"), clients * shards_per_client)
        order = rng.permutation(len(shards))
        return [rng.permutation(np.concatenate([shards[s] for s in order[k::clients]])) for k in range(clients)]
    for _ in range(1000):  # redraw until every client has 2 samples at least
        if scheme == "quantity":  # client sizes ~ Dir(alpha), labels iid
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * n).astype(int)[:-1]
            parts = np.split(rng.permutation(n), cuts)
        else:  # label distribution of each client ~ Dir(alpha) (per class, proportions over clients)
            parts = [[] for _ in range(clients)]
            for c in np.unique(y):
                idx = rng.permutation(np.flatnonzero(y == c))
                cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
                for k, part in enumerate(np.split(idx, cuts)):
                    parts[k].append(part)
            parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= 2:
            return [rng.permutation(p) for p in parts]
    raise MpitrainError(f"--alpha {alpha}: could not give each of {clients} clients 2 samples; raise alpha")


def write_partition(path, scheme, clients=16, alpha=None, shards_per_client=None, seed=0, test_fraction=0.2):
    """Add (or replace) the partition of an existing dataset file.  Returns a one-line description."""
    import h5py

    if not os.path.isfile(path):
        raise MpitrainError(f"{path}: no such file (prepare it with --source, or give --source with --partition)")
    try:
        f = h5py.File(path, "r+")
    except OSError:
        raise MpitrainError(f"{path}: cannot open as HDF5 to add a partition") from None
    with f:
        return f"{path}: " + add_partition(f, scheme, clients, alpha, shards_per_client, seed, test_fraction)


def add_partition(f, scheme, clients=16, alpha=None, shards_per_client=None, seed=0, test_fraction=0.2):
    """Write the partition into the open file f (prepare's temporary file, or write_partition's); returns
    the description.  alpha and shards_per_client: None = the default (0.5, 2), and refused where the
    scheme ignores them."""
    for name, value, used in (("--alpha", alpha, ("dirichlet", "quantity")),
                              ("--shards-per-client", shards_per_client, ("shards",))):
        if value is not None and scheme not in used:
            raise MpitrainError(f"{name}: only for --partition {' or '.join(used)}, not {scheme}")
    alpha, shards_per_client = 0.5 if alpha is None else alpha, 2 if shards_per_client is None else shards_per_client
    if not 0 <= test_fraction < 1:
        raise MpitrainError(f"--client-test-fraction {test_fraction}: expected a number in [0, 1)")
    if f.attrs.get("task", "classify") != "classify":
        raise MpitrainError(f"--partition: not for {f.attrs.get('source')} (task = {f.attrs['task']!r}): federated "
                            "partitions hold class labels")
    x, y = f["train/x"], f["train/y"][...]  # x is copied a group of rows at a time: bounded memory
    parts = split_clients(y, scheme, clients, alpha, shards_per_client, seed)
    order = np.concatenate(parts)
    sizes = np.array([len(p) for p in parts], np.int64)
    n_train = sizes - (sizes * test_fraction).astype(np.int64)
    if "partition" in f:
        del f["partition"]
    g = f.create_group("partition")
    px = g.create_dataset("x", (len(order), x.shape[1]), np.float32,
                          chunks=(max(1, min(len(order), 4096)), x.shape[1]))
    group = max(1, GROUP_BYTES // (4 * x.shape[1]))
    for a in range(0, len(order), group):
        rows = order[a:a + group]
        sort = np.argsort(rows)
        block = np.empty((len(rows), x.shape[1]), np.float32)
        block[sort] = x[rows[sort]]  # h5py reads increasing indices
        px[a:a + len(rows)] = block
    g.create_dataset("y", data=y[order])
    g["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    g["n_train"] = n_train
    digest = hashlib.sha256()  # with the file's checksum of train/, this names the partition exactly
    for a in (order.astype(np.int64), sizes, n_train):
        digest.update(a.tobytes())
    g.attrs.update(scheme=scheme, clients=clients, alpha=alpha, shards_per_client=shards_per_client,
                   seed=seed, test_fraction=test_fraction, checksum=digest.hexdigest())
    return (f"partition {scheme} over {clients} clients "
            f"({sizes.min()}–{sizes.max()} samples each, {int(n_train.sum())} for training)")
