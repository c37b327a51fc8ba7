"""Streaming aggregation (cloud/fold.py): the running float64 sum gives the round's bounded FedAvg
whatever the order updates arrive in, and after a persist/restore (a cloud killed mid-round)."""

from __future__ import annotations

import logging
import random
import threading

import numpy as np
import pytest

from fedpft.cloud.aggregate import cap_weights, clip_update, fedavg, norm_bound, sum_stats, update_norm
from fedpft.cloud.fold import RoundFold
from fedpft.cloud.state import RunStore

SHAPES = {"a.lora_A": (4, 16), "a.lora_B": (16, 4), "head.weight": (3, 16)}


def updates(n: int, seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    ref = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    ups = {f"d{i:02d}": {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in ref.items()} for i in range(n)}
    ups["d00"] = {k: v + 50.0 for k, v in ref.items()}  # one far outside the norm bound
    stats = {d: {3: (rng.integers(0, 9, 8).astype(np.float32), float(rng.integers(10, 20)))} for d in ups}
    samples = {d: int(rng.integers(1, 50)) for d in ups}
    samples["d01"] = 10**9  # one claiming the fleet's weight
    return ref, ups, stats, samples


def fold_in(ref, ups, stats, samples, order, fold=None):
    fold = fold or RoundFold(ref, label="r0")
    for d in order:
        fold.add(fold.contribution(d, ups[d], samples[d], 0.5), ups[d], stats[d])
    return fold


def reference_fedavg(ref, ups, samples):
    """The aggregate before streaming: clip each update to the bound, cap the weights, FedAvg."""
    names = sorted(ups)
    bound, _ = norm_bound([update_norm(ups[d], ref) for d in names], 3.0)
    weights = cap_weights([max(samples[d], 1) for d in names], 3.0)
    return fedavg([clip_update(ups[d], ref, bound) for d in names], weights)


def finish(fold, ups):
    return fold.finish(fold.bounds(3.0, None, None, 3.0), lambda d: ups[d])


def test_folding_in_any_order_gives_the_same_sum_and_the_bounded_fedavg():
    ref, ups, stats, samples = updates(12)
    names = sorted(ups)
    first = fold_in(ref, ups, stats, samples, names)
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    second = fold_in(ref, ups, stats, samples, shuffled)
    for k in SHAPES:
        np.testing.assert_allclose(first.sum[k], second.sum[k], rtol=1e-12, atol=1e-12)
    b = first.bounds(3.0, None, None, 3.0)
    assert b.scales[0] < 1.0 and b.weights[1] < samples["d01"]  # both bounds took part
    want = reference_fedavg(ref, ups, samples)
    for got in (finish(first, ups), finish(second, ups)):
        for k in SHAPES:
            assert got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    for layer, (off, pos) in sum_stats(list(stats.values())).items():
        np.testing.assert_allclose(first.stats()[layer][0], off)
        assert first.stats()[layer][1] == pos


def test_check_workers_folding_at_once_give_the_sequential_sum_and_consistent_snapshots():
    """`take` is what the cloud's check threads call: four of them folding 40 updates at once, while
    the loop snapshots the sum, end with the sequential fold's sum and counts, every snapshot's sum
    is exactly the sequential sum of the devices it names, and each thread folds through one reused
    change buffer (an update's change no longer outlives its check). MiniLM-sized updates (118k
    coordinates): numpy's in-place add then runs long enough without the GIL for an unlocked fold to
    lose additions or a snapshot to tear."""
    ref, ups, stats, samples = updates(40, seed=3, shapes={"a.lora_A": (8, 4096), "a.lora_B": (4096, 8), "head.weight": (13, 4096)})
    names = sorted(ups)
    want = fold_in(ref, ups, stats, samples, names)
    fold = RoundFold(ref, label="r0")
    buffers: dict[int, set[int]] = {}
    snaps, go = [], threading.Barrier(5)

    def worker(part):
        go.wait()
        for d in part:
            c = fold.take(d, ups[d], stats[d], samples[d], 0.5)
            assert c.device == d and c.norm > 0
            buffers.setdefault(threading.get_ident(), set()).add(id(fold._scratch.buf))

    threads = [threading.Thread(target=worker, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    go.wait()
    while any(t.is_alive() for t in threads):
        snaps.append(fold.snapshot())
    for t in threads:
        t.join()
    assert set(fold.folded) == set(names) and all(len(ids) == 1 for ids in buffers.values()) and len(buffers) == 4
    for k in SHAPES:
        np.testing.assert_allclose(fold.sum[k], want.sum[k], rtol=1e-12, atol=1e-12)
    for layer, (off, pos) in want.stats().items():
        got_off, got_pos = fold.stats()[layer]
        np.testing.assert_array_equal(got_off, off)
        assert got_pos == pytest.approx(pos)
    before = fold.flat.copy()
    fold.take(names[0], ups[names[0]], stats[names[0]], samples[names[0]], 0.5)  # a device's second update adds nothing
    np.testing.assert_array_equal(fold.flat, before)
    assert snaps
    for snap in snaps[:: max(1, len(snaps) // 8)]:
        part = fold_in(ref, ups, stats, samples, sorted(snap.folded))
        np.testing.assert_allclose(snap.flat, part.flat, rtol=1e-12, atol=1e-12)


def test_a_restored_sum_folds_the_rest_to_the_same_adapters(tmp_path):
    ref, ups, stats, samples = updates(9, seed=3)
    names = sorted(ups)
    whole = finish(fold_in(ref, ups, stats, samples, names), ups)
    store = RunStore(tmp_path)
    store.save_fold(1, fold_in(ref, ups, stats, samples, names[5:]).to_bytes())  # persisted, then the cloud died
    resumed = RoundFold(ref, label="r0")
    resumed.restore(store.load_fold(1))
    assert resumed.add(resumed.contribution("d05", ups["d05"], 1, None), ups["d05"], stats["d05"]) is False  # counted once
    fold_in(ref, ups, stats, samples, names[:5], resumed)
    for k, v in finish(resumed, ups).items():
        np.testing.assert_allclose(v, whole[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(resumed.stats()[3][0], sum_stats(list(stats.values()))[3][0])


def test_a_damaged_or_foreign_sum_is_not_used(tmp_path, caplog):
    ref, ups, stats, samples = updates(3)
    store = RunStore(tmp_path)
    store.save_fold(0, fold_in(ref, ups, stats, samples, sorted(ups)).to_bytes())
    with pytest.raises(ValueError, match="running sum of 'r0'"):
        RoundFold(ref, label="r1").restore(store.load_fold(0))
    path = tmp_path / "updates" / "round_0000" / "running-sum.bin"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with caplog.at_level(logging.WARNING):
        assert store.load_fold(0) is None
    assert any("does not match its sha256 side file" in m for m in caplog.messages)
    store.drop_fold(0)
    assert store.load_fold(0) is None and not path.exists()
