"""The contract pieces both sides share: routes, update metadata, atomic writes, broker config."""

import os
import stat

import pytest

from fedpft.shared import topics as T
from fedpft.shared.config import AgentConfig, BrokerConfig, ServeConfig
from fedpft.shared.fsio import atomic_write
from fedpft.shared.messages import Ack, BlobRequest, DeviceStatus, Hello, Presence, ProtocolError, Rollout, Task, Update
from fedpft.shared.mqtt import MqttTransport
from fedpft.shared.routes import FLEET_ROUTES, RUN_ROUTES, check_fleet_route, check_route
from fedpft.shared.update import UpdateMeta


def _hello(device="d1", run="r"):
    return Hello(run_id=run, sender=device, device_id=device, num_samples=3)


def test_every_device_kind_has_a_route():
    assert set(RUN_ROUTES) == T.DEVICE_KINDS | T.BROADCAST_KINDS
    assert set(FLEET_ROUTES) == T.FLEET_DEVICE_KINDS | {T.ROLLOUT}


def test_a_message_on_its_own_topic_passes():
    parsed = check_route(T.device_topic("r", "d1", T.HELLO), _hello())
    assert parsed == ("r", "d1", T.HELLO)
    ack = Ack(run_id="r", sender="cloud", device_id="d1", acked="update")
    assert check_route(T.device_topic("r", "d1", T.INBOX), ack).kind == T.INBOX


@pytest.mark.parametrize("topic,msg,why", [
    (T.device_topic("r", "d1", T.UPDATE), _hello(), "does not belong on a update topic"),
    (T.device_topic("r", "d1", T.HELLO), BlobRequest(run_id="r", sender="d1", device_id="d2", blob_id="b"),
     "does not belong on a hello topic"),
    (T.device_topic("r", "d1", T.BLOBREQ), BlobRequest(run_id="r", sender="d1", device_id="d2", blob_id="b"),
     "about device 'd2' on device 'd1'"),
    (T.device_topic("r", "d1", T.HELLO), _hello("d2"), "sender 'd2' published on device 'd1'"),
    (T.device_topic("r", "d1", T.HELLO), _hello(run="other"), "for run 'other'"),
    (T.round_topic("r"), Update(run_id="r", sender="d1", device_id="d1", error="x"), "does not belong on a round"),
])
def test_a_message_off_its_route_is_refused_in_one_line(topic, msg, why):
    with pytest.raises(ProtocolError, match=why):
        check_route(topic, msg)


def test_fleet_routes():
    st = DeviceStatus(run_id="f", sender="d1", device_id="d1", cohort="c", state="idle")
    assert check_fleet_route(T.fleet_device_topic("f", "d1", T.STATUS), st).device_id == "d1"
    with pytest.raises(ProtocolError, match="does not belong on a presence topic"):
        check_fleet_route(T.fleet_device_topic("f", "d1", T.PRESENCE), st)
    bye = Presence(run_id="f", sender="d1", device_id="d1", status="offline")
    with pytest.raises(ProtocolError, match="does not belong on a rollout topic"):
        check_fleet_route(T.rollout_topic("f"), bye)
    assert Rollout in FLEET_ROUTES[T.ROLLOUT] and Task in RUN_ROUTES[T.ROUND]


def test_update_meta_round_trips_and_reads_null_as_unmeasured():
    raw = {"format": "fedpft-update", "format_version": "1", "num_samples": "7", "mean_loss": "0.25",
           "acc_before": "null", "skipped_summary": "", "seconds": "1.5", "run_id": "r", "unknown": "kept out"}
    meta = UpdateMeta.parse(raw).check_format()
    assert meta.num_samples == 7 and meta.mean_loss == 0.25 and meta.acc_before is None and meta.run_id == "r"
    out = meta.to_metadata()
    assert out["acc_before"] == "null" and out["skipped_summary"] == "" and out["seconds"] == "1.500"
    assert "unknown" not in out and "task_id" not in out and out["run_id"] == "r"
    assert UpdateMeta.parse({}).num_samples == 0  # an older blob without the field weighs nothing


@pytest.mark.parametrize("raw,why", [
    ({"num_samples": "-1"}, "num_samples='-1'"),
    ({"num_samples": "many"}, "num_samples='many'"),
    ({"mean_loss": "low"}, "mean_loss='low'"),
])
def test_bad_update_meta_is_one_protocol_error(raw, why):
    with pytest.raises(ProtocolError, match=why):
        UpdateMeta.parse(raw)


@pytest.mark.parametrize("raw,why", [({}, "not a fedpft-update file"), ({"format": "fedpft-update", "format_version": "9"}, "version '9'")])
def test_update_meta_format_check(raw, why):
    with pytest.raises(ProtocolError, match=why):
        UpdateMeta.parse(raw).check_format()


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["f.bin"]


def test_atomic_write_mode_keeps_a_secret_private(tmp_path):
    path = tmp_path / "secret"
    atomic_write(path, b"pw", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_serve_and_agent_configs_are_broker_configs():
    serve = ServeConfig(bundle="b", out="o", ca="ca.pem", username="u", password="secret")
    agent = AgentConfig(broker="mqtts://h:8883", device_id="d", data="x.jsonl", cert="c.pem", key="k.pem")
    assert isinstance(serve, BrokerConfig) and isinstance(agent, BrokerConfig)
    assert serve.broker is None  # None starts the embedded broker
    assert "secret" not in serve.model_dump_json()


def test_transport_from_config():
    cfg = BrokerConfig(broker="mqtt://h:1884", ca="ca.pem", username="u", password="p")
    t = MqttTransport.from_config(cfg, "dev-1", clean_start=True)
    assert (t.url, t.client_id, t.tls, t.username, t.password, t.clean_start) == ("mqtt://h:1884", "dev-1", ("ca.pem", None, None), "u", "p", True)
    assert MqttTransport.from_config(cfg, "c", url="mqtt://127.0.0.1:1999").url == "mqtt://127.0.0.1:1999"
