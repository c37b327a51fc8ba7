"""Update checks run off the round loop (cloud/checks.py): an update is acked only once it is on
disk, a redelivery during its check is counted once, and a round waits for checks in flight."""

from __future__ import annotations

import logging
import time

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


def test_ack_follows_the_durable_write_and_a_redelivery_counts_once(tiny_bert_bundle, tmp_path, caplog):
    fed = open_round(tiny_bert_bundle, tmp_path)
    stored = tmp_path / "run" / "updates" / "round_0000" / "d1.safetensors"
    acks = []
    listener = fed.t.hub.transport("d1")
    listener.connect()
    listener.subscribe(topics.device_topic(RUN, "d1", topics.INBOX), lambda t, p: acks.append((decode(p), stored.is_file())))
    manifest = BundleManifest.load(tiny_bert_bundle)
    src = BlobSource("upd-d1", encode_tensors(good_tensors(manifest, 0), binding(RUN, 0, "d1", "t0")), 8192)
    uid = make_update_id(RUN, 0, "d1", "t0", src.sha256)
    msg = encode(Update(run_id=RUN, round_id=0, sender="d1", device_id="d1", blob=src.ref, num_samples=5, task_id="t0", update_id=uid))
    with caplog.at_level(logging.INFO, logger="fedpft"):
        for payload in src.payloads():
            fed._on_upload(topics.upload_topic(RUN, "d1", src.blob_id), payload)
        fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)
        fed._on_json(topics.device_topic(RUN, "d1", topics.UPDATE), msg)  # QoS 1 redelivery, while the first is checked
        while not fed.events.empty():
            fed.pump(0.01)
    assert [(a.ok, a.reason, on_disk) for a, on_disk in acks] == [(True, None, True), (True, "duplicate (already counted)", True)]
    assert sum(m.startswith("round 0: update from d1 ") for m in caplog.messages) == 1
    assert list(fed.tracker.accepted) == ["d1"] and fed.collector.checking == {}


def test_a_round_completes_with_every_update_checked_and_folded(tiny_bert_bundle, tmp_path):
    fed, hub = federation(tiny_bert_bundle, tmp_path, [(f"good{i}", honest(i)) for i in range(3)], min_clients=3)
    t0 = time.time()
    state = fed.run()
    hub.join()
    rec = state.history[-1]
    assert rec["clients"] == 3 and rec["devices"] == ["good0", "good1", "good2"], rec
    assert fed.collector.checking == {} and fed.events.in_flight == 0 and time.time() - t0 < 60
    assert not (tmp_path / "run" / "updates" / "round_0000" / "running-sum.bin").exists()  # the checkpoint replaced it
