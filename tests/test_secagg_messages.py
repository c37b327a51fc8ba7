"""The secure-aggregation message kinds on the wire, their topics, and the edge's import weight."""

import subprocess
import sys

import pytest

from fedpft.shared import topics
from fedpft.shared.messages import (
    BlobRef, ProtocolError, SecAggBox, SecAggKeys, SecAggMasked, SecAggPeer, SecAggReveal, SecAggRoster, SecAggRouted,
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
