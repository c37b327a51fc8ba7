"""Every MQTT topic of the federation, built only here.

Layout (one run = one subtree, so runs never see each other's traffic):

    fedpft/<run>/round                          cloud -> all   Task
    fedpft/<run>/control                        cloud -> all   EndOfRun
    fedpft/<run>/blob/<blob_id>                 cloud -> all   chunks of a blob (bundle, adapters, ffn)
    fedpft/<run>/secagg                         cloud -> all   SecAggRoster, SecAggUnmask (secure aggregation)
    fedpft/<run>/device/<id>/hello              device -> cloud  Hello
    fedpft/<run>/device/<id>/presence           device -> cloud  Presence (retained; last will)
    fedpft/<run>/device/<id>/update             device -> cloud  Update
    fedpft/<run>/device/<id>/ack                device -> cloud  Ack (task received)
    fedpft/<run>/device/<id>/blobreq            device -> cloud  BlobRequest (missing chunks)
    fedpft/<run>/device/<id>/upload/<blob_id>   device -> cloud  chunks of the device's update blob
    fedpft/<run>/device/<id>/secagg             device -> cloud  SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal
    fedpft/<run>/device/<id>/inbox              cloud -> device  Ack (update received), BlobRequest, SecAggRouted
    fedpft/<run>/device/<id>/resend/<blob_id>   cloud -> device  re-sent chunks asked for by blobreq

Everything a device may write sits under `fedpft/<run>/device/<id>/`, so a broker ACL confines
each device to that subtree plus read on the broadcast topics (see `device_acl`).

Fleet rollouts live beside runs, in their own subtree (`fleet` is therefore not a valid run id):

    fedpft/fleet/<fleet>/rollout                          cloud -> all   Rollout
    fedpft/fleet/<fleet>/device/<id>/status               device -> cloud  DeviceStatus (retained; the rollout ack)
    fedpft/fleet/<fleet>/device/<id>/presence             device -> cloud  Presence (retained; last will)
    fedpft/fleet/<fleet>/device/<id>/blobreq              device -> cloud  BlobRequest (chunks of a rollout's bundle)
    fedpft/fleet/<fleet>/device/<id>/resend/<blob_id>     cloud -> device  chunks asked for by blobreq

Fleet messages carry the fleet name in `run_id`; `parse_fleet` splits a fleet topic and
`fleet_device_acl` confines a device to its own fleet subtree in the same way.
"""

from __future__ import annotations

from typing import NamedTuple

from .messages import ProtocolError, check_id

ROOT = "fedpft"

# Broadcast kinds (no device in the topic).
ROUND = "round"
CONTROL = "control"
BLOB = "blob"
# Per-device kinds.
HELLO = "hello"
PRESENCE = "presence"
UPDATE = "update"
ACK = "ack"
BLOBREQ = "blobreq"
UPLOAD = "upload"
INBOX = "inbox"
RESEND = "resend"
SECAGG = "secagg"  # broadcast (roster, unmask) and per device (keys, shares, masked, reveal)

BROADCAST_KINDS = frozenset({ROUND, CONTROL, SECAGG})
DEVICE_KINDS = frozenset({HELLO, PRESENCE, UPDATE, ACK, BLOBREQ, INBOX, SECAGG})
# Kinds followed by a blob id level.
BLOB_KINDS = frozenset({BLOB, UPLOAD, RESEND})
# What a device publishes (the rest under its subtree it only reads).
DEVICE_WRITES = (HELLO, PRESENCE, UPDATE, ACK, BLOBREQ, UPLOAD, SECAGG)


# Fleet layer (rollouts).
FLEET = "fleet"  # the subtree's level after ROOT; reserved, so no run can be called that
ROLLOUT = "rollout"
STATUS = "status"
FLEET_DEVICE_KINDS = frozenset({STATUS, PRESENCE, BLOBREQ})
FLEET_WRITES = (STATUS, PRESENCE, BLOBREQ)


class Topic(NamedTuple):
    run: str
    device_id: str | None
    kind: str


class FleetTopic(NamedTuple):
    fleet: str
    device_id: str | None
    kind: str


def _run(run: str) -> str:
    if check_id(run, "run id") == FLEET:
        raise ProtocolError(f"invalid run id {run!r}: {FLEET!r} is reserved for fleet rollouts")
    return f"{ROOT}/{run}"


def _device(run: str, device_id: str) -> str:
    return f"{_run(run)}/device/{check_id(device_id, 'device id')}"


def round_topic(run: str) -> str:
    return f"{_run(run)}/{ROUND}"


def control_topic(run: str) -> str:
    return f"{_run(run)}/{CONTROL}"


def secagg_topic(run: str) -> str:
    return f"{_run(run)}/{SECAGG}"


def blob_topic(run: str, blob_id: str) -> str:
    return f"{_run(run)}/{BLOB}/{check_id(blob_id, 'blob id')}"


def device_topic(run: str, device_id: str, kind: str) -> str:
    """A per-device JSON topic: hello, presence, update, ack, blobreq or inbox."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}; expected one of {sorted(DEVICE_KINDS)}")
    return f"{_device(run, device_id)}/{kind}"


def upload_topic(run: str, device_id: str, blob_id: str) -> str:
    return f"{_device(run, device_id)}/{UPLOAD}/{check_id(blob_id, 'blob id')}"


def resend_topic(run: str, device_id: str, blob_id: str) -> str:
    return f"{_device(run, device_id)}/{RESEND}/{check_id(blob_id, 'blob id')}"


# ---- subscription patterns -------------------------------------------------------------------


def run_pattern(run: str) -> str:
    """Everything of one run (the cloud's monitor, tests)."""
    return f"{_run(run)}/#"


def blob_pattern(run: str) -> str:
    return f"{_run(run)}/{BLOB}/+"


def all_devices_pattern(run: str, kind: str) -> str:
    """What the cloud subscribes to, e.g. every device's updates: fedpft/<run>/device/+/update."""
    if kind in (UPLOAD, RESEND):
        return f"{_run(run)}/device/+/{kind}/+"
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{_run(run)}/device/+/{kind}"


def resend_pattern(run: str, device_id: str) -> str:
    return f"{_device(run, device_id)}/{RESEND}/+"


def device_subtree(run: str, device_id: str) -> str:
    return f"{_device(run, device_id)}/#"


def device_acl(run: str, device_id: str) -> dict[str, list[str]]:
    """Least-privilege ACL for one device: read broadcasts and its own inbox, write only its own."""
    dev = _device(run, device_id)
    return {
        "read": [round_topic(run), control_topic(run), secagg_topic(run), blob_pattern(run), f"{dev}/{INBOX}", f"{dev}/{RESEND}/+"],
        "write": [f"{dev}/{k}/+" if k == UPLOAD else f"{dev}/{k}" for k in DEVICE_WRITES],
    }


# ---- fleet rollouts ----------------------------------------------------------------------------


def _fleet(fleet: str) -> str:
    return f"{ROOT}/{FLEET}/{check_id(fleet, 'fleet name')}"


def _fleet_device(fleet: str, device_id: str) -> str:
    return f"{_fleet(fleet)}/device/{check_id(device_id, 'device id')}"


def rollout_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/{ROLLOUT}"


def fleet_device_topic(fleet: str, device_id: str, kind: str) -> str:
    """A device's fleet topic: status, presence or blobreq."""
    if kind not in FLEET_DEVICE_KINDS:
        raise ValueError(f"unknown fleet device topic kind {kind!r}; expected one of {sorted(FLEET_DEVICE_KINDS)}")
    return f"{_fleet_device(fleet, device_id)}/{kind}"


def fleet_resend_topic(fleet: str, device_id: str, blob_id: str) -> str:
    return f"{_fleet_device(fleet, device_id)}/{RESEND}/{check_id(blob_id, 'blob id')}"


def fleet_resend_pattern(fleet: str, device_id: str) -> str:
    return f"{_fleet_device(fleet, device_id)}/{RESEND}/+"


def fleet_devices_pattern(fleet: str, kind: str) -> str:
    """What the cloud subscribes to, e.g. every device's status: fedpft/fleet/<fleet>/device/+/status."""
    if kind not in FLEET_DEVICE_KINDS:
        raise ValueError(f"unknown fleet device topic kind {kind!r}")
    return f"{_fleet(fleet)}/device/+/{kind}"


def fleet_pattern(fleet: str) -> str:
    """Everything of one fleet (the cloud's ACL grant)."""
    return f"{_fleet(fleet)}/#"


def fleet_device_acl(fleet: str, device_id: str) -> dict[str, list[str]]:
    """Least-privilege fleet ACL for one device: read rollouts and its re-sends, write only its own."""
    dev = _fleet_device(fleet, device_id)
    return {"read": [rollout_topic(fleet), f"{dev}/{RESEND}/+"], "write": [f"{dev}/{k}" for k in FLEET_WRITES]}


def parse_fleet(topic: str) -> FleetTopic:
    """Split a concrete fleet topic into (fleet, device_id | None, kind); ProtocolError if it is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or parts[1] != FLEET:
        raise ProtocolError(f"not a {ROOT}/{FLEET} topic: {topic!r}")
    fleet, rest = check_id(parts[2], "fleet name"), parts[3:]
    if rest == [ROLLOUT]:
        return FleetTopic(fleet, None, ROLLOUT)
    if rest[0] == "device" and len(rest) >= 3 and _device_kind_fits(rest, FLEET_DEVICE_KINDS, (RESEND,)):
        return FleetTopic(fleet, rest[1], rest[2])
    raise ProtocolError(f"unknown fleet topic: {topic!r}")


def check_fleet_sender(topic: str, fleet: str, sender: str) -> FleetTopic:
    """`check_sender` for fleet topics: the fleet (message run_id) and device must match the topic."""
    parsed = parse_fleet(topic)
    if parsed.fleet != fleet:
        raise ProtocolError(f"message for fleet {fleet!r} arrived on fleet {parsed.fleet!r}'s topic")
    if parsed.device_id is not None and parsed.kind != RESEND and parsed.device_id != sender:
        raise ProtocolError(f"sender {sender!r} published on device {parsed.device_id!r}'s topic")
    return parsed


# ---- parsing -----------------------------------------------------------------------------------


def _device_kind_fits(rest: list[str], kinds: frozenset[str], blob_kinds: tuple[str, ...]) -> bool:
    """`rest` = ["device", <id>, <kind>, *tail]: a known JSON kind with no tail, or a blob kind
    followed by one blob id. Ids are checked (ProtocolError)."""
    check_id(rest[1], "device id")
    kind, tail = rest[2], rest[3:]
    if kind in blob_kinds and len(tail) == 1:
        check_id(tail[0], "blob id")
        return True
    return kind in kinds and not tail


def parse(topic: str) -> Topic:
    """Split a concrete topic into (run, device_id | None, kind); ProtocolError if it is not ours."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise ProtocolError(f"not a {ROOT} topic: {topic!r}")
    if parts[1] == FLEET:
        raise ProtocolError(f"a fleet topic, not a run's: {topic!r} (see parse_fleet)")
    run = check_id(parts[1], "run id")
    rest = parts[2:]
    if rest[0] == "device":
        if len(rest) < 3:
            raise ProtocolError(f"device topic without kind: {topic!r}")
        if _device_kind_fits(rest, DEVICE_KINDS, (UPLOAD, RESEND)):
            return Topic(run, rest[1], rest[2])
        raise ProtocolError(f"unknown device topic: {topic!r}")
    kind, tail = rest[0], rest[1:]
    if kind == BLOB and len(tail) == 1:
        check_id(tail[0], "blob id")
        return Topic(run, None, kind)
    if kind in BROADCAST_KINDS and not tail:
        return Topic(run, None, kind)
    raise ProtocolError(f"unknown topic: {topic!r}")


def blob_id_of(topic: str) -> str:
    """The blob id level of a blob, upload or resend topic (after `parse` validated it)."""
    parsed = parse(topic)
    if parsed.kind not in BLOB_KINDS:
        raise ProtocolError(f"not a blob topic: {topic!r}")
    return topic.rsplit("/", 1)[1]


def check_sender(topic: str, run_id: str, sender: str) -> Topic:
    """Refuse a message whose claimed run/sender disagrees with the topic it came on.

    With the ACL confining each device to its subtree, the topic is the unforgeable identity;
    this check makes the JSON agree with it, so a device cannot speak for another.
    """
    parsed = parse(topic)
    if parsed.run != run_id:
        raise ProtocolError(f"message for run {run_id!r} arrived on run {parsed.run!r}'s topic")
    if parsed.device_id is not None and parsed.kind != INBOX and parsed.device_id != sender:
        raise ProtocolError(f"sender {sender!r} published on device {parsed.device_id!r}'s topic")
    return parsed
