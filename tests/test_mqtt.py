"""Real brokers: the machine's Mosquitto on 127.0.0.1:1883 (skipped if absent) and the EmbeddedBroker."""

import os
import socket
import threading
import time
import uuid

import pytest

from fedpft.cloud.broker import EmbeddedBroker
from fedpft.shared import topics as T
from fedpft.shared.chunks import BlobSource, Reassembler
from fedpft.shared.messages import Presence, decode, encode
from fedpft.shared.mqtt import MqttTransport, parse_url
from fedpft.shared.transport import TransportError

MOSQUITTO = "mqtt://127.0.0.1:1883"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def embedded():
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "embedded"])
def url(request):
    if request.param == "mosquitto":
        if not _listening("127.0.0.1", 1883):
            pytest.skip("no Mosquitto on 127.0.0.1:1883")
        return MOSQUITTO
    return request.getfixturevalue("embedded").url


@pytest.fixture
def run_id():
    return f"t{uuid.uuid4().hex[:12]}"


def _client(url, name, **kw):
    kw.setdefault("connect_timeout", 3.0)
    kw.setdefault("publish_timeout", 10.0)
    return MqttTransport(url, f"{name}-{uuid.uuid4().hex[:8]}", **kw)


class Inbox:
    """Collects deliveries; tests wait on it instead of sleeping."""

    def __init__(self):
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic, payload):
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait(self, n=1, timeout=5.0):
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n, timeout), f"got {len(self.items)}/{n}"
        return self.items


def test_parse_url():
    u = parse_url("mqtts://user:p%40ss@broker.example:9999?protocol=3.1.1")
    assert (u.host, u.port, u.tls, u.username, u.password, u.explicit_protocol) == ("broker.example", 9999, True, "user", "p@ss", True)
    assert parse_url("mqtt://h").port == 1883 and parse_url("mqtts://h").port == 8883
    for bad in ("http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h?protocol=4"):
        with pytest.raises(TransportError, match="bad broker URL"):
            parse_url(bad)


def test_chunked_3mib_blob_round_trip(url, run_id):
    blob = os.urandom(3 * 1024 * 1024 + 123)
    src = BlobSource("bundle-1", blob)  # 1 MiB chunks
    got = Inbox()
    with _client(url, "cloud") as cloud, _client(url, "dev") as dev:
        dev.subscribe(T.blob_pattern(run_id), got)
        for payload in src.payloads():
            cloud.publish(T.blob_topic(run_id, src.blob_id), payload)
        items = got.wait(src.count, timeout=10)
    r = Reassembler.for_ref(src.ref)
    for topic, payload in items:
        assert T.blob_id_of(topic) == src.blob_id
        r.add(payload)
    assert r.result() == blob


def test_reconnect_resubscribes(url, run_id):
    got = Inbox()
    topic = T.round_topic(run_id)
    # clean_start: the broker forgets the subscription with the connection, so only a
    # resubscribe in on_connect can bring the second message.
    with _client(url, "dev", clean_start=True, reconnect_delay=(1, 1)) as dev, _client(url, "cloud") as cloud:
        dev.subscribe(topic, got)
        cloud.publish(topic, b"before")
        got.wait(1)
        dev._client.socket().shutdown(socket.SHUT_RDWR)  # the network drops
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and dev.connected:
            time.sleep(0.01)
        while time.monotonic() < deadline and not dev.connected:
            time.sleep(0.02)
        assert dev.connected
        # The SUBACK is not observable from here; retry the publish until it lands (QoS 1, idempotent).
        while len(got.items) < 2 and time.monotonic() < deadline:
            cloud.publish(topic, b"after")
            time.sleep(0.1)
        assert [p for _, p in got.items][:2] == [b"before", b"after"]


def test_persistent_session_gets_what_was_sent_while_away(url, run_id):
    topic = T.round_topic(run_id)
    cid = f"dev-{uuid.uuid4().hex[:8]}"
    got = Inbox()
    with _client(url, "cloud") as cloud:
        dev = MqttTransport(url, cid, connect_timeout=3)
        dev.subscribe(topic, got)
        dev.connect()
        dev.close()
        # let the broker see the disconnect first: a QoS 1 message sent into a session that is still
        # closing went to the old socket, and the embedded broker (amqtt) does not redeliver it
        time.sleep(0.5)
        cloud.publish(topic, b"while away")
        back = MqttTransport(url, cid, connect_timeout=3)
        back.subscribe(topic, got)
        with back:
            assert got.wait(1)[0][1] == b"while away"
        with MqttTransport(url, cid, clean_start=True, connect_timeout=3):
            pass  # drop the session on the broker


def test_last_will_on_abrupt_disconnect(url, run_id):
    presence = T.device_topic(run_id, "d1", "presence")
    offline = encode(Presence(run_id=run_id, sender="d1", device_id="d1", status="offline", reason="connection lost"))
    got = Inbox()
    with _client(url, "cloud") as cloud:
        cloud.subscribe(T.all_devices_pattern(run_id, "presence"), got)
        dev = _client(url, "d1", will=(presence, offline), keepalive=5)
        dev.connect()
        dev.publish(presence, encode(Presence(run_id=run_id, sender="d1", device_id="d1", status="online")), retain=True)
        got.wait(1)
        dev.abort()
        topic, payload = got.wait(2)[1]
        msg = decode(payload)
        assert T.parse(topic).device_id == "d1" and msg.status == "offline"
        cloud.publish(presence, b"", retain=True)  # leave no retained state behind


def test_graceful_close_sends_no_will(embedded, run_id):
    presence = T.device_topic(run_id, "d1", "presence")
    got = Inbox()
    with _client(embedded.url, "cloud") as cloud:
        cloud.subscribe(presence, got)
        with _client(embedded.url, "d1", will=(presence, b"offline"), will_retain=False):
            pass
        cloud.publish(presence, b"marker")
        assert [p for _, p in got.wait(1)] == [b"marker"]


def test_bad_messages_do_not_stop_the_receive_loop(embedded, run_id):
    good = Inbox()

    def handler(topic, payload):
        good(topic, decode(payload))  # raises ProtocolError on garbage

    topic = T.device_topic(run_id, "d1", "hello")
    with _client(embedded.url, "cloud") as cloud, _client(embedded.url, "d1") as dev:
        cloud.subscribe(topic, handler)
        dev.publish(topic, b"\x00garbage")
        dev.publish(topic, b'{"protocol": 9}')
        dev.publish(topic, encode(Presence(run_id=run_id, sender="d1", device_id="d1", status="online")))
        assert good.wait(1)[0][1].status == "online"


def test_unreachable_broker_fails_fast_with_one_line():
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        MqttTransport("mqtt://127.0.0.1:1999", "nobody").connect()
    assert str(info.value) == "cannot reach broker mqtt://127.0.0.1:1999: connection refused"
    assert time.monotonic() - t0 < 2


def test_publish_before_connect_is_a_transport_error():
    with pytest.raises(TransportError, match="not connected"):
        MqttTransport("mqtt://127.0.0.1:1999", "nobody").publish("a", b"")


def test_v5_falls_back_to_311_on_amqtt(embedded, run_id):
    # amqtt is 3.1.1-only and never answers a v5 CONNECT; without ?protocol= we retry in 3.1.1.
    plain = embedded.url.split("?")[0]
    got = Inbox()
    with _client(plain, "x", connect_timeout=0.5) as t:
        assert t.protocol.name == "MQTTv311"
        t.subscribe(T.control_topic(run_id), got)
        t.publish(T.control_topic(run_id), b"end")
        got.wait(1)


def test_embedded_broker_restart_and_reconnect(run_id):
    got = Inbox()
    topic = T.round_topic(run_id)
    broker = EmbeddedBroker()
    url = broker.start()
    try:
        with _client(url, "dev", reconnect_delay=(1, 1)) as dev, _client(url, "cloud", reconnect_delay=(1, 1)) as cloud:
            dev.subscribe(topic, got)
            broker.stop()  # sessions are lost with the broker
            assert not _listening("127.0.0.1", broker.port)
            broker.start()  # same port
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not (dev.connected and cloud.connected):
                time.sleep(0.02)
            while len(got.items) < 1 and time.monotonic() < deadline:
                cloud.publish(topic, b"after restart")
                time.sleep(0.1)
            assert got.items and got.items[0][1] == b"after restart"
    finally:
        broker.stop()


def test_the_inflight_window_is_what_the_broker_grants(tmp_path):
    """The cloud asks for a wide window (cloud/serve.py); a broker granting less (Mosquitto's default
    Receive Maximum is 20) narrows it, and provision's broker config grants any."""
    import shutil
    import subprocess

    from fedpft.cloud.provision import broker_conf

    if not _listening("127.0.0.1", 1883) or not shutil.which("mosquitto"):
        pytest.skip("needs Mosquitto")
    with _client(MOSQUITTO, "narrow", max_inflight=1000) as t:
        assert t.inflight_window == 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # provision's limits, on an anonymous listener (its users and ACL are tested in test_security_broker)
    limits = [l for l in broker_conf(tmp_path, port).splitlines() if l.startswith("max_")]
    assert "max_inflight_messages 0" in limits  # no maximum
    (tmp_path / "m.conf").write_text("\n".join([*limits, f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", ""]))
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 10
        while not _listening("127.0.0.1", port) and time.time() < end:
            time.sleep(0.05)
        with _client(f"mqtt://127.0.0.1:{port}", "wide", max_inflight=65535) as t:
            assert t.inflight_window == 65535
        with _client(f"mqtt://127.0.0.1:{port}", "device") as t:
            assert t.inflight_window == 20  # a device keeps paho's default
    finally:
        proc.terminate()
        proc.wait(10)
