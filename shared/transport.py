"""The one Transport interface the round logic talks to, and its in-memory implementation.

Handlers receive (topic, payload bytes). They never run on a network thread: a transport only
enqueues what arrives, and a `Dispatcher` calls the handlers from its own worker (or, for the
deterministic in-memory hub, from the publisher's thread once the publish is queued). A handler
that raises is logged as one line and the loop goes on, so one bad message cannot stop a run.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, runtime_checkable

from .messages import ProtocolError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


class TransportError(RuntimeError):
    """The transport cannot do what was asked (broker unreachable, not connected, timed out)."""


@runtime_checkable
class Transport(Protocol):
    client_id: str

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        """Deliver `payload` on `topic`. `wait=False` returns once the transport holds the message
        (QoS 1 delivery is still retried, across reconnects) instead of after the broker's
        acknowledgement: for replies whose loss the peer recovers from, e.g. receipts a device asks
        for again, where waiting would serialise a fleet's replies on one round trip each."""
        ...

    def subscribe(self, pattern: str, handler: Handler) -> None: ...

    def unsubscribe(self, pattern: str) -> None: ...

    def __enter__(self) -> "Transport": ...

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None: ...


# ---- MQTT topic rules ----------------------------------------------------------------------------


def check_topic(topic: str) -> str:
    """A concrete topic one may publish to: non-empty, no wildcards, no NUL."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise TransportError(f"invalid publish topic {topic!r}")
    return topic


def check_pattern(pattern: str) -> str:
    """A subscription filter: '+' fills one whole level, '#' only as the whole last level."""
    levels = pattern.split("/") if pattern else []
    ok = bool(levels) and "\0" not in pattern
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            ok = False
    if not ok:
        raise TransportError(f"invalid subscription pattern {pattern!r}")
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching; wildcards at the first level do not match '$SYS'-style topics."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    pl, tl = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pl):
        if p == "#":
            return True
        if i >= len(tl) or (p != "+" and p != tl[i]):
            return False
    return len(pl) == len(tl)


def bucket(pattern: str) -> tuple[int, str]:
    """(-1, pattern) for a filter without wildcards; else (levels before its first wildcard, those
    levels): every topic it can match starts with them."""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            return i, "/".join(levels[:i])
    return -1, pattern


# ---- hand-off from the network to the handlers ----------------------------------------------------


class Dispatcher:
    """Subscriptions and the queue between the receiving thread and the handlers.

    `threaded=True` runs handlers on one worker thread per transport (in arrival order);
    `threaded=False` leaves the queue for `run_pending()` to drain in the caller's thread.
    """

    def __init__(self, name: str, threaded: bool = True) -> None:
        self.name = name
        self.threaded = threaded
        self._subs: dict[str, list[Handler]] = {}  # in subscription order: handlers run in it
        # pattern -> its bucket: a topic looks up one bucket per wildcard depth in use instead of
        # matching every pattern (a process hosting many devices on one connection subscribes
        # thousands: benchmarks/simdevice.py's shared link)
        self._buckets: dict[tuple[int, str], list[str]] = {}
        self._depths: dict[int, int] = {}  # wildcard depth -> patterns with it
        self._order: dict[str, int] = {}
        self._added = itertools.count()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._unfinished = 0
        self._thread: threading.Thread | None = None

    # subscriptions
    def add(self, pattern: str, handler: Handler) -> None:
        with self._lock:
            if check_pattern(pattern) not in self._subs:
                depth, key = bucket(pattern)
                self._buckets.setdefault((depth, key), []).append(pattern)
                self._depths[depth] = self._depths.get(depth, 0) + 1
                self._order[pattern] = next(self._added)
            self._subs.setdefault(pattern, []).append(handler)

    def remove(self, pattern: str) -> bool:
        with self._lock:
            if self._subs.pop(pattern, None) is None:
                return False
            del self._order[pattern]
            depth, key = bucket(pattern)
            patterns = self._buckets[depth, key]
            patterns.remove(pattern)
            if not patterns:
                del self._buckets[depth, key]
            self._depths[depth] -= 1
            if not self._depths[depth]:
                del self._depths[depth]
            return True

    def handlers(self, topic: str) -> list[Handler]:
        """The handlers of every pattern matching `topic`, patterns in subscription order."""
        levels = topic.split("/")
        with self._lock:
            found = list(self._buckets.get((-1, topic), ()))
            for depth in self._depths:
                if 0 <= depth <= len(levels):
                    found += self._buckets.get((depth, "/".join(levels[:depth])), ())
            if len(found) > 1:
                found.sort(key=self._order.__getitem__)
            return [h for p in found if topic_matches(p, topic) for h in self._subs[p]]

    def patterns(self) -> list[str]:
        with self._lock:
            return list(self._subs)

    # queue
    def deliver(self, topic: str, payload: bytes) -> None:
        """Called from the receiving side: only enqueue, never run user code here."""
        with self._idle:
            self._unfinished += 1
        self._queue.put((topic, bytes(payload)))

    def start(self) -> None:
        if self.threaded and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._worker, name=f"dispatch-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Run what is already queued, then stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
            self._thread = None

    def run_pending(self) -> int:
        """Run queued deliveries in this thread (unthreaded mode); returns how many ran."""
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            if item is not None:
                self._run(*item)
                n += 1

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every queued delivery has been handled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _worker(self) -> None:
        while (item := self._queue.get()) is not None:
            self._run(*item)

    def _run(self, topic: str, payload: bytes) -> None:
        try:
            for handler in self.handlers(topic):
                try:
                    handler(topic, payload)
                except ProtocolError as exc:
                    log.warning("%s: rejected message on %s: %s", self.name, topic, exc.reason)
                except Exception as exc:  # a handler bug must not stop the receive loop
                    log.error("%s: handler %s failed on %s: %s: %s", self.name, _name(handler), topic, type(exc).__name__, exc)
        finally:
            with self._idle:
                self._unfinished -= 1
                self._idle.notify_all()


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


# ---- in memory -------------------------------------------------------------------------------------


@dataclass
class _Session:
    persistent: bool
    transport: "InMemoryTransport | None" = None
    patterns: set[str] = field(default_factory=set)
    pending: list[tuple[str, bytes]] = field(default_factory=list)


class InMemoryHub:
    """A broker in a dict: wildcard routing, retained messages, last wills, persistent sessions.

    Unthreaded (default): `publish` returns only after every delivery it caused, including
    replies published from handlers, has run — in one deterministic order, in the caller's
    thread. Handlers must then not block on other threads; use `threaded=True` when the cloud
    and devices run on threads of their own, and `join()` to wait for quiet.
    """

    def __init__(self, threaded: bool = False) -> None:
        self.threaded = threaded
        self.retained: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.RLock()
        self._pumping = False
        self.published: list[tuple[str, bytes]] = []  # every publish, for tests to inspect

    def transport(self, client_id: str, **kwargs: object) -> "InMemoryTransport":
        return InMemoryTransport(self, client_id, **kwargs)  # type: ignore[arg-type]

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until no transport has deliveries left (threaded mode)."""
        with self._lock:
            dispatchers = [s.transport._dispatcher for s in self._sessions.values() if s.transport]
        return all(d.join(timeout) for d in dispatchers)

    # called by InMemoryTransport
    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.published.append((topic, payload))
            if retain:
                # MQTT: an empty retained payload clears the retained message.
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            for s in self._sessions.values():
                if any(topic_matches(p, topic) for p in s.patterns):
                    if s.transport is not None:
                        s.transport._dispatcher.deliver(topic, payload)
                    elif s.persistent:
                        s.pending.append((topic, payload))  # QoS 1 held for an offline session
        self._pump()

    def _connect(self, t: "InMemoryTransport") -> None:
        with self._lock:
            s = self._sessions.get(t.client_id)
            if s is not None and s.transport is not None and s.transport is not t:
                s.transport._connected = False  # session takeover, as a broker does
            if s is None or t.clean_start:
                s = self._sessions[t.client_id] = _Session(persistent=not t.clean_start)
            s.transport = t
            pending, s.pending = s.pending, []
            for topic, payload in pending:
                t._dispatcher.deliver(topic, payload)
        for pattern in t._dispatcher.patterns():
            self._subscribe(t, pattern)
        self._pump()

    def _subscribe(self, t: "InMemoryTransport", pattern: str) -> None:
        with self._lock:
            s = self._sessions[t.client_id]
            s.patterns.add(pattern)
            for topic, payload in self.retained.items():
                if topic_matches(pattern, topic):
                    t._dispatcher.deliver(topic, payload)
        self._pump()

    def _unsubscribe(self, t: "InMemoryTransport", pattern: str) -> None:
        with self._lock:
            s = self._sessions.get(t.client_id)
            if s is not None:
                s.patterns.discard(pattern)

    def _disconnect(self, t: "InMemoryTransport", abrupt: bool) -> None:
        with self._lock:
            s = self._sessions.get(t.client_id)
            if s is None or s.transport is not t:
                return
            s.transport = None
            if not s.persistent:
                del self._sessions[t.client_id]
        if abrupt and t.will is not None:
            self._publish(t.will[0], t.will[1], t.will_retain)

    def _pump(self) -> None:
        if self.threaded:
            return
        with self._lock:
            if self._pumping:  # a handler published: the outer pump will deliver it
                return
            self._pumping = True
            try:
                while True:
                    ran = sum(s.transport._dispatcher.run_pending() for s in list(self._sessions.values()) if s.transport)
                    if not ran:
                        break
            finally:
                self._pumping = False


class InMemoryTransport:
    """A `Transport` on an `InMemoryHub`: same semantics as MqttTransport, no sockets."""

    def __init__(
        self,
        hub: InMemoryHub,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        will_retain: bool = True,
        clean_start: bool = False,
    ) -> None:
        self.hub = hub
        self.client_id = client_id
        self.will = (check_topic(will[0]), will[1]) if will else None
        self.will_retain = will_retain
        self.clean_start = clean_start
        self._connected = False
        self._dispatcher = Dispatcher(client_id, threaded=hub.threaded)

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self._dispatcher.start()
        self._connected = True
        self.hub._connect(self)

    def close(self) -> None:
        """Graceful disconnect: no last will."""
        if self._connected:
            self._connected = False
            self.hub._disconnect(self, abrupt=False)
        self._dispatcher.stop()

    def abort(self) -> None:
        """Drop the connection as a crash would: the hub publishes the last will."""
        if self._connected:
            self._connected = False
            self.hub._disconnect(self, abrupt=True)
        self._dispatcher.stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        if not self._connected:
            raise TransportError(f"{self.client_id}: not connected, cannot publish to {topic}")
        self.hub._publish(check_topic(topic), bytes(payload), retain)

    def subscribe(self, pattern: str, handler: Handler) -> None:
        self._dispatcher.add(pattern, handler)
        if self._connected:
            self.hub._subscribe(self, pattern)

    def unsubscribe(self, pattern: str) -> None:
        self._dispatcher.remove(pattern)
        if self._connected:
            self.hub._unsubscribe(self, pattern)

    def join(self, timeout: float | None = 10.0) -> bool:
        """Wait until this transport's handlers have run on everything delivered so far."""
        return self._dispatcher.join(timeout)

    def __enter__(self) -> "InMemoryTransport":
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
