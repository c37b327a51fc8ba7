"""`serve --resume` mid-round with streaming aggregation: the persisted running sum is taken over
and the round ends with the adapters of an uninterrupted one (in-process, in-memory hub)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedpft.cloud.server import Federation
from fedpft.shared.codec import encode_tensors
from fedpft.cloud.config import ServeConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.transport import InMemoryHub
from fedpft.shared.update import bind_update
from test_robust_rounds import federation
from test_security_hostile import RUN, good_tensors, honest

pytestmark = pytest.mark.faults

DEVICES = [(f"good{i}", honest(i)) for i in range(3)]


def crashed_after_accepting_good0(bundle, out, persist: bool) -> None:
    """The run folder a cloud leaves when killed right after it accepted good0 in round 0."""
    hub = InMemoryHub()
    fed = Federation(ServeConfig(bundle=bundle, out=out, run_id=RUN, rounds=1), hub.transport("dead-cloud"), show_progress=False)
    state = fed.initial_state()
    tensors = good_tensors(BundleManifest.load(bundle), 0)
    fed.store.save_update(0, "good0", bind_update(encode_tensors(tensors), RUN, 0, "good0", "t-before"))
    if persist:
        fold = fed.strategy.begin(0, state)
        fold.add(fold.contribution("good0", tensors, 10, None, declared=10), tensors, {})
        fed.store.save_fold(0, fold.to_bytes())


@pytest.mark.parametrize("check_processes", [0, 2])  # the resumed cloud's checks: threads, or processes (partial sums)
@pytest.mark.parametrize("persist", [True, False])
def test_a_resumed_round_ends_with_the_adapters_of_an_uninterrupted_one(tiny_bert_bundle, tmp_path, caplog, persist, check_processes):
    whole, hub = federation(tiny_bert_bundle, tmp_path / "whole", DEVICES, min_clients=3)
    want = whole.store.read_tensors(whole.run().adapters)
    hub.join()

    crashed_after_accepting_good0(tiny_bert_bundle, tmp_path / "cut" / "run", persist)  # where federation() puts it
    with caplog.at_level(logging.INFO, logger="fedpft"):
        resumed, hub = federation(tiny_bert_bundle, tmp_path / "cut", DEVICES, min_clients=3, resume=True,
                                    check_processes=check_processes)
        state = resumed.run()
        hub.join()
    assert state.history[-1]["devices"] == ["good0", "good1", "good2"]
    assert any("update from good0 restored from disk" in m for m in caplog.messages)
    assert any("duplicate update from good0" in m for m in caplog.messages)  # its new answer counted once
    got = resumed.store.read_tensors(state.adapters)
    if persist:  # the sum kept what the stored blob does not say (the Update's sample count)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-8)
    else:  # refolded from the blob alone, which claims no samples: counted with weight 1, as before
        assert got.keys() == want.keys() and not all(np.allclose(got[k], v, rtol=1e-6, atol=1e-8) for k, v in want.items())
