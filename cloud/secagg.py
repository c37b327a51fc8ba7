"""The cloud side of secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+ graph, Bell et al.
2020): a transport-agnostic state machine that learns only the sum of the round's inputs.

    handle(SecAggKeys)            stage keys     collect fresh public keys
    roster()        -> SecAggRoster              close keys: broadcast keys and parameters
    handle(SecAggShares)          stage shares   sealed Shamir shares, routed unread
    routed()        -> {device: SecAggRouted}    close shares: each device's boxes, to its inbox
    handle(SecAggMasked, blob)    stage masked   add each masked input to a running ring sum
    unmask_request() -> SecAggUnmask             close masked: survivors and dropped devices
    handle(SecAggReveal)          stage unmask   shares of survivors' seeds and dropped keys
    result()        -> SecAggResult              reconstruct, unmask, decode the sum

`handle` returns None when a message counts, else one line saying why it was refused; the round
goes on without that message. A stage that ends with too few devices raises SecAggAbort(reason).
Recovery: any k devices dropping after their shares were routed are unmasked when k <= n - T
(complete graph; with a SecAgg+ degree, when T holders of each dropped device survive).

What the cloud holds is masked material only: public keys, sealed boxes it cannot open, the
running sum of masked inputs (never one device's input, only its sha256), and, in the last stage,
shares that by the reveal rule never open both secrets of one device. `snapshot()` is exactly that
(cloud/secagg_store.py writes it); the unmasked sum exists only as `result()`'s return value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpft.shared import secagg_crypto as sc
from fedpft.shared import secagg_ring as ring
from fedpft.shared import shamir
from fedpft.shared.codec import decode_tensors
from fedpft.shared.messages import (
    ProtocolError, SecAggBox, SecAggKeys, SecAggMasked, SecAggPeer, SecAggReveal, SecAggRoster, SecAggRouted, SecAggShares,
    SecAggUnmask,
)
from fedpft.shared.signing import sign
from fedpft.shared.update import check_binding

from .secagg_unmask import SecAggAbort, recover

STAGES = ("keys", "shares", "masked", "unmask", "done", "failed")


def default_threshold(n: int) -> int:
    """Of n share holders per device, 2n/3 + 1 (at least 2): tolerates a third of the round dropping, and two disjoint survivor
    sets can never both reach it, so a lying cloud cannot get both secrets of one device."""
    return min(n, max(2, 2 * n // 3 + 1))


def value_bound(clip: float, weight_cap: float, max_positions: float, noise_std: float = 0.0,
                stats_sensitivity: float = 0.0) -> float:
    """Bound on |x| of every coordinate one device encodes (the ring's overflow bound uses it).

    Without DP: weight_cap * clip for the weighted change (a coordinate is at most the L2 norm),
    the weight itself, and max_positions for counts. With DP (noise_std > 0): weight 1, so
    clip + 10 noise stds for the change and 1 + 10 stds of the rates' noise (std * S / C) for the
    rates; a 10-sigma tail (p ~ 1e-23) is clamped by the device if it ever happens.
    """
    if noise_std > 0:
        return max(clip + 10 * noise_std, 1.0 + 10 * noise_std * stats_sensitivity / clip)
    return max(weight_cap * clip, weight_cap, max_positions)


@dataclass(frozen=True)
class SecAggConfig:
    layout: dict[str, tuple[int, ...]]
    value_bound: float
    threshold: int | None = None  # None: default_threshold(share holders per device)
    degree: int | None = None  # SecAgg+ neighbours; None = complete graph
    frac_bits: int = ring.FRAC_BITS
    clip: float | None = None
    noise_std: float = 0.0


@dataclass
class SecAggResult:
    values: dict[str, np.ndarray]  # the decoded sum, float64, by layout name
    survivors: list[str]
    dropped: list[str]
    rejected: list[tuple[str, str]] = field(default_factory=list)


class SecAggCoordinator:
    def __init__(self, run_id: str, round_id: int, task_id: str, devices: list[str], config: SecAggConfig,
                 signing_key: Ed25519PrivateKey | None = None):
        self.run_id, self.round_id, self.task_id = run_id, round_id, task_id
        self.devices, self.config, self.signing_key = sorted(devices), config, signing_key
        self.ctx = sc.context(run_id, round_id, task_id)
        self.length = ring.layout_size(config.layout)
        self.stage = "keys"
        self.failure: str | None = None
        self.keys: dict[str, SecAggKeys] = {}
        self.threshold = 0
        self.graph: dict[str, set[str]] = {}
        self.boxes: dict[str, dict[str, str]] = {}  # sender -> recipient -> sealed box
        self.survivors_u2: list[str] = []
        self.masked_sum = np.zeros(self.length, dtype=np.uint64)
        self.masked_sha: dict[str, str] = {}
        self.dropped: list[str] = []
        self.reveals: dict[str, dict[str, tuple[str, int]]] = {}  # holder -> owner -> (secret, share)
        self.rejected: list[tuple[str, str]] = []

    # ---- intake ---------------------------------------------------------------------------
    def handle(self, msg, blob: bytes | None = None) -> str | None:
        """Take one device message; None if it counts, else the one-line reason it does not."""
        try:
            self._route(msg, blob)
        except ProtocolError as exc:
            self.rejected.append((msg.sender, exc.reason))
            return f"secagg: {msg.type} from {msg.sender} rejected: {exc.reason}"
        return None

    def _route(self, msg, blob: bytes | None) -> None:
        if (msg.run_id, msg.round_id, getattr(msg, "task_id", None)) != (self.run_id, self.round_id, self.task_id):
            raise ProtocolError(f"for run {msg.run_id} round {msg.round_id} task {getattr(msg, 'task_id', None)}, "
                                f"not this round ({self.round_id}, task {self.task_id})")
        if msg.sender not in self.devices:
            raise ProtocolError("not selected for this round")
        handlers = {"secagg_keys": ("keys", self._on_keys), "secagg_shares": ("shares", self._on_shares),
                    "secagg_masked": ("masked", self._on_masked), "secagg_reveal": ("unmask", self._on_reveal)}
        if msg.type not in handlers:
            raise ProtocolError(f"a {msg.type} message is not a device's secagg message")
        stage, fn = handlers[msg.type]
        if self.stage != stage:
            raise ProtocolError(f"arrived at stage {self.stage!r}, not {stage!r} (late, or out of order)")
        fn(msg, blob) if msg.type == "secagg_masked" else fn(msg)

    def _on_keys(self, msg: SecAggKeys) -> None:
        old = self.keys.get(msg.sender)
        if old is not None:
            if (old.enc_key, old.mask_key) != (msg.enc_key, msg.mask_key):
                raise ProtocolError("sent other keys earlier in this round")
            return
        if msg.enc_key == msg.mask_key or any(msg.enc_key in (k.enc_key, k.mask_key) or msg.mask_key in (k.enc_key, k.mask_key)
                                              for k in self.keys.values()):
            raise ProtocolError("reuses a public key (its own other key, or another device's)")
        probe = sc.new_private()
        for pk in (msg.enc_key, msg.mask_key):
            try:
                sc.agree(probe, pk, "probe", self.ctx)
            except ValueError as exc:
                raise ProtocolError(f"wrong key: {exc}") from None
        self.keys[msg.sender] = msg

    def _on_shares(self, msg: SecAggShares) -> None:
        if msg.sender not in self.keys:
            raise ProtocolError("its keys are not in the roster")
        want = self.graph[msg.sender]
        got = {b.peer: b.box for b in msg.boxes}
        if len(got) != len(msg.boxes) or set(got) != want:
            raise ProtocolError(f"boxes for {sorted(got)[:3]}..., expected exactly one for each of its {len(want)} holders")
        for peer, box in got.items():
            if len(box) != 4 * ((sc.BOX_BYTES + 2) // 3):
                raise ProtocolError(f"malformed share box for {peer} ({len(box)} base64 chars)")
        if msg.sender in self.boxes and self.boxes[msg.sender] != got:
            raise ProtocolError("sent other shares earlier in this round")
        self.boxes[msg.sender] = got

    def _on_masked(self, msg: SecAggMasked, blob: bytes | None) -> None:
        if msg.sender not in self.survivors_u2:
            raise ProtocolError("its shares were not routed this round")
        if blob is None or len(blob) != msg.blob.size or hashlib.sha256(blob).hexdigest() != msg.blob.sha256:
            raise ProtocolError("masked input blob does not match its size and sha256")
        if msg.sender in self.masked_sha:
            if self.masked_sha[msg.sender] == msg.blob.sha256:
                return  # a redelivered copy: counted once
            raise ProtocolError("another masked input from this device is already counted (a replay?)")
        tensors, meta = decode_tensors(blob)
        check_binding(meta, self.run_id, self.round_id, msg.sender, self.task_id)
        vec = tensors.get(ring.MASKED_TENSOR)
        if set(tensors) != {ring.MASKED_TENSOR} or vec.dtype != np.int64 or vec.shape != (self.length,):
            raise ProtocolError(f"masked input must be one int64 tensor {ring.MASKED_TENSOR!r} of {self.length} elements")
        self.masked_sum += vec.view(np.uint64)
        self.masked_sha[msg.sender] = msg.blob.sha256

    def _on_reveal(self, msg: SecAggReveal) -> None:
        if msg.sender not in self.masked_sha:
            raise ProtocolError("only devices whose masked input counted reveal shares")
        got: dict[str, tuple[str, int]] = {}
        for s in msg.shares:
            want = "self_seed" if s.owner in self.masked_sha else "mask_key" if s.owner in self.dropped else None
            if want is None or s.secret != want or msg.sender not in self.graph[s.owner] | {s.owner} or s.owner in got:
                raise ProtocolError(f"malformed share: {s.secret} of {s.owner} is not one this device holds and may reveal")
            try:
                got[s.owner] = (s.secret, shamir.share_from_hex(s.share))
            except ValueError as exc:
                raise ProtocolError(f"malformed share of {s.owner}: {exc}") from None
        if msg.sender in self.reveals and self.reveals[msg.sender] != got:
            raise ProtocolError("revealed other shares earlier in this round")
        self.reveals[msg.sender] = got

    # ---- stage closers --------------------------------------------------------------------
    def _abort(self, reason: str) -> SecAggAbort:
        self.stage, self.failure = "failed", reason
        return SecAggAbort(reason)

    def _signed(self, msg):
        return sign(msg, self.signing_key) if self.signing_key is not None else msg

    def roster(self) -> SecAggRoster:
        self._expect("keys")
        n = len(self.keys)
        holders = n if self.config.degree is None or self.config.degree >= n - 1 else self.config.degree + 1
        self.threshold = self.config.threshold or default_threshold(holders)
        if n < max(2, self.threshold):
            raise self._abort(f"secure aggregation needs {max(2, self.threshold)} devices' keys, got {n}")
        if not holders / 2 < self.threshold <= holders:
            raise self._abort(f"threshold {self.threshold} must be a majority of the {holders} share holders per device")
        try:
            ring.check_capacity(n, self.config.value_bound, self.config.frac_bits)
        except ValueError as exc:
            raise self._abort(str(exc)) from None
        self.graph = sc.neighbours(list(self.keys), self.config.degree, self.ctx)
        peers = [SecAggPeer(device_id=d, enc_key=k.enc_key, mask_key=k.mask_key, seed_commitment=k.seed_commitment)
                 for d, k in sorted(self.keys.items())]
        self.stage = "shares"
        c = self.config
        return self._signed(SecAggRoster(
            run_id=self.run_id, round_id=self.round_id, sender="cloud", task_id=self.task_id, threshold=self.threshold,
            degree=c.degree, frac_bits=c.frac_bits, value_bound=c.value_bound, layout_sha256=ring.layout_digest(c.layout),
            clip=c.clip, noise_std=c.noise_std, peers=peers))

    def routed(self) -> dict[str, SecAggRouted]:
        self._expect("shares")
        self.survivors_u2 = sorted(self.boxes)
        if len(self.survivors_u2) < self.threshold:
            raise self._abort(f"only {len(self.survivors_u2)} devices sent valid shares, threshold {self.threshold}")
        self.stage = "masked"
        return {v: self.routed_for(v) for v in self.survivors_u2}

    def routed_for(self, device: str) -> SecAggRouted:
        """The boxes sealed for `device` (also what a re-sent inbox message carries)."""
        boxes = [SecAggBox(peer=u, box=self.boxes[u][device]) for u in self.survivors_u2 if device in self.boxes[u]]
        return self._signed(SecAggRouted(run_id=self.run_id, round_id=self.round_id, sender="cloud",
                                         task_id=self.task_id, device_id=device, boxes=boxes))

    def unmask_request(self) -> SecAggUnmask:
        self._expect("masked")
        survivors = sorted(self.masked_sha)
        self.dropped = sorted(set(self.survivors_u2) - set(survivors))
        if len(survivors) < self.threshold:
            raise self._abort(f"{len(self.dropped)} of {len(self.survivors_u2)} devices dropped before their masked input; "
                              f"{len(survivors)} left is below the threshold {self.threshold} (recoverable: k <= n - T = "
                              f"{len(self.survivors_u2) - self.threshold}); refusing to unmask")
        for owner in (*survivors, *self.dropped):
            alive = len((self.graph[owner] | {owner}) & set(survivors))
            if alive < self.threshold:
                raise self._abort(f"only {alive} of {owner}'s share holders sent a masked input, threshold {self.threshold}")
        self.stage = "unmask"
        return self.current_unmask()

    def current_unmask(self) -> SecAggUnmask:
        return self._signed(SecAggUnmask(run_id=self.run_id, round_id=self.round_id, sender="cloud", task_id=self.task_id,
                                         survivors=sorted(self.masked_sha), dropped=self.dropped))

    def result(self) -> SecAggResult:
        self._expect("unmask")
        try:
            unmasked = recover(self)
        except SecAggAbort as exc:
            raise self._abort(exc.reason) from None
        self.stage = "done"
        values = ring.decode_fixed(unmasked, self.config.layout, self.config.frac_bits)
        return SecAggResult(values, sorted(self.masked_sha), list(self.dropped), list(self.rejected))

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggAbort(f"cannot close stage {stage!r}: the protocol is at {self.stage!r}"
                              + (f" ({self.failure})" if self.failure else ""))
