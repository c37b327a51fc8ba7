"""Client-level differential privacy for DP-FedAvg: the cloud's noise and the privacy accountant.

Mechanism. Each device clips its (unit-weighted) change to L2 norm C (fedpft.edge.privacy); the
sum over a round's devices then has sensitivity C, and Gaussian noise of std Z*C on it makes one
round a Gaussian mechanism of noise multiplier Z. Central DP: the cloud adds that noise to the sum
(`central_noise`); distributed DP: each of n devices adds std Z*C/sqrt(n) before masking, so under
secure aggregation nobody, the cloud included, ever sees an un-noised sum.

Neuron counts. On alignment rounds devices also report per-neuron off-rates in [0, 1]
(sensitivity S = sqrt(neurons)), summed under the same masks and noised with std Z*S. Releasing
both the update sum and the counts is one Gaussian mechanism on the concatenation normalised by
sensitivity, whose L2 sensitivity is sqrt(2): its effective multiplier is Z/sqrt(2)
(`effective_multiplier`), and the accountant charges those rounds at that multiplier.

Accounting. Devices are sampled each round with rate q = devices per round / fleet size, treated
as Poisson sampling (the standard approximation for a fixed-size sample); rounds compose. RDP
(the default: fast, slightly loose) or PLD (tighter, slower) from Google's dp-accounting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from fedpft.shared.secagg_ring import WEIGHT_KEY
from fedpft.shared.update import STATS_PREFIX

ACCOUNTANTS = ("rdp", "pld")


def central_noise(sums: Mapping[str, np.ndarray], noise_multiplier: float, clip: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The round's sum with N(0, (Z*C)^2) on every adapter coordinate and N(0, (Z*S)^2) on every
    neuron rate (S = sqrt(neurons)); the weight (a public count under DP) is left as is."""
    std = noise_multiplier * clip
    neurons = sum(int(np.size(v)) for k, v in sums.items() if k.startswith(STATS_PREFIX) and k.endswith("off_counts"))
    stats_std = noise_multiplier * float(np.sqrt(neurons))
    out = {}
    for k, v in sums.items():
        v = np.asarray(v, dtype=np.float64)
        if k == WEIGHT_KEY or (k.startswith(STATS_PREFIX) and k.endswith("positions")):
            out[k] = v
        elif k.startswith(STATS_PREFIX):
            out[k] = v + rng.normal(0.0, stats_std, v.shape)
        else:
            out[k] = v + rng.normal(0.0, std, v.shape)
    return out


def effective_multiplier(noise_multiplier: float, with_stats: bool) -> float:
    """The multiplier a round costs: Z, or Z/sqrt(2) when the neuron rates are released too."""
    return noise_multiplier / np.sqrt(2.0) if with_stats else noise_multiplier


def _event(q: float, multiplier: float) -> "dp_accounting.DpEvent":  # noqa: F821
    import dp_accounting  # scipy and friends: 70 MB of every cloud process's memory, for DP runs only

    if not 0 < q <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    if not multiplier > 0:
        raise ValueError(f"noise multiplier must be > 0, got {multiplier}")
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(multiplier))


def _accountant(kind: str):
    import dp_accounting

    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")


def epsilon(rounds: Sequence[tuple[float, float]], delta: float, kind: str = "rdp") -> float:
    """Epsilon at `delta` after the given rounds, each (sampling rate q, effective multiplier)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not rounds:
        return 0.0
    acc = _accountant(kind)
    # Identical rounds compose as one event with a count: composing them one by one costs
    # seconds per round in both accountants, and a run re-counts its whole history every round.
    for (q, z), count in sorted(Counter(rounds).items()):
        acc.compose(_event(q, z), count)
    return float(acc.get_epsilon(delta))


def epsilon_uniform(q: float, noise_multiplier: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon of `rounds` identical rounds (one composed event: fast for long runs)."""
    if rounds <= 0:
        return 0.0
    acc = _accountant(kind)
    acc.compose(_event(q, noise_multiplier), rounds)
    return float(acc.get_epsilon(delta))


def next_round_exceeds(spent: Sequence[tuple[float, float]], upcoming: tuple[float, float], delta: float,
                       max_epsilon: float, kind: str = "rdp") -> tuple[bool, float]:
    """(would the next round push epsilon past max_epsilon, epsilon after it): the run ends
    cleanly before such a round."""
    after = epsilon([*spent, upcoming], delta, kind)
    return after > max_epsilon, after


def sampling_rate(devices_per_round: int, fleet_size: int) -> float:
    if fleet_size < 1 or not 0 < devices_per_round <= fleet_size:
        raise ValueError(f"{devices_per_round} devices per round of a fleet of {fleet_size}")
    return devices_per_round / fleet_size
