"""Per-record size caps on a device's data (pytest -m security): a record over the byte cap is
skipped while it is read, in bounded memory, and a text over the token cap (counted before
truncation) is skipped when its batch is made; both are counted as skips with their reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc

import pytest

from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.records import MAX_RECORD_BYTES, BatchMaker, batches, read_local_data

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def text_manifest(tiny_bert_bundle):
    return BundleManifest.load(tiny_bert_bundle)


def line(text: str, label: str = "ant") -> str:
    return json.dumps({"text": text, "label": label}) + "\n"


def write_big_jsonl(path, size: int = 10 * 1024 * 1024):
    """A short sample, one JSON line of `size` bytes (a valid sample but for its size), another."""
    head, tail = '{"label": "bee", "text": "', '"}\n'
    with open(path, "w") as f:
        f.write(line("first one"))
        f.write(head + "word " * ((size - len(head) - len(tail)) // 5) + tail)
        f.write(line("last one", "cat"))
    return path


def test_a_10mb_json_line_is_skipped_fast_in_bounded_memory(tmp_path, text_manifest):
    path = write_big_jsonl(tmp_path / "d.jsonl")
    tracemalloc.start()
    t0 = time.perf_counter()
    data = read_local_data(path, text_manifest)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.x for r in data.records] == ["first one", "last one"]
    assert data.skips.summary() == f"skipped 1 of 3 samples: 1 record over {MAX_RECORD_BYTES} bytes (first: {path}:2)"
    # before the cap: one 10 MB sample after 65 s and 1.7 GB of RSS (16 s, 1.36 GB here)
    assert seconds < 2.0, seconds
    assert peak < 4 * 1024 * 1024, peak  # read through in 1 MiB chunks, never held whole


def test_the_byte_cap_is_exact_and_counts_the_record_not_its_line_break(tmp_path, text_manifest):
    cap = 100
    at = '{"text": "%s", "label": "ant"}' % ("x" * (cap - 28))
    assert len(at) == cap
    path = tmp_path / "d.jsonl"
    path.write_text(at + "\n" + at[:-2] + 'x"}\n' + at)  # the cap, one over it, the cap at EOF without a newline
    data = read_local_data(path, text_manifest, max_record_bytes=cap)
    assert [r.where.rsplit(":", 1)[1] for r in data.records] == ["1", "3"]
    assert data.skips.counts == {f"record over {cap} bytes": 1}


def test_csv_record_over_the_cap_is_skipped_even_across_quoted_line_breaks(tmp_path, text_manifest):
    path = tmp_path / "d.csv"
    big = "long\n" * 300_000  # 1.5 MB in one quoted field spanning many lines
    path.write_text(f'text,label\n"a ""quoted"" one",ant\n"{big}",bee\n"two\nlines",cat\nlast,ant\n', encoding="utf-8")
    tracemalloc.start()
    data = read_local_data(path, text_manifest)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r.x, r.where.rsplit(":", 1)[1]) for r in data.records] == [('a "quoted" one', "2"), ("two\nlines", "300004"), ("last", "300006")]
    assert data.skips.counts == {f"record over {MAX_RECORD_BYTES} bytes": 1} and data.skips.first == f"{path}:3"
    assert peak < 4 * 1024 * 1024, peak


def test_csv_field_between_the_csv_modules_limit_and_the_cap_is_read(tmp_path, text_manifest):
    path = tmp_path / "d.csv"
    text = "w " * 100_000  # 200 KB: over the csv module's 128 KiB default, under the 256 KiB cap
    path.write_bytes(b"text,label\n" + f'"{text}",ant\n'.encode() + b'"\xff\xfe",bee\nok,cat\n')
    data = read_local_data(path, text_manifest)
    assert [r.x for r in data.records] == [text, "ok"]
    assert data.skips.counts == {"malformed line": 1}  # a record that is not UTF-8, not the whole file


def test_text_over_the_token_cap_is_skipped_when_batched(tmp_path, text_manifest, tiny_bert_bundle):
    path = tmp_path / "d.jsonl"
    path.write_text(line("short text") + line("alpha " * 200, "bee") + line("another short", "cat"))
    data = read_local_data(path, text_manifest)
    maker = BatchMaker(tiny_bert_bundle, text_manifest, max_record_tokens=50)
    for _epoch in range(2):  # counted and reported once, not once per epoch
        got = [r.x for b in batches(data.records, maker, 8, data.skips) for r in b.records]
        assert got == ["short text", "another short"]
    assert data.skips.counts == {"text over 50 tokens": 1}
    assert data.skips.first == f"{path}:2"
    # the encoder still truncates what it keeps to the bundle's max_length
    default = BatchMaker(tiny_bert_bundle, text_manifest)
    batch = next(batches(data.records, default, 8, data.skips.__class__()))
    assert batch.inputs["input_ids"].shape[1] <= text_manifest.input.max_length


def test_caps_are_device_config_with_sane_bounds():
    cfg = EdgeTrainConfig()
    assert cfg.max_record_bytes == MAX_RECORD_BYTES == 256 * 1024 and cfg.max_record_tokens == 8192
    with pytest.raises(ValueError):
        EdgeTrainConfig(max_record_bytes=0)


def test_a_10mb_line_costs_the_device_process_little_rss(tmp_path, tiny_bert_bundle):
    """The whole process, as the device runs it: peak RSS with the 10 MB line stays near baseline."""
    path = write_big_jsonl(tmp_path / "d.jsonl")
    script = (
        "import resource, sys\n"
        "from fedpft.shared.records import read_local_data, BatchMaker, batches\n"
        "from fedpft.shared.manifest import BundleManifest\n"
        "m = BundleManifest.load(sys.argv[1]); maker = BatchMaker(sys.argv[1], m)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "d = read_local_data(sys.argv[2], m)\n"
        "n = sum(len(b.records) for b in batches(d.records, maker, 8, d.skips))\n"
        "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_bert_bundle), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    n, grew_mb = map(int, out.stdout.split())
    assert n == 2 and grew_mb < 32, grew_mb
