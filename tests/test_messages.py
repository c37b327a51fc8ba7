import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpft.shared.messages import (
    PROTOCOL_VERSION, Ack, BlobRef, BlobRequest, BundleVersion, DeviceStatus, EndOfRun, Hello, Presence, ProtocolError, Rollout,
    Task, Update, decode, encode,
)

SHA = "ab" * 32
REF = BlobRef(blob_id="b1", sha256=SHA, size=10)


def samples():
    now = time.time()
    return [
        Hello(run_id="r", sender="d1", device_id="d1", num_samples=50, capabilities={"ort": "1.19.2", "cpus": 4}, bundle_version="v1"),
        Presence(run_id="r", sender="d1", device_id="d1", status="offline", reason="last will"),
        Task(run_id="r", round_id=3, sender="cloud", devices=["d1", "d2"], bundle=REF, bundle_version="v1", adapters=REF,
             ffn=REF, epochs=1, lr=1e-3, batch_size=8, max_steps=20, deadline=now + 60),
        Update(run_id="r", round_id=3, sender="d1", device_id="d1", num_samples=50, steps=20, mean_loss=0.5,
               acc_before=0.1, acc_after=0.6, blob=REF),
        Update(run_id="r", round_id=3, sender="d1", device_id="d1", error="out of memory"),
        Ack(run_id="r", round_id=3, sender="cloud", device_id="d1", acked="update"),
        BlobRequest(run_id="r", sender="d1", device_id="d1", blob_id="b1", missing=[0, 5]),
        EndOfRun(run_id="r", round_id=10, sender="cloud"),
        Rollout(run_id="f", sender="cloud", rollout_id="ro-1", target=BundleVersion(bundle_id="abc", bundle_version=2),
                bundle=REF, cohort="canary", deadline=now + 60),
        DeviceStatus(run_id="f", sender="d1", device_id="d1", cohort="canary", installed=BundleVersion(bundle_id="abc", bundle_version=1),
                     state="failed", rollout_id="ro-1", reason="sha256 does not match"),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: m.type)
def test_round_trip(msg):
    data = encode(msg)
    back = decode(data)
    assert back == msg and type(back) is type(msg)
    assert json.loads(data)["protocol"] == PROTOCOL_VERSION


def test_redelivery_has_the_same_key():
    u = samples()[3]
    assert decode(encode(u)).key == u.key == ("update", "r", 3, "d1")


def _raw(**over):
    d = json.loads(encode(samples()[3]))
    d.update(over)
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (_raw(protocol=2), "unsupported protocol version 2"),
        (_raw(protocol=None), "unsupported protocol version"),
        (_raw(type="bogus"), "unknown message type"),
        (_raw(num_samples=-1), "num_samples"),
        (_raw(mean_loss=float("nan")), "mean_loss"),
        (_raw(acc_after=1.5), "acc_after"),
        (_raw(extra_field=1), "extra_field"),
        (_raw(error="x"), "exactly one of blob or error"),
        (_raw(sender="d2"), "differs from device_id"),
        (_raw(run_id="a/b"), "run_id"),
        (_raw(blob={"blob_id": "b", "sha256": "xyz", "size": 1}), "sha256"),
        (b"{" + b" " * 300_000 + b"}", "exceeds"),
    ],
)
def test_bad_payloads_give_one_protocol_error(payload, reason):
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason


def test_task_validation():
    t = samples()[2]
    with pytest.raises(ValueError, match="duplicates"):
        Task(**{**t.model_dump(), "devices": ["d1", "d1"]})
    with pytest.raises(ValueError):
        Task(**{**t.model_dump(), "devices": []})
    with pytest.raises(ValueError):
        Task(**{**t.model_dump(), "lr": 0})


def test_messages_are_frozen():
    with pytest.raises(ValueError):
        samples()[0].num_samples = 3  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_raises_anything_but_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["protocol", "type", "run_id", "sender", "device_id", "num_samples", "round_id"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5), st.just("hello"), st.just(1)), max_size=7))
def test_decode_fuzzed_objects(d):
    try:
        decode(json.dumps(d).encode())
    except ProtocolError:
        pass


def test_asyncapi_document_matches_the_models():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from pydantic.json_schema import models_json_schema

    from fedpft.shared.messages import MESSAGE_MODELS

    doc = yaml.safe_load((Path(__file__).parents[1] / "docs" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("2.6") and doc["info"]["version"] == str(PROTOCOL_VERSION)
    _, fresh = models_json_schema([(m, "validation") for m in MESSAGE_MODELS], ref_template="#/components/schemas/{model}")
    assert doc["components"]["schemas"] == json.loads(json.dumps(fresh["$defs"])), "regenerate docs/asyncapi.yaml"
    from fedpft.shared import topics

    names = [name.format(run="r", fleet="f", deviceId="d", blobId="b") for name in doc["channels"]]
    kinds = {topics.parse(n).kind for n in names if not n.startswith("fedpft/fleet/")}
    assert kinds == topics.BROADCAST_KINDS | topics.DEVICE_KINDS | topics.BLOB_KINDS
    fleet_kinds = {topics.parse_fleet(n).kind for n in names if n.startswith("fedpft/fleet/")}
    assert fleet_kinds == {topics.ROLLOUT, topics.RESEND} | topics.FLEET_DEVICE_KINDS


def test_rollout_shape():
    r = samples()[-2]
    with pytest.raises(ValueError, match="exactly one of cohort or devices"):
        Rollout(**{**r.model_dump(), "devices": ["d1"]})
    with pytest.raises(ValueError, match="carries no"):
        Rollout(**{**r.model_dump(), "rollback": True})
    with pytest.raises(ValueError, match="carries a bundle"):
        Rollout(**{**r.model_dump(), "bundle": None})
    assert r.addresses("anyone", "canary") and not r.addresses("anyone", "stable")
    listed = Rollout(**{**r.model_dump(), "cohort": None, "devices": ["d2"]})
    assert listed.addresses("d2", "stable") and not listed.addresses("d1", "canary")
