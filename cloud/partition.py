"""Split a labelled data set across simulated clients: IID or Dirichlet non-IID (pure numpy)."""

from __future__ import annotations

import numpy as np


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    if scheme == "iid":
        return "iid", None
    name, _, arg = scheme.partition(":")
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise ValueError(f"--partition must be 'iid' or 'dirichlet:<alpha > 0>', got '{scheme}'")


def partition(labels: np.ndarray, n_clients: int, scheme: str, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Indices of each client's samples. Dirichlet: per class, client shares ~ Dir(alpha).

    Redraws (up to 100 times) until every client holds at least `min_size` samples, the usual
    practice so no simulated device starts empty.
    """
    if n_clients < 1:
        raise ValueError("need at least one client")
    if len(labels) < n_clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {n_clients} clients {min_size} each")
    kind, alpha = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        perm = rng.permutation(len(labels))
        return [np.sort(p) for p in np.array_split(perm, n_clients)]
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not draw a Dirichlet({alpha}) split giving every client {min_size} samples; raise alpha or lower --clients")
