"""The last stage of secure aggregation, and what the cloud does with the sum.

`recover` rebuilds, from the revealed Shamir shares, each survivor's self-mask seed (checked
against the commitment it published with its keys) and each dropped device's mask key (checked
against its public key), then strips those masks from the running masked sum. `average` turns the
decoded sum into FedAvg's result: sum(w_i * delta_i) / sum(w_i) and the summed neuron statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpft.shared import secagg_crypto as sc
from fedpft.shared import secagg_ring as ring
from fedpft.shared import shamir
from fedpft.shared.update import STATS_PREFIX


class SecAggAbort(Exception):
    """The round's secure sum cannot be completed; `reason` is one line for the log and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _points(coord, owner: str, secret: str) -> dict[int, int]:
    ids = list(coord.keys)
    return {sc.share_point(ids, holder): share for holder, shares in coord.reveals.items()
            for o, (kind, share) in shares.items() if o == owner and kind == secret}


def _secret(coord, owner: str, secret: str) -> bytes:
    key = coord.keys[owner]
    if secret == "self_seed":
        def check(s: bytes) -> bool:
            return sc.seed_commitment(s, coord.ctx) == key.seed_commitment
    else:
        def check(s: bytes) -> bool:
            return sc.public_of_private(s) == key.mask_key
    points = _points(coord, owner, secret)
    value = shamir.robust_reconstruct(points, coord.threshold, check)
    if value is None:
        what = "self-mask seed" if secret == "self_seed" else "mask key"
        raise SecAggAbort(f"cannot recover the {what} of {owner}: {len(points)} shares arrived, threshold "
                          f"{coord.threshold}, and no {coord.threshold} of them match its commitment")
    return value


def recover(coord) -> np.ndarray:
    """The unmasked ring sum of the survivors' inputs (SecAggAbort with the reason if impossible)."""
    survivors = sorted(coord.masked_sha)
    seeds = [_secret(coord, u, "self_seed") for u in survivors]
    orphans = []
    for d in coord.dropped:
        key = _secret(coord, d, "mask_key")
        for v in sorted(coord.graph[d] & set(survivors)):
            orphans.append((v, d, sc.mask_seed(key, coord.keys[v].mask_key, coord.ctx)))
    return ring.unmask_sum(coord.masked_sum, seeds, orphans)


def average(values: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[int, tuple[np.ndarray, float]], float]:
    """(mean adapter change = sum(w*delta)/sum(w), summed statistics by layer, sum of weights)."""
    wsum = float(np.asarray(values[ring.WEIGHT_KEY]).reshape(-1)[0])
    if not wsum > 0:
        raise SecAggAbort(f"the secure sum of weights is {wsum:g}; nothing to average")
    deltas = {k: np.asarray(v) / wsum for k, v in values.items() if k != ring.WEIGHT_KEY and not k.startswith(STATS_PREFIX)}
    parts: dict[int, dict[str, np.ndarray]] = {}
    for k, v in values.items():
        if k.startswith(STATS_PREFIX):
            _, _, layer, what = k.split(".")
            parts.setdefault(int(layer), {})[what] = np.asarray(v)
    stats = {layer: (p["off_counts"], float(p["positions"].reshape(-1)[0])) for layer, p in parts.items()}
    return deltas, stats, wsum
