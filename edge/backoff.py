"""How long a device waits for its update's receipt before uploading again."""

from __future__ import annotations

import random

# the last waits stay within this many times the first: a device must still answer within a round
MAX_FACTOR = 8


def receipt_wait(base: float, attempt: int, rng: random.Random) -> float:
    """Seconds to wait for the receipt of upload `attempt` (0 = the first): `base`, doubling with
    every attempt up to MAX_FACTOR x, times a draw from [1, 1.5). A cloud slow to check a burst of
    uploads (BENCHMARKS.md, scale: 5,000 devices) must not get the whole burst again at one
    instant, and again twice as large: the doubling thins the waves, the draw spreads each one."""
    return base * min(2 ** attempt, MAX_FACTOR) * (1.0 + 0.5 * rng.random())


# How far "queued" notices may stretch one wait for a receipt, in receipt timeouts: the cloud sends
# one when an update's checks have waited 10 s behind others, and one for each copy it gets while
# checking the first; the receipt follows, so uploading the same bytes again would only add to the queue.
QUEUED_MAX_WAIT = 8


def busy_wait(retry_after: float | None, rng: random.Random) -> float:
    """Seconds before uploading again after a "busy" receipt: the cloud's `retry_after` (1 s if it
    gave none) times a draw from [1, 2), so the devices it turned away together come back spread."""
    return (1.0 if retry_after is None else retry_after) * (1.0 + rng.random())
