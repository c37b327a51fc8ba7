"""The scale benchmark's simulated devices encode their updates without safetensors' Python layer
(benchmarks/simdevice.py, UpdateLayout): the bytes must still be what the cloud accepts, the
same tensors and metadata as `encode_tensors` gives."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedpft.shared.codec import decode_tensors, encode_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from simdevice import UpdateLayout  # noqa: E402


@pytest.mark.parametrize("meta", [{}, {"device": "dev-0001", "round": "3", "task": "ab" * 8, "num_samples": "117"}])
def test_update_layout_bytes_decode_as_encode_tensors_does(meta):
    rng = np.random.default_rng(0)
    shapes = {"layer.0.lora_A": (8, 384), "layer.0.lora_B": (384, 8), "head.bias": (13,), "head.weight": (13, 384),
              "z.one": (1,)}
    template = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    layout = UpdateLayout(template)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fast = layout.encode(layout.flat(tensors), meta)
    want_t, want_m = decode_tensors(encode_tensors(tensors, meta))
    got_t, got_m = decode_tensors(fast)
    assert got_m == want_m
    assert set(got_t) == set(want_t)
    for k in want_t:
        assert got_t[k].dtype == want_t[k].dtype and got_t[k].shape == want_t[k].shape
        np.testing.assert_array_equal(got_t[k], want_t[k])
    assert int.from_bytes(fast[:8], "little") % 8 == 0  # the header padded to 8 bytes, as safetensors does


def test_update_layout_refuses_nothing_silently():
    layout = UpdateLayout({"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError):
        layout.encode(np.zeros(5, np.float32), {})  # a vector that does not fill the tensors
