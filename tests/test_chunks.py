import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpft.shared.chunks import DEFAULT_CHUNK_SIZE, HEADER_SIZE, BlobSource, Chunk, Reassembler, sha256_hex, split
from fedpft.shared.messages import BlobRequest, ProtocolError, decode, encode

DATA = os.urandom(10_000)


def test_layout_and_sizes():
    src = BlobSource("b1", DATA, chunk_size=4096)
    assert src.count == 3 and src.ref.sha256 == sha256_hex(DATA) and src.ref.size == len(DATA)
    payloads = list(src.payloads())
    assert [len(p) - HEADER_SIZE - 2 for p in payloads] == [4096, 4096, 10_000 - 8192]
    c = Chunk.from_bytes(payloads[2])
    assert (c.blob_id, c.index, c.count, c.total_size, c.blob_sha256) == ("b1", 2, 3, 10_000, src.sha256)
    assert DEFAULT_CHUNK_SIZE == 1 << 20


def test_empty_blob_is_one_chunk():
    payloads = split("e", b"")
    assert len(payloads) == 1
    r = Reassembler("e", sha256=sha256_hex(b""), size=0)
    assert r.missing() is None
    r.add(payloads[0])
    assert r.done and r.result() == b""


def test_any_order_and_duplicates():
    src = BlobSource("b1", DATA, chunk_size=1000)
    payloads = list(src.payloads()) * 2
    random.Random(1).shuffle(payloads)
    r = Reassembler.for_ref(src.ref)
    new = [r.add(p) for p in payloads]
    assert sum(new) == src.count
    assert r.done and r.missing() == [] and r.result() == DATA


def test_missing_and_blob_request_resend():
    src = BlobSource("b1", DATA, chunk_size=1000)
    payloads = list(src.payloads())
    r = Reassembler.for_ref(src.ref)
    for i, p in enumerate(payloads):
        if i not in (3, 7):
            r.add(p)
    assert not r.done and r.missing() == [3, 7]
    req = decode(encode(BlobRequest(run_id="r", sender="d1", device_id="d1", blob_id="b1", missing=r.missing())))
    for p in src.payloads(req.missing):
        assert r.add(p)
    assert r.result() == DATA
    # An empty request means "everything" (the asker had no chunk to learn the count from).
    assert len(list(src.payloads([]))) == src.count


def test_bad_resend_request_sends_nothing():
    src = BlobSource("b1", DATA, chunk_size=1000)
    with pytest.raises(ProtocolError, match="asked for"):
        list(src.payloads([1, 99]))


def _tamper(payload: bytes, at: int) -> bytes:
    b = bytearray(payload)
    b[at] ^= 0xFF
    return bytes(b)


def test_corrupted_chunk_is_refused():
    p = split("b1", DATA, 1000)[0]
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        Chunk.from_bytes(_tamper(p, len(p) - 1))


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"short", "shorter than"),
        (b"XXXX" + bytes(200), "magic"),
        (b"FPC1\x09" + bytes(200), "version"),
    ],
)
def test_malformed_chunk_headers(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        Chunk.from_bytes(payload)


def test_chunks_of_another_blob_or_layout_are_refused():
    src = BlobSource("b1", DATA, chunk_size=1000)
    r = Reassembler.for_ref(src.ref)
    with pytest.raises(ProtocolError, match="offered to the reassembler"):
        r.add(split("b2", DATA, 1000)[0])
    other = BlobSource("b1", DATA[::-1], chunk_size=1000)
    with pytest.raises(ProtocolError, match="blob sha256"):
        r.add(next(other.payloads()))
    lazy = Reassembler("b1")  # learns the layout from the first chunk
    lazy.add(next(src.payloads()))
    with pytest.raises(ProtocolError, match="layout"):
        lazy.add(split("b1", DATA, 500)[1])
    with pytest.raises(ProtocolError, match="limit"):
        Reassembler("b1", max_bytes=100).add(next(src.payloads()))


def test_lying_layout_is_caught_by_whole_blob_hash():
    # Each chunk is self-consistent, but the blob hash they claim is not the hash of the whole.
    fake = "00" * 32
    parts = [Chunk(c.blob_id, c.index, c.count, c.chunk_size, c.total_size, c.chunk_sha256, fake, c.data)
             for c in map(Chunk.from_bytes, split("b1", DATA, 4096))]
    r = Reassembler("b1")
    for c in parts:
        r.add(c.to_bytes())
    with pytest.raises(ProtocolError, match="whole-blob sha256 mismatch"):
        r.result()
    assert r.received == 0 and r.missing() is None


def test_incomplete_result_is_refused():
    src = BlobSource("b1", DATA, chunk_size=1000)
    r = Reassembler.for_ref(src.ref)
    r.add(next(src.payloads()))
    with pytest.raises(ProtocolError, match="incomplete: 1/10"):
        r.result()


def test_resume_from_folder(tmp_path):
    src = BlobSource("b1", DATA, chunk_size=1000)
    payloads = list(src.payloads())
    first = Reassembler.for_ref(src.ref, folder=tmp_path)
    for p in payloads[:6]:
        first.add(p)
    del first  # the device restarts
    (tmp_path / "b1" / "8.tmp").write_bytes(b"half written")
    (tmp_path / "b1" / "9.chunk").write_bytes(_tamper(payloads[9], len(payloads[9]) - 1))
    again = Reassembler.for_ref(src.ref, folder=tmp_path)
    assert again.missing() == [6, 7, 8, 9]
    assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == [f"{i}.chunk" for i in range(6)]
    for i in again.missing():
        again.add(payloads[i])
    assert again.result() == DATA
    again.discard()
    assert not (tmp_path / "b1").exists()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700), st.randoms())
def test_property_any_order_round_trip(data, size, rnd):
    payloads = split("p", data, size)
    payloads += rnd.sample(payloads, k=min(3, len(payloads)))
    rnd.shuffle(payloads)
    r = Reassembler("p", sha256=sha256_hex(data), size=len(data))
    for p in payloads:
        r.add(p)
    assert r.result() == data


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_chunks_are_protocol_errors(data):
    try:
        Chunk.from_bytes(data)
    except ProtocolError:
        pass


def test_a_viewed_chunk_is_the_payload_itself_and_a_one_chunk_blob_comes_back_uncopied():
    """The cloud parses uploads with view=True: the chunk's data and the reassembled one-chunk blob
    are read-only views of the received payload (no 0.6 MB copy per update), equal to the copying
    parse; a mutable payload is still copied, and result() without view still gives bytes."""
    data = os.urandom(5000)
    src = BlobSource("b-view", data, chunk_size=8192)
    (payload,) = list(src.payloads())
    viewed, copied = Chunk.from_bytes(payload, view=True), Chunk.from_bytes(payload)
    assert isinstance(viewed.data, memoryview) and viewed.data.readonly and viewed.data.obj is payload
    assert isinstance(copied.data, bytes) and viewed.data == copied.data == data
    mutable = Chunk.from_bytes(bytearray(payload), view=True)
    assert isinstance(mutable.data, bytes) and mutable.data == data
    asm = Reassembler.for_ref(src.ref)
    asm.add(viewed)
    blob = asm.result(view=True)
    assert isinstance(blob, memoryview) and blob.obj is payload and blob == data
    assert isinstance(asm.result(), bytes) and asm.result() == data
    # several chunks are joined into new bytes, whatever was asked
    many = BlobSource("b-many", data, chunk_size=1024)
    asm = Reassembler.for_ref(many.ref)
    for p in many.payloads():
        asm.add(Chunk.from_bytes(p, view=True))
    assert isinstance(asm.result(view=True), bytes) and asm.result(view=True) == data


def test_an_unverified_one_chunk_blob_is_hashed_by_whoever_takes_it():
    """verify=False (the cloud with check processes): a one-chunk blob's hash is left to the taker,
    which result(verify=False) says by verified_sha256 None; anyone else still gets it checked."""
    (one,) = list(BlobSource("u1", DATA, chunk_size=len(DATA)).payloads())
    bad = one[:-1] + bytes([one[-1] ^ 1])
    with pytest.raises(ProtocolError, match="corrupted in transit"):
        Chunk.from_bytes(bad)
    c = Chunk.from_bytes(bad, view=True, verify=False)
    assert not c.verified
    r = Reassembler("u1")
    r.add(c)
    assert r.verified_sha256 is None
    assert bytes(r.result(view=True, verify=False)) == bad[-len(DATA):]  # unhashed: the caller checks it
    with pytest.raises(ProtocolError, match="whole-blob sha256 mismatch"):
        r.result()  # a taker that did not promise to check it is refused the corrupted bytes
    good = Reassembler("u1")
    good.add(Chunk.from_bytes(one, verify=False))
    assert good.result() == DATA  # verified on the way out
    parts = list(BlobSource("m1", DATA, chunk_size=4096).payloads())
    broken = parts[0][:-1] + bytes([parts[0][-1] ^ 1])
    with pytest.raises(ProtocolError, match="corrupted in transit"):
        Chunk.from_bytes(broken, verify=False)  # a chunk of several is always checked on arrival
