"""Hostile input thrown at the real `Federation` over the in-memory hub: every bad message,
tensor or chunk is refused with a logged reason, and the round still completes with the good
devices (whose mean is exactly what the cloud aggregates).

Fake devices in this file speak the wire protocol directly; one of them ("evil") attacks and
then reports an error, so each round ends without waiting for its deadline.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpft.cloud.config import ServeConfig
from fedpft.cloud.handlers import DEVICE_KINDS
from fedpft.cloud.sampling import RoundTracker
from fedpft.cloud.server import Federation
from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource, Chunk
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import (
    Ack, BlobRef, BlobRequest, Hello, Presence, ProtocolError, Task, Update, decode, encode, make_update_id,
)
from fedpft.shared import transport
from fedpft.shared.routes import check_route
from fedpft.shared.transport import InMemoryHub, TransportError, topic_matches
from fedpft.shared.update import bind_update, binding, stat_key

pytestmark = pytest.mark.security

RUN = "sec"
CAP = 64 * 1024  # ServeConfig.max_update_bytes in these tests; a good update is ~30 KB
GOOD = ("good0", "good1")


def good_tensors(manifest: BundleManifest, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.key: (rng.standard_normal(t.shape) * 0.01).astype(t.dtype) for t in manifest.trainable}


@dataclass
class Device:
    """A fake device: announces itself (retained presence), answers tasks with `on_task`."""

    hub: InMemoryHub
    device_id: str
    manifest: BundleManifest
    on_task: object = None  # callable(device, task) | None: never answers
    announce: bool = True
    sent: list = field(default_factory=list)
    task: Task | None = None  # the last task addressed to it: updates answer it

    def __post_init__(self) -> None:
        self.t = self.hub.transport(self.device_id)
        self.t.connect()
        self.t.subscribe(topics.round_topic(RUN), self._task)
        # a round past 64 devices addresses each its own Task in its inbox (cloud/fanout.py)
        self.t.subscribe(topics.device_topic(RUN, self.device_id, topics.INBOX), self._task)
        if self.announce:
            self.pub(topics.PRESENCE, Presence(run_id=RUN, sender=self.device_id, device_id=self.device_id, status="online"), retain=True)

    def hello(self) -> None:
        """What makes a device eligible for rounds (a real device repeats it as a heartbeat)."""
        self.pub(topics.HELLO, Hello(run_id=RUN, sender=self.device_id, device_id=self.device_id, num_samples=10))

    def _task(self, topic: str, payload: bytes) -> None:
        try:
            task = decode(payload)
        except ProtocolError:
            return
        if isinstance(task, Task) and self.device_id in task.devices:
            self.task = task
            if self.on_task is not None:
                self.on_task(self, task)

    @property
    def task_id(self) -> str:
        return self.task.task_id if self.task is not None else "no-task"

    def pub(self, kind: str, msg, retain: bool = False) -> None:
        self.raw(topics.device_topic(RUN, self.device_id, kind), encode(msg), retain)

    def raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.t.publish(topic, payload, retain=retain)

    def update(self, round_id: int, data: bytes, *, ref: BlobRef | None = None, chunks: list[bytes] | None = None,
               sender: str | None = None, blob_id: str | None = None, **fields) -> None:
        """Upload `data` (bound to the current task, as a real device does) in chunks and publish
        the Update naming it (both overridable to lie)."""
        sender = sender or self.device_id
        if data[:8] != b"\x08" + bytes(7):  # not the deliberately broken non-safetensors blob
            data = bind_update(data, RUN, round_id, sender, self.task_id)
        src = BlobSource(blob_id or f"upd-{self.device_id}-{round_id}-{len(self.sent)}", data, chunk_size=8192)
        for payload in chunks if chunks is not None else list(src.payloads()):
            self.raw(topics.upload_topic(RUN, self.device_id, src.blob_id), payload)
        fields.setdefault("num_samples", 10)
        ref = ref or src.ref
        uid = make_update_id(RUN, round_id, sender, self.task_id, ref.sha256)
        self.pub(topics.UPDATE, Update(run_id=RUN, round_id=round_id, sender=sender, device_id=sender, blob=ref,
                                       task_id=self.task_id, update_id=uid, **fields))
        self.sent.append(data)  # after publishing: the cloud has it queued

    def error(self, round_id: int, reason: str = "done attacking") -> None:
        uid = make_update_id(RUN, round_id, self.device_id, self.task_id, None)
        self.pub(topics.UPDATE, Update(run_id=RUN, round_id=round_id, sender=self.device_id, device_id=self.device_id, error=reason,
                                       task_id=self.task_id, update_id=uid))


def honest(seed: int):
    def answer(dev: Device, task: Task) -> None:
        dev.update(task.round_id, encode_tensors(good_tensors(dev.manifest, seed)))
    return answer


# ---- the attacks: each does its harm, then the attacker reports an error ----------------------


def _tensors(dev: Device, **change) -> bytes:
    t = good_tensors(dev.manifest, 99)
    first = dev.manifest.trainable[0].key
    for what, value in change.items():
        if what == "rename":
            t["base_model.evil.weight"] = t.pop(first)
        elif what == "drop":
            t.pop(first)
        elif what == "shape":
            t[first] = np.zeros((3, 3), np.float32)
        elif what == "dtype":
            t[first] = t[first].astype(np.float64)
        elif what == "value":
            t[first] = t[first].copy()
            t[first].flat[0] = value
        elif what == "stats":
            layer, neurons = next((s.layer, s.neurons) for s in dev.manifest.stat_outputs)
            t[stat_key(layer, "off_counts")] = np.full(neurons, 50, np.float32)
            t[stat_key(layer, "positions")] = np.array([10], np.float32)
    return encode_tensors(t)


def _msg_json(dev: Device, r: int, **change) -> bytes:
    d = json.loads(encode(Update(run_id=RUN, round_id=r, sender=dev.device_id, device_id=dev.device_id, error="x")))
    d.update(change)
    return json.dumps(d).encode()


def _corrupt_chunk(dev: Device, r: int) -> None:
    data = encode_tensors(good_tensors(dev.manifest, 99))
    src = BlobSource("upd-evil-corrupt", data, chunk_size=8192)
    payloads = list(src.payloads())
    payloads[1] = payloads[1][:-1] + bytes([payloads[1][-1] ^ 0xFF])  # flip a data byte in transit
    dev.update(r, data, ref=src.ref, chunks=payloads)


def _lying_layout(dev: Device, r: int) -> None:
    """Every chunk matches its own hash, but the blob is not the one the Update names."""
    named = BlobSource("upd-evil-swap", encode_tensors(good_tensors(dev.manifest, 99))).ref
    dev.update(r, encode_tensors(good_tensors(dev.manifest, 98)), blob_id="upd-evil-swap", ref=named)


def _oversize_chunks(dev: Device, r: int) -> None:
    """A sound first chunk of a 2 MiB blob: refused on sight, before the rest could pile up."""
    src = BlobSource("upd-evil-big", bytes(2 << 20), chunk_size=1 << 20)
    dev.raw(topics.upload_topic(RUN, dev.device_id, src.blob_id), next(src.payloads([0])))


def _stranger(dev: Device, r: int) -> None:
    stranger = Device(dev.hub, "stranger", dev.manifest, announce=False)
    stranger.update(r, encode_tensors(good_tensors(dev.manifest, 7)))


def _duplicate(dev: Device, r: int) -> None:
    # good0 already answered (it answers first); a second, different update must not count
    good0 = Device.__new__(Device)
    good0.__dict__.update(dev.__dict__)
    good0.device_id = "good0"
    good0.update(r, encode_tensors(good_tensors(dev.manifest, 12345)))


ATTACKS = {
    # control messages
    "malformed_json": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE), b"{not json"), "malformed JSON"),
    "wrong_protocol": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE), _msg_json(d, r, protocol=2)),
                       "unsupported protocol version 2"),
    "wrong_schema": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE), _msg_json(d, r, num_samples=-4)),
                     "invalid update message: num_samples"),
    "unknown_field": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE), _msg_json(d, r, admin=True)),
                      "invalid update message: admin"),
    "oversized_message": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE), _msg_json(d, r, error="x" * 300_000)),
                          "exceeds the 262144-byte limit"),
    "wrong_kind_on_topic": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE),
                                               encode(Hello(run_id=RUN, sender=d.device_id, device_id=d.device_id, num_samples=1))),
                            "a hello message does not belong on a update topic"),
    "spoofed_sender": (lambda d, r: d.raw(topics.device_topic(RUN, d.device_id, topics.UPDATE),
                                          encode(Update(run_id=RUN, round_id=r, sender="good0", device_id="good0", error="forged"))),
                       "sender 'good0' published on device 'evil''s topic"),
    "blobreq_for_other": (lambda d, r: d.pub(topics.BLOBREQ, BlobRequest(run_id=RUN, sender=d.device_id, device_id="good0", blob_id="x")),
                          "message about device 'good0' on device 'evil''s topic"),
    # update contents
    "wrong_tensor_name": (lambda d, r: d.update(r, _tensors(d, rename=True)), "unexpected tensor 'base_model.evil.weight'"),
    "missing_tensor": (lambda d, r: d.update(r, _tensors(d, drop=True)), "update lacks 1 adapter tensors"),
    "wrong_shape": (lambda d, r: d.update(r, _tensors(d, shape=True)), "got float32[3, 3], expected float32["),
    "wrong_dtype": (lambda d, r: d.update(r, _tensors(d, dtype=True)), "got float64["),
    "nan": (lambda d, r: d.update(r, _tensors(d, value=np.nan)), "holds NaN or Inf"),
    "inf": (lambda d, r: d.update(r, _tensors(d, value=-np.inf)), "holds NaN or Inf"),
    "stats_out_of_range": (lambda d, r: d.update(r, _tensors(d, stats=True)), "statistics out of range"),
    "not_safetensors": (lambda d, r: d.update(r, b"\x08" + bytes(7) + b"{}garbage" * 50), "malformed safetensors"),
    # sizes
    "oversized_update_ref": (lambda d, r: d.update(r, _tensors(d), ref=BlobRef(blob_id="upd-evil-huge", sha256="0" * 64, size=CAP * 100)),
                             f"exceeds the {CAP}-byte cap"),
    "oversized_upload": (_oversize_chunks, f"exceeds the {CAP}-byte limit"),
    # chunks
    "chunk_hash_mismatch": (_corrupt_chunk, "sha256 mismatch (corrupted in transit)"),
    "blob_hash_mismatch": (_lying_layout, "update blob sha256 does not match the update message"),
    # rounds and membership
    "stale_round": (lambda d, r: d.update(r + 5, _tensors(d)), "stale: round 5 is not the current round 0"),
    "not_selected": (_stranger, "rejected update from stranger for round 0: device was not selected"),
    "duplicate": (_duplicate, "from good0 already counted for this round"),
}


def run_round(bundle, tmp_path, attack) -> tuple[dict, dict[str, np.ndarray], Federation]:
    manifest = BundleManifest.load(bundle)
    hub = InMemoryHub(threaded=True)

    honest_devices = [Device(hub, d, manifest, honest(i)) for i, d in enumerate(GOOD)]

    def evil(dev: Device, task: Task) -> None:
        # attack once the honest updates are queued at the cloud, so "duplicate" finds good0 counted
        end = time.time() + 10
        while not all(d.sent for d in honest_devices) and time.time() < end:
            time.sleep(0.005)
        attack(dev, task.round_id)
        dev.error(task.round_id)

    devices = [*honest_devices, Device(hub, "evil", manifest, evil)]
    cfg = ServeConfig(bundle=bundle, out=tmp_path / "run", run_id=RUN, rounds=1, min_clients=2, round_timeout=20,
                      wait_for_clients=5, chunk_size=8192, max_update_bytes=CAP)
    cloud = hub.transport("cloud")
    cloud.connect()
    fed = Federation(cfg, cloud, show_progress=False)
    fed.subscribe()
    for d in devices:
        d.hello()
    state = fed.run()
    hub.join()
    expected = {d.device_id: decode_tensors(d.sent[0])[0] for d in honest_devices}
    return state.history[-1], fed.store.read_tensors(state.adapters), fed, expected


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_with_a_reason_and_the_round_completes(tiny_bert_bundle, tmp_path, caplog, name):
    attack, reason = ATTACKS[name]
    caplog.set_level(logging.INFO, logger="fedpft")
    record, adapters, _, expected = run_round(tiny_bert_bundle, tmp_path, attack)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("fedpft")]
    assert any(reason in m for m in logged), f"no log line with {reason!r}:\n" + "\n".join(logged)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a handler failed"
    # the round completed with exactly the honest devices, and their mean is the new global model
    assert record["clients"] == 2 and record["devices"] == list(GOOD), record
    for key, value in adapters.items():
        np.testing.assert_allclose(value, (expected["good0"][key] + expected["good1"][key]) / 2, rtol=1e-6, atol=1e-7)


# ---- property: nothing thrown at the cloud's subscriptions crashes it, every bad input is logged ----

DEVICES = ("d1", "d2", "d3")
KINDS = (topics.HELLO, topics.PRESENCE, topics.UPDATE, topics.ACK, topics.BLOBREQ)


@pytest.fixture(scope="module")
def fuzz_fed(tiny_bert_bundle, tmp_path_factory):
    hub = InMemoryHub()
    cloud = hub.transport("cloud")
    cloud.connect()
    cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path_factory.mktemp("fuzz"), run_id=RUN, chunk_size=1024, max_update_bytes=CAP)
    fed = Federation(cfg, cloud, show_progress=False)
    fed.subscribe()
    fed.blobs.offer("adapters-r0-0", bytes(range(256)) * 20)
    return fed


_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hub -> {client id: its transport}


def send(fed: Federation, client: str, topic: str, payload: bytes) -> None:
    """`client` publishes on the cloud's hub, as any broker client may; on an unthreaded hub the
    cloud's handlers have run when this returns."""
    links = _CLIENTS.setdefault(fed.t.hub, {})  # one connection per client, as on a broker
    if client not in links:
        links[client] = fed.t.hub.transport(client)
        links[client].connect()
    links[client].publish(topic, payload)


def _reaches_cloud(topic: str) -> bool:
    """Whether the broker hands a topic to the cloud at all (what `Federation.subscribe` listens to)."""
    return any(topic_matches(topics.all_devices_pattern(RUN, kind), topic) for kind in (*DEVICE_KINDS, topics.UPLOAD))


def _templates(manifest: BundleManifest) -> list[dict]:
    ref = BlobSource("upd-d1-0", encode_tensors(good_tensors(manifest, 1)), 1024).ref
    base = dict(run_id=RUN, round_id=0, sender="d1", device_id="d1", sent_at=1.0)  # fixed: hypothesis replays draws
    msgs = [
        Hello(**base, num_samples=5), Presence(**base, status="offline", reason="bye"),
        Update(**base, blob=ref, num_samples=3, mean_loss=0.5), Update(**base, error="oom"),
        Ack(**base, acked="task"), BlobRequest(**base, blob_id="adapters-r0-0", missing=[0, 2]),
    ]
    return [json.loads(encode(m)) for m in msgs]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8,
)


@st.composite
def hostile_json(draw, templates):
    """(topic, payload): random bytes, or a valid message mutated, on a device topic of the run."""
    kind = draw(st.sampled_from(KINDS))
    topic = topics.device_topic(RUN, draw(st.sampled_from(DEVICES)), kind)
    how = draw(st.sampled_from(["bytes", "mutate", "mutate", "flip", "valid", "topic"]))
    if how == "bytes":
        return topic, draw(st.binary(max_size=300))
    msg = dict(draw(st.sampled_from(templates)))
    if how == "topic":
        level = draw(st.text(alphabet="abc/+#.-_ \x00é", min_size=0, max_size=30))
        return f"fedpft/{RUN}/{level}", json.dumps(msg).encode()
    if how == "mutate":
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["set", "drop", "add"]))
            key = draw(st.sampled_from(sorted(msg))) if msg else "type"
            if op == "set":
                msg[key] = draw(JSON_VALUES)
            elif op == "drop":
                msg.pop(key, None)
            else:
                msg[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    data = json.dumps(msg).encode()
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return topic, data


def _valid_json(topic: str, payload: bytes) -> bool:
    """The oracle: would the cloud's own rules (the shared contract) accept this message at the door?"""
    if payload == b"" and topic.endswith("/presence"):
        return True  # clearing a retained presence: housekeeping the cloud ignores quietly
    try:
        msg = decode(payload)
        parsed = topics.check_sender(topic, msg.run_id, msg.sender)
        if parsed.run != RUN or parsed.kind not in DEVICE_KINDS:
            return False
        check_route(topics.device_topic(parsed.run, parsed.device_id, parsed.kind), msg)
    except ProtocolError:
        return False
    return True


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_counter():
    h = Counter()
    logger = logging.getLogger("fedpft")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def drain(fed: Federation) -> None:
    """`pump` until the event queue is empty (pump itself stops on time, not on emptiness)."""
    while not fed.events.empty():
        fed.pump(0.002)


class _Task:
    task_id = "t0"


def _open_round(fed: Federation) -> None:
    fed.round_id, fed.tracker, fed.task = 0, RoundTracker(["d1", "d2"], time.time() + 3600, 1), _Task()


def _throw(fed: Federation, log: Counter, topic: str, payload: bytes, bad: bool) -> None:
    _open_round(fed)
    before = len(log.records)
    try:
        send(fed, "attacker", topic, payload)
    except TransportError:
        return  # a topic with wildcards or NUL: no broker takes it, so it never reaches the cloud
    # the cloud's handlers must not raise: the transport would log what escaped them
    escaped = [r.getMessage() for r in log.records[before:] if r.name == transport.log.name and r.levelno >= logging.WARNING]
    assert not escaped, escaped
    if bad and _reaches_cloud(topic):
        new = [r for r in log.records[before:] if r.levelno >= logging.WARNING]
        assert new and all(r.getMessage().strip() for r in new), f"{payload[:80]!r} on {topic!r} refused silently"
    drain(fed)  # neither may handling what was let in
    assert not [r for r in log.records[before:] if r.levelno >= logging.ERROR]


@pytest.mark.slow  # 1000 examples
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_json_never_crashes_the_cloud(fuzz_fed, log_counter, data):
    topic, payload = data.draw(hostile_json(_templates(fuzz_fed.manifest)))
    _throw(fuzz_fed, log_counter, topic, payload, bad=not _valid_json(topic, payload))


@st.composite
def hostile_chunk(draw, manifest):
    """(topic, payload) for the upload handler: valid chunks of an update, mutated, or bytes."""
    blob = encode_tensors(good_tensors(manifest, draw(st.integers(0, 3))))
    src = BlobSource(draw(st.sampled_from(["upd-a", "upd-b"])), blob, 1024)
    payload = next(src.payloads([draw(st.integers(0, src.count - 1))]))
    device = draw(st.sampled_from(DEVICES))
    blob_id = draw(st.sampled_from([src.blob_id, "upd-other"]))
    how = draw(st.sampled_from(["valid", "flip", "truncate", "bytes"]))
    if how == "flip":
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1:]
    elif how == "truncate":
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    elif how == "bytes":
        payload = draw(st.binary(max_size=200))
    return topics.upload_topic(RUN, device, blob_id), payload


def _valid_chunk(topic: str, payload: bytes) -> bool:
    try:
        return Chunk.from_bytes(payload).blob_id == topics.blob_id_of(topic)
    except ProtocolError:
        return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_chunks_never_crash_the_cloud(fuzz_fed, log_counter, data):
    topic, payload = data.draw(hostile_chunk(fuzz_fed.manifest))
    _throw(fuzz_fed, log_counter, topic, payload, bad=not _valid_chunk(topic, payload))


@st.composite
def hostile_update(draw, manifest):
    """A whole update blob of drawn tensors (names, shapes, dtypes, values near the real ones)."""
    specs = {t.key: (tuple(t.shape), t.dtype) for t in manifest.trainable}
    layer, neurons = next((s.layer, s.neurons) for s in manifest.stat_outputs)
    names = [*specs, stat_key(layer, "off_counts"), stat_key(layer, "positions"), stat_key(layer + 7, "positions"), "x"]
    tensors = {k: (np.zeros(s, d) + 0.01) for k, (s, d) in specs.items()} if draw(st.booleans()) else {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(names))
        shape = draw(st.sampled_from([specs.get(name, ((neurons,), ""))[0], (1,), (neurons,), (2, 3), ()]))
        dtype = draw(st.sampled_from(["float32", "float32", "float64", "float16", "int32", "uint8", "bool"]))
        value = draw(st.sampled_from([0.0, 1.0, -1.0, 1e30, np.nan, np.inf, 1e6]))
        with np.errstate(all="ignore"):
            tensors[name] = np.full(shape, value).astype(dtype)
    device = draw(st.sampled_from(["d1", "d2"]))
    return device, encode_tensors(tensors, binding(RUN, 0, device, _Task.task_id))


_seq = iter(range(10**9))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_update_blobs_are_accepted_or_refused_with_a_reason(fuzz_fed, log_counter, data):
    device, blob = data.draw(hostile_update(fuzz_fed.manifest))
    src = BlobSource(f"upd-{device}-{next(_seq)}", blob, 1024)
    _open_round(fuzz_fed)
    before = len(log_counter.records)
    for payload in src.payloads():
        send(fuzz_fed, device, topics.upload_topic(RUN, device, src.blob_id), payload)
    uid = make_update_id(RUN, 0, device, _Task.task_id, src.ref.sha256)
    send(fuzz_fed, device, topics.device_topic(RUN, device, topics.UPDATE), encode(Update(
        run_id=RUN, round_id=0, sender=device, device_id=device, blob=src.ref, num_samples=1, task_id=_Task.task_id, update_id=uid)))
    drain(fuzz_fed)
    said = [r.getMessage() for r in log_counter.records[before:]]
    assert not [r for r in log_counter.records[before:] if r.levelno >= logging.ERROR]
    verdicts = [m for m in said if f"update from {device} " in m or m.startswith(f"rejected update from {device} ")]
    assert len(verdicts) == 1, said


def test_hellos_from_arbitrary_ids_cannot_grow_the_device_registry(tiny_bert_bundle, tmp_path, caplog):
    hub = InMemoryHub()
    cloud = hub.transport("cloud")
    cloud.connect()
    fed = Federation(ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", run_id=RUN, max_devices=3), cloud, show_progress=False)
    fed.subscribe()

    def say(msg) -> None:
        kind = {Hello: topics.HELLO, Presence: topics.PRESENCE, Ack: topics.ACK}[type(msg)]
        send(fed, msg.device_id, topics.device_topic(RUN, msg.device_id, kind), encode(msg))
        drain(fed)

    base = dict(run_id=RUN, round_id=0, sent_at=1.0)
    for d in ("a", "b", "c"):
        say(Hello(**base, sender=d, device_id=d, num_samples=1))
    say(Presence(**base, sender="b", device_id="b", status="offline"))
    say(Presence(**base, sender="ghost", device_id="ghost", status="offline"))  # never seen: not registered
    say(Ack(**base, sender="ghost2", device_id="ghost2", acked="task"))
    assert sorted(fed.devices) == ["a", "b", "c"]
    say(Hello(**base, sender="d", device_id="d", num_samples=1))  # b, offline, makes room
    assert sorted(fed.devices) == ["a", "c", "d"]
    with caplog.at_level(logging.WARNING, logger="fedpft"):
        say(Hello(**base, sender="e", device_id="e", num_samples=1))  # all online: refused, in one line
        say(Presence(**base, sender="f", device_id="f", status="online"))  # a retained presence too
    assert sorted(fed.devices) == ["a", "c", "d"]
    assert any("device registry full" in r.getMessage() and "e" in r.getMessage() for r in caplog.records)
