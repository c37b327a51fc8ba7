"""shared/mqtt.py's PUBLISH decoder (one copy of the payload) against paho's own (five): the same
packet for every field, flag and property, and MalformedPacket wherever paho's gives it."""

from __future__ import annotations

import os
import struct

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties

from fedpft.shared import mqtt

paho_packet = pytest.importorskip("paho.mqtt._packet", reason="paho 2.1 has no decoder of its own to replace")

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


def _props(**values) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    for k, v in values.items():
        setattr(p, k, v)
    return p.pack()


def _publish(topic: bytes, payload: bytes, qos: int, protocol, props: bytes = b"\x00", mid: int = 7) -> bytearray:
    out = struct.pack("!H", len(topic)) + topic
    if qos:
        out += struct.pack("!H", mid)
    if protocol == V5:
        out += props
    return bytearray(out + payload)


CASES = [
    (b"fedpft/r/dev/d1/upload/b1", os.urandom(70_000), 1, V5, b"\x00"),
    (b"fedpft/r/dev/d1/upload/b1", b"", 1, V5, b"\x00"),
    (b"a/b", b"{}", 0, V5, b"\x00"),
    (b"a/b", b"x" * 300, 2, V5, _props(MessageExpiryInterval=30, ContentType="application/json",
                                        UserProperty=[("k", "v"), ("k2", "v2")], CorrelationData=b"\x01\x02")),
    (b"", b"aliased", 1, V5, _props(TopicAlias=3)),  # v5 allows an empty topic with an alias
    (b"x" * 300, os.urandom(200), 1, V5, _props(SubscriptionIdentifier=[200_000])),  # a 3-byte VBI
    (b"a/b", b"payload", 1, V311, b""),
    (b"a/b", b"payload", 0, V311, b""),
]


@pytest.mark.parametrize("topic,payload,qos,protocol,props", CASES)
@pytest.mark.parametrize("flags", [0, 0x08 | 0x01])  # dup and retain
def test_the_same_packet_as_paho(topic, payload, qos, protocol, props, flags):
    header = 0x30 | (qos << 1) | flags
    packet = _publish(topic, payload, qos, protocol, props)
    want = mqtt._PAHO_DECODE_PUBLISH(header, bytearray(packet), protocol)
    got = mqtt.decode_publish(header, packet, protocol)
    assert (got.dup, got.qos, got.retain, got.topic, got.mid, got.payload) == (
        want.dup, want.qos, want.retain, want.topic, want.mid, want.payload)
    assert type(got.payload) is bytes and type(got.topic) is bytes
    if protocol == V5:
        assert got.properties.json() == want.properties.json()
    else:
        assert got.properties is None and want.properties is None


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 27, 28, 29, 30, 31, 33, 34])
def test_a_packet_cut_short_is_malformed_as_for_paho(cut):
    header = 0x32
    packet = _publish(b"fedpft/r/dev/d1/upload/b1", b"", 1, V5, _props(MessageExpiryInterval=30))
    assert len(packet) == 35  # 2 + 25 topic + 2 mid + 1 + 5 properties
    short = packet[:cut]
    with pytest.raises(MalformedPacket):
        mqtt._PAHO_DECODE_PUBLISH(header, bytearray(short), V5)
    with pytest.raises(MalformedPacket):
        mqtt.decode_publish(header, short, V5)


def test_an_empty_v311_topic_is_malformed():
    with pytest.raises(MalformedPacket, match="empty"):
        mqtt.decode_publish(0x32, _publish(b"", b"x", 1, V311), V311)


def test_paho_uses_it():
    assert paho_packet.decode_publish is mqtt.decode_publish
