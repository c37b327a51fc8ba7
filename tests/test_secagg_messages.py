"""The secure-aggregation message kinds on the wire, their topics, and the edge's import weight."""

import subprocess
import sys

import pytest

from fedpft.shared import topics
from fedpft.shared.messages import (
    MAX_MESSAGE_BYTES, MAX_SECAGG_DEVICES, MAX_SECAGG_HOLDERS, BlobRef, ProtocolError, SecAggBox, SecAggKeys, SecAggMasked, SecAggPeer, SecAggReveal, SecAggRoster, SecAggRouted,
    SecAggShare, SecAggShares, SecAggUnmask, decode, encode,
)

K1, K2, H = "1" * 64, "2" * 64, "ab" * 32
PEERS = [SecAggPeer(device_id=d, enc_key=K1, mask_key=K2, seed_commitment=H) for d in ("a", "b", "c")]


def samples():
    common = dict(run_id="r", round_id=2, task_id="t")
    return [
        SecAggKeys(**common, sender="a", device_id="a", enc_key=K1, mask_key=K2, seed_commitment=H),
        SecAggRoster(**common, sender="cloud", threshold=2, frac_bits=24, value_bound=1e3, layout_sha256=H, peers=PEERS),
        SecAggShares(**common, sender="a", device_id="a", boxes=[SecAggBox(peer="b", box="QUJD")]),
        SecAggRouted(**common, sender="cloud", device_id="b", boxes=[SecAggBox(peer="a", box="QUJD")]),
        SecAggMasked(**common, sender="a", device_id="a", blob=BlobRef(blob_id="sa-1", sha256=H, size=9)),
        SecAggUnmask(**common, sender="cloud", survivors=["a", "b"], dropped=["c"]),
        SecAggReveal(**common, sender="a", device_id="a", shares=[SecAggShare(owner="b", secret="self_seed", share="0" * 132)]),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: m.type)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


def test_validators_refuse_what_the_protocol_forbids():
    with pytest.raises(ProtocolError, match="both survivor and dropped"):
        decode(encode(samples()[5]).replace(b'"dropped":["c"]', b'"dropped":["a"]'))
    with pytest.raises(ProtocolError, match="exceeds the 3 peers"):
        decode(encode(samples()[1]).replace(b'"threshold":2', b'"threshold":4'))
    with pytest.raises(ProtocolError, match="differs from device_id"):
        decode(encode(samples()[0]).replace(b'"sender":"a"', b'"sender":"b"'))
    with pytest.raises(ProtocolError, match="share"):
        decode(encode(samples()[6]).replace(b'"share":"0', b'"share":"x'))


def test_secagg_topics_and_acl():
    assert topics.secagg_topic("r") == "fedpft/r/secagg"
    assert topics.parse("fedpft/r/secagg") == topics.Topic("r", None, "secagg")
    assert topics.parse(topics.device_topic("r", "d1", "secagg")) == topics.Topic("r", "d1", "secagg")
    acl = topics.device_acl("r", "d1")
    assert "fedpft/r/secagg" in acl["read"] and "fedpft/r/device/d1/secagg" in acl["write"]
    with pytest.raises(ProtocolError, match="published on device"):
        topics.check_sender(topics.device_topic("r", "d2", "secagg"), "r", "d1")


def test_edge_side_imports_no_heavy_package():
    code = ("import sys, fedpft.edge.secagg, fedpft.edge.privacy; "
            "bad = [m for m in ('torch', 'transformers', 'dp_accounting', 'scipy', 'fedpft.cloud') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_largest_secagg_messages_fit_the_message_limit():
    ids = [f"{i:05d}".rjust(64, "d") for i in range(MAX_SECAGG_DEVICES)]
    peers = [SecAggPeer(device_id=d, enc_key=K1, mask_key=K2, seed_commitment=H) for d in ids]
    roster = SecAggRoster(run_id="r" * 64, round_id=10**6, sender="cloud", task_id="t" * 64, threshold=MAX_SECAGG_DEVICES,
                          degree=None, frac_bits=24, value_bound=1e6, layout_sha256=H, clip=1.0, noise_std=0.1, peers=peers,
                          signer="a" * 16, signature="b" * 128)
    box = SecAggBox(peer=ids[0], box="A" * 216)
    shares = SecAggShares(run_id="r" * 64, round_id=1, sender=ids[0], device_id=ids[0], task_id="t" * 64,
                          boxes=[box] * MAX_SECAGG_HOLDERS)
    reveal = SecAggReveal(run_id="r" * 64, round_id=1, sender=ids[0], device_id=ids[0], task_id="t" * 64,
                          shares=[SecAggShare(owner=ids[0], secret="mask_key", share="f" * 132)] * (MAX_SECAGG_HOLDERS + 1))
    for msg in (roster, shares, reveal):
        assert len(encode(msg)) < MAX_MESSAGE_BYTES
        assert decode(encode(msg)) == msg
