"""The virtual engine's sharing of cores and ORT sessions (`fedpft.sim.pool`): a session reused
across rounds trains exactly as a newly opened one, at most n clients train at once and the
heaviest waiting one goes first, and the plan of slots, threads and providers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import write_text_data
from fedpft.edge.trainer import open_session, train_round
from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.sim import virtual
from fedpft.sim.pool import SessionPool, Slots


def assert_same_round(a, b) -> None:
    assert a.losses == b.losses and a.steps == b.steps and a.acc_before == b.acc_before and a.acc_after == b.acc_after
    assert a.adapters.keys() == b.adapters.keys()
    for k in a.adapters:
        np.testing.assert_array_equal(a.adapters[k], b.adapters[k], err_msg=k)
    assert a.stats.keys() == b.stats.keys() and a.stats
    for layer in a.stats:
        np.testing.assert_array_equal(a.stats[layer][0], b.stats[layer][0])
        assert a.stats[layer][1] == b.stats[layer][1]


def test_a_reused_session_trains_a_round_as_a_fresh_one(tmp_path, tiny_bert_bundle):
    """Round 2 on the pool's session, after a round that moved its adapters, stepped its AdamW and
    installed pushed FFN weights, equals round 2 on a session opened for it, bit for bit (the tiny
    bundle has no dropout) — with the pushed FFN weights and without them (the bundle's again)."""
    m = BundleManifest.load(tiny_bert_bundle)
    data = write_text_data(tmp_path / "local.jsonl", n=30, seed=5)
    cfg = EdgeTrainConfig(lr=1e-2, batch_size=4, epochs=2, seed=7, holdout=0.2, threads=1)
    rng = np.random.default_rng(0)
    start = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in open_session(tiny_bert_bundle).adapters().items()}
    ffn = {t.key: rng.normal(0, 0.02, t.shape).astype(np.float32) for t in m.ffn}
    assert ffn, "the tiny bundle has compressed FFN layers"
    pool = SessionPool(1, threads=1)
    with pool.lease(tiny_bert_bundle) as s:
        first = train_round(tiny_bert_bundle, data, cfg.model_copy(update={"seed": 3}), ffn=ffn, session=s)
        assert s.optimizer.t == first.steps > 0
    for pushed in (ffn, None):
        fresh = train_round(tiny_bert_bundle, data, cfg, adapters=start, ffn=pushed)
        with pool.lease(tiny_bert_bundle) as s:
            assert s.optimizer.t == 0
            reused = train_round(tiny_bert_bundle, data, cfg, adapters=start, ffn=pushed, session=s)
        assert_same_round(reused, fresh)
    assert pool.opened == 1


def test_a_session_comes_back_to_its_checkpoint(tmp_path, tiny_bert_bundle):
    m = BundleManifest.load(tiny_bert_bundle)
    cache = tmp_path / "cache"
    s = open_session(tiny_bert_bundle)
    s.set_ffn({t.key: np.full(t.shape, 0.01, np.float32) for t in m.ffn})
    s.save(cache)
    s = open_session(tiny_bert_bundle, cache)
    saved = s.ffn()
    s.set_ffn({t.key: np.zeros(t.shape, np.float32) for t in m.ffn})
    s.reset()
    for k, v in s.ffn().items():
        np.testing.assert_array_equal(v, saved[k])


def test_a_given_session_refuses_a_checkpoint_cache(tmp_path, tiny_bert_bundle):
    data = write_text_data(tmp_path / "local.jsonl", n=8)
    with pytest.raises(ValueError, match="cache_dir"):
        train_round(tiny_bert_bundle, data, EdgeTrainConfig(), cache_dir=tmp_path / "c", session=open_session(tiny_bert_bundle))


def test_slots_bound_the_holders_and_serve_the_heaviest_first():
    slots = Slots(2, settle=0.3)
    order, busy, peak, lock = [], [0], [0], threading.Lock()

    def client(weight):
        with slots.hold(weight) as i:
            assert 0 <= i < 2
            with lock:
                order.append(weight)
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.05)
            with lock:
                busy[0] -= 1

    threads = [threading.Thread(target=client, args=(w,)) for w in (1, 7, 3, 9, 5, 2)]
    for t in threads:
        t.start()
        time.sleep(0.01)  # they arrive one by one, the light ones first, within the settle window
    for t in threads:
        t.join(5)
    assert peak[0] == 2
    assert order[:2] == [9, 7] or order[:2] == [7, 9]
    assert sorted(order[2:], reverse=True) == order[2:]


def test_slots_refuse_zero():
    with pytest.raises(ValueError):
        Slots(0)


@pytest.mark.parametrize("parallel,clients,cores,plan", [
    (None, 10, 2, (2, 1)), (None, 10, 16, (10, 1)), (1, 10, 2, (1, 2)), (4, 3, 8, (3, 2)), (3, 10, 8, (3, 2)), (None, 1, 1, (1, 1)),
])
def test_plan_parallel(monkeypatch, parallel, clients, cores, plan):
    monkeypatch.setattr(virtual, "cores", lambda: cores)
    assert virtual.plan_parallel(parallel, clients) == plan


def test_providers_follow_the_device_and_the_installed_onnxruntime(monkeypatch, caplog):
    import torch

    from fedpft.cloud import device
    from fedpft.edge import runtime

    assert virtual.ort_providers("cpu") == ("cpu",)
    monkeypatch.setattr(device, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert virtual.ort_providers("cuda") == ("cpu",)
    assert "no CUDA provider" in caplog.text
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert virtual.ort_providers("cuda") == ("cuda",)
