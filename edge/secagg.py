"""The device side of secure aggregation: a transport-agnostic state machine.

Each method takes the cloud's message for a stage and returns this device's answer (or raises
ProtocolError with one line; the agent logs it and the device sits the round out):

    keys(round, task)      -> SecAggKeys                      fresh key pairs and self-mask seed
    on_roster(roster)      -> SecAggShares                    Shamir shares sealed per holder
    on_routed(routed)      -> [warnings]                      boxes from peers; senders = mask set
    masked_input(values)   -> (SecAggMasked, blob bytes)      x + self mask + pairwise masks
    on_unmask(request)     -> SecAggReveal                    shares of survivors' seeds / dropped keys

Secrets (the two private keys, the self seed, shares held for peers) live in memory only, for
one task: a device that restarts mid-round sits it out. Invariant from Bonawitz et al.: for no
owner does this device ever reveal both the mask-key share and the self-seed share, and it
reveals nothing when fewer than `threshold` devices survived (the cloud could then unmask one).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpft.shared import secagg_crypto as sc
from fedpft.shared import secagg_ring as ring
from fedpft.shared import shamir
from fedpft.shared.codec import encode_tensors
from fedpft.shared.messages import (
    BlobRef, ProtocolError, SecAggBox, SecAggKeys, SecAggMasked, SecAggReveal, SecAggRoster, SecAggRouted,
    SecAggShare, SecAggShares, SecAggUnmask,
)
from fedpft.shared.signing import SignatureError, verify
from fedpft.shared.update import binding

from .privacy import contribution


class SecAggParticipant:
    def __init__(self, run_id: str, device_id: str, trusted_key: Ed25519PublicKey | None = None):
        self.run_id, self.device_id, self.trusted = run_id, device_id, trusted_key
        self.stage = "idle"

    # ---- stage 1 --------------------------------------------------------------------------
    def keys(self, round_id: int, task_id: str) -> SecAggKeys:
        self.round_id, self.task_id = round_id, task_id
        self.ctx = sc.context(self.run_id, round_id, task_id)
        self._enc, self._mask = sc.new_private(), sc.new_private()
        self._seed = os.urandom(32)
        self.held: dict[str, tuple[int, int]] = {}  # owner -> (mask-key share, self-seed share)
        self.revealed: dict[str, str] = {}  # owner -> which secret was revealed
        self.stage = "keys"
        return SecAggKeys(run_id=self.run_id, round_id=round_id, sender=self.device_id, device_id=self.device_id,
                          task_id=task_id, enc_key=sc.public_hex(self._enc), mask_key=sc.public_hex(self._mask),
                          seed_commitment=sc.seed_commitment(self._seed, self.ctx))

    def _check(self, msg, stage: str, what: str) -> None:
        if self.stage != stage:
            raise ProtocolError(f"{what} arrived while this device is at stage {self.stage!r}, not {stage!r}; ignored")
        if (msg.run_id, msg.round_id, msg.task_id) != (self.run_id, self.round_id, self.task_id):
            raise ProtocolError(f"{what} for round {msg.round_id} task {msg.task_id}, not round {self.round_id} "
                                f"task {self.task_id}; ignored")
        if self.trusted is not None:
            try:
                verify(msg, self.trusted, what)
            except SignatureError as exc:
                raise ProtocolError(str(exc)) from None

    # ---- stage 2 --------------------------------------------------------------------------
    def on_roster(self, roster: SecAggRoster) -> SecAggShares:
        self._check(roster, "keys", "secagg roster")
        peers = {p.device_id: p for p in roster.peers}
        me = peers.get(self.device_id)
        if me is None or (me.enc_key, me.mask_key) != (sc.public_hex(self._enc), sc.public_hex(self._mask)):
            raise ProtocolError("secagg roster does not carry this device's keys; sitting the round out")
        self.roster, self.peers = roster, peers
        self.graph = sc.neighbours(list(peers), roster.degree, self.ctx)
        holders = sorted(self.graph[self.device_id] | {self.device_id})
        if roster.threshold > len(holders) or 2 * roster.threshold <= len(holders):
            raise ProtocolError(f"secagg threshold {roster.threshold} is not a majority of this device's "
                                f"{len(holders)} share holders; refused")
        xs = {h: sc.share_point(list(peers), h) for h in holders}
        key_shares = shamir.split(sc.private_bytes(self._mask), roster.threshold, list(xs.values()))
        seed_shares = shamir.split(self._seed, roster.threshold, list(xs.values()))
        boxes = []
        for h in holders:
            pair = (key_shares[xs[h]], seed_shares[xs[h]])
            if h == self.device_id:
                self.held[h] = pair
                continue
            key = sc.box_key(self._enc, peers[h].enc_key, self.ctx)
            boxes.append(SecAggBox(peer=h, box=sc.seal(key, self.ctx, self.device_id, h, xs[h], *pair)))
        self.stage = "shares"
        return SecAggShares(run_id=self.run_id, round_id=self.round_id, sender=self.device_id,
                            device_id=self.device_id, task_id=self.task_id, boxes=boxes)

    def on_routed(self, routed: SecAggRouted) -> list[str]:
        """Keep the peers' shares; a box that does not open is a one-line warning, and its sender
        still counts as a mask peer (its share is only needed if it drops)."""
        self._check(routed, "shares", "secagg routed shares")
        if routed.device_id != self.device_id:
            raise ProtocolError(f"routed shares for {routed.device_id}, not this device; ignored")
        mine, warnings, senders = sc.share_point(list(self.peers), self.device_id), [], set()
        for b in routed.boxes:
            if b.peer not in self.graph[self.device_id] or b.peer in senders:
                warnings.append(f"secagg: box from {b.peer} is not from a neighbour, or repeated; ignored")
                continue
            senders.add(b.peer)
            try:
                key = sc.box_key(self._enc, self.peers[b.peer].enc_key, self.ctx)
                x, m, s = sc.open_box(key, self.ctx, b.peer, self.device_id, b.box)
                if x != mine:
                    raise ValueError(f"share point {x} is not this device's {mine}")
                self.held[b.peer] = (m, s)
            except ValueError as exc:
                warnings.append(f"secagg: share from {b.peer} rejected: {exc}")
        self.mask_peers = senders
        self.stage = "routed"
        return warnings

    # ---- stage 3 --------------------------------------------------------------------------
    def masked_update(self, delta: Mapping[str, np.ndarray], num_samples: float,
                      stats: Mapping[int, tuple[np.ndarray, float]] | None,
                      rng: np.random.Generator | None = None) -> tuple[SecAggMasked, bytes]:
        """The device's change (adapters minus the Task's global adapters) clipped, weighted and
        noised as the roster says, then masked. Without DP the clip only keeps the ring from
        overflowing (value_bound / weight)."""
        if self.stage != "routed":
            raise ProtocolError(f"masked input asked at stage {self.stage!r}; sitting the round out")
        r = self.roster
        clip = r.clip or r.value_bound / max(float(num_samples), 1.0)
        values = contribution(delta, num_samples, stats, clip=clip, noise_std=r.noise_std, rng=rng, dp=r.clip is not None)
        return self.masked_input(values)

    def masked_input(self, values: Mapping[str, np.ndarray]) -> tuple[SecAggMasked, bytes]:
        if self.stage != "routed":
            raise ProtocolError(f"masked input asked at stage {self.stage!r}; sitting the round out")
        layout = ring.layout_of(values)
        if ring.layout_digest(layout) != self.roster.layout_sha256:
            raise ProtocolError("this device's update layout differs from the round's (another bundle?)")
        vec, _ = ring.encode_fixed(values, layout, self.roster.value_bound, self.roster.frac_bits)
        seeds = {p: sc.mask_seed(self._mask, self.peers[p].mask_key, self.ctx) for p in self.mask_peers}
        masked = ring.mask(vec, self._seed, seeds, self.device_id)
        meta = binding(self.run_id, self.round_id, self.device_id, self.task_id)
        blob = encode_tensors({ring.MASKED_TENSOR: masked.view(np.int64)}, meta)
        sha = hashlib.sha256(blob).hexdigest()
        self.stage = "masked"
        msg = SecAggMasked(run_id=self.run_id, round_id=self.round_id, sender=self.device_id, device_id=self.device_id,
                           task_id=self.task_id, blob=BlobRef(blob_id=f"sa-{sha[:24]}", sha256=sha, size=len(blob)))
        return msg, blob

    # ---- stage 4 --------------------------------------------------------------------------
    def on_unmask(self, req: SecAggUnmask) -> SecAggReveal:
        self._check(req, "masked", "secagg unmask request")
        survivors, dropped = set(req.survivors), set(req.dropped)
        if self.device_id not in survivors:
            raise ProtocolError("unmask request does not count this device as a survivor; revealing nothing")
        if len(survivors) < self.roster.threshold:
            raise ProtocolError(f"only {len(survivors)} survivors, below the threshold {self.roster.threshold}; "
                                "revealing nothing")
        mine = self.graph[self.device_id]
        if ((survivors | dropped) & (mine - self.mask_peers)) or (dropped - set(self.peers)):
            raise ProtocolError("unmask request names devices that never sent this device their shares; refused")
        shares = []
        for owner in sorted((survivors | dropped) & set(self.held)):
            secret = "self_seed" if owner in survivors else "mask_key"
            if self.revealed.get(owner, secret) != secret:
                raise ProtocolError(f"unmask request would reveal both secrets of {owner}; refused")
            key_share, seed_share = self.held[owner]
            shares.append(SecAggShare(owner=owner, secret=secret,
                                      share=shamir.share_to_hex(seed_share if secret == "self_seed" else key_share)))
        self.revealed.update({s.owner: s.secret for s in shares})
        return SecAggReveal(run_id=self.run_id, round_id=self.round_id, sender=self.device_id,
                            device_id=self.device_id, task_id=self.task_id, shares=shares)
