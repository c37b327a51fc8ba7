import json
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpft.shared.codec import check_finite, check_tensors, decode_tensors, encode_tensors, spec_of
from fedpft.shared.messages import ProtocolError


def tensors():
    rng = np.random.default_rng(0)
    return {
        "lora_A": rng.standard_normal((8, 16)).astype(np.float32),
        "head.bias": np.zeros(3, np.float32),
        "count": np.arange(5, dtype=np.int64),
        "half": np.ones((2, 2), np.float16),
    }


def test_round_trip_with_metadata():
    t = tensors()
    data = encode_tensors(t, {"round": "3", "device": "d1"})
    back, meta = decode_tensors(data)
    assert meta == {"round": "3", "device": "d1"}
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])


def test_non_contiguous_arrays_are_fine():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    back, _ = decode_tensors(encode_tensors({"a": a}))
    assert np.array_equal(back["a"], a)


def test_encode_refuses_what_cannot_travel():
    with pytest.raises(ProtocolError, match="numpy"):
        encode_tensors({"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ProtocolError, match="dtype"):
        encode_tensors({"a": np.array(["x"])})
    with pytest.raises(ProtocolError, match="metadata"):
        encode_tensors({"a": np.zeros(1)}, {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ProtocolError, match="name"):
        encode_tensors({"": np.zeros(1)})


def test_pickle_is_refused():
    import pickle

    with pytest.raises(ProtocolError, match="malformed safetensors"):
        decode_tensors(pickle.dumps({"a": np.zeros(3)}))


@pytest.mark.parametrize("cut", [0, 7, 8, 20, -1])
def test_truncated_blobs_are_refused(cut):
    data = encode_tensors(tensors())
    with pytest.raises(ProtocolError, match="malformed"):
        decode_tensors(data[:cut])


def test_hostile_header_length_and_size_limit():
    with pytest.raises(ProtocolError, match="exceeds the payload"):
        decode_tensors(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode_tensors(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ProtocolError, match="limit"):
        decode_tensors(encode_tensors(tensors()), max_bytes=100)


def test_check_tensors_accepts_matching_spec():
    t = tensors()
    check_tensors(t, spec_of(t))
    check_tensors({"a": np.zeros((2, 3), np.float32)}, {"a": ([2, 3], "float32")})


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda t: t.pop("lora_A"), "missing tensors: lora_A"),
        (lambda t: t.__setitem__("extra", np.zeros(1, np.float32)), "unexpected tensors: extra"),
        (lambda t: t.__setitem__("lora_A", np.zeros((16, 8), np.float32)), "shape (16, 8) != expected (8, 16)"),
        (lambda t: t.__setitem__("head.bias", np.zeros(3, np.float64)), "dtype float64 != expected float32"),
        (lambda t: t["lora_A"].__setitem__((0, 0), np.nan), "'lora_A' holds NaN or Inf"),
        (lambda t: t["half"].__setitem__((1, 1), np.inf), "'half' holds NaN or Inf"),
    ],
)
def test_check_tensors_reasons(mutate, reason):
    spec = spec_of(tensors())
    t = tensors()
    mutate(t)
    with pytest.raises(ProtocolError) as info:
        check_tensors(t, spec)
    assert reason in info.value.reason


def test_partial_checks():
    t = tensors()
    spec = spec_of(t)
    del t["count"]
    check_tensors(t, spec, allow_missing=True)
    check_tensors({**tensors(), "x": np.zeros(1)}, spec, allow_extra=True)
    check_finite({"i": np.array([1, 2], np.int32)})


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_decode_garbage_is_a_protocol_error(data):
    try:
        decode_tensors(data)
    except ProtocolError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_decode_garbage_with_valid_length_prefix(body):
    try:
        decode_tensors(struct.pack("<Q", len(body)) + body)
    except ProtocolError:
        pass


def _mutated(blob: bytes, rnd: random.Random) -> bytes:
    """One header field or the byte buffer changed the way a hostile or broken sender might."""
    n = struct.unpack("<Q", blob[:8])[0]
    header, body = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    name = rnd.choice([k for k in header if k != "__metadata__"])
    entry, how = header[name], rnd.randrange(9)
    if how == 0:
        entry["data_offsets"][rnd.randrange(2)] += rnd.choice([-8, -1, 1, 2, 8])
    elif how == 1:
        entry["shape"] = entry["shape"] + [rnd.choice([0, 1, 2])] if rnd.random() < 0.5 else entry["shape"][:-1]
    elif how == 2:
        entry["dtype"] = rnd.choice(["F32", "F16", "I64", "U8", "BOOL", "F64", "BF16", "U16", "X"])
    elif how == 3:
        body = body[: -rnd.randint(1, 4)] if body else b"x"
    elif how == 4:
        body += b"\0" * rnd.randint(1, 8)
    elif how == 5:
        entry["shape"] = [-1]
    elif how == 6:
        entry["data_offsets"] = entry["data_offsets"][::-1]
    elif how == 7:
        entry["extra"] = 1
    else:
        header[name + "2"] = dict(entry)  # a second tensor over the same bytes
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_decode_agrees_with_the_safetensors_library():
    """decode_tensors reads the format itself (views, no copies): on sound and on damaged blobs it
    must accept nothing the safetensors library refuses, and return the same arrays where both
    accept. It may refuse more: a tensor entry with unknown fields, dtypes we never send (U16)."""
    from safetensors.numpy import load

    rng, rnd = np.random.default_rng(0), random.Random(1)
    accepted = refused = 0
    for trial in range(1500):
        tensors = {f"t{rng.integers(0, 1000)}": np.asarray(rng.random(tuple(int(d) for d in rng.integers(0, 4, rng.integers(0, 3)))) * 10)
                   .astype(rng.choice(["float32", "float16", "int64", "uint8", "bool", "float64"])) for _ in range(rng.integers(1, 5))}
        blob = encode_tensors(tensors, {"k": "v"})
        if trial % 3:
            blob = _mutated(blob, rnd)
        try:
            want = load(blob)
        except Exception:
            want = None
        try:
            got = decode_tensors(blob)[0]
        except ProtocolError:
            got = None
        if want is None:
            assert got is None, f"trial {trial}: accepted a blob safetensors refuses"
            refused += 1
        elif got is not None:
            assert set(got) == set(want)
            for k, arr in want.items():
                assert got[k].dtype == arr.dtype and got[k].shape == arr.shape and np.array_equal(got[k], arr)
                assert not got[k].flags.writeable  # views of the received bytes: nobody writes into them
            accepted += 1
    assert accepted > 500 and refused > 500  # both sides of the check were exercised


def test_decoded_arrays_never_alias_a_mutable_buffer():
    blob = bytearray(encode_tensors({"w": np.ones(4, np.float32)}))
    got = decode_tensors(blob)[0]["w"]
    blob[-4:] = np.float32(7).tobytes()
    assert not got.flags.writeable and got.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_a_view_of_immutable_bytes_is_decoded_in_place_and_a_view_of_a_mutable_buffer_is_copied():
    """The cloud decodes uploads through a view of the received payload (no copy); a view of a
    buffer that can change is copied first, as a bytearray is."""
    blob = encode_tensors({"w": np.arange(4, dtype=np.float32)}, {"k": "v"})
    framed = b"head" + blob
    tensors, meta = decode_tensors(memoryview(framed)[4:])
    assert meta == {"k": "v"} and tensors["w"].tolist() == [0, 1, 2, 3] and not tensors["w"].flags.writeable
    assert np.shares_memory(tensors["w"], np.frombuffer(framed, np.uint8))  # no copy of the payload
    for view in (lambda b: memoryview(b)[4:], lambda b: memoryview(b).toreadonly()[4:]):  # a read-only view of it too
        mutable = bytearray(framed)
        got = decode_tensors(view(mutable))[0]["w"]
        mutable[-4:] = np.float32(7).tobytes()
        assert got.tolist() == [0, 1, 2, 3]


def _blob(header: dict | str | bytes, body: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("blob", [
    _blob({"x": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4),  # more dims than numpy has
    _blob({"x": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}),  # "array is too big" in numpy
    _blob({"x": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),  # a float is not a dimension
    _blob({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),  # nor is a bool
    _blob("[" * 100_000 + "]" * 100_000),  # nesting deep enough to exhaust the parser's recursion
    _blob(json.dumps({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode("utf-16"), b"\0"),
    _blob({"__metadata__": 0, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
])
def test_hostile_headers_are_one_protocol_error(blob):
    """Every fault in a header is a ProtocolError (the cloud rejects the update and goes on); any
    other exception would escape the update checks."""
    with pytest.raises(ProtocolError, match="safetensors"):
        decode_tensors(blob)


def test_a_header_of_huge_dimensions_is_refused_before_any_big_arithmetic():
    """100k dimensions of 2**63-1 made the element count a product of huge integers (about 20 s
    of CPU per upload, quadratic in the header); each dimension is bounded first now."""
    import time

    blob = _blob({"x": {"dtype": "U8", "shape": [2**63 - 1] * 100_000, "data_offsets": [0, 1]}}, b"\0")
    t0 = time.process_time()
    with pytest.raises(ProtocolError, match="shape"):
        decode_tensors(blob)
    assert time.process_time() - t0 < 5.0


def test_a_statistics_key_with_an_absurd_layer_number_is_an_unexpected_tensor():
    """int() of a 5,000-digit layer number raises ValueError (Python's digit limit): the key
    pattern takes at most 9 digits, so such a key is just a tensor the manifest does not name."""
    from fedpft.shared.update import split_update

    with pytest.raises(ProtocolError, match="unexpected tensor"):
        split_update({f"__stats__.layer.{'9' * 5000}.positions": np.zeros(1, np.float32)}, {}, {1: 4})
