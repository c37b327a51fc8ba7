"""Pure round math: FedAvg, statistics, neuron choice, clipping, sampling, quorum/deadline."""

import numpy as np
import pytest

from fedpft.cloud.aggregate import apoz, clip_update, fedavg, most_used, sum_stats, update_norm
from fedpft.cloud.sampling import RoundStatus, RoundTracker, round_rng, sample_devices


def test_fedavg_matches_numpy_weighted_average():
    rng = np.random.default_rng(0)
    ups = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)} for _ in range(4)]
    w = [10, 1, 5, 0]
    out = fedavg(ups, w)
    for k in ("a", "b"):
        ref = np.average(np.stack([u[k] for u in ups]), axis=0, weights=w)
        np.testing.assert_allclose(out[k], ref, rtol=1e-6, atol=1e-7)
        assert out[k].dtype == np.float32


def test_fedavg_rejects_bad_input():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg([{"a": np.ones(2)}], [0])
    with pytest.raises(ValueError):
        fedavg([{"a": np.ones(2)}, {"b": np.ones(2)}], [1, 1])


def test_sum_stats_and_apoz():
    s1 = {1: (np.array([1.0, 0.0, 4.0]), 4.0), 2: (np.array([2.0]), 2.0)}
    s2 = {1: (np.array([3.0, 0.0, 4.0]), 6.0)}
    tot = sum_stats([s1, s2])
    np.testing.assert_array_equal(tot[1][0], [4.0, 0.0, 8.0])
    assert tot[1][1] == 10.0 and tot[2][1] == 2.0
    np.testing.assert_allclose(apoz(*tot[1]), [0.4, 0.0, 0.8])
    with pytest.raises(ValueError):
        sum_stats([s1, {1: (np.ones(2), 1.0)}])


def test_most_used_freezes_lowest_apoz_with_stable_ties():
    a = np.array([0.9, 0.1, 0.5, 0.1, 0.3, 0.95])
    assert most_used(a, 0.5).tolist() == [False, True, False, True, True, False]
    assert most_used(a, 0.0).sum() == 0 and most_used(a, 1.0).all()
    assert most_used(np.zeros(4), 0.5).tolist() == [True, True, False, False]


def test_clip_update_bounds_norm():
    ref = {"w": np.zeros(4, dtype=np.float32)}
    up = {"w": np.array([3.0, 4.0, 0, 0], dtype=np.float32)}
    assert update_norm(up, ref) == pytest.approx(5.0)
    clipped = clip_update(up, ref, 1.0)
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    assert clip_update(up, ref, 10.0)["w"] is up["w"]


def test_sampling_is_deterministic_and_bounded():
    online = [f"d{i}" for i in range(10)]
    a = sample_devices(online, round_rng(1, 3), k=4)
    b = sample_devices(list(reversed(online)), round_rng(1, 3), k=4)
    assert a == b and len(a) == 4 and a == sorted(a)
    assert sample_devices(online[:2], round_rng(0, 0), k=5) == ["d0", "d1"]
    assert len(sample_devices(online, round_rng(0, 0), fraction=0.25)) == 3
    assert sample_devices(online, round_rng(0, 0)) == sorted(online)


def test_round_tracker_quorum_and_deadline():
    t = RoundTracker(["a", "b", "c"], deadline=100.0, min_clients=2)
    assert t.status(0) is RoundStatus.WAITING
    assert t.accept("a", 1) and not t.accept("a", 2)  # idempotent
    assert not t.accept("z", 1)  # not selected
    assert t.status(101) is RoundStatus.FAILED  # deadline below quorum
    assert t.accept("b", 1)
    assert t.status(50) is RoundStatus.WAITING
    assert t.status(101) is RoundStatus.DEADLINE
    assert t.fail("c", "oom") and not t.accept("c", 1)
    assert t.status(50) is RoundStatus.COMPLETE
    t2 = RoundTracker(["a", "b"], deadline=10.0, min_clients=2)
    t2.accept("a", 1)
    t2.fail("b", "boom")
    assert t2.status(0) is RoundStatus.FAILED


def test_partitions_cover_every_sample_once():
    from fedpft.cloud.partition import partition

    labels = np.repeat(np.arange(5), [50, 30, 10, 5, 5])
    for scheme in ("iid", "dirichlet:0.5", "dirichlet:100"):
        parts = partition(labels, 4, scheme, seed=3)
        allidx = np.concatenate(parts)
        assert sorted(allidx.tolist()) == list(range(len(labels))), scheme
        assert min(len(p) for p in parts) >= 2
    assert [len(p) for p in partition(labels, 4, "iid", 0)] == [25, 25, 25, 25]
    # small alpha concentrates each class on few clients
    skew = partition(labels, 4, "dirichlet:0.05", seed=1)
    top_share = np.mean([max(np.sum(labels[p] == c) for p in skew) / np.sum(labels == c) for c in range(5)])
    assert top_share > 0.6
    a, b = partition(labels, 4, "dirichlet:0.5", 7), partition(labels, 4, "dirichlet:0.5", 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:x", "zipf"])
def test_bad_partition_scheme(bad):
    from fedpft.cloud.partition import parse_scheme

    with pytest.raises(ValueError, match="--partition"):
        parse_scheme(bad)


def test_alignment_schedule_skips_the_last_round():
    from fedpft.cloud.server import align_due

    assert [r for r in range(10) if align_due(r, 10, 3)] == [2, 5, 8]
    assert [r for r in range(6) if align_due(r, 6, 3)] == [2]  # after round 6 no device would use it
    assert not any(align_due(r, 5, 0) for r in range(5)) and not any(align_due(r, 5, None) for r in range(5))
