"""Local data on a device: formats, bad samples counted and skipped, no-usable-sample errors, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpft.shared.manifest import BundleManifest
from fedpft.shared.records import BatchMaker, DataError, batches, epoch_order, read_local_data

from conftest import LABELS, write_image_data, write_text_data


@pytest.fixture(scope="module")
def text_manifest(tiny_bert_bundle):
    return BundleManifest.load(tiny_bert_bundle)


@pytest.fixture(scope="module")
def image_manifest(tiny_vit_bundle):
    return BundleManifest.load(tiny_vit_bundle)


def test_jsonl_bad_lines_are_counted_and_summarised(tmp_path, text_manifest):
    path = write_text_data(tmp_path / "d.jsonl", n=10, extra_lines=[
        json.dumps({"text": "alpha", "label": "zebra"}),
        json.dumps({"text": "   ", "label": "ant"}),
        "{not json",
        json.dumps({"label": "ant"}),
        json.dumps(["alpha", "ant"]),
        "",  # blank lines are not samples
    ])
    data = read_local_data(path, text_manifest)
    assert len(data.records) == 10
    assert data.skips.counts == {"malformed line": 3, "unknown label": 1, "empty text": 1}
    assert data.skips.summary() == (
        f"skipped 5 of 15 samples: 3 malformed line, 1 unknown label, 1 empty text (first: {path}:11)"
    )
    assert [r.y for r in data.records[:3]] == [0, 1, 2]


def test_csv_text_with_header_and_ragged_rows(tmp_path, text_manifest):
    path = tmp_path / "d.csv"
    path.write_text('id,text,label\n1,"alpha, beta",bee\n2,gamma\n3,delta,cat,extra\n4,eta,dog\n5,theta,ant\n')
    data = read_local_data(path, text_manifest)
    assert [(r.x, LABELS[r.y]) for r in data.records] == [("alpha, beta", "bee"), ("theta", "ant")]
    assert data.skips.counts == {"malformed line": 2, "unknown label": 1}


def test_csv_without_the_needed_columns_is_an_error(tmp_path, text_manifest):
    path = tmp_path / "d.csv"
    path.write_text("sentence,class\nalpha,ant\n")
    with pytest.raises(DataError, match="header row with columns text, label"):
        read_local_data(path, text_manifest)


@pytest.mark.parametrize("content", ["", "\n\n", json.dumps({"text": "a", "label": "nope"}) + "\n"])
def test_no_usable_sample_is_an_error(tmp_path, text_manifest, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no usable text sample"):
        read_local_data(path, text_manifest)


def test_missing_path_and_wrong_kind(tmp_path, text_manifest):
    with pytest.raises(DataError, match="does not exist"):
        read_local_data(tmp_path / "nope.jsonl", text_manifest)
    with pytest.raises(DataError, match="is a folder"):
        read_local_data(tmp_path, text_manifest)


def test_image_folder_skips_unknown_classes_and_corrupt_files(tmp_path, image_manifest, tiny_vit_bundle):
    root = write_image_data(tmp_path / "imgs", per_class=3)
    (root / "dog").mkdir()
    write_image_data(tmp_path / "imgs", per_class=1, labels=["dog"])
    (root / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (root / "bee" / "0.png").read_bytes()
    (root / "bee" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "loose.png").write_bytes(good)
    (root / "cat" / "notes.txt").write_text("ignored: not an image suffix")
    data = read_local_data(root, image_manifest)
    assert len(data.records) == 11  # 9 good + 2 corrupt not yet decoded
    assert data.skips.counts == {"unknown label": 1, "file outside a class folder": 1}
    maker = BatchMaker(tiny_vit_bundle, image_manifest)
    out = list(batches(data.records, maker, 4, data.skips))
    assert [len(b.labels) for b in out] == [4, 4, 1]
    assert out[0].inputs["pixel_values"].shape == (4, 3, 32, 32) and out[0].inputs["pixel_values"].dtype == np.float32
    assert data.skips.counts["corrupt image"] == 2
    list(batches(data.records, maker, 4, data.skips))  # a second epoch does not count them again
    assert data.skips.counts["corrupt image"] == 2
    assert data.skips.summary().startswith("skipped 4 of 13 samples: 2 corrupt image, 1 unknown label")


def test_image_csv_resolves_relative_paths(tmp_path, image_manifest):
    write_image_data(tmp_path / "imgs", per_class=1)
    path = tmp_path / "list.csv"
    path.write_text("path,label\nimgs/ant/0.png,ant\nimgs/bee/0.png,bee\nimgs/gone.png,cat\n")
    data = read_local_data(path, image_manifest)
    assert [LABELS[r.y] for r in data.records] == ["ant", "bee"]
    assert data.skips.counts == {"missing image": 1}


def test_split_and_epoch_order_are_seeded(tmp_path, text_manifest):
    data = read_local_data(write_text_data(tmp_path / "d.jsonl", n=20), text_manifest)
    train, held = data.split(0.1, seed=3)
    assert len(held) == 2 and len(train) == 18 and not set(train) & set(held)
    assert data.split(0.1, seed=3) == (train, held)
    assert data.split(0.1, seed=4) != (train, held)
    assert data.split(0.0, seed=3) == (data.records, [])
    assert sorted(epoch_order(18, 0, 1)) == list(range(18))
    assert (epoch_order(18, 0, 1) == epoch_order(18, 0, 1)).all()
    assert (epoch_order(18, 0, 1) != epoch_order(18, 0, 2)).any()


def test_text_batches_are_tokenized_per_step(tmp_path, text_manifest, tiny_bert_bundle):
    data = read_local_data(write_text_data(tmp_path / "d.jsonl", n=7), text_manifest)
    out = list(batches(data.records, BatchMaker(tiny_bert_bundle, text_manifest), 3, data.skips))
    assert [len(b.labels) for b in out] == [3, 3, 1]
    b = out[0]
    assert b.inputs["input_ids"].dtype == np.int64 and b.inputs["input_ids"].shape == b.inputs["attention_mask"].shape
    assert b.inputs["input_ids"].shape[1] <= text_manifest.input.max_length
    assert b.labels.tolist() == [0, 1, 2]
