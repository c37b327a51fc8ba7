"""The pure math that bounds one device's influence: norm bound, weight cap, median, trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest

from fedpft.cloud.aggregate import (
    MIN_NORM_BOUND, aggregate, cap_weights, clip_update, coordinate_median, lower_median, norm_bound, trimmed_mean, update_norm,
)

pytestmark = pytest.mark.security


def test_lower_median_takes_the_lower_middle_value():
    assert lower_median([3.0]) == 3.0
    assert lower_median([1.0, 1e12]) == 1.0  # the honest one of two is the reference
    assert lower_median([5.0, 1.0, 3.0]) == 3.0
    with pytest.raises(ValueError):
        lower_median([])


def test_norm_bound_is_a_multiple_of_the_typical_norm_clamped():
    bound, typical = norm_bound([0.2, 0.3, 1e6], factor=3)
    assert typical == 0.3 and bound == pytest.approx(0.9)
    assert norm_bound([0.2, 1e6], factor=3, previous=0.25) == (pytest.approx(0.75), 0.25)
    assert norm_bound([0.0, 0.0], factor=3) == (MIN_NORM_BOUND, 0.0)  # zeros never erase honest updates
    assert norm_bound([0.2, 0.3], factor=3, ceiling=0.5)[0] == 0.5
    assert norm_bound([0.2, 0.3], factor=0) == (None, 0.2)  # adaptive bound off
    assert norm_bound([0.2], factor=0, ceiling=0.1)[0] == 0.1
    assert norm_bound([], factor=3) == (None, None)


def test_clipping_to_the_bound_neutralises_a_huge_update():
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((4, 4)).astype(np.float32)}
    honest = [{"a": ref["a"] + 0.01 * rng.standard_normal((4, 4)).astype(np.float32)} for _ in range(2)]
    evil = {"a": np.full((4, 4), 1e4, np.float32)}
    ups = [*honest, evil]
    bound, _ = norm_bound([update_norm(u, ref) for u in ups], factor=3)
    clipped = [clip_update(u, ref, bound) for u in ups]
    assert update_norm(clipped[2], ref) == pytest.approx(bound, rel=1e-5)
    assert clipped[0]["a"] is honest[0]["a"]  # honest updates pass untouched
    assert np.abs(aggregate(clipped, [1, 1, 1])["a"] - ref["a"]).max() < 0.1


def test_cap_weights_limits_a_claimed_sample_count():
    assert cap_weights([40, 50, 10**12], factor=3) == [40, 50, 150]
    assert cap_weights([40, 10**12], factor=3) == [40, 120]
    assert cap_weights([40, 10**12], factor=0) == [40, 10**12]
    assert cap_weights([], factor=3) == []


def test_coordinate_median_and_trimmed_mean_match_numpy():
    rng = np.random.default_rng(1)
    ups = [{"w": rng.standard_normal((3, 2)).astype(np.float32)} for _ in range(5)]
    stack = np.stack([u["w"] for u in ups]).astype(np.float64)
    np.testing.assert_allclose(coordinate_median(ups)["w"], np.median(stack, axis=0), rtol=1e-6)
    s = np.sort(stack, axis=0)
    np.testing.assert_allclose(trimmed_mean(ups, 0.2)["w"], s[1:4].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(ups, 0.0)["w"], stack.mean(axis=0), rtol=1e-6)
    # three updates: one trimmed from each end -> the median
    np.testing.assert_allclose(trimmed_mean(ups[:3], 0.1)["w"], np.median(stack[:3], axis=0), rtol=1e-6)
    assert trimmed_mean(ups[:2], 0.4)["w"].dtype == np.float32
    with pytest.raises(ValueError):
        trimmed_mean(ups, 0.5)


def test_robust_aggregators_ignore_one_poisoned_update():
    honest = [{"w": np.full(4, v, np.float32)} for v in (1.0, 1.1, 0.9)]
    evil = {"w": np.full(4, 1e4, np.float32)}
    for method in ("median", "trimmed-mean"):
        out = aggregate([*honest, evil], [1, 1, 1, 10**12], method, trim=0.25)["w"]
        assert np.all(np.abs(out - 1.0) <= 0.1), (method, out)
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate(honest, [1, 1, 1], "mode")
