"""How a round's Task is addressed: one on the round topic for a small selection, one per device
on its inbox for a large one (pure; the round trips are in test_security_signing and the scale smoke test)."""

from __future__ import annotations

import time

import pytest

from fedpft.cloud import fanout
from fedpft.cloud.fanout import TASK_BROADCAST_MAX, task_deliveries
from fedpft.shared import topics
from fedpft.shared.messages import MAX_MESSAGE_BYTES, BlobRef, Task, decode, encode

REF = BlobRef(blob_id="b", size=1, sha256="0" * 64)


def _task(n: int) -> Task:
    return Task(run_id="r", round_id=3, sender="cloud", devices=[f"device-{i:05d}" for i in range(n)], bundle=REF,
                bundle_version="v:1", adapters=REF, lr=1e-3, batch_size=8, deadline=time.time() + 60)


def test_a_small_selection_gets_the_task_itself_on_the_round_topic():
    task = _task(TASK_BROADCAST_MAX)
    assert list(task_deliveries(task)) == [(topics.round_topic("r"), task)]


def test_a_large_selection_gets_one_copy_per_device_naming_only_it_on_its_inbox():
    task = _task(TASK_BROADCAST_MAX + 1)
    out = list(task_deliveries(task))
    assert [t for t, _ in out] == [topics.device_topic("r", d, topics.INBOX) for d in task.devices]
    for (topic, copy), device in zip(out, task.devices):
        assert copy.devices == [device] and copy.task_id == task.task_id and copy.deadline == task.deadline
        assert copy.model_dump(exclude={"devices"}) == task.model_dump(exclude={"devices"})
        assert topics.check_sender(topic, copy.run_id, copy.sender).device_id == device  # the cloud may write an inbox
        assert decode(encode(copy)) == copy


def test_past_the_old_2000_cap_every_message_stays_small():
    task = _task(5000)  # one round may select this many; no device ever parses more than its own name
    sizes = [len(encode(c)) for _, c in task_deliveries(task)]
    assert len(sizes) == 5000 and max(sizes) < 1024 < MAX_MESSAGE_BYTES


@pytest.mark.parametrize("limit", [0, 3])
def test_the_threshold_is_the_clouds_choice(monkeypatch, limit):
    monkeypatch.setattr(fanout, "TASK_BROADCAST_MAX", limit)
    assert len(list(task_deliveries(_task(3)))) == (3 if limit == 0 else 1)


def test_a_task_in_an_inbox_must_name_that_device_alone():
    from fedpft.shared.messages import ProtocolError
    from fedpft.shared.routes import check_route

    inbox = topics.device_topic("r", "device-00000", topics.INBOX)
    task = _task(2)
    assert check_route(inbox, task.model_copy(update={"devices": ["device-00000"]})).device_id == "device-00000"
    for devices in (["device-00001"], ["device-00000", "device-00001"]):
        with pytest.raises(ProtocolError, match="a task for .* on device 'device-00000'"):
            check_route(inbox, task.model_copy(update={"devices": devices}))
