"""Update checks run off the round loop (cloud/checks.py): an update is acked only once it is on
disk, a redelivery during its check is counted once, and a round waits for checks in flight."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import pytest

from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource
from fedpft.shared.codec import encode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import Update, decode, encode, make_update_id
from fedpft.shared.update import binding
from test_robust_rounds import federation, open_round
from test_security_hostile import RUN, good_tensors, honest

pytestmark = pytest.mark.security


@contextmanager
def held_checks(fed):
    """Checks submitted in the block wait until `release()` (or the block's end): what the loop does
    while an update is still being checked is then deterministic."""
    gate, check = threading.Event(), fed._check
    fed._check = lambda *a: (gate.wait(10), check(*a))[1]
    try:
        yield gate.set
    finally:
        gate.set()
        fed._check = check


def receipts(fed, device: str = "d1") -> list:
    """The messages the cloud sends to `device`'s inbox, as they arrive."""
    got: list = []
    listener = fed.t.hub.transport(device)
    listener.connect()
    listener.subscribe(topics.device_topic(RUN, device, topics.INBOX), lambda t, p: got.append(decode(p)))
    return got


def device_update(bundle, device: str = "d1", seed: int = 0, chunk_size: int = 8192) -> tuple[BlobSource, bytes]:
    """A sound update of `device` for task t0 of round 0: its blob, and its Update message."""
    src = BlobSource(f"upd-{device}", encode_tensors(good_tensors(BundleManifest.load(bundle), seed), binding(RUN, 0, device, "t0")), chunk_size)
    uid = make_update_id(RUN, 0, device, "t0", src.sha256)
    return src, encode(Update(run_id=RUN, round_id=0, sender=device, device_id=device, blob=src.ref, num_samples=5,
                              task_id="t0", update_id=uid))


def test_ack_follows_the_durable_write_and_a_redelivery_counts_once(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path)
    stored = tmp_path / "run" / "updates" / "round_0000"
    acks = []
    listener = fed.t.hub.transport("d1")
    listener.connect()
    listener.subscribe(topics.device_topic(RUN, "d1", topics.INBOX),
                       lambda t, p: acks.append((decode(p), any(stored.glob("d1.*.safetensors")))))
    manifest = BundleManifest.load(tiny_bert_bundle)
    src = BlobSource("upd-d1", encode_tensors(good_tensors(manifest, 0), binding(RUN, 0, "d1", "t0")), 8192)
    uid = make_update_id(RUN, 0, "d1", "t0", src.sha256)
    msg = encode(Update(run_id=RUN, round_id=0, sender="d1", device_id="d1", blob=src.ref, num_samples=5, task_id="t0", update_id=uid))
    with caplog.at_level(logging.INFO, logger="fedpft"):
        for payload in src.payloads():
            fed._on_upload(topics.upload_topic(RUN, "d1", src.blob_id), payload)
        fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)
        fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)  # QoS 1 redelivery, while the first is checked
        for payload in src.payloads():  # ... and a retry's chunks of the same bytes: not reassembled again
            fed._on_upload(topics.upload_topic(RUN, "d1", src.blob_id), payload)
        with held_checks(fed) as release:
            fed.pump(0.3)
            # reassembled and in its check: no longer an upload, but its bytes still count against the
            # buffer (and nothing more: the check folds its change through the worker's own buffer)
            assert fed.collector.uploads == {} and "d1" in fed.collector.checking
            assert fed.collector.upload_bytes == src.ref.size
            release()
        while not fed.events.empty():
            fed.pump(0.01)
        assert fed.collector.upload_bytes == 0 and fed.collector.checking == {}
    # the copy that came during the check is told at once that its update is queued, not a verdict
    assert [(a.acked, a.ok, a.reason) for a, _ in acks][0] == ("queued", True, "queued behind other updates' checks")
    assert [(a.acked, a.ok, a.reason, on_disk) for a, on_disk in acks[1:]] == [
        ("update", True, None, True), ("update", True, "duplicate (already counted)", True)]
    assert all(a.update_id == uid for a, _ in acks)
    assert sum(m.startswith("round 0: update from d1 ") for m in caplog.messages) == 1
    assert list(fed.tracker.accepted) == ["d1"] and fed.collector.checking == {}


def test_a_device_whose_check_waits_is_told_once_that_it_is_queued(tiny_bert_bundle, tmp_path, monkeypatch):
    """A backlog of checks longer than QUEUED_RECEIPT_AFTER: the device hears "queued" (once) before its
    receipt timeout would make it upload the same bytes again, then its receipt."""
    import fedpft.cloud.server as server

    monkeypatch.setattr(server, "QUEUED_RECEIPT_AFTER", 0.0)
    fed = open_round(tiny_bert_bundle, tmp_path)
    acks = receipts(fed)
    src, msg = device_update(tiny_bert_bundle)
    fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)
    for payload in src.payloads():
        fed._on_upload(topics.upload_topic(RUN, "d1", src.blob_id), payload)
    with held_checks(fed) as release:
        fed.pump(0.3)  # the update is complete and its check waits
        for _ in range(2):  # the loop's once-a-second look at the checks in flight, twice: one notice
            fed._next_expiry = 0.0
            fed._housekeeping()
        release()
    while not fed.events.empty():
        fed.pump(0.01)
    uid = decode(msg).update_id
    assert [(a.acked, a.update_id) for a in acks] == [("queued", uid), ("update", uid)] and acks[1].ok


def test_a_round_completes_with_every_update_checked_and_folded(tiny_bert_bundle, tmp_path):
    fed, hub = federation(tiny_bert_bundle, tmp_path, [(f"good{i}", honest(i)) for i in range(3)], min_clients=3)
    t0 = time.time()
    state = fed.run()
    hub.join()
    rec = state.history[-1]
    assert rec["clients"] == 3 and rec["devices"] == ["good0", "good1", "good2"], rec
    assert fed.collector.checking == {} and fed.events.in_flight == 0 and time.time() - t0 < 60
    assert not (tmp_path / "run" / "updates" / "round_0000" / "running-sum.bin").exists()  # the checkpoint replaced it


def test_updates_in_their_checks_count_against_the_upload_buffer(tiny_bert_bundle, tmp_path, caplog):
    """A cloud whose checks fall behind must not hold every waiting blob: bytes stay reserved until
    the check ends, so with room for one update, a second device's upload is refused (one line)
    while the first is checked, and fits once that check is done."""
    updates = {d: device_update(tiny_bert_bundle, d, i, 1 << 20) for i, d in enumerate(("d1", "d2"))}
    fed = open_round(tiny_bert_bundle, tmp_path, max_upload_buffer=updates["d1"][0].ref.size + 1024)

    def upload(d: str) -> None:
        src, msg = updates[d]
        for payload in src.payloads():
            fed._on_upload(topics.upload_topic(RUN, d, src.blob_id), payload)
        fed._on_json(topics.device_topic(RUN, d, topics.UPDATE), msg)

    with caplog.at_level(logging.WARNING, logger="fedpft"), held_checks(fed) as release:
        upload("d1")
        fed.pump(0.3)
        assert "d1" in fed.collector.checking
        upload("d2")
        fed.pump(0.3)
        assert "d2" not in fed.collector.checking and not fed.collector.uploads
        assert any("upload from d2 dropped: unfinished and unchecked uploads hold" in r.getMessage() for r in caplog.records)
        release()
        while not fed.events.empty():
            fed.pump(0.01)
    assert fed.collector.upload_bytes == 0 and "d1" in fed.tracker.accepted
    upload("d2")  # the device's retry, once there is room
    while not fed.events.empty() or fed.collector.checking:
        fed.pump(0.05)
    assert "d2" in fed.tracker.accepted and fed.collector.upload_bytes == 0


@pytest.mark.parametrize("update_first", [True, False])
def test_a_device_turned_away_for_room_is_told_to_come_back_and_then_counts(tiny_bert_bundle, tmp_path, caplog, update_first):
    """A full upload buffer drops a device's bytes; the device hears "busy" with a retry_after (not
    silence until its receipt timeout, which made 5,000 devices take 153 s), whichever of its Update
    and its first chunk came first, and its upload, made again, is accepted. One line per refusal."""
    updates = {d: device_update(tiny_bert_bundle, d, i, 1 << 20) for i, d in enumerate(("d1", "d2"))}
    fed = open_round(tiny_bert_bundle, tmp_path, max_upload_buffer=updates["d1"][0].ref.size + 1024)
    got = receipts(fed, "d2")

    def upload(d: str) -> None:
        src, msg = updates[d]
        chunks = [lambda p=p: fed._on_upload(topics.upload_topic(RUN, d, src.blob_id), p) for p in src.payloads()]
        for send in ([lambda: fed._on_json(topics.device_topic(RUN, d, topics.UPDATE), msg)] + chunks if d == "d1" or update_first
                     else chunks + [lambda: fed._on_json(topics.device_topic(RUN, d, topics.UPDATE), msg)]):
            send()

    with caplog.at_level(logging.WARNING, logger="fedpft"), held_checks(fed) as release:
        upload("d1")
        fed.pump(0.3)
        upload("d2")
        fed.pump(0.3)
        assert [(a.acked, a.retry_after) for a in got] == [("busy", 2.0)] and "upload buffer holds" in got[0].reason
        assert got[0].update_id == decode(updates["d2"][1]).update_id
        assert sum("d2" in r.getMessage() for r in caplog.records) == 1 + (not update_first), caplog.messages
        release()
        while not fed.events.empty():
            fed.pump(0.01)
    upload("d2")  # as told, once there is room
    while not fed.events.empty() or fed.collector.checking:
        fed.pump(0.05)
    assert "d2" in fed.tracker.accepted and [a.acked for a in got] == ["busy", "update"] and got[1].ok
    assert fed.collector.upload_bytes == 0 and fed.collector.turned_away == {}


def test_check_workers_come_from_the_config(tiny_bert_bundle, tmp_path):
    fed = open_round(tiny_bert_bundle, tmp_path, check_workers=2)
    assert fed.pool._max_workers == 2
    from fedpft.cloud.checks import CHECK_WORKERS

    assert open_round(tiny_bert_bundle, tmp_path / "b").pool._max_workers == CHECK_WORKERS


def test_an_unforeseen_fault_in_a_device_update_rejects_it_and_the_cloud_goes_on(tiny_bert_bundle, tmp_path, caplog, monkeypatch):
    """Parsing is the device's bytes: an exception other than ProtocolError (a parser bug we have
    not found yet) must reject that update in one line, not stop the run."""
    import fedpft.cloud.uploads as uploads

    def broken(*args, **kwargs):
        raise ValueError("a parser bug")

    monkeypatch.setattr(uploads, "split_update", broken)
    fed = open_round(tiny_bert_bundle, tmp_path)
    acks = receipts(fed)
    src, msg = device_update(tiny_bert_bundle, chunk_size=1 << 20)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        for payload in src.payloads():
            fed._on_upload(topics.upload_topic(RUN, "d1", src.blob_id), payload)
        fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)
        while not fed.events.empty() or fed.collector.checking:
            fed.pump(0.05)
    assert [(a.acked, a.ok, a.reason) for a in acks] == [("update", False, "malformed update (ValueError)")]
    assert "d1" not in fed.tracker.accepted and fed.collector.upload_bytes == 0
    assert any("unexpected ValueError while checking it: a parser bug" in r.getMessage() for r in caplog.records)
