"""One bad device must not hold the fleet: in-process rounds of the real `Federation` (in-memory
hub) against devices that go offline, never ack, replay an old update, or stop uploading half-way."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pytest

from fedpft.cloud.config import ServeConfig
from fedpft.cloud.sampling import RoundTracker
from fedpft.cloud.server import Federation
from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource, Chunk
from fedpft.shared.codec import encode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import Ack, BlobRef, Hello, Presence, Task, Update, encode, make_update_id
from fedpft.shared.transport import InMemoryHub
from fedpft.shared.update import bind_update
from test_security_hostile import RUN, Device, good_tensors, honest, send

pytestmark = [pytest.mark.faults, pytest.mark.security]


def federation(bundle, tmp_path, devices, **cfg) -> tuple[Federation, InMemoryHub]:
    hub = InMemoryHub(threaded=True)
    made = [Device(hub, name, BundleManifest.load(bundle), on_task) for name, on_task in devices]
    conf = dict(bundle=bundle, out=tmp_path / "run", run_id=RUN, rounds=1, min_clients=1, round_timeout=60, wait_for_clients=5,
                chunk_size=8192, max_update_bytes=64 * 1024)
    conf.update(cfg)
    cloud = hub.transport("cloud")
    cloud.connect()
    fed = Federation(ServeConfig(**conf), cloud, show_progress=False)
    fed.subscribe()
    for d in made:
        d.hello()
    return fed, hub


def test_a_device_whose_last_will_arrives_is_not_waited_for(tiny_bert_bundle, tmp_path, caplog):
    def vanish(dev: Device, task: Task) -> None:
        # what the broker publishes for a device that dropped: its last will
        dev.pub(topics.PRESENCE, Presence(run_id=RUN, sender=dev.device_id, device_id=dev.device_id, status="offline",
                                          reason="connection lost"), retain=True)

    fed, hub = federation(tiny_bert_bundle, tmp_path, [("good0", honest(0)), ("gone", vanish)])
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        t0 = time.time()
        state = fed.run()
    hub.join()
    rec = state.history[-1]
    assert time.time() - t0 < 20  # round_timeout is 60 s
    assert rec["devices"] == ["good0"] and "went offline (connection lost)" in rec["failed"]["gone"]
    assert any("not waiting for gone: went offline" in m for m in caplog.messages)


def test_a_flood_of_hellos_that_never_ack_does_not_hold_the_round(tiny_bert_bundle, tmp_path, caplog):
    fed, hub = federation(tiny_bert_bundle, tmp_path, [("good0", honest(0))], task_ack_timeout=2, round_timeout=120)
    flood = hub.transport("flood")
    flood.connect()
    for i in range(300):
        d = f"ghost{i:04d}"
        flood.publish(topics.device_topic(RUN, d, topics.HELLO), encode(Hello(run_id=RUN, sender=d, device_id=d, num_samples=10)))
    fed.wait_for_devices(301, 10)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        t0 = time.time()
        state = fed.run()
    hub.join()
    rec = state.history[-1]
    took = time.time() - t0
    print(f"\nround with 300 silent hellos + 1 device: {took:.1f}s (ack deadline 2 s, round timeout 120 s)")
    assert took < 30, took
    assert rec["devices"] == ["good0"] and len(rec["failed"]) == 300
    assert any("did not ack the task within 2s" in m for m in caplog.messages)


def test_an_ack_of_another_task_does_not_keep_the_round_waiting(tiny_bert_bundle, tmp_path, caplog):
    """A task ack counts only for the task the round is waiting on (e.g. a late ack of a killed
    cloud's task for the same round, or a forged one): otherwise the round waits to its timeout."""
    def stale_ack(dev: Device, task: Task) -> None:
        dev.pub(topics.ACK, Ack(run_id=RUN, round_id=task.round_id, sender=dev.device_id, device_id=dev.device_id,
                                acked="task", task_id="an-earlier-task"))

    fed, hub = federation(tiny_bert_bundle, tmp_path, [("good0", honest(0)), ("stale", stale_ack)], task_ack_timeout=2, round_timeout=120)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        t0 = time.time()
        state = fed.run()
    hub.join()
    rec = state.history[-1]
    assert time.time() - t0 < 30
    assert rec["devices"] == ["good0"] and "stale" in rec["failed"]
    assert any("did not ack the task within 2s" in m for m in caplog.messages)


def test_hello_without_samples_and_presence_alone_make_no_device_eligible(tiny_bert_bundle, tmp_path, caplog):
    fed, hub = federation(tiny_bert_bundle, tmp_path, [])
    t = hub.transport("x")
    t.connect()
    t.publish(topics.device_topic(RUN, "empty", topics.HELLO), encode(Hello(run_id=RUN, sender="empty", device_id="empty", num_samples=0)))
    t.publish(topics.device_topic(RUN, "quiet", topics.PRESENCE), encode(Presence(run_id=RUN, sender="quiet", device_id="quiet", status="online")))
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        assert fed.wait_for_devices(1, 1.5) == []
    assert any("declares no training samples" in m for m in caplog.messages)


def test_a_relabelled_replay_is_refused_and_the_real_update_counts(tiny_bert_bundle, tmp_path, caplog):
    """An update of round 0, replayed as round 1 with round 1's task id (nothing in the message is
    secret), is refused by the binding inside the blob; the device's real round-1 update counts."""
    captured: dict = {}

    def answer(dev: Device, task: Task) -> None:
        if task.round_id == 1:
            replay = captured["update"].model_copy(update={"round_id": 1, "task_id": task.task_id})
            uid = make_update_id(RUN, 1, dev.device_id, task.task_id, replay.blob.sha256)
            replay = Update(**{**replay.model_dump(), "update_id": uid})
            dev.pub(topics.UPDATE, replay)
            for p in captured["chunks"]:
                dev.raw(topics.upload_topic(RUN, dev.device_id, replay.blob.blob_id), p)
        honest(task.round_id)(dev, task)

    fed, hub = federation(tiny_bert_bundle, tmp_path, [("d0", answer)], rounds=2)
    spy = hub.transport("spy")
    spy.connect()
    chunks: list[bytes] = []
    spy.subscribe(topics.all_devices_pattern(RUN, topics.UPLOAD), lambda t, p: chunks.append(p) if "update" not in captured else None)
    spy.subscribe(topics.all_devices_pattern(RUN, topics.UPDATE),
                  lambda t, p: captured.setdefault("update", Update.model_validate_json(p)) and captured.setdefault("chunks", list(chunks)))
    with caplog.at_level(logging.INFO, logger="fedpft"):
        state = fed.run()
    hub.join()
    assert [r["devices"] for r in state.history] == [["d0"], ["d0"]]
    assert any("rejected update from d0 for round 1: update blob is bound to round_id '0'" in m for m in caplog.messages), caplog.messages
    assert any("round 1: update from d0" in m for m in caplog.messages)


# ---- uploads: bounded in memory, dropped when stalled or when their round ends ---------------------


def open_round(bundle, tmp_path, **cfg) -> Federation:
    hub = InMemoryHub()
    cloud = hub.transport("cloud")
    cloud.connect()
    conf = dict(bundle=bundle, out=tmp_path / "run", run_id=RUN, max_update_bytes=2 << 20)
    conf.update(cfg)
    fed = Federation(ServeConfig(**conf), cloud, show_progress=False)
    fed.subscribe()

    class _Task:
        task_id = "t0"

    fed.round_id, fed.tracker, fed.task = 0, RoundTracker(["d1", "d2"], time.time() + 3600, 1), _Task()
    return fed


def first_chunk(blob_id: str, size: int = 1 << 20, seed: int = 0, chunk_size: int = 1 << 18) -> tuple[bytes, BlobSource]:
    src = BlobSource(blob_id, np.random.default_rng(seed).bytes(size), chunk_size)
    return next(src.payloads([0])), src


def feed(fed: Federation, device: str, blob_id: str, payload: bytes) -> None:
    send(fed, device, topics.upload_topic(RUN, device, blob_id), payload)
    while not fed.events.empty():
        fed.pump(0.01)


@pytest.mark.slow
def test_never_finished_uploads_stay_bounded_and_are_dropped_with_a_line(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path, max_upload_buffer=3 << 20)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        for i in range(600):  # the finding: 600 never-completed uploads of 1 MiB
            payload, _ = first_chunk(f"junk-{i}", seed=i % 3)
            feed(fed, "d1", f"junk-{i}", payload)
        # each holds its 1 MiB, no more (its check folds its change through the worker's own buffer)
        assert len(fed.uploads) <= 2 and fed.upload_bytes <= 2 * (1 << 20)
        # a device not waited for by the round uploads nothing at all
        payload, _ = first_chunk("stray")
        feed(fed, "stranger", "stray", payload)
        assert ("stranger", "stray") not in fed.uploads
        # the buffer bounds all devices together
        payload, _ = first_chunk("big", size=2 << 20)
        feed(fed, "d2", "big", payload)
        assert fed.upload_bytes <= 3 << 20
    said = caplog.messages
    assert sum("dropped upload junk-" in m and "started another upload" in m for m in said) == 598
    assert any("no open round waits for its update" in m for m in said)
    assert any("the buffer is 3145728 bytes" in m for m in said)
    # counted only once per new chunk, not per attempt
    assert fed.bytes_up <= 601 * ((1 << 18) + 200)


def test_stalled_uploads_time_out_and_round_end_drops_the_rest(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path, upload_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        feed(fed, "d1", "slow", first_chunk("slow")[0])
        time.sleep(1.1)  # past the upload timeout and the loop's once-a-second housekeeping
        fed.pump(0.05)
        assert fed.uploads == {} and fed.upload_bytes == 0
        feed(fed, "d2", "late", first_chunk("late")[0])
        fed.collector.close(0)  # what the loop does when round 0 ends
    assert fed.uploads == {} and fed.upload_bytes == 0
    assert any("dropped upload slow from d1 (1/4 chunks): no chunk for 0s" in m for m in caplog.messages), caplog.messages
    assert any("dropped upload late from d2 (1/4 chunks): round 0 ended" in m for m in caplog.messages)


def test_chunk_metadata_must_agree_with_the_update_from_the_first_chunk_on(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path)
    manifest = BundleManifest.load(tiny_bert_bundle)
    real = BlobSource("upd-d1", encode_tensors(good_tensors(manifest, 0)), 8192)
    uid = make_update_id(RUN, 0, "d1", "t0", real.sha256)
    msg = Update(run_id=RUN, round_id=0, sender="d1", device_id="d1", blob=real.ref, num_samples=5, task_id="t0", update_id=uid)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        # announced first, then a chunk of other bytes under the same blob id: refused on sight
        send(fed, "d1", topics.device_topic(RUN, "d1", topics.UPDATE), encode(msg))
        forged = next(BlobSource("upd-d1", bytes(len(real.data)), 8192).payloads([0]))
        feed(fed, "d1", "upd-d1", forged)
        assert ("d1", "upd-d1") not in fed.uploads
        # chunks first, their update later: the disagreement is found when the update arrives
        feed(fed, "d2", "upd-d2", next(BlobSource("upd-d2", bytes(len(real.data)), 8192).payloads([0])))
        uid2 = make_update_id(RUN, 0, "d2", "t0", real.sha256)
        send(fed, "d2", topics.device_topic(RUN, "d2", topics.UPDATE),
             encode(msg.model_copy(update={"sender": "d2", "device_id": "d2", "update_id": uid2,
                                             "blob": real.ref.model_copy(update={"blob_id": "upd-d2"})})))
        while not fed.events.empty():
            fed.pump(0.01)
    assert any("rejected update from d1" in m and "rejected chunk: chunk upd-d1#0: blob sha256" in m for m in caplog.messages)
    assert any("rejected update from d2" in m and "chunks declare sha256" in m for m in caplog.messages), caplog.messages
    assert fed.uploads == {} and fed.upload_bytes == 0


def test_announced_updates_that_never_upload_stay_bounded(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        for i in range(50):
            ref = BlobSource(f"ghost-{i}", bytes([i]) * 100).ref
            uid = make_update_id(RUN, 0, "d1", "t0", ref.sha256)
            send(fed, "d1", topics.device_topic(RUN, "d1", topics.UPDATE), encode(Update(
                run_id=RUN, round_id=0, sender="d1", device_id="d1", blob=ref, num_samples=1, task_id="t0", update_id=uid)))
        while not fed.events.empty():
            fed.pump(0.01)
        assert len(fed.waiting) <= 2
        fed.collector.close(0)  # what the loop does when round 0 ends
    assert fed.waiting == {} and fed.uploads == {}
    assert sum("announced another update" in m for m in caplog.messages) == 48
    assert sum("round 0 ended" in m for m in caplog.messages) == 2


@pytest.mark.parametrize("check_processes", [0, 1])
def test_chunks_that_match_themselves_but_not_their_blob_are_refused_and_free_the_device(tiny_bert_bundle, tmp_path, caplog,
                                                                                        check_processes):
    """Each chunk matches its own hash, the blob hash they and the Update declare does not match the
    bytes: the device is told why, nothing of it is left waiting for a check (the round would wait for
    it forever), and its honest upload after that counts."""
    fed = open_round(tiny_bert_bundle, tmp_path, check_processes=check_processes)
    manifest = BundleManifest.load(tiny_bert_bundle)
    data = bind_update(encode_tensors(good_tensors(manifest, 0)), RUN, 0, "d1", "t0")
    lie = hashlib.sha256(b"other bytes").hexdigest()
    size = 8192
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    assert len(parts) > 1
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        for i, part in enumerate(parts):
            chunk = Chunk("lying", i, len(parts), size, len(data), hashlib.sha256(part).hexdigest(), lie, part)
            feed(fed, "d1", "lying", chunk.to_bytes())
        ref = BlobRef(blob_id="lying", sha256=lie, size=len(data))
        msg = Update(run_id=RUN, round_id=0, sender="d1", device_id="d1", blob=ref, num_samples=5, task_id="t0",
                     update_id=make_update_id(RUN, 0, "d1", "t0", lie))
        send(fed, "d1", topics.device_topic(RUN, "d1", topics.UPDATE), encode(msg))
        while not fed.events.empty():
            fed.pump(0.01)
        assert fed.collector.checking == {} and fed.uploads == {} and fed.upload_bytes == 0
        assert any("rejected update from d1" in m and "whole-blob sha256 mismatch" in m for m in caplog.messages), caplog.messages
        honest_src = BlobSource("honest", data, size)
        for payload in honest_src.payloads():
            feed(fed, "d1", "honest", payload)
        msg = msg.model_copy(update={"blob": honest_src.ref, "update_id": make_update_id(RUN, 0, "d1", "t0", honest_src.sha256)})
        send(fed, "d1", topics.device_topic(RUN, "d1", topics.UPDATE), encode(msg))
        deadline = time.time() + 30
        while "d1" not in fed.tracker.accepted and time.time() < deadline:
            fed.pump(0.05)
    assert "d1" in fed.tracker.accepted
    fed.close()
