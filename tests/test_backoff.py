"""Re-uploads back off: doubling waits, each drawn from [1, 1.5) x, so a fleet whose receipts were
late together does not come back as one wave (pure, then the real agent against a silent cloud)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from fedpft.edge.agent import EdgeAgent
from fedpft.edge.backoff import MAX_FACTOR, QUEUED_MAX_WAIT, busy_wait, receipt_wait
from fedpft.shared import topics
from fedpft.shared.codec import encode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.messages import Ack, BlobRef, Task, Update, decode, encode
from fedpft.shared.transport import InMemoryHub


def test_waits_double_up_to_the_cap_and_spread_over_half_a_wait():
    rng = random.Random(0)
    for attempt in range(8):
        draws = [receipt_wait(30.0, attempt, rng) for _ in range(2000)]
        base = 30.0 * min(2 ** attempt, MAX_FACTOR)
        assert base <= min(draws) and max(draws) < 1.5 * base
        assert max(draws) - min(draws) > 0.45 * base  # spread, not one instant
    assert receipt_wait(30.0, 10, random.Random(1)) < 1.5 * 30.0 * MAX_FACTOR


def test_a_device_without_receipts_uploads_again_later_each_time(tmp_path):
    """No cloud answers: the agent uploads 1 + max_retries times, the gaps growing as receipt_wait says."""
    seen, th = _agent_against(tmp_path, lambda *a: None, ack_timeout=0.2)
    th.join(10)
    assert not th.is_alive() and len(seen) == 3, seen
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert 0.2 <= gaps[0] < 0.3 + 0.15 and 0.4 <= gaps[1] < 0.6 + 0.15, gaps  # scheduling slack on a busy machine


def _agent_against(tmp_path, cloud, ack_timeout: float, max_retries: int = 2, deadline_s: float = 60.0):
    """The real agent's `upload` against `cloud(hub, update) -> None`, called on each Update it sends;
    returns (monotonic times of the Updates, the agent thread)."""
    hub = InMemoryHub(threaded=True)
    seen: list[float] = []
    spy = hub.transport("cloud")
    spy.connect()

    def on_update(topic, payload):
        seen.append(time.monotonic())
        cloud(spy, decode(payload), len(seen))

    spy.subscribe(topics.device_topic("bo", "dev", topics.UPDATE), on_update)
    cfg = AgentConfig(broker="memory://", device_id="dev", data=tmp_path / "d.jsonl", run_id="bo", cache=tmp_path / "cache",
                      ack_timeout=ack_timeout, max_retries=max_retries, heartbeat=60)
    t = hub.transport("dev")
    t.connect()
    agent = EdgeAgent(cfg, t, lambda *a: None, num_samples=4)
    agent.link.start()  # listen on the inbox, where receipts come
    ref = BlobRef(blob_id="b", sha256="0" * 64, size=1)
    task = Task(run_id="bo", round_id=0, sender="cloud", devices=["dev"], bundle=ref, bundle_version="v:1", adapters=ref,
                lr=1e-3, batch_size=4, deadline=time.time() + deadline_s)
    data = encode_tensors({"w": np.zeros(4, np.float32)})
    th = threading.Thread(target=agent.upload, args=(task, data, {"num_samples": 4, "steps": 1, "mean_loss": 1.0}))
    th.start()
    return seen, th


def _ack(t, update: Update, acked: str, **kw) -> None:
    t.publish(topics.device_topic("bo", "dev", topics.INBOX),
              encode(Ack(run_id="bo", round_id=0, sender="cloud", device_id="dev", acked=acked, update_id=update.update_id, **kw)))


def test_a_queued_notice_holds_the_device_until_its_receipt(tmp_path):
    """The cloud says "queued" at once and sends the receipt after 3 receipt timeouts: one upload, no retry."""
    def cloud(t, update, n):
        _ack(t, update, "queued")
        threading.Timer(0.6, _ack, args=(t, update, "update")).start()

    seen, th = _agent_against(tmp_path, cloud, ack_timeout=0.2)
    th.join(10)
    assert not th.is_alive() and len(seen) == 1, seen


def test_queued_notices_cannot_hold_a_device_forever(tmp_path):
    """A cloud that only ever says "queued": the device uploads again after QUEUED_MAX_WAIT receipt timeouts."""
    stop = threading.Event()

    def cloud(t, update, n):
        def nag():
            while not stop.wait(0.05):
                _ack(t, update, "queued")
        threading.Thread(target=nag, daemon=True).start()

    seen, th = _agent_against(tmp_path, cloud, ack_timeout=0.1, max_retries=1)
    th.join(20)
    stop.set()
    assert not th.is_alive() and len(seen) == 2, seen
    gap = seen[1] - seen[0]
    assert QUEUED_MAX_WAIT * 0.1 <= gap < QUEUED_MAX_WAIT * 0.1 + 0.5, gap


def test_busy_waits_spread_over_one_retry_after():
    rng = random.Random(0)
    draws = [busy_wait(2.0, rng) for _ in range(2000)]
    assert 2.0 <= min(draws) and max(draws) < 4.0 and max(draws) - min(draws) > 1.8
    assert 1.0 <= busy_wait(None, rng) < 2.0


def test_a_busy_cloud_gets_the_update_again_soon_and_it_costs_no_retry(tmp_path):
    """Turned away twice with retry_after 0.1 s, then accepted: the device uploads 3 times within
    about a second, though its receipt timeout is 5 s and it may retry only once."""
    def cloud(t, update, n):
        _ack(t, update, "busy", retry_after=0.1) if n <= 2 else _ack(t, update, "update")

    seen, th = _agent_against(tmp_path, cloud, ack_timeout=5.0, max_retries=1)
    th.join(10)
    assert not th.is_alive() and len(seen) == 3, seen
    assert all(0.1 <= b - a < 0.2 + 0.3 for a, b in zip(seen, seen[1:])), seen  # scheduling slack


def test_busy_notices_end_with_the_round(tmp_path):
    """A cloud that only ever says busy cannot keep a device past its task's deadline."""
    start = time.monotonic()
    seen, th = _agent_against(tmp_path, lambda t, update, n: _ack(t, update, "busy", retry_after=0.2), ack_timeout=5.0,
                              deadline_s=1.5)
    th.join(10)
    # waits of 0.2-0.4 s until 1.5 s: 4 to 8 uploads, and the device gives up at the deadline, not after 10 s
    # (an upload sent just before the deadline reaches the fake cloud a few ms after it: 0.2 s of slack)
    assert not th.is_alive() and 3 <= len(seen) <= 8 and seen[-1] - start < 1.5 + 0.2, seen
    assert time.monotonic() - start < 1.5 + 1.0
