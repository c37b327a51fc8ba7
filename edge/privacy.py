"""What a device contributes to a private round: its change clipped to L2 norm C, weighted, and
(distributed DP) noised before masking. Pure numpy functions, no I/O.

With DP on, every device weighs 1: FedAvg by |D_i| would make the denominator a private sum of
its own, so DP rounds average uniformly over the devices whose input arrived (a public count),
as in DP-FedAvg (McMahan et al. 2018). Without DP the weight is the device's sample count and the
clip is only the overflow guard of the ring.

Neuron statistics under DP are sent as rates: per neuron off_counts / positions in [0, 1], and
positions as 1, so one device moves a layer's count vector by at most sqrt(neurons) in L2 (its
sensitivity S = sqrt(total neurons of the round)) and gets noise of std noise_std * S / C, i.e. the
same multiplier as the adapters. The cloud's APoZ becomes mean rate over devices plus noise of std
Z * S / n_devices (distributed DP) - negligible at a thousand devices per round, but at ten it
swamps the per-neuron differences alignment ranks by, so it then freezes close to random neurons.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpft.shared.secagg_ring import WEIGHT_KEY
from fedpft.shared.update import stat_key
Tensors = Mapping[str, np.ndarray]


def l2_norm(tensors: Tensors) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values())))


def clip_l2(tensors: Tensors, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """(tensors scaled to L2 norm <= clip, the factor used); the factor is 1 when already inside."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = l2_norm(tensors)
    factor = 1.0 if norm <= clip else clip / norm
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in tensors.items()}, factor


def device_noise_std(noise_multiplier: float, clip: float, n_devices: int) -> float:
    """Each of n devices adds N(0, (Z*C)^2 / n): the sum of n carries N(0, (Z*C)^2). Pass the round's
    threshold T as n to keep the full noise even when only T inputs arrive (over-noising by n/T)."""
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    return noise_multiplier * clip / np.sqrt(n_devices)


def add_noise(tensors: Tensors, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if std <= 0:
        return {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    return {k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, np.shape(v)) for k, v in tensors.items()}


def stats_values(stats: Mapping[int, tuple[np.ndarray, float]], as_rates: bool) -> dict[str, np.ndarray]:
    """Per-layer statistics under their update keys; rates (and positions 1) for DP."""
    out = {}
    for layer, (off, pos) in stats.items():
        off = np.asarray(off, dtype=np.float64)
        if as_rates:
            off, pos = (off / pos if pos > 0 else np.zeros_like(off)), 1.0
        out[stat_key(layer, "off_counts")] = off
        out[stat_key(layer, "positions")] = np.asarray([pos], dtype=np.float64)
    return out


def stats_sensitivity(stats_layout: Mapping[str, tuple[int, ...]]) -> float:
    """L2 sensitivity of the rate vector: sqrt(number of neurons over all reported layers)."""
    return float(np.sqrt(sum(int(np.prod(s)) for k, s in stats_layout.items() if k.endswith("off_counts"))))


def contribution(delta: Tensors, num_samples: float, stats: Mapping[int, tuple[np.ndarray, float]] | None,
                 clip: float, noise_std: float = 0.0, rng: np.random.Generator | None = None,
                 dp: bool | None = None) -> dict[str, np.ndarray]:
    """The named float64 values a device encodes: weight * clip(delta, C) [+ noise], the weight,
    and the statistics [as noised rates]. DP (default: noise_std > 0; central DP under masks has
    no device noise but is DP all the same): weight 1, rates."""
    dp = noise_std > 0 if dp is None else dp
    rng = rng if rng is not None else np.random.default_rng()
    weight = 1.0 if dp else float(num_samples)
    clipped, _ = clip_l2(delta, clip)
    out = add_noise({k: weight * v for k, v in clipped.items()}, noise_std, rng)
    out[WEIGHT_KEY] = np.asarray([weight], dtype=np.float64)
    if stats:
        sv = stats_values(stats, as_rates=dp)
        counts = {k: v for k, v in sv.items() if k.endswith("off_counts")}
        s_std = noise_std * stats_sensitivity({k: v.shape for k, v in counts.items()}) / clip if dp else 0.0
        out.update(sv)
        out.update(add_noise(counts, s_std, rng))
    return out
