"""The Mosquitto config `fedpft-cloud provision` writes, run by a real Mosquitto: client id bound to
the user name, a plain listener only on the address named, a TLS listener only with certificates."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpft.cloud.cli import app
from fedpft.cloud.provision import CLOUD_USER, CONF, ProvisionError, listeners, provision
from fedpft.shared.transport import TransportError
from test_security_broker import free_port, make_ca, make_server_cert, wait_listening

pytestmark = pytest.mark.security
runner = CliRunner()
MOSQUITTO = shutil.which("mosquitto", path="/usr/sbin:/usr/bin")


def conf_lines(folder: Path) -> list[str]:
    return [l for l in (folder / CONF).read_text().splitlines() if l and not l.startswith("#")]


def listener_blocks(folder: Path) -> dict[str, list[str]]:
    """`listener ...` line -> the settings that follow it (Mosquitto applies them to that listener)."""
    blocks: dict[str, list[str]] = {}
    for line in conf_lines(folder):
        if line.startswith("listener "):
            blocks[line] = current = []
        elif blocks:
            current.append(line)
    return blocks


def test_default_conf_binds_plain_to_loopback_and_has_no_tls(tmp_path):
    res = runner.invoke(app, ["provision", "--device", "dev1", "--run", "r", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "allow_anonymous false" in conf_lines(tmp_path)
    assert listener_blocks(tmp_path) == {"listener 1883 127.0.0.1": ["use_username_as_clientid true"]}
    assert "no TLS listener" in res.output


def test_tls_listener_only_with_certificate_and_key(tmp_path):
    ca, ca_cert, ca_key = make_ca(tmp_path, "ca")
    crt, key = make_server_cert(tmp_path, ca_cert, ca_key)
    res = runner.invoke(app, ["provision", "--device", "dev1", "--out", str(tmp_path / "b"), "--bind", "10.0.0.5",
                              "--certfile", str(crt), "--keyfile", str(key), "--cafile", str(ca)])
    assert res.exit_code == 0, res.output
    assert listener_blocks(tmp_path / "b") == {
        "listener 1883 10.0.0.5": ["use_username_as_clientid true"],
        "listener 8883 0.0.0.0": ["use_username_as_clientid true", f"cafile {ca.resolve()}", f"certfile {crt.resolve()}",
                                  f"keyfile {key.resolve()}"],
    }
    assert "TLS listener 0.0.0.0:8883" in res.output


@pytest.mark.parametrize("args, message", [
    (["--certfile", "CRT"], "--certfile and --keyfile go together"),
    (["--cafile", "CRT"], "--cafile needs --certfile"),
    (["--bind", "0.0.0.0\nallow_anonymous true"], "--bind"),
    (["--tls-bind", "a b"], "--tls-bind"),
    (["--port", "70000"], "--port 70000"),
    (["--certfile", "CRT", "--keyfile", "missing.key"], "--keyfile"),
])
def test_bad_listener_options_are_one_line_and_write_nothing(tmp_path, args, message):
    crt = tmp_path / "server.crt"
    crt.write_text("not checked here\n")
    args = [str(crt) if a == "CRT" else a for a in args]
    res = runner.invoke(app, ["provision", "--device", "dev1", "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before any file is touched


def test_conf_from_before_the_client_id_rule_is_rewritten_and_a_current_one_is_kept(tmp_path):
    (tmp_path / CONF).write_text("allow_anonymous false\nlistener 8883\n")  # what provision used to write
    res = provision(tmp_path, "dev1", "r")
    assert res.conf is not None and list(listener_blocks(tmp_path)) == ["listener 1883 127.0.0.1"]
    provision(tmp_path, "dev1", "r", listeners=listeners(bind="192.168.1.2", port=1884))
    again = provision(tmp_path, "dev2", "r")  # no listener options: the chosen listener stays
    assert again.conf is None and "listener 1884 192.168.1.2" in conf_lines(tmp_path)
    with pytest.raises(ProvisionError, match="both 1883"):
        listeners(port=1883, tls_port=1883, certfile=res.password_file, keyfile=res.password_file)


@pytest.fixture
def mosquitto_with_generated_conf(tmp_path):
    """Mosquitto run on exactly the config provision wrote (plus a user and stderr logging)."""
    if MOSQUITTO is None:
        pytest.skip("needs the mosquitto binary")
    ca, ca_cert, ca_key = make_ca(tmp_path, "ca")
    crt, key = make_server_cert(tmp_path, ca_cert, ca_key)
    port, tls_port = free_port(), free_port()
    creds = tmp_path / "creds"
    devs = {d: provision(creds, d, "r") for d in ("dev1", "dev2")}
    provision(creds, "dev1", "r", listeners=listeners(bind="127.0.0.1", port=port, tls_bind="127.0.0.1",
                                                      tls_port=tls_port, certfile=crt, keyfile=key))
    devs["dev1"] = provision(creds, "dev1", "r")  # a new password; the conf stays
    conf = tmp_path / "run.conf"
    log = tmp_path / "mosquitto.log"
    conf.write_text(f"user {getpass.getuser()}\npersistence false\nlog_dest file {log}\n" + (creds / CONF).read_text())
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        wait_listening(tls_port, proc)
        pw = {d: p.password_file.read_text().strip() for d, p in devs.items()}
        pw[CLOUD_USER] = devs["dev1"].cloud_password_file.read_text().strip()
        yield {"url": f"mqtt://127.0.0.1:{port}", "tls_url": f"mqtts://127.0.0.1:{tls_port}", "ca": ca, "pw": pw, "log": log}
    finally:
        proc.terminate()
        proc.wait(10)


def _connect(url: str, user: str, password: str, client_id: str, **kw):
    from fedpft.shared.mqtt import MqttTransport

    t = MqttTransport(url, client_id=client_id, clean_start=True, username=user, password=password,
                      connect_timeout=3, publish_timeout=3, **kw)
    t.connect()
    return t


def test_generated_conf_keeps_a_device_online_when_another_takes_its_client_id(mosquitto_with_generated_conf):
    b = mosquitto_with_generated_conf
    dev2 = _connect(b["url"], "dev2", b["pw"]["dev2"], client_id="dev2")
    intruder = _connect(b["url"], "dev1", b["pw"]["dev1"], client_id="dev2")  # dev1's credentials, dev2's id
    try:
        time.sleep(1.0)  # a takeover would disconnect dev2 at once
        dev2.publish("fedpft/r/device/dev2/hello", b"{}")
        assert "already connected" not in b["log"].read_text()  # Mosquitto's line for a takeover
        # TLS answers on its own port with the generated certificate
        tls = _connect(b["tls_url"], CLOUD_USER, b["pw"][CLOUD_USER], client_id="c", ca=str(b["ca"]))
        tls.close()
        with pytest.raises(TransportError):
            _connect(b["url"], "dev1", "wrong password", client_id="x")
    finally:
        intruder.close()
        dev2.close()


def test_plain_listener_is_not_reachable_on_other_addresses(mosquitto_with_generated_conf):
    port = int(mosquitto_with_generated_conf["url"].rsplit(":", 1)[1])
    try:
        other = socket.gethostbyname(socket.gethostname())
    except OSError:
        pytest.skip("no non-loopback address")
    if other.startswith("127."):
        pytest.skip("the host name resolves to loopback only")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=1).close()
