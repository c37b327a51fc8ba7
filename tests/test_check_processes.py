"""`serve --check-processes N` (cloud/check_processes.py): uploads checked, stored and folded in
processes of their own end the round with the adapters the check threads give, the persisted
running sum is exactly the sum of the devices it names, and a check process that dies stops the
cloud with one line (its accepted updates on disk for --resume)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from fedpft.cloud import check_processes
from fedpft.cloud import fold as fold_module
from fedpft.cloud.check_processes import CheckProcessDied
from fedpft.cloud.checks import EventQueue
from fedpft.cloud.fold import RoundFold
from fedpft.cloud.state import RunStore
from fedpft.cloud.uploads import UpdateLimits, Verdict
from fedpft.shared.messages import Update, make_update_id
from fedpft.shared.chunks import BlobSource
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.update import bind_update
from test_fold import fold_in, updates
from test_robust_rounds import federation
from test_security_hostile import RUN, good_tensors, honest

pytestmark = pytest.mark.faults


def test_partial_sums_merge_into_the_sequential_fold():
    ref, ups, stats, samples = updates(9, seed=3)
    names = sorted(ups)
    whole = fold_in(ref, ups, stats, samples, names)
    base = fold_in(ref, ups, stats, samples, names[:2])  # what the loop itself holds (restored on resume)
    parts = [fold_in(ref, ups, stats, samples, names[2 + k::3]) for k in range(3)]
    for p in parts:
        base.merge(p.to_bytes())
    assert base.folded.keys() == whole.folded.keys()
    np.testing.assert_allclose(base.flat, whole.flat, rtol=1e-12, atol=1e-12)
    assert base.positions == pytest.approx(whole.positions)
    np.testing.assert_allclose(base.off[3], whole.off[3])
    with pytest.raises(ValueError, match="folded twice"):  # a device in two partial sums would count twice
        base.merge(parts[0].to_bytes())
    with pytest.raises(ValueError, match="running sum of"):  # another round's (or attempt's adapters')
        base.merge(fold_in(ref, ups, stats, samples, ["d01"], RoundFold(ref, label="r1")).to_bytes())

    # a partial sum refused for its statistics (another proxy's neuron count) changes nothing here
    odd = {d: {2: (np.ones(8, np.float32), 4.0), 3: (np.ones(5, np.float32), 4.0)} for d in ups}
    flat, folded, off = base.flat.copy(), dict(base.folded), {k: v.copy() for k, v in base.off.items()}
    with pytest.raises(ValueError, match="neuron count"):
        base.merge(fold_in(ref, {"x": ups["d01"]}, {"x": odd["d01"]}, {"x": 3}, ["x"]).to_bytes())
    np.testing.assert_array_equal(base.flat, flat)
    assert base.folded == folded and base.off.keys() == off.keys() and base.positions.keys() == {3}
    np.testing.assert_array_equal(base.off[3], off[3])


def _bad(dev, task):
    """An update of the wrong tensors, refused by the check (in a check process, here); then the
    device reports a failure, so the round does not wait for it."""
    dev.update(task.round_id, encode_tensors({"evil.weight": np.zeros(3, np.float32)}))
    dev.error(task.round_id)


def _one_chunk(seed: int, corrupt: bool = False):
    """An update in one chunk, as real devices send theirs (with check processes its sha256 is taken
    in the check process, not on arrival); `corrupt`: one byte changed after hashing."""
    def answer(dev, task):
        data = bind_update(encode_tensors(good_tensors(dev.manifest, seed)), RUN, task.round_id, dev.device_id, task.task_id)
        src = BlobSource(f"one-{dev.device_id}", data, chunk_size=len(data))
        payload = bytearray(next(src.payloads()))
        if corrupt:
            payload[-1] ^= 1
            dev.update(task.round_id, data, ref=src.ref, chunks=[bytes(payload)], blob_id=src.blob_id)
            dev.error(task.round_id)
        else:
            dev.update(task.round_id, data, ref=src.ref, chunks=[bytes(payload)], blob_id=src.blob_id)
    return answer


DEVICES = [*((f"good{i}", honest(i)) for i in range(4)), ("good4", _one_chunk(4)), ("bad", _bad),
           ("corrupt", _one_chunk(5, corrupt=True))]


def test_a_round_checked_in_processes_ends_as_one_checked_in_threads(tiny_bert_bundle, tmp_path, monkeypatch, caplog):
    threads, hub = federation(tiny_bert_bundle, tmp_path / "threads", DEVICES, min_clients=5)
    want = threads.store.read_tensors(threads.run().adapters)
    hub.join()

    saved: list[bytes] = []
    monkeypatch.setattr(fold_module, "PERSIST_SECONDS", 0.0)  # persist after every counted update
    procs, hub = federation(tiny_bert_bundle, tmp_path / "procs", DEVICES, min_clients=5, check_processes=2)
    save = procs.store.save_fold
    procs.store.save_fold = lambda r, data: (saved.append(data), save(r, data))[1]
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        state = procs.run()
    hub.join()
    rec = state.history[-1]
    assert rec["devices"] == [f"good{i}" for i in range(5)] and {"bad", "corrupt"} <= rec["failed"].keys()
    assert any("rejected update from bad" in m for m in caplog.messages)
    assert any("rejected update from corrupt" in m and "sha256 does not match" in m for m in caplog.messages)
    got = procs.store.read_tensors(state.adapters)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-8)
    assert len(list((tmp_path / "procs" / "run" / "updates" / "round_0000").glob("good*.safetensors"))) == 5
    assert all(w.proc._closed for w in procs.checks.workers) and not _check_threads()  # closed with the run

    # every persisted sum is exactly the sum of the devices it names (what --resume relies on)
    assert saved
    init = "checkpoints/adapters_round_init.safetensors"
    reference = procs.store.read_tensors(init)

    def empty() -> RoundFold:
        return RoundFold(reference, procs.cfg.max_client_samples, label=f"round 0 on {init}")

    stored = procs.store.stored_updates(0)
    before: set[str] = set()
    for data in saved:
        snap, check = empty(), empty()
        snap.restore(data)
        for d, c in snap.folded.items():
            tensors = {k: v for k, v in decode_tensors(stored[d].read_bytes())[0].items() if k in reference}
            check.add(c, tensors, {}, check.change_flat(tensors))
        np.testing.assert_allclose(snap.flat, check.flat, rtol=1e-12, atol=1e-12)
        # saves never go backwards; the last need not hold the whole round (a save still in flight
        # when the last update lands is skipped: the round's checkpoint holds it)
        assert before <= snap.folded.keys() <= {f"good{i}" for i in range(5)}
        before = set(snap.folded)
    assert before


def _check_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fedpft-check-") and t.name.endswith(("-send", "-read"))]


@pytest.mark.parametrize("n", [1, 2])
def test_a_check_process_that_dies_stops_the_cloud_in_one_line(tiny_bert_bundle, tmp_path, n):
    """Killed before any check: with one process the first check fails; with two, the survivor must
    not go on alone (the dead one's partial sum is gone), so the loop hears of it at once."""
    fed, hub = federation(tiny_bert_bundle, tmp_path, DEVICES[:2], min_clients=2, check_processes=n)
    w = fed.checks.workers[0]
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.join(10)
    with pytest.raises(CheckProcessDied, match="check process 0 .* exited.*--resume"):
        fed.run()
    hub.join()
    assert all(w.proc._closed for w in fed.checks.workers) and not _check_threads()  # nothing outlives the run


def test_a_check_process_that_dies_while_the_loop_hands_it_a_check_answers_it(tmp_path, monkeypatch):
    """The process dies between the loop's choice of it and the check's registration: the check is
    still answered (an error), never left for the round to wait on forever."""
    events = EventQueue()
    procs = check_processes.CheckProcesses(1, UpdateLimits("r", 1 << 20, {}, {}), RunStore(tmp_path), events)
    w, encode = procs.workers[0], check_processes.encode_tensors

    def dying_encode(*args, **kwargs):  # the first check of a fold encodes its reference first
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(10)
        deadline = time.time() + 10
        while w.dead is None and time.time() < deadline:
            time.sleep(0.01)
        return encode(*args, **kwargs)

    monkeypatch.setattr(check_processes, "encode_tensors", dying_encode)
    msg = Update(run_id="r", round_id=0, sender="d", device_id="d", error="x", task_id="t",
                 update_id=make_update_id("r", 0, "d", "t", None))
    procs.submit(Verdict(msg, "check", data=b"abc"), "t", RoundFold({"a": np.zeros(4, np.float32)}, label="x"), None, None)
    got = [events.get(timeout=10) for _ in range(2)]  # the death itself, and the check's answer
    assert all(tag == "checked" and out[0] == "error" and isinstance(out[1], CheckProcessDied) for tag, out in got)
    assert events.in_flight == 0
    procs.close()
    assert not _check_threads()


def test_close_stops_a_process_that_does_not_answer_and_fails_what_waits_on_it(tmp_path):
    """A stopped process (as one stuck in an fsync) neither holds close() nor outlives it, and a save
    waiting for its partial sum is answered."""
    procs = check_processes.CheckProcesses(1, UpdateLimits("r", 1 << 20, {}, {}), RunStore(tmp_path), EventQueue())
    procs.wait_ready(60)
    w = procs.workers[0]
    fold = RoundFold({"a": np.zeros(4, np.float32)}, label="x")
    w.folds.add(procs._fid(fold))  # as if it had checked an update of this fold
    os.kill(w.proc.pid, signal.SIGSTOP)
    (waiting,) = procs.partials(fold)
    t0 = time.monotonic()
    procs.close(timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(CheckProcessDied, match="closed|exited"):  # whichever of close() and its reader saw it first
        waiting.result(1)
    assert w.proc._closed and not _check_threads()
    procs.close()  # twice: harmless


def test_a_check_process_overlaps_its_durable_writes_and_answers_a_partial_after_them(tmp_path, monkeypatch):
    """One process's checks wait on their fsyncs: they run side by side (one at a time capped a
    process at ~135 updates a second), and a partial-sum request still answers only after every
    check sent before it, naming exactly those devices."""
    import multiprocessing as mp

    from fedpft.shared.messages import BlobRef

    expected = {"a": ((2, 3), "float32")}
    ref = {"a": np.zeros((2, 3), np.float32)}
    now, most, lock = [0], [0], threading.Lock()
    write = RunStore.write_update

    def slow_write(self, *args):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)  # a slow disk's fsync
        with lock:
            now[0] -= 1
        return write(self, *args)

    monkeypatch.setattr(RunStore, "write_update", slow_write)
    monkeypatch.setattr(check_processes.signal, "signal", lambda *a: None)  # served on a thread here, not a process's main one
    cloud, child = mp.Pipe(duplex=True)
    server = threading.Thread(target=check_processes._serve, args=(child, UpdateLimits("r", 1 << 20, expected, {}), str(tmp_path)), daemon=True)
    server.start()
    assert cloud.poll(10) and cloud.recv() == ("ready",)
    cloud.send(("fold", 1, "lbl", encode_tensors(ref), None))
    devices = [f"dev{k}" for k in range(4)]
    for k, dev in enumerate(devices):
        data = bind_update(encode_tensors({"a": np.full((2, 3), k + 1, np.float32)}), "r", 0, dev, "t1")
        sha = BlobSource(f"b{k}", data).sha256
        msg = Update(run_id="r", round_id=0, sender=dev, device_id=dev, blob=BlobRef(blob_id=f"b{k}", sha256=sha, size=len(data)),
                     num_samples=10, steps=1, mean_loss=1.0, task_id="t1", update_id=make_update_id("r", 0, dev, "t1", sha))
        cloud.send(("check", k, 1, msg, "t1", None, None))
        cloud.send_bytes(data)
    cloud.send(("partial", 1, True))
    replies = [cloud.recv() for _ in range(5) if cloud.poll(10)]
    cloud.send(("stop",))
    server.join(10)
    checked, partial = replies[:4], replies[4]
    assert sorted(r[1] for r in checked) == [0, 1, 2, 3] and all(r[0] == "checked" and r[2] == "accept" for r in checked)
    assert partial[0] == "partial" and partial[2] is not None
    fold = RoundFold(ref, label="lbl")
    fold.restore(partial[2])
    assert sorted(fold.folded) == devices
    np.testing.assert_allclose(fold.sum["a"], np.full((2, 3), 10 * (1 + 2 + 3 + 4)))  # weights: num_samples 10
    assert most[0] >= 2  # the writes overlapped (one at a time: never two)


@pytest.mark.parametrize("cpus, want", [({0}, 0), ({0, 1}, 2), (set(range(16)), 2)])
def test_serve_checks_in_processes_by_default_only_where_it_may_use_two_cores(monkeypatch, cpus, want):
    from fedpft.cloud import checks

    monkeypatch.setattr(checks.os, "sched_getaffinity", lambda pid: cpus, raising=False)
    assert checks.default_check_processes() == want


def test_serve_resolves_its_check_processes_default_and_keeps_an_explicit_zero(monkeypatch, tmp_path):
    """`serve` without --check-processes gets the machine's default; `--check-processes 0` stays threads."""
    from typer.testing import CliRunner

    from fedpft.cloud import cli_rounds, serve as serve_module
    from fedpft.cloud.cli import app

    seen = []

    def run_serve(cfg, show_progress):
        seen.append(cfg.check_processes)
        raise RuntimeError("stopped before any round")  # the CLI reports it in one line

    monkeypatch.setattr(cli_rounds, "default_check_processes", lambda: 3)
    monkeypatch.setattr(serve_module, "serve", run_serve)
    for extra in ([], ["--check-processes", "0"]):
        CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path), "--out", str(tmp_path / "run"), *extra])
    assert seen == [3, 0]
