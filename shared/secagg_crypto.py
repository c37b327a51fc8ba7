"""Secure aggregation key material: X25519 agreement, HKDF seeds, sealed share boxes, the
neighbour graph and the self-seed commitment. Pure functions over bytes (no state, no I/O).

Each device holds two X25519 key pairs per round (Bonawitz et al. 2017): `enc` agrees the
AEAD key that seals the Shamir shares it sends to a peer through the cloud, `mask` agrees the
pairwise mask seed. Keys are fresh per round, so a seed derived from them never repeats; the
HKDF `info` still binds run, round and task, so nothing derived for one round fits another.

Graph (SecAgg+, Bell et al. 2020): `degree=None` is the complete graph (plain SecAgg). Otherwise a
circulant graph over the roster permuted by a public seed: each device masks with, and shares its
secrets among, its `degree` nearest ring neighbours (degree even), so cost per device is O(degree)
instead of O(n). A device's share holders are its neighbours and itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .shamir import SHARE_BYTES

_NONCE = 12
# A sealed box: nonce | ciphertext of (x u16 | mask-key share | self-seed share) | tag.
_PLAIN = struct.Struct(f">H{SHARE_BYTES}s{SHARE_BYTES}s")
BOX_BYTES = _NONCE + _PLAIN.size + 16


def context(run_id: str, round_id: int, task_id: str) -> bytes:
    return f"{run_id}\n{round_id}\n{task_id}".encode("utf-8")


def new_private() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_of_private(raw: bytes) -> str:
    """The public key (hex) of a raw private key: checks a reconstructed mask key."""
    return public_hex(X25519PrivateKey.from_private_bytes(raw))


def agree(private: X25519PrivateKey | bytes, peer_public_hex: str, purpose: str, ctx: bytes) -> bytes:
    """32 bytes = HKDF-SHA256(X25519(private, peer), info = purpose | ctx). ValueError on a
    malformed or low-order peer key (cryptography refuses an all-zero shared secret)."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex))
    except ValueError as exc:
        raise ValueError(f"bad X25519 public key: {exc}") from None
    shared = private.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode() + b"\n" + ctx).derive(shared)


def mask_seed(private: X25519PrivateKey | bytes, peer_public_hex: str, ctx: bytes) -> bytes:
    return agree(private, peer_public_hex, "fedpft-secagg-mask", ctx)


def box_key(private: X25519PrivateKey | bytes, peer_public_hex: str, ctx: bytes) -> bytes:
    return agree(private, peer_public_hex, "fedpft-secagg-box", ctx)


def _aad(ctx: bytes, sender: str, recipient: str) -> bytes:
    return ctx + f"\n{sender}\n{recipient}".encode("utf-8")


def seal(key: bytes, ctx: bytes, sender: str, recipient: str, x: int, mask_share: int, seed_share: int) -> str:
    """Base64 box a peer opens with the same agreed key; the cloud routing it cannot read it, and
    the AAD binds it to (run, round, task, sender, recipient)."""
    nonce = os.urandom(_NONCE)
    plain = _PLAIN.pack(x, mask_share.to_bytes(SHARE_BYTES, "big"), seed_share.to_bytes(SHARE_BYTES, "big"))
    return base64.b64encode(nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(ctx, sender, recipient))).decode()


def open_box(key: bytes, ctx: bytes, sender: str, recipient: str, box: str) -> tuple[int, int, int]:
    """(x, mask-key share, self-seed share); ValueError with the reason on any fault."""
    try:
        raw = base64.b64decode(box, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("share box is not base64") from None
    if len(raw) != BOX_BYTES:
        raise ValueError(f"share box of {len(raw)} bytes, expected {BOX_BYTES}")
    try:
        plain = ChaCha20Poly1305(key).decrypt(raw[:_NONCE], raw[_NONCE:], _aad(ctx, sender, recipient))
    except InvalidTag:
        raise ValueError("share box does not authenticate (wrong key, or another round's or peer's box)") from None
    x, m, s = _PLAIN.unpack(plain)
    return x, int.from_bytes(m, "big"), int.from_bytes(s, "big")


def seed_commitment(seed: bytes, ctx: bytes) -> str:
    """Published with the keys; lets the cloud check a reconstructed self-mask seed."""
    return hashlib.sha256(b"fedpft-secagg-seed\n" + ctx + b"\n" + seed).hexdigest()


def neighbours(devices: Sequence[str], degree: int | None, ctx: bytes) -> dict[str, set[str]]:
    """Undirected mask/share graph over `devices`: complete, or circulant of even `degree`."""
    ids = sorted(devices)
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {d: set(ids) - {d} for d in ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even number >= 2, got {degree}")
    order = sorted(ids, key=lambda d: hashlib.sha256(ctx + b"\n" + d.encode()).digest())
    graph: dict[str, set[str]] = {d: set() for d in ids}
    for i, d in enumerate(order):
        for step in range(1, degree // 2 + 1):
            peer = order[(i + step) % n]
            graph[d].add(peer)
            graph[peer].add(d)
    return graph


def share_point(devices: Sequence[str], device: str) -> int:
    """A holder's Shamir x: its 1-based position in the sorted roster."""
    return sorted(devices).index(device) + 1
