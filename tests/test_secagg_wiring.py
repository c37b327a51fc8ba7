"""The wiring of secure aggregation and DP, without processes: options, the Task's privacy field,
the round's secagg parameters, and a cut secure round on resume (the federation itself:
tests/test_secagg_federation.py)."""

from __future__ import annotations

import json
import hashlib
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from fedpft.cloud.config import ServeConfig
from fedpft.shared.messages import BlobRef, Task, TaskPrivacy, decode, encode


def task(**kw) -> Task:
    ref = BlobRef(blob_id="b", sha256="0" * 64, size=1)
    return Task(run_id="r", sender="cloud", devices=["a", "b"], bundle=ref, bundle_version="x", adapters=ref, lr=1.0,
                batch_size=1, deadline=1.0, **kw)


@pytest.mark.parametrize("kw, says", [
    (dict(dp_mode="distributed", dp_clip=1, dp_noise=1), "--dp-mode distributed needs --secure-agg"),
    (dict(dp_noise=1), "--dp-noise needs --dp-clip"),
    (dict(dp_clip=1, dp_noise=1, align_every=1), "needs --secure-agg"),
    (dict(dp_clip=1, aggregator="median"), "use --aggregator fedavg"),
    (dict(secure_agg=True, secagg_degree=3), "must be even"),
    (dict(secagg_threshold=3), "need --secure-agg"),
    (dict(dp_max_epsilon=3.0), "needs --dp-noise"),
])
def test_privacy_options_refused_with_one_line(kw, says):
    with pytest.raises(ValidationError, match=says):
        ServeConfig(bundle="b", out="o", **kw)


def test_simulate_refuses_privacy_options_before_preparing_anything():
    from fedpft.cloud.config import SimulateConfig

    with pytest.raises(ValidationError, match="needs at least 2 --clients"):
        SimulateConfig(out="o", secure_agg=True, clients=1)
    with pytest.raises(ValidationError, match="needs --secure-agg, or --align-every 0"):
        SimulateConfig(out="o", dp_clip=1.0, dp_noise=1.0)
    cfg = SimulateConfig(out="o", secure_agg=True, dp_clip=1.0, dp_noise=1.0, dp_mode="distributed")
    assert ServeConfig(bundle="b", out="o", **cfg.privacy_fields()).dp_mode == "distributed"


def test_plain_task_carries_no_privacy_key_and_a_private_one_is_signed():
    from fedpft.shared.signing import SignatureError, canonical, sign, verify
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    plain = task()
    assert "privacy" not in json.loads(encode(plain)) and b"privacy" not in canonical(plain)
    key = Ed25519PrivateKey.generate()
    private = sign(task(privacy=TaskPrivacy(secure_agg=True, clip=0.5)), key)
    got = decode(encode(private))
    assert got.privacy == TaskPrivacy(secure_agg=True, clip=0.5)
    verify(got, key.public_key(), "task")
    forged = got.model_copy(update={"privacy": TaskPrivacy(secure_agg=False)})
    with pytest.raises(SignatureError):
        verify(forged, key.public_key(), "task")


def test_distributed_noise_is_calibrated_to_a_pinned_threshold():
    from fedpft.cloud.secure_round import layout, secagg_config

    shape = layout({"w": ((4, 2), "float32")}, {1: 8}, report_stats=True)
    assert list(shape) == ["__secagg__.weight", "__stats__.layer.1.off_counts", "__stats__.layer.1.positions", "w"]
    cfg = ServeConfig(bundle="b", out="o", secure_agg=True, dp_clip=0.5, dp_noise=2.0, dp_mode="distributed")
    c = secagg_config(cfg, shape, n_devices=10, max_weight=40)
    assert c.threshold == 7 and c.clip == 0.5 and c.noise_std == pytest.approx(2.0 * 0.5 / np.sqrt(7))
    plain = secagg_config(ServeConfig(bundle="b", out="o", secure_agg=True), shape, n_devices=10, max_weight=40)
    assert plain.clip is None and plain.noise_std == 0 and plain.threshold is None and plain.value_bound >= 40 * 100


def test_a_secure_round_cut_by_a_restart_is_restarted_and_its_state_deleted(tmp_path, caplog):
    from fedpft.cloud import secagg_store
    from fedpft.cloud.private_rounds import PrivateRounds
    from fedpft.cloud.secagg import SecAggConfig, SecAggCoordinator
    from fedpft.cloud.secure_round import state_path

    cfg = ServeConfig(bundle="b", out=tmp_path, secure_agg=True)
    coord = SecAggCoordinator("r", 2, "t2", ["a", "b"], SecAggConfig({"w": (3,)}, 10.0))
    secagg_store.write(state_path(cfg), coord)
    rounds = PrivateRounds(SimpleNamespace(cfg=cfg))
    with caplog.at_level(logging.WARNING):
        rounds.on_resume()
    assert not state_path(cfg).exists()
    assert "secure aggregation of round 2 (task t2, stage keys) was cut by a restart" in caplog.text


# ---- the live round loop's secure stages, in process: real Federation, fake devices over the in-memory hub ----


def secure_device(hub, name: str, manifest, delta: dict, n: int, behaviour: str = "honest"):
    """A device that runs SecAggParticipant's stages on the hub's handler threads. behaviour:
    honest; `plain` also sends a plain update (refused unread); `replay` sends a second, different
    masked input; `drop` leaves after its shares were routed (its last will)."""
    from fedpft.edge.secagg import SecAggParticipant
    from fedpft.shared import topics
    from fedpft.shared.chunks import BlobSource
    from fedpft.shared.codec import encode_tensors
    from fedpft.shared.messages import Presence, SecAggMasked, SecAggRoster, SecAggRouted, SecAggUnmask
    from test_security_hostile import RUN, Device

    part = SecAggParticipant(RUN, name)

    def upload(msg, blob):
        dev.pub(topics.SECAGG, msg)
        for payload in BlobSource(msg.blob.blob_id, blob, chunk_size=8192).payloads():
            dev.raw(topics.upload_topic(RUN, name, msg.blob.blob_id), payload)

    def on_task(dev, task):
        dev.pub(topics.SECAGG, part.keys(task.round_id, task.task_id))
        if behaviour == "plain":
            dev.update(task.round_id, encode_tensors({k: v.astype(np.float32) for k, v in delta.items()}))

    def on_cloud(topic, payload):
        msg = decode(payload)
        if isinstance(msg, SecAggRoster):
            dev.pub(topics.SECAGG, part.on_roster(msg))
        elif isinstance(msg, SecAggRouted):
            part.on_routed(msg)
            if behaviour == "drop":
                return dev.pub(topics.PRESENCE, Presence(run_id=RUN, sender=name, device_id=name, status="offline",
                                                         reason="connection lost"), retain=True)
            masked, blob = part.masked_update(delta, n, None)
            upload(masked, blob)
            if behaviour == "replay":
                other = blob[:-8] + bytes(8)
                sha = hashlib.sha256(other).hexdigest()
                upload(SecAggMasked(**{**masked.model_dump(), "blob": {"blob_id": f"sa-{sha[:24]}", "sha256": sha, "size": len(other)}}), other)
        elif isinstance(msg, SecAggUnmask):
            dev.pub(topics.SECAGG, part.on_unmask(msg))

    dev = Device(hub, name, manifest, on_task)
    dev.t.subscribe(topics.secagg_topic(RUN), on_cloud)
    dev.t.subscribe(topics.device_topic(RUN, name, topics.INBOX), on_cloud)
    return dev


def test_secure_round_in_the_live_loop_recovers_a_drop_and_refuses_plain_and_replayed_inputs(tiny_bert_bundle, tmp_path, caplog):
    from fedpft.cloud.server import Federation
    from fedpft.shared.codec import decode_tensors
    from fedpft.shared.manifest import BundleManifest
    from fedpft.shared.transport import InMemoryHub
    from test_security_hostile import RUN

    manifest = BundleManifest.load(tiny_bert_bundle)
    ref = decode_tensors((tiny_bert_bundle / manifest.files["adapters_init"].path).read_bytes())[0]
    rng = np.random.default_rng(1)
    deltas = {d: {t.key: rng.standard_normal(t.shape) * 0.01 for t in manifest.trainable} for d in ("s0", "s1", "s2", "s3")}
    samples = {"s0": 10, "s1": 30, "s2": 20, "s3": 10}
    hub = InMemoryHub(threaded=True)
    devs = [secure_device(hub, d, manifest, deltas[d], samples[d], b)
            for d, b in (("s0", "plain"), ("s1", "replay"), ("s2", "honest"), ("s3", "drop"))]
    cloud = hub.transport("cloud")
    cloud.connect()
    fed = Federation(ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", run_id=RUN, rounds=1, min_clients=3,
                                 round_timeout=60, wait_for_clients=10, chunk_size=8192, secure_agg=True,
                                 secagg_stage_timeout=20), cloud, show_progress=False)
    fed.subscribe()
    for d in devs:
        d.hello()
    with caplog.at_level(logging.INFO, logger="fedpft"):
        t0 = time.time()
        state = fed.run()
    hub.join()
    rec = state.history[-1]
    assert time.time() - t0 < 30, rec
    assert rec["devices"] == ["s0", "s1", "s2"] and rec["secagg_dropped"] == ["s3"], rec
    assert any("another masked input from this device is already counted" in r for r in rec["secagg_rejected"]), rec
    assert "this run uses secure aggregation: send a masked input, not a plain update" in caplog.text
    got = fed.store.read_tensors(state.adapters)
    w = {d: samples[d] for d in ("s0", "s1", "s2")}
    for k in ref:
        want = ref[k].astype(np.float64) + sum(w[d] * deltas[d][k] for d in w) / sum(w.values())
        assert np.max(np.abs(got[k] - want)) < 1e-6, k
    assert not (tmp_path / "run" / "updates").exists() and not (tmp_path / "run" / "secagg-state.safetensors").exists()
