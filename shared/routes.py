"""Which message each topic kind carries, and the one check that a message fits its topic.

`topics` says where a message may travel and `messages` what it may hold; this table joins the
two, so the cloud's round loop, its rollouts and the fleet agent refuse a message on the wrong
topic with the same line.
"""

from __future__ import annotations

from . import topics
from .messages import (
    Ack, BlobRequest, DeviceStatus, EndOfRun, Hello, Presence, ProtocolError, Rollout, SecAggKeys, SecAggMasked, SecAggReveal,
    SecAggRoster, SecAggRouted, SecAggShares, SecAggUnmask, Task, Update,
)

# Run topics: kind -> the message types it may carry.
RUN_ROUTES: dict[str, tuple[type, ...]] = {
    topics.ROUND: (Task,),
    topics.CONTROL: (EndOfRun,),
    topics.HELLO: (Hello,),
    topics.PRESENCE: (Presence,),
    topics.UPDATE: (Update,),
    topics.ACK: (Ack,),
    topics.BLOBREQ: (BlobRequest,),
    # a Task too, when the cloud addresses a large round device by device (cloud/fanout.py)
    topics.INBOX: (Ack, BlobRequest, SecAggRouted, Task),
    # the run's broadcast secagg topic (cloud) and each device's own (check_sender binds the sender)
    topics.SECAGG: (SecAggRoster, SecAggUnmask, SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal),
}
# Fleet topics (run_id holds the fleet name).
FLEET_ROUTES: dict[str, tuple[type, ...]] = {
    topics.ROLLOUT: (Rollout,),
    topics.STATUS: (DeviceStatus,),
    topics.PRESENCE: (Presence,),
    topics.BLOBREQ: (BlobRequest,),
}


def check_route(topic: str, msg) -> topics.Topic:
    """The parsed run topic, or ProtocolError unless `msg` is of a type its kind carries, its
    run and sender agree with the topic, and a per-device topic's message is about that device
    (a BlobRequest naming another device would have chunks re-sent to that one)."""
    parsed = topics.check_sender(topic, msg.run_id, msg.sender)
    _check_fits(parsed.kind, parsed.device_id, msg, RUN_ROUTES)
    return parsed


def check_fleet_route(topic: str, msg) -> topics.FleetTopic:
    """`check_route` for fleet topics."""
    parsed = topics.check_fleet_sender(topic, msg.run_id, msg.sender)
    _check_fits(parsed.kind, parsed.device_id, msg, FLEET_ROUTES)
    return parsed


def _check_fits(kind: str, device_id: str | None, msg, routes: dict[str, tuple[type, ...]]) -> None:
    if type(msg) not in routes.get(kind, ()):
        raise ProtocolError(f"a {msg.type} message does not belong on a {kind} topic")
    if device_id is None:
        return
    if isinstance(msg, Task):  # a Task in a device's inbox is for that device alone
        if msg.devices != [device_id]:
            raise ProtocolError(f"a task for {_names(msg.devices)} on device {device_id!r}'s topic")
    elif getattr(msg, "device_id", None) != device_id:
        raise ProtocolError(f"message about device {getattr(msg, 'device_id', None)!r} on device {device_id!r}'s topic")


def _names(devices: list[str], n: int = 3) -> str:
    return ", ".join(repr(d) for d in devices[:n]) + (f" and {len(devices) - n} more" if len(devices) > n else "")
