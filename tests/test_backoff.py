"""Re-uploads back off: doubling waits, each drawn from [1, 1.5) x, so a fleet whose receipts were
late together does not come back as one wave (pure, then the real agent against a silent cloud)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from fedpft.edge.agent import EdgeAgent
from fedpft.edge.backoff import MAX_FACTOR, receipt_wait
from fedpft.shared import topics
from fedpft.shared.codec import encode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.messages import BlobRef, Task, Update, decode
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
    hub = InMemoryHub(threaded=True)
    seen: list[float] = []
    spy = hub.transport("spy")
    spy.connect()
    spy.subscribe(topics.device_topic("bo", "dev", topics.UPDATE), lambda topic, payload: seen.append(time.monotonic()))
    cfg = AgentConfig(broker="memory://", device_id="dev", data=tmp_path / "d.jsonl", run_id="bo", cache=tmp_path / "cache",
                      ack_timeout=0.2, max_retries=2, heartbeat=60)
    t = hub.transport("dev")
    t.connect()
    agent = EdgeAgent(cfg, t, lambda *a: None, num_samples=4)
    ref = BlobRef(blob_id="b", sha256="0" * 64, size=1)
    task = Task(run_id="bo", round_id=0, sender="cloud", devices=["dev"], bundle=ref, bundle_version="v:1", adapters=ref,
                lr=1e-3, batch_size=4, deadline=time.time() + 60)
    data = encode_tensors({"w": np.zeros(4, np.float32)})
    th = threading.Thread(target=agent.upload, args=(task, data, {"num_samples": 4, "steps": 1, "mean_loss": 1.0}))
    th.start()
    th.join(10)
    assert not th.is_alive()
    deadline = time.monotonic() + 2
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 3, seen
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert 0.2 <= gaps[0] < 0.3 + 0.15 and 0.4 <= gaps[1] < 0.6 + 0.15, gaps  # scheduling slack on a busy machine
    assert all(isinstance(decode(p), Update) for tp, p in hub.published if tp.endswith("/update"))
