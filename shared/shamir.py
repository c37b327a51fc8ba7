"""Shamir t-out-of-n secret sharing over the prime field GF(2^521 - 1).

A Mersenne prime large enough that one field element holds a whole 32-byte secret (an X25519
private key, a self-mask seed): one share per secret, no chunking. Shares are evaluated at
x = 1..n (a holder's 1-based position in the round's roster), x = 0 is the secret. Pure Python
ints; a round shares 2 secrets per holder, so speed is not a concern.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares {x: f(x)} of a degree threshold-1 polynomial with f(0) = secret."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def reconstruct(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from any `threshold` shares (Lagrange at 0); ValueError if fewer, or if the
    value is not a 32-byte secret (a corrupt share yields a random field element)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("shares do not reconstruct a 32-byte secret (a corrupt share)")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_hex(y: int) -> str:
    return y.to_bytes(SHARE_BYTES, "big").hex()


def share_from_hex(text: str) -> int:
    """ValueError unless `text` is one field element in hex."""
    if len(text) != 2 * SHARE_BYTES:
        raise ValueError(f"a share is {2 * SHARE_BYTES} hex digits, got {len(text)}")
    y = int(text, 16)
    if y >= PRIME:
        raise ValueError("share is not a field element")
    return y


def robust_reconstruct(shares: Mapping[int, int], threshold: int, check: Callable[[bytes], bool],
                       max_tries: int = 64) -> bytes | None:
    """The secret from some `threshold` of `shares` that passes `check` (a commitment or a public
    key), trying subsets in order: a holder sending a well-formed but wrong share cannot spoil the
    round while `threshold` honest shares remain among the first subsets tried. None if none fits."""
    if len(shares) < threshold:
        return None
    for tries, subset in enumerate(combinations(sorted(shares), threshold)):
        if tries >= max_tries:
            break
        try:
            secret = reconstruct({x: shares[x] for x in subset}, threshold)
        except ValueError:
            continue
        if check(secret):
            return secret
    return None
