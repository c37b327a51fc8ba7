"""Hostile input thrown at the device agents through the network (the in-memory hub), as anyone
able to publish on their topics could: each bad message or chunk is refused with one logged line,
and the agent goes on (it still answers the cloud afterwards)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedpft.edge.agent import EdgeAgent
from fedpft.edge.fleet import FleetAgent
from fedpft.shared import topics
from fedpft.shared.config import AgentConfig, FleetConfig
from fedpft.shared.messages import (
    BlobRef, BundleVersion, DeviceStatus, EndOfRun, Hello, Rollout, Task, decode, encode,
)
from fedpft.shared.transport import InMemoryHub

pytestmark = pytest.mark.security

RUN, FLEET, ME = "sec", "fl", "dev"


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def _ignored(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("ignored message on", "ignored chunk on"))]


def _attack(hub: InMemoryHub, th: threading.Thread, ready_kind: str, attacks: list[tuple[str, bytes]]):
    """Start the agent's thread, wait until it has spoken, throw `attacks` from another client."""
    attacker = hub.transport("evil")
    attacker.connect()
    th.start()
    _wait(lambda: any(tp.endswith(f"/{ME}/{ready_kind}") for tp, _ in hub.published))
    for topic, payload in attacks:
        attacker.publish(topic, payload)
    hub.join()
    return attacker


def _round_attacks() -> list[tuple[str, bytes]]:
    ref = BlobRef(blob_id="adapters-r0-0", sha256="a" * 64, size=10)
    task = Task(run_id="other-run", round_id=0, sender="cloud", devices=[ME], bundle=ref, bundle_version="x:1", adapters=ref,
                lr=1e-3, batch_size=4, deadline=time.time() + 60)
    return [
        (topics.round_topic(RUN), b"\xff not json"),
        (topics.round_topic(RUN), b'{"type": "task", "run_id": "sec"}'),  # missing fields
        (topics.round_topic(RUN), encode(task)),  # another run's task on this run's topic
        (topics.device_topic(RUN, ME, topics.INBOX), b"[]"),
        (topics.resend_topic(RUN, ME, "adapters-r0-0"), b"\x00\x01 not a chunk"),
    ]


def test_round_agent_refuses_hostile_messages_and_goes_on(tmp_path, caplog):
    hub = InMemoryHub(threaded=True)
    cfg = AgentConfig(broker="memory://", device_id=ME, data=tmp_path / "d.jsonl", run_id=RUN, cache=tmp_path / "cache", heartbeat=60)
    t = hub.transport(ME)
    t.connect()
    agent = EdgeAgent(cfg, t, lambda *a: pytest.fail("must not train"), num_samples=4)
    th = threading.Thread(target=agent.serve, daemon=True)
    attacks = _round_attacks()
    with caplog.at_level(logging.INFO, logger="fedpft"):
        attacker = _attack(hub, th, "hello", attacks)
        # a cloud restarting the run clears the control topic: the device says hello again at once
        hellos = sum(tp.endswith(f"/{ME}/hello") for tp, _ in hub.published)
        attacker.publish(topics.control_topic(RUN), b"", retain=True)
        _wait(lambda: sum(tp.endswith(f"/{ME}/hello") for tp, _ in hub.published) > hellos)
        attacker.publish(topics.control_topic(RUN), encode(EndOfRun(run_id=RUN, sender="cloud")))
        th.join(10)
    assert not th.is_alive() and agent.finished
    said = _ignored(caplog)
    assert len(said) == len(attacks) and all("\n" not in m for m in said), said
    assert not [tp for tp, _ in hub.published if tp.endswith(f"/{ME}/update")]  # nothing answered the forged task
    hello = decode(next(p for tp, p in reversed(hub.published) if tp.endswith(f"/{ME}/hello")))
    assert isinstance(hello, Hello) and hello.device_id == ME


def test_fleet_agent_refuses_what_does_not_belong_on_the_rollout_topic(tmp_path, caplog):
    hub = InMemoryHub(threaded=True)
    cfg = FleetConfig(broker="memory://", device_id=ME, cohort="c", cache=tmp_path / "cache", fleet=FLEET, heartbeat=60)
    t = hub.transport(ME)
    t.connect()
    stop = threading.Event()
    agent = FleetAgent(cfg, t, stop)
    th = threading.Thread(target=agent.serve, daemon=True)
    status = DeviceStatus(run_id=FLEET, sender=ME, device_id=ME, cohort="c", state="installed")
    rollout = Rollout(run_id="other-fleet", sender="cloud", rollout_id="ro-1", target=BundleVersion(bundle_id="b", bundle_version=1),
                      cohort="c", rollback=True, deadline=time.time() + 60)
    attacks = [
        (topics.rollout_topic(FLEET), encode(status)),  # a device's kind on the cloud's topic
        (topics.rollout_topic(FLEET), encode(rollout)),  # another fleet's rollout
        (topics.rollout_topic(FLEET), b"{"),
        (topics.fleet_resend_topic(FLEET, ME, "b"), b"junk"),
    ]
    with caplog.at_level(logging.INFO, logger="fedpft"):
        _attack(hub, th, "status", attacks)
        stop.set()
        th.join(10)
    assert not th.is_alive()
    said = _ignored(caplog)
    assert len(said) == len(attacks), said
    assert agent.state == "idle" and agent.rollout_id is None  # no attack moved the device
