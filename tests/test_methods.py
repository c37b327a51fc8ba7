"""The one method table (shared/methods.py) that prepare, simulate and serve read."""

from __future__ import annotations

import pytest

from fedpft.cloud.config import PrepareConfig, SimulateConfig
from fedpft.shared.methods import METHODS, Method, method, proxies, register_method


def test_every_method_is_a_simulate_choice_and_every_proxy_a_prepare_choice(tmp_path):
    for name, row in METHODS.items():
        sim = SimulateConfig(out=tmp_path, method=name, rounds=4)
        assert sim.resolved_align_every() == (2 if row.align else 0)
        assert PrepareConfig(model="minilm", out=tmp_path, proxy=row.proxy).proxy == row.proxy
    assert set(proxies()) == {"fedpft", "fedot", "full"}
    with pytest.raises(ValueError):
        SimulateConfig(out=tmp_path, method="fedprox")


def test_lookups_and_registration_refuse_with_one_line():
    with pytest.raises(ValueError, match="unknown method 'fedprox'; choose one of fedpft, fedot, full, noalign, layeronly"):
        method("fedprox")
    with pytest.raises(ValueError, match="registered twice"):
        register_method(Method("fedpft", "fedpft", True, True, True, ""))
    with pytest.raises(ValueError, match="must be registered first"):
        register_method(Method("sparse", "sparse-proxy", True, False, False, ""))
    assert "sparse" not in METHODS
