"""Secure aggregation end to end, in-process: n participants and the coordinator exchange the real
encoded messages (sim/secagg_round.py); the result must be plain FedAvg of the survivors."""

import numpy as np
import pytest

from fedpft.cloud import secagg_store
from fedpft.cloud.aggregate import fedavg, sum_stats
from fedpft.cloud.secagg import SecAggConfig, SecAggCoordinator, default_threshold
from fedpft.sim.secagg_round import run_round
from fedpft.cloud.secagg_unmask import average
from fedpft.edge.privacy import contribution
from fedpft.edge.secagg import SecAggParticipant
from fedpft.shared import secagg_ring as ring
from fedpft.shared.codec import decode_tensors
from fedpft.shared.messages import ProtocolError, SecAggUnmask

N = 10
T = default_threshold(N)  # 7: k <= 3 dropouts recoverable
CLIP = 50.0


def tiny_shapes():
    return {"lora_A": (2, 4), "lora_B": (4, 2), "head": (3,)}


def minilm_shapes():
    """The 50 trainable tensors of all-MiniLM-L6-v2 with LoRA r=8 on q/k/v/attention-output + a 13-class head."""
    shapes = {}
    for layer in range(6):
        for mod in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            base = f"base_model.model.bert.encoder.layer.{layer}.{mod}"
            shapes[f"{base}.lora_A.weight"] = (8, 384)
            shapes[f"{base}.lora_B.weight"] = (384, 8)
    shapes["base_model.model.classifier.modules_to_save.default.weight"] = (13, 384)
    shapes["base_model.model.classifier.modules_to_save.default.bias"] = (13,)
    return shapes


def fleet(shapes, n=N, neurons=6, layers=(1,), seed=0):
    rng = np.random.default_rng(seed)
    glob = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    devs = {}
    for i in range(n):
        upd = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in glob.items()}
        pos = float(rng.integers(50, 500))
        stats = {L: (rng.integers(0, int(pos), neurons).astype(np.float64), pos) for L in layers}
        devs[f"dev{i:02d}"] = (upd, float(rng.integers(10, 300)), stats)
    return glob, devs


def contributions(glob, devs):
    return {d: contribution({k: u[k].astype(np.float64) - glob[k] for k in glob}, w, st, clip=CLIP)
            for d, (u, w, st) in devs.items()}


def config(contribs, **kw):
    return SecAggConfig(layout=ring.layout_of(next(iter(contribs.values()))), value_bound=CLIP * 300, **kw)


def check_equals_fedavg(rep, glob, devs, tol=1e-6):
    assert rep.failure is None, rep.failure
    deltas, stats, _ = average(rep.result.values)
    surv = rep.result.survivors
    ref = fedavg([devs[d][0] for d in surv], [devs[d][1] for d in surv])
    for k in glob:
        assert np.abs(glob[k] + deltas[k] - ref[k]).max() < tol, k
    ref_stats = sum_stats([devs[d][2] for d in surv])
    for layer, (off, pos) in ref_stats.items():
        assert np.allclose(stats[layer][0], off) and stats[layer][1] == pytest.approx(pos)


def test_secure_sum_equals_fedavg_for_a_tiny_model():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    rep = run_round(c, config(c))
    check_equals_fedavg(rep, glob, devs)
    assert rep.result.dropped == [] and rep.log == []


def test_secure_sum_equals_fedavg_for_minilm_shaped_tensors():
    glob, devs = fleet(minilm_shapes(), neurons=1536, layers=(1, 2, 3, 4))
    assert len(glob) == 50
    c = contributions(glob, devs)
    rep = run_round(c, config(c))
    check_equals_fedavg(rep, glob, devs)


def test_secagg_plus_graph_gives_the_same_sum():
    glob, devs = fleet(tiny_shapes(), n=12)
    c = contributions(glob, devs)
    rep = run_round(c, config(c, degree=6, threshold=4), drop_before_masked={"dev03"})
    check_equals_fedavg(rep, glob, devs)
    assert rep.result.dropped == ["dev03"]


@pytest.mark.parametrize("k", [1, 2, N - T])
def test_k_dropouts_after_sharing_are_recovered_when_k_le_n_minus_t(k):
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    gone = set(sorted(c)[:k])
    rep = run_round(c, config(c), drop_before_masked=gone)
    check_equals_fedavg(rep, glob, devs)
    assert set(rep.result.dropped) == gone


def test_more_dropouts_than_n_minus_t_are_refused_with_the_reason():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    rep = run_round(c, config(c), drop_before_masked=set(sorted(c)[: N - T + 1]))
    assert rep.result is None
    assert "below the threshold 7" in rep.failure and "k <= n - T = 3" in rep.failure


def test_dropouts_at_the_reveal_stage():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)
    rep = run_round(c, config(c), drop_before_masked={ids[0]}, drop_before_reveal={ids[1], ids[2]})
    check_equals_fedavg(rep, glob, devs)  # the silent ones' inputs still count: they were masked in
    assert ids[1] in rep.result.survivors
    rep = run_round(c, config(c), drop_before_reveal=set(ids[:4]))
    assert rep.result is None and "cannot recover the self-mask seed" in rep.failure


def test_malformed_share_box_wrong_key_and_bad_reveal_are_rejected_and_the_round_completes():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)

    def tamper(stage, d, msg, blob):
        if stage == "keys" and d == ids[0]:  # a low-order X25519 key
            msg = msg.model_copy(update={"mask_key": "00" * 32})
        if stage == "shares" and d == ids[1]:  # a box the cloud can see is malformed
            boxes = list(msg.boxes)
            boxes[0] = boxes[0].model_copy(update={"box": "QUJD"})
            msg = msg.model_copy(update={"boxes": boxes})
        if stage == "shares" and d == ids[2]:  # well-formed, but sealed with garbage: only its recipient sees it
            boxes = list(msg.boxes)  # the last holder: one still in the round
            boxes[-1] = boxes[-1].model_copy(update={"box": "A" * len(boxes[-1].box)})
            msg = msg.model_copy(update={"boxes": boxes})
        if stage == "reveal" and d == ids[3]:  # a parseable but wrong share
            shares = list(msg.shares)  # of the last owner, whose other 7 shares are all good
            shares[-1] = shares[-1].model_copy(update={"share": "0" * 131 + "1"})
            msg = msg.model_copy(update={"shares": shares})
        return msg, blob

    rep = run_round(c, config(c), tamper=tamper)
    check_equals_fedavg(rep, glob, devs)
    assert ids[0] not in rep.result.survivors and ids[1] not in rep.result.survivors
    assert ids[2] in rep.result.survivors and ids[3] in rep.result.survivors
    text = "\n".join(rep.log)
    assert f"secagg_keys from {ids[0]} rejected: wrong key" in text
    assert f"secagg_shares from {ids[1]} rejected: malformed share box" in text
    assert f"share from {ids[2]} rejected: share box does not authenticate" in text


def test_replayed_masked_input_and_wrong_round_messages_are_rejected():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)
    captured = {}
    run_round(c, config(c), round_id=1, task_id="t1",
              tamper=lambda s, d, m, b: (captured.setdefault((s, d), (m, b)), (m, b))[1])
    old_msg, old_blob = captured[("masked", ids[4])]
    coord = SecAggCoordinator("run", 2, "t2", ids, config(c))
    reasons = []

    def tamper(stage, d, msg, blob):
        if stage == "masked" and d == ids[4]:
            relabelled = old_msg.model_copy(update={"round_id": 2, "task_id": "t2"})
            reasons.append(coord.handle(relabelled, old_blob))  # round 1's blob under round 2's label
            reasons.append(coord.handle(msg.model_copy(update={"round_id": 1}), blob))  # wrong round
        if stage == "shares" and d == ids[5]:
            reasons.append(coord.handle(msg.model_copy(update={"task_id": "t1"}), None))  # another task's shares
        return msg, blob

    rep = run_round(c, config(c), round_id=2, task_id="t2", coordinator=coord, tamper=tamper)
    check_equals_fedavg(rep, glob, devs)
    assert ids[4] in rep.result.survivors and ids[5] in rep.result.survivors
    assert "bound to round_id '1', task_id 't1'" in reasons[1] and "(a replay?)" in reasons[1]
    assert "not this round (2, task t2)" in reasons[0] and "not this round" in reasons[2]


def test_a_second_different_masked_input_is_refused_a_copy_is_idempotent():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)
    coord = SecAggCoordinator("run", 1, "task1", ids, config(c))
    notes = []

    def tamper(stage, d, msg, blob):
        if stage == "masked" and d == ids[0]:
            assert coord.handle(msg, blob) is None
            notes.append("first")
        return msg, blob

    rep = run_round(c, config(c), coordinator=coord, tamper=tamper)
    check_equals_fedavg(rep, glob, devs)  # the redelivered copy counted once
    assert notes == ["first"]
    other = SecAggParticipant("run", ids[0])
    with pytest.raises(ProtocolError):
        other.masked_input(c[ids[0]])  # no keys, no roster: the participant refuses


def test_signed_stages_verify_and_a_tampered_roster_is_refused():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    rep = run_round(c, config(c), signing_key=key, trusted_key=key.public_key())
    check_equals_fedavg(rep, glob, devs)

    ids = sorted(c)
    coord = SecAggCoordinator("run", 1, "task1", ids, config(c), key)
    parts = {d: SecAggParticipant("run", d, key.public_key()) for d in ids}
    for d in ids:
        assert coord.handle(parts[d].keys(1, "task1")) is None
    roster = coord.roster()
    with pytest.raises(ProtocolError, match="signature does not verify"):
        parts[ids[0]].on_roster(roster.model_copy(update={"threshold": 2}))
    with pytest.raises(ProtocolError, match="not round 1"):
        parts[ids[1]].on_roster(roster.model_copy(update={"round_id": 0}))


def test_participant_never_reveals_both_secrets_nor_below_threshold():
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)
    coord = SecAggCoordinator("run", 1, "task1", ids, config(c))
    parts = {d: SecAggParticipant("run", d) for d in ids}
    for d in ids:
        coord.handle(parts[d].keys(1, "task1"))
    roster = coord.roster()
    for d in ids:
        coord.handle(parts[d].on_roster(roster))
    for d, msg in coord.routed().items():
        assert parts[d].on_routed(msg) == []
    me = parts[ids[0]]
    me.masked_input(c[ids[0]])
    first = SecAggUnmask(run_id="run", round_id=1, sender="cloud", task_id="task1", survivors=ids)
    assert {s.secret for s in me.on_unmask(first).shares} == {"self_seed"}
    both = first.model_copy(update={"survivors": ids[:9], "dropped": ids[9:]})
    with pytest.raises(ProtocolError, match="both secrets"):
        me.on_unmask(both)
    few = first.model_copy(update={"survivors": ids[:T - 1]})
    with pytest.raises(ProtocolError, match="below the threshold"):
        me.on_unmask(few)


def test_persisted_state_is_masked_only_and_a_restored_coordinator_finishes(tmp_path):
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    cfg = config(c)
    layout = cfg.layout
    plain = {d: ring.encode_fixed(v, layout, cfg.value_bound)[0] for d, v in c.items()}
    saved = {}

    def crash_and_restore(coord):
        path = tmp_path / "secagg-state.safetensors"
        secagg_store.write(path, coord)
        saved["bytes"] = path.read_bytes()
        return secagg_store.read(path)

    rep = run_round(c, cfg, drop_before_masked={sorted(c)[0]}, after_masked=crash_and_restore)
    check_equals_fedavg(rep, glob, devs)
    data = saved["bytes"]
    survivors = rep.result.survivors
    for d in c:
        assert plain[d].tobytes() not in data
        assert devs[d][0]["lora_A"].tobytes() not in data
        for k, v in c[d].items():
            assert np.asarray(v, np.float64).tobytes() not in data and np.asarray(v, np.float32).tobytes() not in data
    stored, _ = decode_tensors(data)
    plain_sum = ring.ring_sum([plain[d] for d in survivors], plain[survivors[0]].size)
    assert not np.array_equal(stored[ring.MASKED_TENSOR.replace("masked", "masked_sum")].view(np.uint64), plain_sum)


def test_a_corrupt_state_file_is_one_line():
    with pytest.raises(ProtocolError, match="malformed safetensors|not a secagg state"):
        secagg_store.restore(b"\0" * 16)


def _manual_round(c, cfg, ids):
    coord = SecAggCoordinator("run", 1, "task1", ids, cfg)
    parts = {d: SecAggParticipant("run", d) for d in ids}
    for d in ids:
        assert coord.handle(parts[d].keys(1, "task1")) is None
    roster = coord.roster()
    for d in ids:
        assert coord.handle(parts[d].on_roster(roster)) is None
    for d, msg in coord.routed().items():
        assert parts[d].on_routed(msg) == []
    return coord, parts


def test_a_crash_in_the_unmask_stage_resumes_with_the_same_request(tmp_path):
    glob, devs = fleet(tiny_shapes())
    c = contributions(glob, devs)
    ids = sorted(c)
    coord, parts = _manual_round(c, config(c), ids)
    for d in ids[1:]:
        u, w, st = devs[d]
        assert coord.handle(*parts[d].masked_update({k: u[k].astype(np.float64) - glob[k] for k in glob}, w, st)) is None
    req = coord.unmask_request()
    for d in ids[1:4]:
        assert coord.handle(parts[d].on_unmask(req)) is None
    assert not secagg_store.resumable(SecAggCoordinator("run", 1, "task1", ids, config(c)))
    secagg_store.write(tmp_path / "s", coord)  # the cloud dies here; revealed shares are not on disk
    back = secagg_store.read(tmp_path / "s")
    assert secagg_store.resumable(back) and back.reveals == {}
    again = back.current_unmask()
    assert (again.survivors, again.dropped) == (req.survivors, req.dropped) == (ids[1:], [ids[0]])
    for d in ids[1:]:
        assert back.handle(parts[d].on_unmask(again)) is None  # the same request: the same answer
    rep_values = back.result().values
    deltas, _, _ = average(rep_values)
    ref = fedavg([devs[d][0] for d in ids[1:]], [devs[d][1] for d in ids[1:]])
    assert all(np.abs(glob[k] + deltas[k] - ref[k]).max() < 1e-6 for k in glob)


def test_secagg_plus_refuses_when_too_few_holders_of_one_device_survive():
    from fedpft.shared import secagg_crypto as sc

    glob, devs = fleet(tiny_shapes(), n=12)
    c = contributions(glob, devs)
    graph = sc.neighbours(sorted(c), 4, sc.context("run", 1, "task1"))  # holders 5, default T 4
    victim = sorted(c)[0]
    gone = set(sorted(graph[victim])[:2])
    rep = run_round(c, config(c, degree=4), drop_before_masked=gone)
    assert rep.result is None and f"of {victim}'s share holders sent a masked input, threshold 4" in rep.failure
