"""`Transport` over MQTT with paho-mqtt — the only module that imports paho.

Choices, and why:
- QoS 1 everywhere: at-least-once is enough because every handler is idempotent (messages are
  keyed by (type, run, round, sender); chunks by (blob, index)). QoS 2 would cost a second
  round trip per 1 MiB chunk for nothing.
- Persistent sessions (`clean_start=False`, v5 session expiry): a device that drops off keeps
  its subscriptions on the broker, and QoS 1 messages sent meanwhile wait for it.
- Subscriptions are (re)made in `on_connect`, so a reconnect after a broker restart (where the
  session is lost) resubscribes by itself.
- paho callbacks only enqueue; handlers run on the Dispatcher's thread (see transport.py).
- MQTT v5 by default; `?protocol=3.1.1` on the URL, or a broker that answers "unsupported
  protocol version" (amqtt), gets 3.1.1.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, VariableByteIntegers

try:
    from paho.mqtt import _packet as paho_packet
except ImportError:  # paho 2.1 decodes a PUBLISH inside its client: nothing to stand in for there
    paho_packet = None

from .transport import Dispatcher, Handler, TransportError, check_topic

if TYPE_CHECKING:
    from .config import BrokerConfig

log = logging.getLogger(__name__)


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion):  # noqa: ANN201 - paho's PublishPacket
    """paho's `_packet.decode_publish`, giving the same packet with one copy of the payload.

    paho 2.2 peels a PUBLISH with `struct.unpack("!H{n}s")` once per field, and its property
    parser slices the remaining buffer again: five copies of the payload before a handler sees
    it. For the cloud that is 3 GB of copying per 1,000 devices' 0.6 MB updates, on the one
    network thread every message waits for, under the GIL (0.49 ms of 0.6 ms per update here).
    Fields are read from a view instead; only the payload is copied, once, into the `bytes`
    paho hands on. A packet that ends inside a field is `MalformedPacket` (paho drops the
    connection), as with paho's own. Stricter than paho's in one way: properties that do not fill
    exactly the length they declare (MQTT 5 §2.2.2.2) are MalformedPacket here, where paho's
    parser reads past them into the payload and returns a packet anyway."""
    view = memoryview(packet)
    end = len(view)

    def need(upto: int, what: str) -> None:
        if upto > end:
            raise MalformedPacket(f"PUBLISH ends inside its {what} ({end} bytes)")

    need(2, "topic length")
    (slen,) = struct.unpack_from("!H", view, 0)
    need(2 + slen, "topic")
    topic, pos = bytes(view[2 : 2 + slen]), 2 + slen
    if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    qos = (header & 0x06) >> 1
    mid = 0
    if qos > 0:
        need(pos + 2, "packet id")
        (mid,) = struct.unpack_from("!H", view, pos)
        pos += 2
    properties = None
    if protocol == MQTTProtocolVersion.MQTTv5:
        # the properties' length first (at most 4 bytes), so that their parser gets only them
        props_len, vbi_len = VariableByteIntegers.decode(bytes(view[pos : pos + 4]))
        need(pos + vbi_len + props_len, "properties")
        properties = Properties(PacketTypes.PUBLISH)
        _, used = properties.unpack(bytes(view[pos : pos + vbi_len + props_len]))
        pos += used
    return paho_packet.PublishPacket(dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=topic,
                                     mid=mid, properties=properties, payload=bytes(view[pos:]))


# paho (2.2 on) looks `_packet.decode_publish` up on every PUBLISH; ours is tested against it
# (tests/test_mqtt_decode.py), and stands in only for a paho whose packet has the fields it fills.
# A field that does not parse is then MalformedPacket, as with paho's own (`convert_exception`).
_PAHO_DECODE_PUBLISH = getattr(paho_packet, "decode_publish", None)
if getattr(_PAHO_DECODE_PUBLISH, "__module__", None) == "paho.mqtt._packet" and hasattr(paho_packet, "convert_exception") and \
        getattr(paho_packet, "PublishPacket", None) is not None and paho_packet.PublishPacket._fields == ("dup", "qos", "retain", "topic", "mid", "properties", "payload"):
    decode_publish = paho_packet.convert_exception(decode_publish)
    paho_packet.decode_publish = decode_publish


_UNSUPPORTED_PROTOCOL = 132  # v5 CONNACK reason; paho maps a v3 "refused: protocol" onto it
_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311, "311": MQTTProtocolVersion.MQTTv311}


@dataclass(frozen=True)
class BrokerUrl:
    scheme: str
    host: str
    port: int
    protocol: MQTTProtocolVersion
    username: str | None = None
    password: str | None = None
    explicit_protocol: bool = False  # False: try 5, fall back to 3.1.1

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"


def parse_url(url: str) -> BrokerUrl:
    """`mqtt://[user:pass@]host[:port][?protocol=5|3.1.1]`, or `mqtts://...` for TLS."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise TransportError(f"bad broker URL {url!r}: {exc}") from None
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise TransportError(f"bad broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
    q = parse_qs(u.query)
    given = q.get("protocol") or q.get("version")
    proto = given[0] if given else "5"
    if proto not in _PROTOCOLS:
        raise TransportError(f"bad broker URL {url!r}: protocol must be 5 or 3.1.1, got {proto!r}")
    return BrokerUrl(
        scheme=u.scheme,
        host=u.hostname,
        port=port or (8883 if u.scheme == "mqtts" else 1883),
        protocol=_PROTOCOLS[proto],
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
        explicit_protocol=bool(given),
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


class _Acks:
    """Waits for SUBACKs by message id without holding a lock across paho calls (paho calls
    back while holding its own locks, so a lock spanning `subscribe()` could deadlock)."""

    _KEEP = 1024  # acks nobody waits for (resubscribe on reconnect) must not pile up

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done: dict[int, str | None] = {}  # mid -> refusal reason, None when granted

    def arrived(self, mid: int, refused: str | None) -> None:
        with self._cond:
            self._done[mid] = refused
            while len(self._done) > self._KEEP:
                del self._done[next(iter(self._done))]
            self._cond.notify_all()

    def wait(self, mid: int, timeout: float) -> tuple[bool, str | None]:
        """(arrived, refusal reason)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._done, timeout)
            return ok, self._done.pop(mid, None)


class MqttTransport:
    """A `Transport` over one MQTT connection; `client_id` should be stable (the device id) so
    the persistent session survives restarts. Handlers run on a dispatcher thread."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        will_retain: bool = True,
        clean_start: bool = False,
        session_expiry: int = 3600,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        connect_timeout: float = 5.0,
        publish_timeout: float = 30.0,
        reconnect_delay: tuple[int, int] = (1, 30),
        max_inflight: int = 20,
    ) -> None:
        self.url = url
        self.broker = parse_url(url)
        self.client_id = client_id
        self.will = (check_topic(will[0]), bytes(will[1])) if will else None
        self.will_retain = will_retain
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.tls = (ca, cert, key)
        self.username = username or self.broker.username
        self.password = password or self.broker.password
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.reconnect_delay = reconnect_delay
        # QoS 1 messages sent and not yet PUBACKed; paho queues the rest. paho's 20 suits a device; a
        # cloud that addresses a Task and a receipt to each of thousands of devices needs a wider
        # window, or its fan-out waits on one broker round trip per 20 messages. Never above what the
        # broker grants (MQTT 5 Receive Maximum, read from the CONNACK).
        self.max_inflight = max_inflight
        self.protocol = self.broker.protocol
        self._dispatcher = Dispatcher(client_id)
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._connack_reason: str | None = None
        self._connack_code = 0
        self._acks = _Acks()
        self._closing = False

    @classmethod
    def from_config(cls, cfg: "BrokerConfig", client_id: str, *, url: str | None = None, **options: Any) -> "MqttTransport":
        """The one place a transport is built from the broker options every MQTT command takes.
        `url` replaces cfg.broker (an embedded broker's address); `options` are the keyword
        arguments of the constructor (will, clean_start, session_expiry, ...)."""
        def path(p: object) -> str | None:
            return str(p) if p else None

        return cls(url or cfg.broker, client_id, ca=path(cfg.ca), cert=path(cfg.cert), key=path(cfg.key),
                   username=cfg.username, password=cfg.password, **options)

    @property
    def inflight_window(self) -> int:
        """QoS 1 messages this client may have unacknowledged: `max_inflight`, or less where the
        broker grants less."""
        c = self._client
        return self.max_inflight if c is None else c.max_inflight_messages

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ---- lifecycle -------------------------------------------------------------------------------

    def connect(self) -> None:
        self._dispatcher.start()
        self._closing = False
        may_fall_back = self.protocol == MQTTProtocolVersion.MQTTv5 and not self.broker.explicit_protocol
        answered = self._open(self.protocol, raise_on_silence=not may_fall_back)
        # A 3.1.1-only broker either refuses v5 (paho reports 132) or, like amqtt, chokes on the v5
        # CONNECT properties and never answers; both get a second try with 3.1.1.
        if may_fall_back and (not answered or self._connack_code == _UNSUPPORTED_PROTOCOL):
            log.info("broker %s does not speak MQTT 5; using 3.1.1", self.url)
            self._shutdown_client()
            self.protocol = MQTTProtocolVersion.MQTTv311
            self._open(self.protocol, raise_on_silence=True)
        if self._connack_reason is not None:
            reason = self._connack_reason
            self._shutdown_client()
            raise TransportError(f"broker {self.url} refused the connection: {reason}")

    def _open(self, protocol: MQTTProtocolVersion, raise_on_silence: bool) -> bool:
        """TCP-connect and wait for the CONNACK; False if none came (and not raise_on_silence)."""
        self._connack.clear()
        self._connack_reason, self._connack_code = None, 0
        c = self._client = self._make_client(protocol)
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        props = None
        if v5 and not self.clean_start:
            # v5 ends a session at disconnect unless told to keep it; keep it long enough to resume.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        try:
            if v5:
                c.connect(self.broker.host, self.broker.port, self.keepalive, clean_start=self.clean_start, properties=props)
            else:
                c.connect(self.broker.host, self.broker.port, self.keepalive)
        except (OSError, ValueError) as exc:
            self._client = None
            self._dispatcher.stop()
            raise TransportError(f"cannot reach broker {self.url}: {_why(exc)}") from None
        c.loop_start()
        if self._connack.wait(self.connect_timeout):
            return True
        self._shutdown_client()
        if raise_on_silence:
            raise TransportError(f"cannot reach broker {self.url}: no CONNACK within {self.connect_timeout:g} s")
        return False

    def _make_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=None if v5 else self.clean_start,
        )
        c.connect_timeout = self.connect_timeout
        c.max_inflight_messages_set(self.max_inflight)
        c.reconnect_delay_set(*self.reconnect_delay)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        ca, cert, key = self.tls
        if self.broker.tls or ca or cert:
            try:
                c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TransportError(f"TLS setup for {self.url} failed: {_why(exc)}") from None
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1, retain=self.will_retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        return c

    def close(self) -> None:
        """Graceful: DISCONNECT is sent, so the broker does not publish the last will."""
        self._closing = True
        if self._client is not None:
            self._client.disconnect()
        self._shutdown_client()
        self._dispatcher.stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash would: the broker sends the will."""
        self._closing = True
        c, self._client = self._client, None
        if c is not None:
            sock = c.socket()
            c.loop_stop()
            if sock is not None:
                sock.close()
        self._connected.clear()
        self._dispatcher.stop()

    def _shutdown_client(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.loop_stop()
            c.disconnect()
            sock = c.socket()  # still open when the broker never answered: do not leak it
            if sock is not None:
                sock.close()
        self._connected.clear()

    def __enter__(self) -> "MqttTransport":
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- operations ------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        """Returns once the broker acknowledged (QoS 1) — across a reconnect if need be; with
        `wait=False` once paho holds the message (it sends and retries it on its own)."""
        c = self._client
        if c is None:
            raise TransportError(f"{self.client_id}: not connected to {self.url}, cannot publish to {topic}")
        info = c.publish(check_topic(topic), bytes(payload), qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # Offline: paho keeps a QoS>0 message and sends it after reconnecting; wait for that.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if not wait:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TransportError(f"publish to {topic} on {self.url} failed: {paho.error_string(info.rc)}")
            return
        try:
            info.wait_for_publish(self.publish_timeout)
            ok = info.is_published()
        except (ValueError, RuntimeError) as exc:
            raise TransportError(f"publish to {topic} on {self.url} failed: {exc}") from None
        if not ok:
            raise TransportError(f"publish to {topic} on {self.url} not acknowledged within {self.publish_timeout:g} s")

    def subscribe(self, pattern: str, handler: Handler) -> None:
        """Register `handler`; when connected, returns after the broker's SUBACK."""
        self._dispatcher.add(pattern, handler)
        c = self._client
        if c is not None and self.connected:
            rc, mid = c.subscribe(pattern, qos=1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # NO_CONN: on_connect subscribes after the reconnect
            arrived, refused = self._acks.wait(mid, self.connect_timeout)
            if not arrived:
                raise TransportError(f"subscribe to {pattern} on {self.url}: no SUBACK within {self.connect_timeout:g} s")
            if refused:
                self._dispatcher.remove(pattern)
                raise TransportError(f"broker {self.url} refused subscription to {pattern}: {refused}")

    def unsubscribe(self, pattern: str) -> None:
        self._dispatcher.remove(pattern)
        if self._client is not None and self.connected:
            self._client.unsubscribe(pattern)

    def join(self, timeout: float | None = 10.0) -> bool:
        """Wait until the handlers have run on everything received so far."""
        return self._dispatcher.join(timeout)

    # ---- paho callbacks (network thread: no user code, no exceptions escape) -------------------

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:  # type: ignore[no-untyped-def]
        if reason.is_failure:
            self._connack_code, self._connack_reason = reason.value, str(reason)
            if self._connack.is_set():  # a reconnect was refused; paho keeps retrying
                log.warning("broker %s refused reconnect of %s: %s", self.url, self.client_id, reason)
            self._connack.set()
            return
        granted = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if granted is not None and granted < self.max_inflight and hasattr(client, "_max_inflight_messages"):
            # paho has no public way to narrow the window once connected, and the grant arrives only now
            client._max_inflight_messages = granted
            log.debug("%s: broker %s grants %d messages in flight (asked for %d)", self.client_id, self.url, granted, self.max_inflight)
        patterns = self._dispatcher.patterns()
        if patterns:
            client.subscribe([(p, 1) for p in patterns])
        if self._connack.is_set():
            log.info("%s reconnected to %s (session present: %s)", self.client_id, self.url, flags.session_present)
        self._connected.set()
        self._connack.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:  # type: ignore[no-untyped-def]
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._closing:
            log.warning("%s lost connection to %s: %s; reconnecting", self.client_id, self.url, reason)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            self._dispatcher.deliver(msg.topic, msg.payload)
        except Exception as exc:  # e.g. a topic that is not UTF-8
            log.warning("%s: dropped a message: %s: %s", self.client_id, type(exc).__name__, exc)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        bad = ", ".join(str(r) for r in reason_codes if r.is_failure) or None
        if bad:
            log.warning("%s: broker %s refused a subscription: %s", self.client_id, self.url, bad)
        self._acks.arrived(mid, bad)
