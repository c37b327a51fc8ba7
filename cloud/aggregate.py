"""Pure math of a round: FedAvg of adapters, activation statistics, neuron selection, norm bound.

No I/O and no torch: numpy in, numpy out, so each piece is tested against a one-line reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]


def fedavg(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted average of tensor dicts (weights = |D_i|), accumulated in float64 then cast back.

    Every update must hold the same keys; callers validate shapes before they get here.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    keys = list(updates[0].keys())
    for u in updates[1:]:
        if set(u.keys()) != set(keys):
            raise ValueError("updates disagree on tensor names")
    out = {}
    for k in keys:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for wi, u in zip(w, updates):
            acc += wi * u[k].astype(np.float64)
        out[k] = acc.astype(updates[0][k].dtype)
    return out


def sum_stats(stats: Sequence[Mapping[int, tuple[np.ndarray, float]]]) -> dict[int, tuple[np.ndarray, float]]:
    """Sum per-layer (off_counts, positions) over devices."""
    total: dict[int, tuple[np.ndarray, float]] = {}
    for s in stats:
        for layer, (off, pos) in s.items():
            if layer in total:
                a, p = total[layer]
                if a.shape != off.shape:
                    raise ValueError(f"layer {layer}: neuron count {off.shape} differs from {a.shape}")
                total[layer] = (a + off.astype(np.float64), p + float(pos))
            else:
                total[layer] = (off.astype(np.float64), float(pos))
    return total


def apoz(off_counts: np.ndarray, positions: float) -> np.ndarray:
    """Average percentage of zeros (here: of activations <= 0) per neuron, in [0, 1]."""
    if positions <= 0:
        raise ValueError("no positions counted")
    return np.clip(off_counts / positions, 0.0, 1.0)


def most_used(apoz_values: np.ndarray, fraction: float) -> np.ndarray:
    """Bool mask of the `fraction` of neurons with the lowest APoZ (the ones clients use most).

    Ties broken by lower index so the choice is deterministic.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(apoz_values)
    k = int(round(n * fraction))
    order = np.lexsort((np.arange(n), apoz_values))[:k]
    mask = np.zeros(n, dtype=bool)
    mask[order] = True
    return mask


def update_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of (update - reference) over all tensors: how far a device moved the adapters."""
    sq = sum(float(np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in reference)
    return float(np.sqrt(sq))


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> dict[str, np.ndarray]:
    """Scale the delta to at most `max_norm` (limits what one device can do to the aggregate)."""
    norm = update_norm(update, reference)
    if norm <= max_norm or norm == 0:
        return dict(update)
    s = max_norm / norm
    return {k: (reference[k] + s * (update[k] - reference[k])).astype(update[k].dtype) for k in reference}
