"""A device's broker connection: connect with backoff, leave an offline presence as the last will,
say goodbye (retained) on the way out.

Both agents connect here (`run_online` in `edge/agent.py`, `run_fleet` in `edge/fleet.py`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fedpft.shared import topics
from fedpft.shared.config import BrokerConfig
from fedpft.shared.messages import encode
from fedpft.shared.transport import Transport, TransportError

from .link import Address

log = logging.getLogger("fedpft.agent")


def connect_with_backoff(cfg: BrokerConfig, client_id: str, will: tuple[str, bytes], max_wait: float = 300.0) -> Transport:
    """Connect, retrying with exponential backoff + jitter (a fleet must not reconnect in lockstep)."""
    from fedpft.shared.mqtt import MqttTransport

    delay, waited = 1.0, 0.0
    while True:
        t = MqttTransport.from_config(cfg, client_id, will=will)
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


@contextmanager
def connected(cfg: BrokerConfig, address: Address, client_id: str, goodbye: str) -> Iterator[Transport]:
    """A connected transport whose last will marks the device offline ("connection lost"); on
    leaving, an offline presence saying `goodbye`, retained, then close."""
    presence = address.topic(topics.PRESENCE)
    will = (presence, encode(address.presence("offline", "connection lost")))
    transport = connect_with_backoff(cfg, client_id, will)
    try:
        yield transport
    finally:
        try:
            transport.publish(presence, encode(address.presence("offline", goodbye)), retain=True)
        except TransportError:
            pass
        transport.close()
