"""Differential privacy pieces: clipping, central and distributed Gaussian noise, the accountant."""

import dp_accounting
import numpy as np
import pytest

from fedpft.cloud import dp
from fedpft.cloud.secagg import SecAggConfig
from fedpft.sim.secagg_round import run_round
from fedpft.cloud.secagg_unmask import average
from fedpft.edge.privacy import add_noise, clip_l2, contribution, device_noise_std, l2_norm, stats_sensitivity
from fedpft.shared import secagg_ring as ring


def test_clip_l2_scales_only_what_is_outside():
    t = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    clipped, f = clip_l2(t, 1.0)
    assert f == pytest.approx(0.2) and l2_norm(clipped) == pytest.approx(1.0)
    assert np.allclose(clipped["a"], [0.6, 0.0])
    same, f = clip_l2(t, 10.0)
    assert f == 1.0 and np.array_equal(same["b"], t["b"])
    with pytest.raises(ValueError):
        clip_l2(t, 0.0)


def test_central_noise_empirical_std_is_z_times_c():
    rng = np.random.default_rng(1)
    z, c = 1.1, 0.5
    sums = {"w": np.zeros((400, 500)), ring.WEIGHT_KEY: np.array([7.0])}
    noised = dp.central_noise(sums, z, c, rng)
    assert np.std(noised["w"]) == pytest.approx(z * c, rel=0.01)
    assert noised[ring.WEIGHT_KEY][0] == 7.0  # a public count under DP: not noised


def test_distributed_noise_through_the_secure_sum_carries_the_full_noise():
    n, z, c = 10, 0.8, 2.0
    std = device_noise_std(z, c, n)
    assert std == pytest.approx(z * c / np.sqrt(n))
    rng = np.random.default_rng(2)
    shapes = {"lora": (200, 100)}
    stats = {1: (np.full(1536, 30.0), 100.0)}
    contribs = {f"d{i}": contribution({k: np.zeros(s) for k, s in shapes.items()}, 50, stats, clip=c, noise_std=std, rng=rng)
                for i in range(n)}
    cfg = SecAggConfig(layout=ring.layout_of(contribs["d0"]), value_bound=c + 12 * std * 40)
    rep = run_round(contribs, cfg)
    assert rep.failure is None
    total = rep.result.values
    assert np.std(total["lora"]) == pytest.approx(z * c, rel=0.03)  # the sum, not one device, has std Z*C
    assert total[ring.WEIGHT_KEY][0] == pytest.approx(n)  # weight 1 each under DP
    rates = total["__stats__.layer.1.off_counts"]
    s = stats_sensitivity({"__stats__.layer.1.off_counts": (1536,)})
    assert s == pytest.approx(np.sqrt(1536))
    assert np.mean(rates) == pytest.approx(n * 0.3, abs=3 * z * s / np.sqrt(1536))
    assert np.std(rates) == pytest.approx(z * s, rel=0.06)  # rates noised with their own sensitivity
    deltas, st, wsum = average(total)
    assert wsum == pytest.approx(n) and st[1][1] == pytest.approx(n)


def test_noise_is_off_without_dp_and_weights_are_sample_counts():
    out = contribution({"a": np.ones(3)}, 42, None, clip=100.0)
    assert np.array_equal(out["a"], 42 * np.ones(3)) and out[ring.WEIGHT_KEY][0] == 42
    assert np.array_equal(add_noise({"a": np.ones(2)}, 0.0, np.random.default_rng())["a"], np.ones(2))


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_matches_dp_accounting_reference(kind):
    q, z, rounds, delta = 0.05, 1.1, 60, 1e-5
    if kind == "rdp":
        ref_acc = dp_accounting.rdp.RdpAccountant()
    else:
        ref_acc = dp_accounting.pld.PLDAccountant()
    ref_acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    ref = ref_acc.get_epsilon(delta)
    assert dp.epsilon_uniform(q, z, rounds, delta, kind) == pytest.approx(ref, rel=1e-9)
    assert dp.epsilon([(q, z)] * rounds, delta, kind) == pytest.approx(ref, rel=1e-3)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    e = lambda q, z, r: dp.epsilon_uniform(q, z, r, 1e-5)  # noqa: E731
    assert e(0.01, 1.0, 10) < e(0.01, 1.0, 100) < e(0.1, 1.0, 100)
    assert e(0.1, 2.0, 100) < e(0.1, 1.0, 100)
    assert dp.epsilon([], 1e-5) == 0.0


def test_next_round_exceeds_stops_before_the_budget_is_passed():
    q, z, delta = 0.1, 1.0, 1e-5
    spent = [(q, z)] * 5
    e5, e6 = dp.epsilon(spent, delta), dp.epsilon([*spent, (q, z)], delta)
    assert e5 < e6
    assert dp.next_round_exceeds(spent, (q, z), delta, max_epsilon=(e5 + e6) / 2) == (True, pytest.approx(e6))
    assert dp.next_round_exceeds(spent, (q, z), delta, max_epsilon=e6 + 0.01)[0] is False


def test_effective_multiplier_and_sampling_rate():
    assert dp.effective_multiplier(1.0, with_stats=False) == 1.0
    assert dp.effective_multiplier(1.0, with_stats=True) == pytest.approx(1 / np.sqrt(2))
    assert dp.sampling_rate(10, 1000) == 0.01
    with pytest.raises(ValueError):
        dp.sampling_rate(0, 10)
    with pytest.raises(ValueError, match="unknown accountant"):
        dp.epsilon([(0.1, 1.0)], 1e-5, "moments")
