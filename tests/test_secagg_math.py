"""Pure pieces of secure aggregation: ring encoding, masks, Shamir, share boxes, the graph."""

import itertools

import numpy as np
import pytest

from fedpft.shared import secagg_crypto as sc
from fedpft.shared import secagg_ring as ring
from fedpft.shared import shamir

CTX = sc.context("run", 3, "task")


def test_fixed_point_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    vals = {"b": rng.normal(0, 3, (4, 5)), "a": rng.normal(0, 1e-3, (7,))}
    layout = ring.layout_of(vals)
    vec, clamped = ring.encode_fixed(vals, layout, value_bound=100.0)
    back = ring.decode_fixed(vec, layout)
    assert clamped == 0 and vec.dtype == np.uint64
    for k in vals:
        assert np.abs(back[k] - vals[k]).max() <= 0.5 / 2**ring.FRAC_BITS


def test_encoding_clamps_to_the_bound_and_counts_it():
    vec, clamped = ring.encode_fixed({"x": np.array([5.0, -7.0, 1.0])}, {"x": (3,)}, value_bound=2.0)
    assert clamped == 2
    assert list(ring.decode_fixed(vec, {"x": (3,)})["x"]) == [2.0, -2.0, 1.0]


def test_negative_sums_wrap_and_decode():
    layout = {"x": (2,)}
    vs = [ring.encode_fixed({"x": np.array([-1.5, 0.25])}, layout, 10.0)[0] for _ in range(3)]
    assert np.allclose(ring.decode_fixed(ring.ring_sum(vs, 2), layout)["x"], [-4.5, 0.75])


def test_capacity_bound():
    ring.check_capacity(2000, 2.0**27)  # 2^11 x 2^27 x 2^24 = 2^62
    with pytest.raises(ValueError, match="overflow"):
        ring.check_capacity(2000, 2.0**29)


def test_layout_digest_depends_on_names_and_shapes():
    assert ring.layout_digest({"a": (2,), "b": (3,)}) == ring.layout_digest({"b": (3,), "a": (2,)})
    assert ring.layout_digest({"a": (2,)}) != ring.layout_digest({"a": (1, 2)})


def test_prg_is_deterministic_and_seed_dependent():
    s1, s2 = b"\1" * 32, b"\2" * 32
    assert np.array_equal(ring.prg(s1, 100), ring.prg(s1, 100))
    assert not np.array_equal(ring.prg(s1, 100), ring.prg(s2, 100))
    assert np.array_equal(ring.prg(s1, 10), ring.prg(s1, 100)[:10])


def test_pairwise_masks_cancel_and_self_masks_come_off():
    ids = ["a", "b", "c"]
    priv = {d: sc.new_private() for d in ids}
    pub = {d: sc.public_hex(priv[d]) for d in ids}
    xs = {d: np.arange(5, dtype=np.uint64) * (i + 1) for i, d in enumerate(ids)}
    seeds = {d: bytes([i]) * 32 for i, d in enumerate(ids)}
    masked = [ring.mask(xs[d], seeds[d], {p: sc.mask_seed(priv[d], pub[p], CTX) for p in ids if p != d}, d) for d in ids]
    total = ring.unmask_sum(ring.ring_sum(masked, 5), [seeds[d] for d in ids], [])
    assert np.array_equal(total, sum(xs.values()))
    assert not np.array_equal(masked[0], xs["a"])


def test_shamir_any_threshold_subset_reconstructs():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="3 needed"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)


def test_robust_reconstruct_skips_a_corrupt_share():
    secret = b"\7" * 32
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    shares[1] = (shares[1] + 1) % shamir.PRIME
    assert shamir.robust_reconstruct(shares, 3, lambda s: s == secret) == secret
    assert shamir.robust_reconstruct(dict(list(shares.items())[:2]), 3, lambda s: True) is None


def test_share_hex_round_trip_and_refusals():
    y = shamir.PRIME - 5
    assert shamir.share_from_hex(shamir.share_to_hex(y)) == y
    with pytest.raises(ValueError, match="field element"):
        shamir.share_from_hex("ff" * shamir.SHARE_BYTES)
    with pytest.raises(ValueError, match="hex digits"):
        shamir.share_from_hex("abc")


def test_box_opens_only_for_its_recipient_round_and_key():
    a, b, c = sc.new_private(), sc.new_private(), sc.new_private()
    key_ab = sc.box_key(a, sc.public_hex(b), CTX)
    assert key_ab == sc.box_key(b, sc.public_hex(a), CTX)
    box = sc.seal(key_ab, CTX, "a", "b", 2, 11, 22)
    assert len(box) == 4 * ((sc.BOX_BYTES + 2) // 3)
    assert sc.open_box(key_ab, CTX, "a", "b", box) == (2, 11, 22)
    with pytest.raises(ValueError, match="authenticate"):
        sc.open_box(sc.box_key(c, sc.public_hex(a), CTX), CTX, "a", "b", box)  # wrong key
    with pytest.raises(ValueError, match="authenticate"):
        sc.open_box(key_ab, sc.context("run", 4, "task"), "a", "b", box)  # another round
    with pytest.raises(ValueError, match="authenticate"):
        sc.open_box(key_ab, CTX, "a", "c", box)  # another recipient
    with pytest.raises(ValueError, match="base64"):
        sc.open_box(key_ab, CTX, "a", "b", "not*base64")


def test_low_order_public_key_is_refused():
    with pytest.raises(ValueError):
        sc.mask_seed(sc.new_private(), "00" * 32, CTX)


def test_neighbour_graph_complete_and_circulant():
    ids = [f"d{i}" for i in range(12)]
    full = sc.neighbours(ids, None, CTX)
    assert all(len(v) == 11 for v in full.values())
    g = sc.neighbours(ids, 4, CTX)
    assert all(len(v) == 4 for v in g.values())
    assert all(u in g[v] for u in g for v in g[u])  # symmetric
    assert g == sc.neighbours(list(reversed(ids)), 4, CTX)  # order-free
    with pytest.raises(ValueError, match="even"):
        sc.neighbours(ids, 3, CTX)


def test_value_bound_covers_weighted_changes_counts_and_noise():
    from fedpft.cloud.secagg import value_bound

    assert value_bound(clip=2.0, weight_cap=300, max_positions=4096) == 4096
    assert value_bound(clip=20.0, weight_cap=300, max_positions=4096) == 6000
    assert value_bound(clip=1.0, weight_cap=300, max_positions=4096, noise_std=0.1, stats_sensitivity=40.0) == pytest.approx(41.0)
    ring.check_capacity(800, value_bound(clip=20.0, weight_cap=300, max_positions=4096))
