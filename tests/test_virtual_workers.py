"""Virtual clients training in worker processes (`fedpft.sim.workers`): with dropout in the graph,
a round trained in a worker equals the same round trained alone in this process, bit for bit, also
while another client trains at the same time in the other worker; a failed round keeps its error
type and what it logged (in the device's agent.log); a worker that dies fails its round and is
replaced at the next; closing the pool ends a round in progress."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from conftest import write_text_data
from fedpft.edge.task_training import make_trainer
from fedpft.edge.trainer import open_session
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.message_base import BlobRef
from fedpft.shared.messages import Task
from fedpft.shared.records import DataError
from fedpft.edge.session import TrainError
from fedpft.sim.virtual import device_logs
from fedpft.sim.workers import RemoteTraceback, WorkerDied, WorkerPool, _plain_args, rebuild_error

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


def test_a_failed_round_keeps_its_error_and_its_log(tmp_path, tiny_bert_bundle, pool):
    bundle = tiny_bert_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no label here"}\n')
    bad = AgentConfig(broker="memory://", device_id="dev-e", data=empty, cache=tmp_path / "e", run_id="w", threads=1)
    with pytest.raises(DataError, match="no usable"):
        pool.trainer(bad, 1)(bundle, task(["dev-e"]), adapters, None)
    # the worker's log lines are logged again on the device's thread, so they land in its agent.log
    good = agent_cfg(tmp_path, "dev-g")
    got = {}
    with device_logs({"dev-g": tmp_path / "agent.log"}):
        th = threading.Thread(target=lambda: got.update(r=pool.trainer(good, 1)(bundle, task(["dev-g"]), adapters, None)), name="dev-g")
        th.start()
        th.join(120)
    assert got["r"][1]["steps"] > 0 and got["r"][0]
    assert "INFO fedpft.agent: round 2: " in (tmp_path / "agent.log").read_text()


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def remote(exc: Exception) -> tuple:
    """What a worker sends for `exc`."""
    return [(c.__module__, c.__qualname__) for c in type(exc).__mro__], _plain_args(exc), str(exc), "Traceback (most recent call last): ..."


FAIL = type("Fail", (RuntimeError,), {"__module__": "onnxruntime.capi"})  # a class this process cannot import


@pytest.mark.parametrize("exc,same_class", [
    (FileNotFoundError(2, "No such file or directory", "/data/shard.jsonl"), True), (OSError(18, "Cross-device link", "a", None, "b"), True),
    (ValueError("bad shard"), True), (KeyError("x"), True),
    (TrainError("training diverged at step 3: loss is nan"), True), (DataError("no usable sample"), True),
    (FAIL("[ONNXRuntimeError] boom"), False), (NeedsTwo("a", "b"), False)])
def test_a_workers_error_is_reported_as_it_would_be_in_process(exc, same_class):
    """The agent's failure line (and whether it logs a traceback) is the same as for the exception
    raised in its own process; the worker's traceback is the cause."""
    from fedpft.edge import agent

    back = rebuild_error(*remote(exc))
    t = task(["d"])
    assert agent._failure_line(t, back) == agent._failure_line(t, exc)
    assert type(back).__name__ == type(exc).__name__
    assert type(back) is type(exc) if same_class else isinstance(back, type(exc).__mro__[1])
    assert isinstance(back.__cause__, RemoteTraceback) and "Traceback" in str(back.__cause__)


def test_a_dead_worker_fails_its_round_and_is_replaced(tmp_path, tiny_bert_bundle, caplog):
    """Killed in the middle of a round (as by the OOM killer): that round fails with WorkerDied, the
    slot's next round starts a new worker and trains as the first would have."""
    bundle = tiny_bert_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    cfg = agent_cfg(tmp_path, "dev-k")
    long_cfg = agent_cfg(tmp_path, "dev-long", n=400)
    long_task = task(["dev-long"]).model_copy(update={"epochs": 200})  # minutes: it is killed long before
    pool = WorkerPool(1, threads=1)
    try:
        first = pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)
        w = pool.workers[0]
        cpu0 = psutil.Process(w.proc.pid).cpu_times().user
        result = {}
        th = threading.Thread(target=lambda: result.update(r=catch(lambda: pool.trainer(long_cfg, 1)(bundle, long_task, adapters, None))))
        th.start()
        deadline = time.monotonic() + 60
        while psutil.Process(w.proc.pid).cpu_times().user < cpu0 + 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)  # until it is training
        os.kill(w.proc.pid, signal.SIGKILL)
        th.join(30)
        assert isinstance(result["r"], WorkerDied) and "worker 0" in str(result["r"]) and "exited during round 2" in str(result["r"])
        with caplog.at_level(logging.WARNING, logger="fedpft.simulate"):
            again = pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)
        assert "had exited; starting a new one" in caplog.text
        assert_same_update(again[0], first[0])
        assert again[1] == first[1] and pool.started == 2
        last = pool.workers[0]
    finally:
        pool.close()
    assert pool.workers == [None] and last.proc.exitcode == 0  # asked to stop, not killed
    with pytest.raises(WorkerDied, match="shutting down"):
        pool.trainer(cfg, 1)(bundle, task(["dev-k"]), adapters, None)


def catch(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def test_close_ends_a_round_in_progress(tmp_path, tiny_bert_bundle):
    """A run that ends while a client still trains: close() stops the workers within its timeout and
    the round fails with WorkerDied rather than holding the thread."""
    bundle = tiny_bert_bundle
    adapters = encode_tensors(open_session(bundle).adapters())
    pool = WorkerPool(1, threads=1)
    long_cfg = agent_cfg(tmp_path, "dev-long", n=400)
    result = {}
    th = threading.Thread(target=lambda: result.update(r=catch(lambda: pool.trainer(long_cfg, 1)(
        bundle, task(["dev-long"]).model_copy(update={"epochs": 200}), adapters, None))))
    th.start()
    deadline = time.monotonic() + 60
    while (pool.workers[0] is None or not pool.workers[0].busy.locked()) and time.monotonic() < deadline:
        time.sleep(0.05)
    w = pool.workers[0]
    t0 = time.monotonic()
    pool.close(timeout=1.0)
    th.join(30)
    assert time.monotonic() - t0 < 15
    assert isinstance(result["r"], WorkerDied) and not w.proc.is_alive()
