"""Signed content: the cloud signs the bundle manifest and every Task (Ed25519); a device with
--trust-key refuses unsigned or tampered ones with a one-line error that reaches the cloud as
an Update error; a device without one accepts everything after one warning (development mode)."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from fedpft.cloud import fanout
from fedpft.cloud.config import ServeConfig
from fedpft.cloud.server import Federation
from fedpft.edge.agent import EdgeAgent
from fedpft.shared import topics
from fedpft.shared.codec import encode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.manifest import BundleManifest, verify_bundle
from fedpft.shared.messages import BlobRef, ProtocolError, Task, Update, decode
from fedpft.shared.signing import (
    SignatureError, generate_keypair, key_id, load_private_key, load_public_key, sign, sign_bundle, verify,
)
from fedpft.shared.transport import InMemoryHub

from conftest import copy_bundle

pytestmark = pytest.mark.security
RUN = "signed"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private, public paths) of the cloud's key, and of an impostor's."""
    root = tmp_path_factory.mktemp("keys")
    return generate_keypair(root / "cloud"), generate_keypair(root / "impostor")


@pytest.fixture(scope="module")
def signed_bundle(tiny_bert_bundle, tmp_path_factory, keys):
    folder = copy_bundle(tiny_bert_bundle, tmp_path_factory.mktemp("signed") / "bundle")
    sign_bundle(folder, load_private_key(keys[0][0]))
    return folder


def test_keys_are_private_and_keygen_refuses_to_overwrite(keys):
    (priv, pub), _ = keys
    assert priv.stat().st_mode & 0o777 == 0o600
    assert len(key_id(load_public_key(pub))) == 16
    with pytest.raises(FileExistsError):
        generate_keypair(priv.parent)
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_key(priv)  # a private key given as --trust-key is a clear error


def test_manifest_signature_covers_every_file_hash(signed_bundle, keys):
    (_, pub), (_, other_pub) = keys
    m = verify_bundle(signed_bundle)
    verify(m, load_public_key(pub), "bundle")
    entry = m.files["training_model"].model_copy(update={"sha256": "0" * 64})
    tampered = m.model_copy(update={"files": {**m.files, "training_model": entry}})
    with pytest.raises(SignatureError, match="does not verify .* \\(tampered\\)"):
        verify(tampered, load_public_key(pub), "bundle")
    with pytest.raises(SignatureError, match="signed by key .* not by the trusted key"):
        verify(m, load_public_key(other_pub), "bundle")
    # survives the trip through JSON on disk
    verify(BundleManifest.model_validate_json(json.dumps(json.loads((signed_bundle / "manifest.json").read_text()))),
           load_public_key(pub), "bundle")


def _task(**kw) -> Task:
    ref = BlobRef(blob_id="adapters-r0-0", sha256="a" * 64, size=10)
    base = dict(run_id=RUN, round_id=0, sender="cloud", devices=["dev"], bundle=ref, bundle_version="x:1", adapters=ref,
                lr=1e-3, batch_size=4, deadline=time.time() + 60)
    return Task(**{**base, **kw})


def _agent(hub, tmp_path, trust_key=None, trainer=None) -> EdgeAgent:
    cfg = AgentConfig(broker="mqtt://unused:1", device_id="dev", data=tmp_path / "data.jsonl", run_id=RUN,
                      cache=tmp_path / "cache", trust_key=trust_key, fetch_timeout=20, ack_timeout=5, heartbeat=0.5)
    t = hub.transport("dev")
    t.connect()
    return EdgeAgent(cfg, t, trainer or (lambda *a: pytest.fail("must not train")), num_samples=4)


def _errors(hub: InMemoryHub) -> list[str]:
    return [m.error for topic, p in hub.published if topic.endswith("/dev/update") for m in [decode(p)] if isinstance(m, Update) and m.error]


@pytest.mark.parametrize("case", ["unsigned", "tampered_ffn", "impostor"])
def test_device_refuses_unsigned_or_tampered_task(tmp_path, keys, caplog, case):
    (priv, pub), (other_priv, _) = keys
    hub = InMemoryHub()
    agent = _agent(hub, tmp_path, trust_key=pub)
    task = _task()
    if case == "tampered_ffn":  # signed, then the FFN blob swapped for an attacker's
        task = sign(task, load_private_key(priv)).model_copy(update={"ffn": BlobRef(blob_id="ffn-evil", sha256="e" * 64, size=5)})
    elif case == "impostor":
        task = sign(task, load_private_key(other_priv))
    with caplog.at_level(logging.INFO, logger="fedpft"):
        assert agent.handle_task(task) == 0
    reason = {"unsigned": "is not signed", "tampered_ffn": "(tampered); refused", "impostor": "not by the trusted key"}[case]
    (error,) = _errors(hub)
    assert reason in error and "\n" not in error
    assert any(reason in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_without_trust_key_the_device_warns_once_and_accepts(tmp_path, caplog):
    hub = InMemoryHub()
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        agent = _agent(hub, tmp_path)
    assert [r.getMessage() for r in caplog.records].count("no --trust-key: unsigned tasks and bundles are accepted (development mode)") == 1
    agent.link.check_signed(_task(), "task")  # no error


def _run(bundle, tmp_path, hub, signing_key, trust_key, trainer):
    """A real Federation and a real EdgeAgent (fake trainer) over the threaded in-memory hub."""
    agent = _agent(hub, tmp_path, trust_key=trust_key, trainer=trainer)
    th = threading.Thread(target=agent.serve, daemon=True)
    th.start()
    cloud = hub.transport("cloud")
    cloud.connect()
    cfg = ServeConfig(bundle=bundle, out=tmp_path / "run", run_id=RUN, rounds=1, min_clients=1, round_timeout=30,
                      wait_for_clients=10, max_round_retries=0, chunk_size=1 << 16, signing_key=signing_key)
    state = Federation(cfg, cloud, show_progress=False).run()
    th.join(20)
    assert not th.is_alive()
    return state.history[-1]


def _decoded(payload: bytes):
    try:
        return decode(payload)
    except ProtocolError:
        return None  # chunks


def _trainer(calls):
    def train(bundle_dir, task, adapters, ffn):
        m = BundleManifest.load(bundle_dir)
        calls.append(task.round_id)
        return encode_tensors({t.key: np.zeros(t.shape, t.dtype) for t in m.trainable}), {"num_samples": 4}
    return train


@pytest.mark.parametrize("addressed", [False, True], ids=["round-topic-task", "inbox-task"])
def test_signed_bundle_and_tasks_train_end_to_end(signed_bundle, tmp_path, keys, caplog, monkeypatch, addressed):
    """Either form of the Task (cloud/fanout.py) is signed and accepted: addressed copies each carry
    their own signature over the one device they name."""
    (priv, pub), _ = keys
    if addressed:
        monkeypatch.setattr(fanout, "TASK_BROADCAST_MAX", 0)
    hub = InMemoryHub(threaded=True)
    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="fedpft"):
        record = _run(signed_bundle, tmp_path, hub, priv, pub, _trainer(calls))
    assert calls == [0] and record["clients"] == 1, record
    assert not [r for r in caplog.records if "not signed" in r.getMessage()]
    tasks = [(tp, m) for tp, p in hub.published for m in [_decoded(p)] if isinstance(m, Task)]
    want = topics.device_topic(RUN, "dev", topics.INBOX) if addressed else topics.round_topic(RUN)
    assert [tp for tp, _ in tasks] == [want] and tasks[0][1].signature


def test_unsigned_bundle_is_refused_and_the_cloud_logs_why(tiny_bert_bundle, tmp_path, keys, caplog):
    (priv, pub), _ = keys
    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="fedpft"):
        record = _run(tiny_bert_bundle, tmp_path, InMemoryHub(threaded=True), priv, pub, _trainer(calls))
    assert calls == [] and record["clients"] == 0 and "skipped" in record
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("device dev failed round 0: bundle ") and "is not signed" in m for m in said), said
    assert any("the bundle is not signed by --signing-key" in m for m in said)
    assert not (tmp_path / "cache" / "bundles").exists() or not any((tmp_path / "cache" / "bundles").iterdir())


def test_prepare_signs_the_manifest_and_keeps_the_key_path_out(tiny_bert_dir, tmp_path, keys):
    from conftest import make_bundle

    (priv, pub), _ = keys
    bundle = make_bundle(str(tiny_bert_dir), tmp_path / "bundle", signing_key=priv)
    m = verify_bundle(bundle)
    verify(m, load_public_key(pub), "bundle")
    assert "signing_key" not in m.config and str(priv) not in (bundle / "prepare_config.json").read_text()
