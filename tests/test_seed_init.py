"""A run's seed draws its initial adapters, even on a bundle prepared once with another seed."""

from __future__ import annotations

import numpy as np

from fedpft.cloud.config import ServeConfig
from fedpft.cloud.server import Federation
from fedpft.modeling.adapters import redraw_adapters
from fedpft.shared.codec import decode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.transport import InMemoryHub


def bundle_init(bundle) -> dict[str, np.ndarray]:
    m = BundleManifest.load(bundle)
    return decode_tensors((bundle / m.files["adapters_init"].path).read_bytes())[0]


def test_redraw_follows_the_initialisers_of_add_adapters(tiny_bert_bundle):
    """Same keys, shapes and dtypes; LoRA A uniform within peft's bound with its spread; B and the head
    bias kept; a seed gives the same values every time and another seed others."""
    init = bundle_init(tiny_bert_bundle)
    new = redraw_adapters(init, seed=7, head_std=0.02)
    assert {k: (v.shape, v.dtype) for k, v in new.items()} == {k: (v.shape, v.dtype) for k, v in init.items()}
    a_keys = [k for k in init if "lora_A" in k]
    assert a_keys and all(not np.array_equal(new[k], init[k]) for k in a_keys)
    for k in a_keys:
        bound = 1 / np.sqrt(init[k].shape[1])
        assert np.abs(new[k]).max() <= bound and np.abs(init[k]).max() <= bound
    drawn, torch_drawn = np.concatenate([new[k].ravel() for k in a_keys]), np.concatenate([init[k].ravel() for k in a_keys])
    assert abs(drawn.std() / torch_drawn.std() - 1) < 0.1
    for k in init:
        if "lora_B" in k or k.endswith("classifier.bias"):
            np.testing.assert_array_equal(new[k], init[k])
    head = [k for k in init if k.endswith("classifier.weight")]
    assert head and not np.array_equal(new[head[0]], init[head[0]])
    again, other = redraw_adapters(init, 7, 0.02), redraw_adapters(init, 8, 0.02)
    assert all(np.array_equal(again[k], new[k]) for k in init)
    assert not all(np.array_equal(other[k], new[k]) for k in a_keys)


def test_serve_starts_from_the_bundle_adapters_only_at_the_bundle_seed(tiny_bert_bundle, tmp_path):
    init = bundle_init(tiny_bert_bundle)  # the tests' bundles are prepared with seed 0
    got = {}
    for seed in (0, 3):
        cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / f"s{seed}", run_id=f"seed-{seed}", rounds=1, seed=seed)
        fed = Federation(cfg, InMemoryHub().transport("cloud"), show_progress=False)
        got[seed] = fed.store.read_tensors(fed.initial_state().adapters)
    assert all(np.array_equal(got[0][k], v) for k, v in init.items())
    assert not all(np.array_equal(got[3][k], v) for k, v in init.items())
    with_fm_std = redraw_adapters(init, 3, 0.02)  # the tiny BERT's initializer_range
    assert all(np.array_equal(got[3][k], with_fm_std[k]) for k in init)
