"""Round blobs on a real broker: broadcast once before the Task; a device that subscribed to the
broadcast topic only after it went out still completes the round through a re-send."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from fedpft.cloud.server import Federation
from fedpft.edge.agent import EdgeAgent
from fedpft.shared import topics
from fedpft.shared.codec import encode_tensors
from fedpft.cloud.config import ServeConfig
from fedpft.shared.config import AgentConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.mqtt import MqttTransport

from conftest import mosquitto_up

pytestmark = pytest.mark.skipif(not mosquitto_up(), reason="needs Mosquitto on 127.0.0.1:1883")
BROKER = "mqtt://127.0.0.1:1883"


class Spy:
    """A transport that records what it publishes and, with `hold`, subscribes to that pattern
    only once `release` is set (a device that joins the broadcast topic late)."""

    def __init__(self, inner: MqttTransport, hold: str | None = None) -> None:
        self.inner, self.hold = inner, hold
        self.published: list[str] = []
        self.release = threading.Event()
        self.on_publish = lambda topic: None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        self.inner.publish(topic, payload, qos=qos, retain=retain, wait=wait)
        self.published.append(topic)
        self.on_publish(topic)

    def subscribe(self, pattern: str, handler) -> None:
        if pattern != self.hold:
            return self.inner.subscribe(pattern, handler)

        def later() -> None:
            self.release.wait(30)
            self.inner.subscribe(pattern, handler)

        threading.Thread(target=later, daemon=True).start()


def _trainer(manifest: BundleManifest, got: dict, me: str):
    def train(bundle_dir, task, adapters, ffn):
        got[me] = adapters
        return encode_tensors({t.key: np.zeros(t.shape, t.dtype) for t in manifest.trainable}), {"num_samples": 4}
    return train


def test_a_device_that_joins_after_the_broadcast_still_completes_the_round(tiny_bert_bundle, tmp_path):
    run = f"bcast-{uuid.uuid4().hex[:8]}"
    manifest = BundleManifest.load(tiny_bert_bundle)
    got: dict[str, bytes] = {}
    spies, agents, threads = {}, [], []
    for me, hold in (("early", None), ("late", topics.blob_pattern(run))):
        spies[me] = Spy(MqttTransport(BROKER, client_id=f"{run}-{me}", session_expiry=60), hold)
        spies[me].connect()
        cfg = AgentConfig(broker=BROKER, device_id=me, data=tmp_path / "unused.jsonl", run_id=run, cache=tmp_path / me,
                          fetch_timeout=30, ack_timeout=10, heartbeat=0.5)
        agents.append(EdgeAgent(cfg, spies[me], _trainer(manifest, got, me), num_samples=4))
    cloud = Spy(MqttTransport(BROKER, client_id=f"{run}-cloud", session_expiry=60))
    # the late device subscribes to blob/+ once the Task (published after the broadcast) is out
    cloud.on_publish = lambda topic: spies["late"].release.set() if topic == topics.round_topic(run) else None
    cloud.connect()
    cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", broker=BROKER, run_id=run, rounds=1, min_clients=2,
                      clients_per_round=2, round_timeout=60, wait_for_clients=30, max_round_retries=0, chunk_size=4096)
    fed = Federation(cfg, cloud, show_progress=False)
    try:
        for agent in agents:
            agent.link.install_bundle = lambda ref, folder, expect=None: manifest  # cached bundle (not what this test is about)
            threads.append(threading.Thread(target=agent.serve, daemon=True))
            threads[-1].start()
        state = fed.run()
        for th in threads:
            th.join(20)
    finally:
        cloud.publish(topics.control_topic(run), b"", retain=True)
        for me, spy in spies.items():
            spy.publish(topics.device_topic(run, me, topics.PRESENCE), b"", retain=True)
            spy.close()
        cloud.close()
    record = state.history[-1]
    assert record["clients"] == 2 and sorted(record["devices"]) == ["early", "late"], record
    adapters_blob = (tiny_bert_bundle / manifest.files["adapters_init"].path).read_bytes()
    count = -(-len(adapters_blob) // 4096)
    broadcast = [t for t in cloud.published if t.startswith(f"fedpft/{run}/blob/")]
    assert len(broadcast) == count, "the adapters went out once, chunk by chunk, on the run's blob topic"
    assert topics.device_topic(run, "early", topics.BLOBREQ) not in spies["early"].published, "the subscribed device asked for nothing"
    assert topics.device_topic(run, "late", topics.BLOBREQ) in spies["late"].published
    assert fed.blobs.resent_chunks >= count and got["early"] == got["late"]
    assert not any(th.is_alive() for th in threads)
