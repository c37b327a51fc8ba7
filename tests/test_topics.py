import pytest

from fedpft.shared import topics as T
from fedpft.shared.messages import ProtocolError
from fedpft.shared.transport import topic_matches


def test_broadcast_topics_round_trip():
    assert T.round_topic("r1") == "fedpft/r1/round"
    assert T.parse(T.round_topic("r1")) == ("r1", None, "round")
    assert T.parse(T.control_topic("r1")) == ("r1", None, "control")
    assert T.parse(T.blob_topic("r1", "bundle-v1")) == ("r1", None, "blob")
    assert T.blob_id_of(T.blob_topic("r1", "bundle-v1")) == "bundle-v1"


@pytest.mark.parametrize("kind", sorted(T.DEVICE_KINDS))
def test_device_topics_round_trip(kind):
    topic = T.device_topic("r1", "dev_7", kind)
    assert topic == f"fedpft/r1/device/dev_7/{kind}"
    run, device, parsed_kind = T.parse(topic)
    assert (run, device, parsed_kind) == ("r1", "dev_7", kind)


def test_blob_carrying_device_topics():
    up = T.upload_topic("r", "d", "upd-3")
    assert T.parse(up) == ("r", "d", "upload") and T.blob_id_of(up) == "upd-3"
    rs = T.resend_topic("r", "d", "bundle")
    assert T.parse(rs) == ("r", "d", "resend") and topic_matches(T.resend_pattern("r", "d"), rs)
    with pytest.raises(ProtocolError):
        T.blob_id_of(T.round_topic("r"))


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "..", ".", "sp ace", "$SYS", "é"])
def test_bad_ids_are_refused(bad):
    with pytest.raises(ProtocolError, match="invalid"):
        T.round_topic(bad)
    with pytest.raises(ProtocolError):
        T.device_topic("r", bad, "hello")


def test_ids_at_the_limits_are_fine():
    assert T.parse(T.device_topic("a" * 64, "A.b-c_9", "hello")).device_id == "A.b-c_9"


@pytest.mark.parametrize(
    "topic",
    ["other/r/round", "fedpft/r", "fedpft/r/nope", "fedpft/r/round/extra", "fedpft/r/device/d",
     "fedpft/r/device/d/nope", "fedpft/r/device/d/upload", "fedpft/r/blob", "fedpft/r/blob/a/b",
     "fedpft/r+/round", "fedpft/r/device/../hello"],
)
def test_parse_refuses_foreign_topics(topic):
    with pytest.raises(ProtocolError):
        T.parse(topic)


def test_patterns_match_what_they_should():
    assert topic_matches(T.all_devices_pattern("r", "update"), T.device_topic("r", "d1", "update"))
    assert not topic_matches(T.all_devices_pattern("r", "update"), T.device_topic("r", "d1", "hello"))
    assert not topic_matches(T.all_devices_pattern("r", "update"), T.device_topic("r2", "d1", "update"))
    assert topic_matches(T.all_devices_pattern("r", "upload"), T.upload_topic("r", "d1", "b"))
    assert topic_matches(T.blob_pattern("r"), T.blob_topic("r", "b"))
    assert topic_matches(T.run_pattern("r"), T.upload_topic("r", "d", "b"))
    assert topic_matches(T.device_subtree("r", "d"), T.device_topic("r", "d", "inbox"))
    with pytest.raises(ValueError):
        T.all_devices_pattern("r", "round")


def test_acl_confines_a_device_to_its_subtree():
    acl = T.device_acl("r", "d1")
    own = T.device_subtree("r", "d1")
    for w in acl["write"]:
        assert w.startswith(own[:-1])
    mine = [T.device_topic("r", "d1", k) for k in ("hello", "presence", "update", "ack", "blobreq")]
    mine.append(T.upload_topic("r", "d1", "b"))
    assert all(any(topic_matches(p, t) for p in acl["write"]) for t in mine)
    others = [T.device_topic("r", "d2", "update"), T.round_topic("r"), T.device_topic("r", "d1", "inbox")]
    assert not any(topic_matches(p, t) for p in acl["write"] for t in others)
    for t in (T.round_topic("r"), T.control_topic("r"), T.blob_topic("r", "b"), T.device_topic("r", "d1", "inbox")):
        assert any(topic_matches(p, t) for p in acl["read"])
    assert not any(topic_matches(p, T.device_topic("r", "d2", "inbox")) for p in acl["read"])


def test_check_sender_binds_json_to_topic():
    assert T.check_sender(T.device_topic("r", "d1", "update"), "r", "d1").device_id == "d1"
    with pytest.raises(ProtocolError, match="sender 'd2'"):
        T.check_sender(T.device_topic("r", "d1", "update"), "r", "d2")
    with pytest.raises(ProtocolError, match="run"):
        T.check_sender(T.device_topic("r", "d1", "update"), "other", "d1")
    T.check_sender(T.device_topic("r", "d1", "inbox"), "r", "cloud")
    T.check_sender(T.round_topic("r"), "r", "cloud")


def test_fleet_topics_round_trip_and_stay_apart_from_runs():
    assert T.rollout_topic("f1") == "fedpft/fleet/f1/rollout"
    assert T.parse_fleet(T.rollout_topic("f1")) == ("f1", None, "rollout")
    for kind in sorted(T.FLEET_DEVICE_KINDS):
        assert T.parse_fleet(T.fleet_device_topic("f1", "d1", kind)) == ("f1", "d1", kind)
        assert topic_matches(T.fleet_devices_pattern("f1", kind), T.fleet_device_topic("f1", "d9", kind))
    rs = T.fleet_resend_topic("f1", "d1", "bundle-x")
    assert T.parse_fleet(rs) == ("f1", "d1", "resend") and topic_matches(T.fleet_resend_pattern("f1", "d1"), rs)
    with pytest.raises(ProtocolError, match="fleet topic"):
        T.parse(T.rollout_topic("f1"))  # a fleet is no run ...
    with pytest.raises(ProtocolError, match="reserved"):
        T.round_topic("fleet")  # ... and no run may be called "fleet"
    for bad in ["fedpft/fleet/f1", "fedpft/fleet/f1/round", "fedpft/fleet/f1/device/d/update", "fedpft/fleet/f1/device/d/resend",
                "fedpft/fleet/f+/rollout", "fedpft/r/device/d/status", "fedpft/fleet/f1/rollout/x"]:
        with pytest.raises(ProtocolError):
            T.parse_fleet(bad)
    with pytest.raises(ValueError):
        T.fleet_device_topic("f1", "d1", "update")


def test_fleet_acl_confines_a_device_to_its_subtree():
    acl = T.fleet_device_acl("f", "d1")
    mine = [T.fleet_device_topic("f", "d1", k) for k in sorted(T.FLEET_DEVICE_KINDS)]
    assert all(any(topic_matches(p, t) for p in acl["write"]) for t in mine)
    others = [T.fleet_device_topic("f", "d2", "status"), T.rollout_topic("f"), T.fleet_resend_topic("f", "d1", "b"),
              T.fleet_device_topic("g", "d1", "status")]
    assert not any(topic_matches(p, t) for p in acl["write"] for t in others)
    assert all(any(topic_matches(p, t) for p in acl["read"]) for t in (T.rollout_topic("f"), T.fleet_resend_topic("f", "d1", "b")))
    assert not any(topic_matches(p, T.fleet_resend_topic("f", "d2", "b")) for p in acl["read"])


def test_check_fleet_sender():
    assert T.check_fleet_sender(T.fleet_device_topic("f", "d1", "status"), "f", "d1").device_id == "d1"
    with pytest.raises(ProtocolError, match="sender 'd2'"):
        T.check_fleet_sender(T.fleet_device_topic("f", "d1", "status"), "f", "d2")
    with pytest.raises(ProtocolError, match="fleet"):
        T.check_fleet_sender(T.rollout_topic("f"), "g", "cloud")
    T.check_fleet_sender(T.fleet_resend_topic("f", "d1", "b"), "f", "cloud")
