"""Blob serving without a broker: round blobs broadcast once, re-sends merged per (device, blob)
and published by the server's own sender thread (never the caller's), a bounded table; and the
device side keeping broadcast chunks that arrive before their Task."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedpft.cloud.blobs import BlobServer, ResendQueue, worth_broadcasting
from fedpft.edge.blobs import KEEP_BLOBS, BlobFetcher
from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource, Chunk
from fedpft.shared.messages import BlobRequest, ProtocolError

RUN = "r1"
DATA = bytes(range(256)) * 40  # 10240 bytes: 10 chunks of 1024


class SlowTransport:
    """Records publishes (thread, topic, chunk index); each waits for `gate` like a PUBACK that is late."""

    def __init__(self, fail_for: str | None = None) -> None:
        self.gate = threading.Event()
        self.sent: list[tuple[str, str, int]] = []
        self.fail_for = fail_for
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        assert self.gate.wait(10), "publish never released"
        if self.fail_for and f"/{self.fail_for}/" in topic:
            raise TimeoutError("no PUBACK")
        with self.lock:
            self.sent.append((threading.current_thread().name, topic, Chunk.from_bytes(payload).index))

    def to(self, device: str) -> list[int]:
        with self.lock:
            return [i for _, topic, i in self.sent if f"/device/{device}/" in topic]


def _req(device: str, missing=(), blob: str = "adapters-r0-0") -> BlobRequest:
    return BlobRequest(run_id=RUN, sender=device, device_id=device, blob_id=blob, missing=list(missing))


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_queue_merges_requests_per_device_and_blob_in_order_of_first_request():
    q = ResendQueue()
    assert q.add("d1", "b", {0}) and q.add("d2", "b", {1}) and q.add("d1", "b", {2, 0}) and q.add("d1", "c", {3})
    assert len(q) == 3 and q.merged == 1
    assert q.take(0) == (("d1", "b"), [0, 2])
    assert q.take(0) == (("d2", "b"), [1])
    assert q.take(0) == (("d1", "c"), [3])
    assert q.take(0.01) is None


def test_queue_does_not_queue_again_what_is_on_its_way():
    q = ResendQueue()
    q.add("d1", "b", {0, 1, 2})
    assert q.take(0) == (("d1", "b"), [0, 1, 2])
    q.sent(0)
    assert q.add("d1", "b", {1, 2}) and len(q) == 0  # both still being sent: nothing to add
    assert q.add("d1", "b", {0, 2, 5})  # 0 went out already (the device lost it?), 5 is new
    assert q.take(0) == (("d1", "b"), [0, 5])


def test_queue_is_bounded_and_a_full_table_is_one_clear_refusal():
    server = BlobServer(SlowTransport(), RUN, 1024, max_pending=2)
    server.offer("adapters-r0-0", DATA)
    server.serve(_req("d1"))
    _wait(lambda: server.queue._sending is not None)  # d1 is being sent (its PUBACK is late)
    server.serve(_req("d2"))
    server.serve(_req("d3", [1]))
    server.serve(_req("d2", [3]))  # merged: no new row
    with pytest.raises(ProtocolError, match="re-send table full \\(2 waiting\\); d4 will ask again"):
        server.serve(_req("d4"))
    server.t.gate.set()
    server.close()


def test_bad_requests_are_refused_before_anything_is_queued():
    server = BlobServer(SlowTransport(), RUN, 1024)
    server.offer("adapters-r0-0", DATA)
    with pytest.raises(ProtocolError, match="unknown blob nope"):
        server.serve(_req("d1", blob="nope"))
    with pytest.raises(ProtocolError, match="has chunks 0..9; d1 asked for \\[10\\]"):
        server.serve(_req("d1", [1, 10]))
    assert len(server.queue) == 0 and server._sender is None


def test_resends_go_out_on_the_sender_thread_merged_while_it_waits_for_pubacks():
    t = SlowTransport()
    server = BlobServer(t, RUN, 1024)
    server.offer("adapters-r0-0", DATA)
    t0 = time.time()
    server.serve(_req("d1", [0]))  # the sender takes this one and blocks on its PUBACK
    _wait(lambda: server.queue._sending is not None)
    for missing in ([1, 2], [2, 3], [0, 3]):  # a straggler asking again and again meanwhile
        server.serve(_req("d2", missing))
    server.serve(_req("d1", [0, 4]))  # 0 is on its way: only 4 is new
    assert time.time() - t0 < 1.0, "serve() must only queue, never wait for the broker"
    assert t.sent == [] and len(server.queue) == 2
    t.gate.set()
    _wait(lambda: len(t.sent) == 6)
    assert t.to("d1") == [0, 4] and t.to("d2") == [0, 1, 2, 3]
    assert {name for name, _, _ in t.sent} == {f"blob-sender-{RUN}"}
    assert all(topic == topics.resend_topic(RUN, topic.split("/")[3], "adapters-r0-0") for _, topic, _ in t.sent)
    assert server.resent_chunks == 6 and server.bytes_sent == sum(len(server._source("adapters-r0-0").chunk(i).to_bytes())
                                                                   for i in (0, 4, 0, 1, 2, 3))
    server.close()
    assert not server._sender.is_alive()


def test_a_failed_resend_is_one_line_and_the_others_are_still_served(caplog):
    t = SlowTransport(fail_for="d1")
    t.gate.set()
    server = BlobServer(t, RUN, 1024)
    server.offer("adapters-r0-0", DATA)
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        server.serve(_req("d1"))
        server.serve(_req("d2", [7]))
        _wait(lambda: t.to("d2") == [7])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["re-send of adapters-r0-0 to d1 stopped: TimeoutError: no PUBACK (it will ask again)"]
    server.close()


def test_broadcast_publishes_every_chunk_once_on_the_run_blob_topic():
    t = SlowTransport()
    t.gate.set()
    server = BlobServer(t, RUN, 4096)
    ref = server.offer("adapters-r0-0", DATA)
    server.broadcast_round(ref, None)
    assert [(topic, i) for _, topic, i in t.sent] == [(topics.blob_topic(RUN, "adapters-r0-0"), i) for i in range(3)]
    assert t.sent[0][0] == threading.current_thread().name  # returns once the broker has them: the Task goes next
    assert server.bytes_sent == sum(len(p) for p in BlobSource("adapters-r0-0", DATA, 4096).payloads())
    assert server.resent_chunks == 0 and server._sender is None


@pytest.mark.parametrize("selected, online, expected", [(1, 1, True), (5, 10, True), (4, 10, False), (0, 0, False), (1000, 1000, True)])
def test_broadcast_only_when_the_task_names_at_least_half_the_online_devices(selected, online, expected):
    assert worth_broadcasting(selected, online) is expected


# ---- the device side: chunks kept ahead of their Task ---------------------------------------------


def _fetcher(tmp_path, requests: list) -> BlobFetcher:
    return BlobFetcher(tmp_path, lambda ref, missing: requests.append(list(missing)), lambda timeout: time.sleep(0.01),
                       lambda held: None, 0.3)


def test_a_device_holding_the_broadcast_asks_for_nothing(tmp_path):
    src, requests = BlobSource("adapters-r0-0", DATA, 1024), []
    f = _fetcher(tmp_path, requests)
    for i in range(src.count):
        f.keep(src.chunk(i))
    assert f.fetch(src.ref) == DATA and requests == []
    assert f.kept == {} and f.kept_bytes == 0


def test_a_partial_or_forged_broadcast_asks_only_for_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr("fedpft.edge.blobs.STALL_SECONDS", 0.1)
    src, requests = BlobSource("adapters-r0-0", DATA, 1024), []
    f = _fetcher(tmp_path, requests)
    f.keep(src.chunk(0))
    f.keep(BlobSource("adapters-r0-0", b"x" * len(DATA), 1024).chunk(1))  # not the Task's blob
    with pytest.raises(Exception, match="1/10 chunks after 0s"):
        f.fetch(src.ref)
    assert requests[0] == list(range(1, 10))


def test_kept_chunks_are_bounded_oldest_blob_first(tmp_path):
    f = _fetcher(tmp_path, [])
    for b in range(KEEP_BLOBS + 2):
        f.keep(BlobSource(f"blob-{b}", DATA, 1024).chunk(0))
    assert list(f.kept) == [f"blob-{b}" for b in range(2, KEEP_BLOBS + 2)]
    assert f.kept_bytes == 1024 * KEEP_BLOBS


def test_a_blob_over_the_byte_cap_is_not_kept_but_fetched_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr("fedpft.edge.blobs.KEEP_BYTES", 3000)
    src, requests = BlobSource("ffn-a1", DATA, 1024), []
    f = _fetcher(tmp_path, requests)
    f.keep(BlobSource("adapters-r0-0", DATA[:2048], 1024).chunk(0))  # 2 KB: fits
    for i in range(4):
        f.keep(src.chunk(i))
    assert list(f.kept) == ["adapters-r0-0"] and f.kept_bytes == 1024
