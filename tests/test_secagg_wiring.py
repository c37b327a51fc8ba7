"""The wiring of secure aggregation and DP, without processes: options, the Task's privacy field,
the round's secagg parameters, and a cut secure round on resume (the federation itself:
tests/test_secagg_federation.py)."""

from __future__ import annotations

import json
import logging
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
