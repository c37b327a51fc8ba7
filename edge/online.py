"""`fedpft-edge train --broker ...`: connect, then let the agent serve the run's tasks."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.codec import decode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.messages import Presence, Task, encode
from fedpft.shared.transport import TransportError

from .agent import EdgeAgent

log = logging.getLogger("fedpft.agent")


def rough_sample_count(path: Path) -> int:
    """What a device announces before it has the bundle (labels unknown yet); the exact count
    of usable samples travels with each update and is what FedAvg weighs by."""
    path = Path(path)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.is_file())
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return max(0, n - 1) if path.suffix.lower() == ".csv" else n


def make_trainer(cfg: AgentConfig):
    from .trainer import train_round
    from .update import encode_update

    def train(bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
        tc = EdgeTrainConfig(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, max_steps=task.max_steps,
                             seed=task.seed, holdout=cfg.holdout, report_stats=task.report_stats, threads=cfg.threads,
                             providers=cfg.providers)
        res = train_round(bundle_dir, cfg.data, tc, adapters=decode_tensors(adapters)[0],
                          ffn=decode_tensors(ffn)[0] if ffn is not None else None)
        log.info("round %d: %d steps on %d samples, loss %.4f, held-out accuracy %s -> %s", task.round_id, res.steps,
                 res.num_samples, res.mean_loss, res.acc_before, res.acc_after)
        fields = {"num_samples": res.num_samples, "steps": res.steps, "mean_loss": res.mean_loss,
                  "acc_before": res.acc_before, "acc_after": res.acc_after}
        return encode_update(res), fields

    return train


def connect_with_backoff(cfg, max_wait: float = 300.0, *, client_id: str | None = None, will: tuple[str, bytes] | None = None):
    """Connect, retrying with exponential backoff + jitter (a fleet must not reconnect in lockstep).

    `cfg` holds the broker, TLS and credentials (AgentConfig, FleetConfig); the client id and last
    will default to the run's (an offline Presence on the device's run presence topic)."""
    from fedpft.shared.mqtt import MqttTransport

    if will is None:
        bye = Presence(run_id=cfg.run_id, sender=cfg.device_id, device_id=cfg.device_id, status="offline", reason="connection lost")
        will = (topics.device_topic(cfg.run_id, cfg.device_id, topics.PRESENCE), encode(bye))
    delay, waited = 1.0, 0.0
    while True:
        t = MqttTransport(
            cfg.broker, client_id=client_id or f"fedpft-{cfg.run_id}-{cfg.device_id}", will=will,
            ca=str(cfg.ca) if cfg.ca else None, cert=str(cfg.cert) if cfg.cert else None, key=str(cfg.key) if cfg.key else None,
            username=cfg.username, password=cfg.password,
        )
        try:
            t.connect()
            return t
        except TransportError as exc:
            if waited >= max_wait:
                raise
            log.warning("%s; retrying in %.0fs", exc, delay)
            time.sleep(delay)
            waited += delay
            delay = min(30.0, delay * 2) * (0.8 + 0.4 * random.random())


def run_online(cfg: AgentConfig) -> int:
    transport = connect_with_backoff(cfg)
    try:
        agent = EdgeAgent(cfg, transport, make_trainer(cfg), rough_sample_count(cfg.data))
        return agent.serve()
    finally:
        bye = Presence(run_id=cfg.run_id, sender=cfg.device_id, device_id=cfg.device_id, status="offline", reason="run ended")
        try:
            transport.publish(topics.device_topic(cfg.run_id, cfg.device_id, topics.PRESENCE), encode(bye), retain=True)
        except TransportError:
            pass
        transport.close()
