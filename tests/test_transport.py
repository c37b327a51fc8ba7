import logging
import threading

import pytest

from fedpft.shared import topics as T
from fedpft.shared.messages import ProtocolError
from fedpft.shared.transport import (
    Dispatcher, InMemoryHub, InMemoryTransport, Transport, TransportError, check_pattern, topic_matches,
)


@pytest.mark.parametrize(
    "pattern, topic, hit",
    [
        ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
        ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True), ("+", "a/b", False),
        ("a/+/c", "a/x/c", True), ("a/+/c", "a/x/d", False), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True), ("a/b", "a/b/c", False), ("a/b/c", "a/b", False),
    ],
)
def test_wildcards(pattern, topic, hit):
    assert topic_matches(pattern, topic) is hit


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a"])
def test_bad_patterns(bad):
    with pytest.raises(TransportError):
        check_pattern(bad)


def test_in_memory_is_a_transport():
    assert isinstance(InMemoryTransport(InMemoryHub(), "x"), Transport)


def test_synchronous_delivery_is_deterministic_and_includes_replies():
    hub = InMemoryHub()
    run = "t-sync"
    log: list[str] = []
    with hub.transport("cloud") as cloud, hub.transport("d1") as d1, hub.transport("d2") as d2:
        for dev, t in (("d1", d1), ("d2", d2)):
            def on_task(topic, payload, dev=dev, t=t):
                log.append(f"{dev} got {payload.decode()}")
                t.publish(T.device_topic(run, dev, "update"), f"from {dev}".encode())
            t.subscribe(T.round_topic(run), on_task)
        cloud.subscribe(T.all_devices_pattern(run, "update"), lambda topic, p: log.append(f"cloud got {p.decode()}"))
        cloud.publish(T.round_topic(run), b"task1")
        # Everything, replies included, has run by the time publish returns.
        assert log == ["d1 got task1", "d2 got task1", "cloud got from d1", "cloud got from d2"]


def test_handler_errors_are_one_log_line_and_do_not_stop_delivery(caplog):
    hub = InMemoryHub()
    got = []

    def broken(topic, payload):
        raise RuntimeError("boom\nsecond line")

    def rejecting(topic, payload):
        raise ProtocolError("bad message")

    with hub.transport("a") as a, hub.transport("b") as b:
        b.subscribe("x/#", broken)
        b.subscribe("x/1", rejecting)
        b.subscribe("x/+", lambda t, p: got.append(p))
        with caplog.at_level(logging.WARNING):
            a.publish("x/1", b"1")
            a.publish("x/1", b"2")
    assert got == [b"1", b"2"]
    assert any("RuntimeError: boom" in r.getMessage() for r in caplog.records)
    assert any("rejected message on x/1: bad message" in r.getMessage() for r in caplog.records)
    assert all(r.exc_info is None for r in caplog.records)  # no tracebacks


def test_threaded_delivery_runs_off_the_publisher_thread():
    hub = InMemoryHub(threaded=True)
    seen = []
    done = threading.Event()
    with hub.transport("a") as a, hub.transport("b") as b:
        b.subscribe("q/#", lambda t, p: (seen.append((threading.current_thread().name, p)), done.set()))
        a.publish("q/1", b"x")
        assert done.wait(5)
        assert hub.join(5)
    assert seen == [("dispatch-b", b"x")]


def test_retained_messages_and_clearing():
    hub = InMemoryHub()
    with hub.transport("a") as a:
        a.publish("r/p", b"online", retain=True)
        got = []
        with hub.transport("b") as b:
            b.subscribe("r/+", lambda t, p: got.append(p))
            assert got == [b"online"]
        a.publish("r/p", b"", retain=True)
        assert "r/p" not in hub.retained


def test_last_will_on_abort_not_on_close():
    hub = InMemoryHub()
    run = "t-will"
    seen = []
    with hub.transport("cloud") as cloud:
        cloud.subscribe(T.all_devices_pattern(run, "presence"), lambda t, p: seen.append((T.parse(t).device_id, p)))
        will = (T.device_topic(run, "d1", "presence"), b"offline")
        d1 = hub.transport("d1", will=will)
        d1.connect()
        d1.close()
        assert seen == []
        d2 = hub.transport("d1", will=will)
        d2.connect()
        d2.abort()
        assert seen == [("d1", b"offline")]
        assert hub.retained[will[0]] == b"offline"


def test_persistent_session_queues_while_offline():
    hub = InMemoryHub()
    got = []
    with hub.transport("cloud") as cloud:
        dev = hub.transport("d1")
        dev.subscribe("fedpft/r/round", lambda t, p: got.append(p))
        dev.connect()
        dev.close()
        cloud.publish("fedpft/r/round", b"while away")
        back = hub.transport("d1")  # a new process, same client id
        back.subscribe("fedpft/r/round", lambda t, p: got.append(p))
        back.connect()
        assert got == [b"while away"]
        back.close()
        clean = hub.transport("d1", clean_start=True)
        cloud.publish("fedpft/r/round", b"dropped: clean session")
        clean.subscribe("fedpft/r/round", lambda t, p: got.append(p))
        clean.connect()
        assert got == [b"while away"]
        clean.close()


def test_unsubscribe_and_publish_rules():
    hub = InMemoryHub()
    got = []
    t = hub.transport("a")
    with pytest.raises(TransportError, match="not connected"):
        t.publish("x", b"")
    with t:
        t.subscribe("x", lambda tp, p: got.append(p))
        t.publish("x", b"1")
        t.unsubscribe("x")
        t.publish("x", b"2")
        with pytest.raises(TransportError, match="invalid publish topic"):
            t.publish("x/#", b"")
    assert got == [b"1"]


def test_dispatcher_join_and_stop():
    d = Dispatcher("t")
    got = []
    d.add("#", lambda t, p: got.append(p))
    d.start()
    for i in range(100):
        d.deliver("a", bytes([i]))
    assert d.join(5) and len(got) == 100
    d.stop()


def test_dispatcher_finds_the_same_handlers_as_matching_every_pattern():
    """The index by literal prefix is only a shortcut: for any subscriptions and topic it must
    return what a scan of every pattern returns, in subscription order, and forget removed ones."""
    import random

    rng = random.Random(7)
    words = ["a", "b", "fedpft", "$SYS", "dev1", "dev2"]
    d = Dispatcher("idx", threaded=False)
    subs: dict[str, list] = {}
    for i in range(400):
        n = rng.randint(1, 4)
        levels = [rng.choice(words + ["+"]) for _ in range(n)]
        if rng.random() < 0.2:
            levels[-1] = "#"
        pattern = "/".join(levels)
        h = (lambda i: lambda topic, payload: i)(i)
        d.add(pattern, h)
        subs.setdefault(pattern, []).append(h)
    for pattern in list(subs)[::5]:
        assert d.remove(pattern)
        del subs[pattern]
    assert not d.remove("never/subscribed")
    for _ in range(2000):
        topic = "/".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        assert d.handlers(topic) == [h for p, hs in subs.items() if topic_matches(p, topic) for h in hs], topic
