"""A real Mosquitto with what `provision` writes (password file, ACL) and TLS from a test CA:
a provisioned device publishes and subscribes on its own topics only; TLS works with the right
CA and fails with a clear TransportError with a wrong one."""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import os
import queue
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedpft.cloud.provision import CLOUD_USER, broker_conf, provision
from fedpft.shared import topics
from fedpft.shared.messages import Hello, encode
from fedpft.shared.transport import TransportError

pytestmark = [pytest.mark.security, pytest.mark.skipif(shutil.which("mosquitto", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) is None,
                                                       reason="needs the mosquitto binary")]
RUN = "acl"


FLEET = "lab"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(folder: Path, name: str) -> tuple[Path, object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(folder: Path, ca_cert, ca_key) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = folder / "server.crt", folder / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return crt, pem


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "mosquitto exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not listen on {port}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("broker")
    creds = root / "creds"
    dev1, dev2 = provision(creds, "dev1", RUN, fleet=FLEET), provision(creds, "dev2", RUN)
    ca, ca_cert, ca_key = make_ca(root, "test-ca")
    wrong_ca, _, _ = make_ca(root, "other-ca")
    crt, key = make_server_cert(root, ca_cert, ca_key)
    port, tls_port = free_port(), free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\npersistence false\nlog_dest stderr\n"
                    + broker_conf(creds, port, bind="127.0.0.1")
                    + f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n")
    exe = shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        wait_listening(tls_port, proc)
        yield {
            "url": f"mqtt://127.0.0.1:{port}", "tls_url": f"mqtts://127.0.0.1:{tls_port}", "ca": ca, "wrong_ca": wrong_ca,
            "pw": {"dev1": dev1.password_file.read_text().strip(), "dev2": dev2.password_file.read_text().strip(),
                   CLOUD_USER: dev1.cloud_password_file.read_text().strip()},
        }
    finally:
        proc.terminate()
        proc.wait(10)


def connect(broker, user: str, url: str | None = None, **kw):
    from fedpft.shared.mqtt import MqttTransport

    t = MqttTransport(url or broker["url"], client_id=f"t-{user}-{time.monotonic_ns()}", clean_start=True, username=user,
                      password=kw.pop("password", broker["pw"].get(user)), connect_timeout=3, publish_timeout=3, **kw)
    t.connect()
    return t


def inbox(t, pattern: str) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    t.subscribe(pattern, lambda topic, payload: q.put((topic, payload)))
    return q


def received_until(q: queue.Queue, sentinel: str, timeout: float = 5.0) -> list[str]:
    """Topics received up to and including `sentinel` (published after the probe, so a probe that
    got through would arrive first: one publisher's messages keep their order)."""
    seen, end = [], time.time() + timeout
    while time.time() < end:
        try:
            topic, _ = q.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(topic)
        if topic == sentinel:
            return seen
    raise AssertionError(f"sentinel {sentinel} never arrived; got {seen}")


def hello(dev: str) -> bytes:
    return encode(Hello(run_id=RUN, sender=dev, device_id=dev, num_samples=1))


@pytest.fixture
def clients(broker):
    """(cloud, dev1), connected with their provisioned credentials."""
    cloud, dev1 = connect(broker, CLOUD_USER), connect(broker, "dev1")
    yield cloud, dev1
    dev1.close()
    cloud.close()


def test_device_publishes_on_its_own_topics_only(clients):
    cloud, dev1 = clients
    seen = inbox(cloud, topics.run_pattern(RUN))
    forbidden = topics.device_topic(RUN, "dev2", topics.HELLO)
    try:
        dev1.publish(forbidden, hello("dev2"))  # MQTT 5: refused in the PUBACK; 3.1.1: dropped silently
    except TransportError:
        pass
    own = topics.device_topic(RUN, "dev1", topics.HELLO)
    dev1.publish(own, hello("dev1"))
    got = received_until(seen, own)
    assert forbidden not in got and own in got


def test_device_cannot_read_another_devices_inbox(clients):
    cloud, dev1 = clients
    other = topics.device_topic(RUN, "dev2", topics.INBOX)
    q: queue.Queue = queue.Queue()
    try:
        dev1.subscribe(other, lambda topic, payload: q.put((topic, payload)))
    except TransportError as exc:  # brokers that refuse in the SUBACK; Mosquitto 2.0 grants and never delivers
        assert "refused subscription" in str(exc)
    own = topics.device_topic(RUN, "dev1", topics.INBOX)
    dev1.subscribe(own, lambda topic, payload: q.put((topic, payload)))
    cloud.publish(other, b"secret for dev2")
    cloud.publish(own, b"for dev1")
    assert received_until(q, own) == [own]


def test_device_reads_the_runs_broadcasts(clients):
    cloud, dev1 = clients
    q = inbox(dev1, topics.round_topic(RUN))
    cloud.publish(topics.round_topic(RUN), b"task")
    assert received_until(q, topics.round_topic(RUN)) == [topics.round_topic(RUN)]


def test_fleet_device_follows_rollouts_and_writes_only_its_own_fleet_topics(broker):
    """dev1 was provisioned into the fleet, dev2 was not."""
    cloud, dev1, dev2 = connect(broker, CLOUD_USER), connect(broker, "dev1"), connect(broker, "dev2")
    try:
        rollout = topics.rollout_topic(FLEET)
        got1, got2 = inbox(dev1, rollout), queue.Queue()
        try:
            dev2.subscribe(rollout, lambda topic, payload: got2.put(topic))
        except TransportError:
            pass
        cloud.publish(rollout, b"rollout")
        assert received_until(got1, rollout) == [rollout]
        statuses = inbox(cloud, topics.fleet_devices_pattern(FLEET, topics.STATUS))
        for dev, t in (("dev2", dev2), ("dev1", dev1)):  # dev2's first: refused, so it never arrives
            try:
                t.publish(topics.fleet_device_topic(FLEET, dev, topics.STATUS), b"status")
            except TransportError:
                pass
        own = topics.fleet_device_topic(FLEET, "dev1", topics.STATUS)
        assert received_until(statuses, own) == [own]
        assert got2.empty()
    finally:
        for t in (dev2, dev1, cloud):
            t.close()


def test_wrong_password_is_refused_in_one_line(broker):
    with pytest.raises(TransportError, match="refused the connection") as err:
        connect(broker, "dev1", password="guess")
    assert "\n" not in str(err.value)


def test_tls_with_the_ca_works_and_a_wrong_ca_fails_clearly(broker):
    t = connect(broker, "dev1", url=broker["tls_url"], ca=str(broker["ca"]))
    try:
        own = topics.device_topic(RUN, "dev1", topics.HELLO)
        t.publish(own, hello("dev1"))
    finally:
        t.close()
    with pytest.raises(TransportError) as err:
        connect(broker, "dev1", url=broker["tls_url"], ca=str(broker["wrong_ca"]))
    msg = str(err.value)
    assert "cannot reach broker mqtts://127.0.0.1" in msg and "CERTIFICATE_VERIFY_FAILED" in msg and "\n" not in msg
