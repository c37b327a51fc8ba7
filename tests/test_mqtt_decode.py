"""shared/mqtt.py's PUBLISH decoder (one copy of the payload) against paho's own (five): the same
packet for every field, flag and property, MalformedPacket wherever paho's gives it, and also for
properties that overrun their declared length (which paho's reads into the payload)."""

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
@pytest.mark.parametrize("flags", [0, 0x08, 0x01])  # dup, retain
def test_the_same_packet_as_paho(topic, payload, qos, protocol, props, flags):
    header = 0x30 | (qos << 1) | flags
    packet = _publish(topic, payload, qos, protocol, props)
    want = mqtt._PAHO_DECODE_PUBLISH(header, bytearray(packet), protocol)
    for given in (packet, bytes(packet)):  # paho hands it a bytearray; bytes work too
        got = mqtt.decode_publish(header, given, protocol)
        assert (got.dup, got.qos, got.retain, got.topic, got.mid, got.payload) == (
            want.dup, want.qos, want.retain, want.topic, want.mid, want.payload)
        assert type(got.payload) is bytes and type(got.topic) is bytes
        if protocol == V5:
            assert got.properties.json() == want.properties.json()
        else:
            assert got.properties is None and want.properties is None
    packet += b"x"  # no view of paho's buffer outlives the call (it would refuse to grow)


def test_qos_3_decodes_as_paho_decodes_it():
    packet = _publish(b"a/b", b"p", 3, V5)
    want = mqtt._PAHO_DECODE_PUBLISH(0x36, bytearray(packet), V5)
    got = mqtt.decode_publish(0x36, packet, V5)
    assert (got.qos, got.mid, got.payload) == (want.qos, want.mid, want.payload) == (3, 7, b"p")


@pytest.mark.parametrize("packet", [
    "0003612f62" "01" "01" "01" "5041594c4f4144",        # a 1-byte property area holding a property of 2
    "0003612f62" "01" "02" "00000009" "5041594c4f4144",  # the same with a 4-byte value
    "0003612f62" "06" "08" "0003" "72",                  # the area declared longer than the packet
])
def test_properties_that_overrun_their_declared_length_are_malformed(packet):
    """paho's parser reads past the area into the payload and returns a packet; MQTT 5 calls it malformed."""
    data = bytearray.fromhex(packet)
    mqtt._PAHO_DECODE_PUBLISH(0x30, bytearray(data), V5)  # paho: no error
    with pytest.raises(MalformedPacket):
        mqtt.decode_publish(0x30, data, V5)


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


def test_an_empty_v311_topic_is_malformed_as_for_paho():
    for decode in (mqtt._PAHO_DECODE_PUBLISH, mqtt.decode_publish):
        with pytest.raises(MalformedPacket, match="empty"):
            decode(0x32, _publish(b"", b"x", 1, V311), V311)


def test_paho_uses_it_and_the_tests_compare_against_paho_s_own():
    assert paho_packet.decode_publish is mqtt.decode_publish
    assert mqtt._PAHO_DECODE_PUBLISH.__module__ == "paho.mqtt._packet"  # not ours, from a second import
