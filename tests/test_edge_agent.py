"""The round agent against a real `Federation` over the threaded in-memory hub: what it keeps in
its cache lets a restarted device re-send a round's update instead of training it twice."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fedpft.cloud.server import Federation
from fedpft.edge.agent import EdgeAgent
from fedpft.shared import topics
from fedpft.shared.codec import encode_tensors
from fedpft.cloud.config import ServeConfig
from fedpft.shared.config import AgentConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import Task, Update, decode
from fedpft.shared.transport import InMemoryHub

RUN = "agent"


def _agent(hub: InMemoryHub, tmp_path, trainer) -> EdgeAgent:
    cfg = AgentConfig(broker="memory://", device_id="dev", data=tmp_path / "data.jsonl", run_id=RUN, cache=tmp_path / "cache",
                      fetch_timeout=20, ack_timeout=0.5, max_retries=0, heartbeat=0.5)
    t = hub.transport("dev")
    t.connect()
    return EdgeAgent(cfg, t, trainer, num_samples=4)


def test_a_restarted_device_resends_the_stored_update_and_never_trains_the_round_twice(tiny_bert_bundle, tmp_path):
    calls: list[int] = []

    def train(bundle_dir, task, adapters, ffn):
        calls.append(task.round_id)
        m = BundleManifest.load(bundle_dir)
        return encode_tensors({t.key: np.zeros(t.shape, t.dtype) for t in m.trainable}), {"num_samples": 4}

    hub = InMemoryHub(threaded=True)
    agent = _agent(hub, tmp_path, train)
    th = threading.Thread(target=agent.serve, daemon=True)
    th.start()
    cloud = hub.transport("cloud")
    cloud.connect()
    cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", run_id=RUN, rounds=1, min_clients=1, round_timeout=30,
                      wait_for_clients=10, max_round_retries=0, chunk_size=1 << 16)
    assert Federation(cfg, cloud, show_progress=False).run().history[-1]["clients"] == 1
    th.join(20)
    assert not th.is_alive() and calls == [0]
    task = next(m for tp, p in hub.published if tp == topics.round_topic(RUN) for m in [decode(p)] if isinstance(m, Task))

    cache = tmp_path / "cache"
    done = json.loads((cache / f"done-{RUN}.json").read_text())  # written whole: temp, fsync, rename
    assert set(done) == {"0"} and not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    again = InMemoryHub()
    restarted = _agent(again, tmp_path, lambda *a: pytest.fail("a trained round must not be trained again"))
    assert restarted.handle_task(task.model_copy(update={"deadline": task.deadline + 3600})) == 0
    (update,) = [m for tp, p in again.published if tp.endswith("/dev/update") for m in [decode(p)] if isinstance(m, Update)]
    assert update.error is None and update.num_samples == 4 and update.task_id == task.task_id
