"""Ed25519 signatures over what the cloud sends: the bundle manifest and each round's Task.

- The bundle: the signature covers the canonical JSON of the manifest without its `signature`
  field. The manifest holds the sha256 of every file, so it vouches for the whole bundle.
- A Task: the signature covers the canonical JSON of the Task without `signature`. The Task
  names the global adapters and the re-aligned FFN weights by sha256 (and carries run, round,
  hyper-parameters and deadline), so one signature vouches for every blob of the round, and a
  Task cannot be replayed into another run or round.

Keys are PEM files (private: PKCS#8, mode 0600; public: SubjectPublicKeyInfo); a key id is the
first 16 hex digits of the sha256 of the raw public key. Devices only verify, so they only need
the public key (`fedpft-edge train --trust-key`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from .fsio import atomic_write
from .manifest import MANIFEST_NAME, BundleManifest

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"

Signed = TypeVar("Signed", bound=BaseModel)


class SignatureError(Exception):
    """Content that is unsigned, signed by another key, or changed after signing; one line."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(folder: Path) -> tuple[Path, Path]:
    """Write a new key pair into `folder` (the private key 0600); refuses to overwrite one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    priv, pub = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if priv.exists() or pub.exists():
        raise FileExistsError(f"{folder} already holds a signing key; remove it first to make a new one")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "trusted key"))
    except ValueError as exc:
        raise SignatureError(f"trusted key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key {path}: not an Ed25519 key")
    return key


def canonical(record: BaseModel) -> bytes:
    """What is signed: sorted, compact JSON of the record without its `signature` field."""
    data = record.model_dump(mode="json", exclude={"signature"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def sign(record: Signed, key: Ed25519PrivateKey) -> Signed:
    """A copy of `record` (a model with `signature` and `signer` fields) signed by `key`."""
    unsigned = record.model_copy(update={"signer": key_id(key.public_key()), "signature": None})
    return unsigned.model_copy(update={"signature": key.sign(canonical(unsigned)).hex()})


def verify(record: BaseModel, trusted: Ed25519PublicKey, what: str) -> None:
    """SignatureError (one line naming `what`) unless `record` is signed by `trusted`, unchanged."""
    want = key_id(trusted)
    signature, signer = getattr(record, "signature", None), getattr(record, "signer", None)
    if not signature:
        raise SignatureError(f"{what} is not signed (this device trusts key {want}); refused")
    if signer != want:
        raise SignatureError(f"{what} is signed by key {signer}, not by the trusted key {want}; refused")
    try:
        trusted.verify(bytes.fromhex(signature), canonical(record))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: signature does not verify with key {want} (tampered); refused") from None


def sign_bundle(folder: Path, key: Ed25519PrivateKey) -> BundleManifest:
    """Sign a bundle's manifest in place (the files are covered through their sha256)."""
    manifest = sign(BundleManifest.load(folder), key)
    atomic_write(Path(folder) / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    return manifest
