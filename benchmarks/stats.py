"""Statistics of the multi-seed benchmark: pure functions over per-run accuracy curves (no I/O).

A run is one (method, partition, seed); the seed fixes the partition, the evaluation sample, the
adapter initialisation, device sampling and training order, so two methods run with the same seed
face the same data: their difference per seed is a paired sample, and the paired t interval is
much narrower than comparing two independent means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

# the criterion: the last three rounds move the mean accuracy by less than half a point
CONVERGED_POINTS = 0.5
LAST_ROUNDS = 3


@dataclass(frozen=True)
class Summary:
    mean: float
    sd: float  # sample standard deviation (n - 1); nan for one value
    n: int


@dataclass(frozen=True)
class PairedDiff:
    mean: float  # mean of a - b over the seeds both have
    lo: float  # 95% t confidence interval; nan below two pairs
    hi: float
    n: int
    seeds: tuple[int, ...]

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def t_quantile(p: float, df: int) -> float:
    """Quantile p of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, sd, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDiff:
    """a - b over the seeds both hold (seed -> value), with a `level` t interval of the mean."""
    seeds = tuple(sorted(set(a) & set(b)))
    d = [a[s] - b[s] for s in seeds]
    s = summarize(d)
    if s.n < 2:
        return PairedDiff(s.mean, math.nan, math.nan, s.n, seeds)
    half = t_quantile(0.5 + level / 2, s.n - 1) * s.sd / math.sqrt(s.n)
    return PairedDiff(s.mean, s.mean - half, s.mean + half, s.n, seeds)


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per-round mean over runs, up to the shortest curve (rounds every run reached)."""
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def last_rounds_movement(curves: Sequence[Sequence[float]], last: int = LAST_ROUNDS) -> float:
    """How far the mean curve moved over its last `last` rounds: max - min of those rounds' means
    (same unit as the curves); nan when the curves are shorter than `last`."""
    m = mean_curve(curves)
    if len(m) < last:
        return math.nan
    tail = m[-last:]
    return max(tail) - min(tail)


def block_drift(curves: Sequence[Sequence[float]], last: int = LAST_ROUNDS) -> float:
    """Mean of the mean curve's last `last` rounds minus the mean of the `last` before them: the
    drift that is left, with each round's evaluation noise averaged over a block (max - min of
    single rounds grows with that noise even on a flat curve). nan when the curves are too short."""
    m = mean_curve(curves)
    if len(m) < 2 * last:
        return math.nan
    return sum(m[-last:]) / last - sum(m[-2 * last:-last]) / last


# the window whose least-squares line says whether a curve still rises: short, because the curves bend (on the
# 20-round runs of session 16 a line through the last 10 rounds rose twice as steeply as one through the last 6)
TREND_ROUNDS = 6
# expected range (max - min) of LAST_ROUNDS = 3 independent standard normal draws
RANGE_OF_3 = 1.693


def tail_trend(curve: Sequence[float], window: int = TREND_ROUNDS) -> tuple[float, float]:
    """Least-squares line through a curve's last `window` rounds: (slope per round, sd of the
    residuals about it). The slope says whether a curve is still rising; the residual sd is the
    round-to-round noise that max - min of single rounds picks up on a flat curve. nans when the
    curve is shorter than `window` (or `window` < 3)."""
    if window < 3 or len(curve) < window:
        return math.nan, math.nan
    y = list(curve[-window:])
    xm, ym = (window - 1) / 2, sum(y) / window
    sxx = sum((x - xm) ** 2 for x in range(window))
    slope = sum((x - xm) * (v - ym) for x, v in enumerate(y)) / sxx
    resid = [v - (ym + slope * (x - xm)) for x, v in enumerate(y)]
    return slope, math.sqrt(sum(r * r for r in resid) / (window - 2))


def converged(curves: Sequence[Sequence[float]], points: float = CONVERGED_POINTS, last: int = LAST_ROUNDS) -> bool:
    """The issue's criterion, with curves in percent: the last rounds moved the mean by < `points`."""
    move = last_rounds_movement(curves, last)
    return not math.isnan(move) and move < points


# ---- the paper's claims -----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claim about a paired difference a - b (accuracy as a fraction): `above` holds when the
    interval lies above 0; `within` when it lies inside [-margin, margin] (an equivalence test: a
    wide interval around 0 is no evidence of closeness)."""

    text: str
    a: str
    b: str
    kind: str  # "above" | "within"
    margin: float = 0.0


# FedPFT (arXiv 2404.11536): within about a point of full-FM tuning, clearly above FedOT, and its
# neuron-level alignment adds on top of layer distillation
CLAIMS = (
    Claim("FedPFT is within about a point of full-FM tuning", "full", "fedpft", "within", 0.01),
    Claim("FedPFT is clearly above FedOT (same device budget)", "fedpft", "fedot", "above"),
    Claim("neuron-level alignment adds on top of layer distillation", "fedpft", "layeronly", "above"),
)


def verdict(claim: Claim, d: PairedDiff, unit: str = "seeds") -> str:
    """One line on what the paired difference says about the claim, in points (over `d.n` `unit`)."""
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    if d.n == 0:
        return "not measured yet"
    if d.n < 2:
        return f"one seed only ({claim.a} − {claim.b} = {pts(d.mean)} points): no interval yet, no verdict"
    ci = f"{claim.a} − {claim.b} = {pts(d.mean)} points, 95% CI [{pts(d.lo)}, {pts(d.hi)}], {d.n} {unit}"
    if claim.kind == "above":
        if d.lo > 0:
            return f"supported ({ci})"
        if d.hi < 0:
            return f"refuted: {claim.b} is above ({ci})"
        return f"not distinguishable from no difference ({ci})"
    if -claim.margin <= d.lo and d.hi <= claim.margin:
        return f"supported: the whole interval is within ±{100 * claim.margin:g} point ({ci})"
    if d.lo > claim.margin or d.hi < -claim.margin:
        return f"refuted: the gap is beyond ±{100 * claim.margin:g} point ({ci})"
    return f"inconclusive: the interval reaches past ±{100 * claim.margin:g} point ({ci})"
