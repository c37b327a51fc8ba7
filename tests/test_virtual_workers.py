"""Virtual clients training in worker processes (`fedpft.sim.workers`): with dropout in the graph,
a round trained in a worker equals the same round trained alone in this process, bit for bit, also
while another client trains at the same time in the other worker; a failed round keeps its error
type and what it logged; a worker that dies fails its round and is replaced at the next."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import write_text_data
from fedpft.edge.task_training import make_trainer
from fedpft.edge.trainer import open_session
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.message_base import BlobRef
from fedpft.shared.messages import Task
from fedpft.shared.records import DataError
from fedpft.sim.workers import WorkerDied, WorkerPool

REF = BlobRef(blob_id="b1", sha256="0" * 64, size=10)


def assert_same_update(a: bytes, b: bytes) -> None:
    """The same tensors, bit for bit (the blobs' metadata differ in the seconds the round took)."""
    ta, tb = decode_tensors(a)[0], decode_tensors(b)[0]
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def task(devices: list[str], seed: int = 5) -> Task:
    return Task(run_id="w", round_id=2, sender="cloud", devices=devices, bundle=REF, bundle_version="v:1", adapters=REF,
                epochs=2, lr=5e-3, batch_size=4, seed=seed, report_stats=True, deadline=time.time() + 600)


def agent_cfg(tmp_path, dev: str, n: int = 40) -> AgentConfig:
    data = write_text_data(tmp_path / f"{dev}.jsonl", n=n, seed=len(dev))
    return AgentConfig(broker="memory://", device_id=dev, data=data, cache=tmp_path / dev, run_id="w", threads=1)


@pytest.fixture
def pool():
    p = WorkerPool(2, threads=1)
    yield p
    p.close()


def test_rounds_in_workers_draw_the_masks_they_would_alone(tmp_path, tiny_bert_dropout_bundle, pool):
    """Two clients training at once in two workers, twice: every update equals the one trained
    alone in this process, byte for byte (the masks are seeded per client and round, and with
    threads of one process the two clients' steps drew from one generator in turns)."""
    bundle = tiny_bert_dropout_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    cfgs = [agent_cfg(tmp_path, dev, n=60) for dev in ("dev-a", "dev-b")]
    t = task([c.device_id for c in cfgs])
    alone = {c.device_id: make_trainer(c)(bundle, t, adapters, None) for c in cfgs}

    for _ in range(2):
        got, errors = {}, []

        def train(c):
            try:
                got[c.device_id] = pool.trainer(c, weight=1)(bundle, t, adapters, None)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=train, args=(c,)) for c in cfgs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors
        for dev, (update, fields) in alone.items():
            assert_same_update(got[dev][0], update)
            assert got[dev][1] == fields
    assert pool.started == 2


def test_a_failed_round_keeps_its_error_and_its_log(tmp_path, tiny_bert_bundle, pool, caplog):
    bundle = tiny_bert_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no label here"}\n')
    bad = AgentConfig(broker="memory://", device_id="dev-e", data=empty, cache=tmp_path / "e", run_id="w", threads=1)
    with pytest.raises(DataError, match="no usable"):
        pool.trainer(bad, 1)(bundle, task(["dev-e"]), adapters, None)
    good = agent_cfg(tmp_path, "dev-g")
    with caplog.at_level(logging.INFO, logger="fedpft.agent"):
        update, fields = pool.trainer(good, 1)(bundle, task(["dev-g"]), adapters, None)
    assert fields["steps"] > 0 and update
    # the worker's log line, logged again in this process (where device_logs routes it by thread)
    assert any(r.name == "fedpft.agent" and r.getMessage().startswith("round 2: ") for r in caplog.records)


def test_a_dead_worker_fails_its_round_and_is_replaced(tmp_path, tiny_bert_bundle, caplog):
    bundle = tiny_bert_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    cfg = agent_cfg(tmp_path, "dev-k")
    pool = WorkerPool(1, threads=1)
    try:
        first = pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)
        w = pool.workers[0]
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(10)
        with pytest.raises(WorkerDied, match="worker 0 .* exited during round 2"):
            w.train(cfg, bundle, task(["dev-k"]), adapters, None)
        with caplog.at_level(logging.WARNING, logger="fedpft.simulate"):
            again = pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)
        assert "had exited; starting a new one" in caplog.text
        assert_same_update(again[0], first[0])
        assert again[1] == first[1] and pool.started == 2
    finally:
        pool.close()
    assert pool.workers == [None] and not w.proc.is_alive()
    with pytest.raises(WorkerDied, match="shutting down"):
        pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)
