"""--frozen-dtype float16: frozen weight matrices stored in half precision, computed in float32.

The pure storage rule, then a real tiny-BERT bundle prepared both ways: what the device reads is
exactly the cloud's (rounded) proxy, only the frozen matrices shrink, and trainable tensors stay
float32. Training parity of the float16 bundle with torch is in test_export_parity (tiny_bert_f16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedpft.cloud.bundle_model import load_proxy
from fedpft.edge.session import load_parameters
from fedpft.export.bundle import GRAPH_PREFIX, round_frozen_
from fedpft.shared.manifest import ROLE_PARAMETERS, BundleError, BundleManifest
from fedpft.shared.precision import for_compute, for_storage, half_exact


def test_only_frozen_matrices_that_float16_holds_exactly_are_stored_as_float16():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((4, 3)).astype(np.float16).astype(np.float32)
    params = {
        "emb": exact,
        "lora": exact.copy(),  # trainable: never rounded
        "bias": exact[0].copy(),  # a vector: stays float32
        "fine": rng.standard_normal((4, 3)).astype(np.float32),  # not rounded by the cloud
        "huge": np.full((2, 2), 1e5, np.float32),  # beyond float16's range
    }
    out = for_storage(params, ["emb", "bias", "fine", "huge"], "float16")
    assert {n: str(a.dtype) for n, a in out.items()} == {
        "emb": "float16", "lora": "float32", "bias": "float32", "fine": "float32", "huge": "float32"}
    np.testing.assert_array_equal(for_compute(out["emb"]), exact)
    assert for_compute(out["emb"]).dtype == np.float32
    assert all(out[n].dtype == np.float32 for n in out if n != "emb")
    assert for_storage(params, ["emb"], "float32")["emb"].dtype == np.float32
    with pytest.raises(ValueError, match="frozen dtype"):
        for_storage(params, ["emb"], "int8")


def test_a_parameter_file_with_another_float_type_is_refused_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "parameters.safetensors"
    save_file({"w": np.zeros((2, 2), np.float64), "ids": np.arange(3, dtype=np.int64)}, str(path))
    with pytest.raises(BundleError, match="parameter 'w' stored as float64"):
        load_parameters(path)
    save_file({"w": np.ones((2, 2), np.float16), "ids": np.arange(3, dtype=np.int64)}, str(path))
    got = load_parameters(path)
    assert got["w"].dtype == np.float32 and got["ids"].dtype == np.int64


def test_half_exact_refuses_non_matrices_and_other_dtypes():
    assert not half_exact(np.zeros(3, np.float32))
    assert not half_exact(np.zeros((2, 2), np.float64))
    assert half_exact(np.zeros((2, 2), np.float32))


def test_round_frozen_rounds_matrices_and_leaves_vectors_and_out_of_range_matrices():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(1e5)
    model = torch.nn.Sequential(lin, big)
    bias = lin.bias.detach().clone()
    kept = round_frozen_(model)
    assert kept == ["1.weight"]
    w = lin.weight.detach()
    assert torch.equal(w, w.half().float()) and w.dtype == torch.float32
    assert torch.equal(lin.bias.detach(), bias)
    assert bool((big.weight == 1e5).all())


def _tensor_dtypes(bundle) -> dict[str, str]:
    m = BundleManifest.load(bundle)
    with safe_open(str(bundle / m.files[ROLE_PARAMETERS].path), framework="np") as f:
        return {k: str(f.get_tensor(k).dtype) for k in f.keys()}


def test_a_float16_manifest_says_so_where_older_devices_refuse_it_and_float32_ones_stay_unchanged(
        tiny_bert_bundle, tiny_bert_f16_bundle, tmp_path):
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedpft.shared.signing import sign, verify

    f16 = json.loads((tiny_bert_f16_bundle / "manifest.json").read_text())
    f32 = json.loads((tiny_bert_bundle / "manifest.json").read_text())
    assert f16["frozen_dtype"] == "float16" and "frozen_dtype" not in f32
    # a device from before float16 bundles validates with extra="forbid" and knows no such field;
    # from this version on, a field a device does not know is refused in one line
    assert BundleManifest.model_config["extra"] == "forbid"
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "manifest.json").write_text(json.dumps({**f16, "frozen_dtype_v2": "int4"}))
    with pytest.raises(BundleError, match=r"invalid manifest: frozen_dtype_v2: Extra inputs are not permitted \(a bundle from a newer fedpft") as err:
        BundleManifest.load(newer)
    assert "\n" not in str(err.value)
    old = BundleManifest.model_validate(f32)
    assert "frozen_dtype" not in old.model_dump(mode="json")  # and its signature covers the same bytes as before
    key = Ed25519PrivateKey.generate()
    for m in (old, BundleManifest.model_validate(f16)):
        signed = sign(m, key)
        verify(BundleManifest.model_validate_json(signed.model_dump_json()), key.public_key(), "bundle")


def test_float16_bundle_halves_the_frozen_matrices_and_nothing_else(tiny_bert_bundle, tiny_bert_f16_bundle):
    m = BundleManifest.load(tiny_bert_f16_bundle)
    assert m.config["frozen_dtype"] == "float16" and m.frozen_dtype == "float16"
    f32, f16 = _tensor_dtypes(tiny_bert_bundle), _tensor_dtypes(tiny_bert_f16_bundle)
    assert set(f32) == set(f16) and set(f32.values()) == {"float32"}
    trainable = {t.name for t in m.trainable}
    assert all(f16[n] == "float32" for n in trainable)
    halved = {n for n, d in f16.items() if d == "float16"}
    assert halved and not halved & trainable
    assert {t.name for t in m.ffn if len(t.shape) == 2} <= halved  # re-aligned FFN weights are frozen matrices too
    device = load_parameters(tiny_bert_f16_bundle / m.files[ROLE_PARAMETERS].path)
    assert {str(a.dtype) for a in device.values()} == {"float32"}
    saved = sum(a.nbytes for n, a in device.items() if n in halved) // 2
    size = {b: (b / BundleManifest.load(b).files[ROLE_PARAMETERS].path).stat().st_size for b in (tiny_bert_bundle, tiny_bert_f16_bundle)}
    assert abs(size[tiny_bert_bundle] - size[tiny_bert_f16_bundle] - saved) < 4096  # the rest is the JSON header


def test_devices_compute_with_the_clouds_rounded_proxy_exactly(tiny_bert_bundle, tiny_bert_f16_bundle):
    """The cloud's proxy (alignment, evaluation) and the devices' upcast parameters are the same numbers."""
    m = BundleManifest.load(tiny_bert_f16_bundle)
    device = load_parameters(tiny_bert_f16_bundle / m.files[ROLE_PARAMETERS].path)
    model, _ = load_proxy(tiny_bert_f16_bundle)
    cloud = {GRAPH_PREFIX + n: p.detach().numpy() for n, p in model.named_parameters()}
    common = [n for n in device if n in cloud]
    assert len(common) == len(device)
    for n in common:
        np.testing.assert_array_equal(device[n], cloud[n], err_msg=n)
    # and the rounding did change the weights: the float32 bundle of the same model differs
    f32 = load_parameters(tiny_bert_bundle / m.files[ROLE_PARAMETERS].path)
    frozen = [n for n in common if n not in {t.name for t in m.trainable} and device[n].ndim >= 2]
    assert frozen and sum(not np.array_equal(device[n], f32[n]) for n in frozen) > len(frozen) // 2


def test_simulate_passes_the_frozen_dtype_to_the_bundle_it_prepares(tmp_path):
    from fedpft.cloud.config import ServeConfig, SimulateConfig
    from fedpft.cloud.simulate import bundle_config
    from fedpft.shared.datasets import materialize

    data = materialize(tmp_path / "data")
    cfg = SimulateConfig(out=tmp_path / "run", frozen_dtype="float16")
    assert bundle_config(cfg, data, tmp_path / "bundle").frozen_dtype == "float16"
    assert bundle_config(SimulateConfig(out=tmp_path / "run"), data, tmp_path / "bundle").frozen_dtype == "float32"
    assert "frozen_dtype" not in ServeConfig.model_fields  # a bundle's storage is prepare's business


def test_simulate_says_when_the_bundle_it_is_given_was_prepared_otherwise(tiny_bert_bundle, caplog):
    import logging

    from fedpft.cloud.config import load_prepare_config
    from fedpft.cloud.simulate import warn_if_bundle_differs

    have = load_prepare_config(tiny_bert_bundle)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        warn_if_bundle_differs(tiny_bert_bundle, have)
        assert not caplog.records
        warn_if_bundle_differs(tiny_bert_bundle, have.model_copy(update={"frozen_dtype": "float16", "seed": 9}))
    assert len(caplog.records) == 1
    assert "frozen_dtype=float32 (asked float16): using it as it is" in caplog.messages[0] and "seed" not in caplog.messages[0]
