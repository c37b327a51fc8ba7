"""Pure math of a round: FedAvg of adapters, activation statistics, neuron selection, and the
bounds that keep one device from steering the aggregate (norm bound, weight cap, median,
trimmed mean).

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


# The norm bound never drops below this: when the typical change is ~0 (devices that took no step,
# or a majority sending zeros) a bound of 3 x 0 would erase every honest update.
MIN_NORM_BOUND = 1e-3
AGGREGATORS = ("fedavg", "median", "trimmed-mean")


def lower_median(values: Sequence[float]) -> float:
    """The median, or of an even count the lower of the two middle values: with two devices, one
    honest and one inflating its number, the honest one is the reference (a plain median would
    take half of the inflated value)."""
    if len(values) == 0:
        raise ValueError("lower_median of nothing")
    return float(np.sort(np.asarray(values, dtype=np.float64))[(len(values) - 1) // 2])


def norm_bound(norms: Sequence[float], factor: float, ceiling: float | None = None,
               previous: float | None = None, floor: float = MIN_NORM_BOUND) -> tuple[float | None, float | None]:
    """(bound on a device's change, typical change) for one round.

    typical = lower median of this round's change norms and the previous round's typical norm
    (so a round of one or two devices still has a reference); bound = clamp(factor * typical,
    floor, ceiling). factor 0 turns the adaptive part off (only `ceiling` bounds); (None, typical)
    when nothing bounds.
    """
    samples = [*norms, *([previous] if previous is not None else [])]
    typical = lower_median(samples) if samples else None
    bound = None
    if factor > 0 and typical is not None:
        bound = max(factor * typical, floor)
    if ceiling is not None:
        bound = ceiling if bound is None else min(bound, ceiling)
    return bound, typical


def cap_weights(weights: Sequence[float], factor: float) -> list[float]:
    """FedAvg weights, each at most `factor` x the lower median of the round's weights (0 = no
    cap): a device claiming 10^12 samples counts like a large honest one, not like the fleet."""
    if factor <= 0 or not weights:
        return [float(w) for w in weights]
    cap = factor * lower_median(weights)
    return [float(min(w, cap)) for w in weights]


def _stack(updates: Sequence[Tensors], key: str) -> np.ndarray:
    return np.stack([u[key].astype(np.float64) for u in updates])  # (devices, *shape)


def coordinate_median(updates: Sequence[Tensors]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (unweighted): each value is one some device actually sent (odd count),
    so a minority of devices cannot move it past the honest range."""
    if not updates:
        raise ValueError("median needs at least one update")
    return {k: np.median(_stack(updates, k), axis=0).astype(updates[0][k].dtype) for k in updates[0]}


def trimmed_mean(updates: Sequence[Tensors], trim: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the k lowest and k highest values, k = floor(trim * n)
    (at least 1 once there are 3 updates and trim > 0), unweighted."""
    n = len(updates)
    if n == 0:
        raise ValueError("trimmed mean needs at least one update")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    k = int(trim * n)
    if trim > 0 and n >= 3:
        k = max(k, 1)
    k = min(k, (n - 1) // 2)
    out = {}
    for key in updates[0]:
        s = np.sort(_stack(updates, key), axis=0)
        out[key] = s[k : n - k].mean(axis=0).astype(updates[0][key].dtype)
    return out


def aggregate(updates: Sequence[Tensors], weights: Sequence[float], method: str = "fedavg", trim: float = 0.2) -> dict[str, np.ndarray]:
    """One aggregation rule by name (AGGREGATORS); median and trimmed mean ignore the weights."""
    if method == "fedavg":
        return fedavg(updates, weights)
    if method == "median":
        return coordinate_median(updates)
    if method == "trimmed-mean":
        return trimmed_mean(updates, trim)
    raise ValueError(f"unknown aggregator {method!r}; choose one of {', '.join(AGGREGATORS)}")
