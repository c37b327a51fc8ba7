"""`fedpft-edge train` offline rounds on tiny bundles: update file, adapters round trip, statistics,
bad adapters, bad data, tampered bundles, checkpoint cache, and no torch on the device path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from fedpft.edge.cli import app
from fedpft.edge.trainer import AdapterError, cached_checkpoint, open_session, train_round
from fedpft.edge.update import read_update
from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.manifest import BundleError, BundleManifest

from conftest import copy_bundle, write_image_data, write_text_data

runner = CliRunner()


def train_cli(bundle: Path, data: Path, out: Path, *args: str):
    return runner.invoke(app, ["train", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "-q", *args])


def error_lines(res) -> list[str]:
    return [l for l in res.stderr.splitlines() if l.startswith("error:")]


def assert_clean_failure(res, out: Path, needle: str) -> None:
    assert res.exit_code != 0, res.output
    lines = error_lines(res)
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture
def text_data(tmp_path):
    return write_text_data(tmp_path / "local.jsonl", n=30, extra_lines=['{"text": "alpha", "label": "dog"}', "oops"])


def test_cli_round_writes_adapters_metrics_and_statistics(tmp_path, tiny_bert_bundle, text_data):
    out = tmp_path / "update.safetensors"
    res = train_cli(tiny_bert_bundle, text_data, out, "--lr", "1e-2", "--batch-size", "4", "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert "skipped 2 of 32 samples: 1 unknown label, 1 malformed line" in res.stderr
    m = BundleManifest.load(tiny_bert_bundle)
    u = read_update(out, m)
    meta = u.metadata
    assert meta["format"] == "fedpft-update" and meta["bundle_id"] == m.bundle_id
    assert int(meta["num_samples"]) == 27 and int(meta["holdout_samples"]) == 3
    assert int(meta["steps"]) == 2 * 7 and int(meta["samples_seen"]) == 2 * 27
    assert float(meta["mean_loss"]) > 0
    assert 0 <= float(meta["acc_before"]) <= 1 and 0 <= float(meta["acc_after"]) <= 1
    assert set(u.adapters) == {t.key for t in m.trainable}
    init = load_file(str(tiny_bert_bundle / "adapters_init.safetensors"))
    assert any(not np.array_equal(u.adapters[k], init[k]) for k in init)
    assert sorted(u.stats) == [s.layer for s in m.stat_outputs] == [1]
    off, positions = u.stats[1]
    assert off.shape == (m.stat_outputs[0].neurons,) and positions > 0 and (off <= positions).all()
    raw = load_file(str(out))
    assert raw["__stats__.layer.1.off_counts"].dtype == np.float32 and raw["__stats__.layer.1.positions"].shape == (1,)


def test_statistics_sum_every_position_of_the_round(tmp_path, tiny_vit_bundle):
    data = write_image_data(tmp_path / "imgs", per_class=4)
    cfg = EdgeTrainConfig(batch_size=3, epochs=2, holdout=0.25, lr=1e-3)
    res = train_round(tiny_vit_bundle, data, cfg)
    tokens = (32 // 8) ** 2 + 1  # patches + [CLS]
    assert res.samples_seen == 2 * 9 and res.steps == 2 * 3
    assert all(pos == res.samples_seen * tokens for _, pos in res.stats.values())
    assert res.holdout_samples == 3 and res.acc_before is not None


def test_adapters_round_trip(tmp_path, tiny_bert_bundle, text_data):
    """Round 2 starting from round 1's file sees round 1's model: same held-out accuracy, and with
    a vanishing learning rate it hands back exactly the adapters it was given."""
    first, second, third = tmp_path / "r1.safetensors", tmp_path / "r2.safetensors", tmp_path / "r3.safetensors"
    assert train_cli(tiny_bert_bundle, text_data, first, "--lr", "5e-2", "--holdout", "0.3").exit_code == 0
    res = train_cli(tiny_bert_bundle, text_data, second, "--adapters", str(first), "--lr", "1e-12", "--holdout", "0.3")
    assert res.exit_code == 0, res.output
    m = BundleManifest.load(tiny_bert_bundle)
    a, b = read_update(first, m), read_update(second, m)
    assert a.metadata["acc_after"] == b.metadata["acc_before"]
    for k, v in a.adapters.items():
        np.testing.assert_allclose(b.adapters[k], v, atol=1e-8, rtol=0)
    # the adapter tensors alone (what the cloud sends back) work as --adapters too
    save_file(a.adapters, str(tmp_path / "global.safetensors"))
    assert train_cli(tiny_bert_bundle, text_data, third, "--adapters", str(tmp_path / "global.safetensors")).exit_code == 0


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t.pop(next(iter(t))), "missing tensors"),
        (lambda t: t.__setitem__(next(iter(t)), np.zeros((3, 3), np.float32)), "shape (3, 3) != expected"),
        (lambda t: t.__setitem__(next(iter(t)), t[next(iter(t))].astype(np.float64)), "dtype float64 != expected float32"),
        (lambda t: t[next(iter(t))].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda t: t.__setitem__("base_model.model.bogus.weight", np.zeros(2, np.float32)), "unexpected tensors"),
    ],
)
def test_bad_adapters_are_refused(tmp_path, tiny_bert_bundle, text_data, change, needle):
    tensors = load_file(str(tiny_bert_bundle / "adapters_init.safetensors"))
    change(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "u.safetensors"
    res = train_cli(tiny_bert_bundle, text_data, out, "--adapters", str(tmp_path / "bad.safetensors"))
    assert_clean_failure(res, out, needle)


def test_adapters_file_that_is_not_safetensors(tmp_path, tiny_bert_bundle, text_data):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    out = tmp_path / "u.safetensors"
    assert_clean_failure(train_cli(tiny_bert_bundle, text_data, out, "--adapters", str(tmp_path / "bad.safetensors")), out, "malformed safetensors")
    assert_clean_failure(train_cli(tiny_bert_bundle, text_data, out, "--adapters", str(tmp_path / "none.safetensors")), out, "cannot read")


def test_no_usable_sample_fails_without_writing(tmp_path, tiny_bert_bundle, tiny_vit_bundle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "", "label": "ant"}\n{"text": "x", "label": "zebra"}\n')
    out = tmp_path / "u.safetensors"
    assert_clean_failure(train_cli(tiny_bert_bundle, bad, out), out, "holds no usable text sample (skipped 2 of 2 samples")
    # images: every file is found corrupt only when decoded, during the round
    root = tmp_path / "imgs"
    for label in ("ant", "bee"):
        (root / label).mkdir(parents=True)
        (root / label / "x.png").write_bytes(b"garbage")
    res = train_cli(tiny_vit_bundle, root, out, "--holdout", "0")
    assert_clean_failure(res, out, "no usable image sample (skipped 2 of 2 samples: 2 corrupt image")


def test_tampered_bundle_is_refused(tmp_path, tiny_bert_bundle, text_data):
    bundle = copy_bundle(tiny_bert_bundle, tmp_path / "bundle")
    model = bundle / "training_model.onnx"
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model.write_bytes(bytes(blob))
    out = tmp_path / "u.safetensors"
    assert_clean_failure(train_cli(bundle, text_data, out), out, "sha256 does not match")
    with pytest.raises(BundleError):
        train_round(bundle, text_data, EdgeTrainConfig())


def test_max_steps_and_bad_options(tmp_path, tiny_bert_bundle, text_data):
    out = tmp_path / "u.safetensors"
    res = train_cli(tiny_bert_bundle, text_data, out, "--max-steps", "2", "--epochs", "5")
    assert res.exit_code == 0, res.output
    assert read_update(out, BundleManifest.load(tiny_bert_bundle)).metadata["steps"] == "2"
    out.unlink()
    assert_clean_failure(train_cli(tiny_bert_bundle, text_data, out, "--holdout", "1.5"), out, "holdout")
    assert_clean_failure(train_cli(tiny_bert_bundle, text_data, out, "--batch-size", "0"), out, "batch")
    assert_clean_failure(train_cli(tiny_bert_bundle, tmp_path / "missing.jsonl", out), out, "does not exist")


def test_help_documents_every_option():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for opt in ("--bundle", "--data", "--out", "--adapters", "--epochs", "--batch-size", "--lr", "--max-steps", "--seed", "--holdout"):
        assert opt in text
    # every option line carries a help text
    cmd = __import__("typer").main.get_command(app).commands["train"]
    assert all(p.help for p in cmd.params if p.name != "help")


def test_checkpoint_cache_keeps_pushed_ffn_weights(tmp_path, tiny_bert_bundle, text_data):
    cache = tmp_path / "cache"
    session = open_session(tiny_bert_bundle)
    m = session.manifest
    assert cached_checkpoint(m, cache) is None
    ffn = {t.key: np.full(t.shape, 0.01, np.float32) for t in m.ffn}
    session.set_ffn(ffn)
    session.save(cache)
    assert cached_checkpoint(m, cache) is not None
    for k, v in open_session(tiny_bert_bundle, cache).ffn().items():
        np.testing.assert_array_equal(v, ffn[k])
    # a round with the cache starts from it, and saves its result back
    res = train_round(tiny_bert_bundle, text_data, EdgeTrainConfig(lr=1e-2), cache_dir=cache)
    after = open_session(tiny_bert_bundle, cache)
    np.testing.assert_array_equal(after.ffn()[m.ffn[0].key], ffn[m.ffn[0].key])
    np.testing.assert_array_equal(after.adapters()[m.trainable[-1].key], res.adapters[m.trainable[-1].key])
    with pytest.raises(AdapterError, match="shape"):
        session.set_ffn({m.ffn[0].key: np.zeros(3, np.float32)})


def test_edge_round_imports_no_torch(tmp_path, tiny_bert_bundle, text_data):
    """The device path (CLI import + a full round + writing the update) never loads torch & co."""
    out = tmp_path / "u.safetensors"
    script = f"""
import sys
from typer.testing import CliRunner
import fedpft.edge.cli as cli
res = CliRunner().invoke(cli.app, ["train", "--bundle", {str(tiny_bert_bundle)!r}, "--data", {str(text_data)!r},
                                   "--out", {str(out)!r}, "-q"])
assert res.exit_code == 0, res.output
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "peft", "optimum"}})
print("HEAVY", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert out.is_file()


def test_held_out_split_stays_fixed_while_the_round_seed_changes(monkeypatch, tiny_bert_bundle, text_data):
    """The cloud sends a new seed every round; were it to move the held-out split, samples held out
    in one round would be trained on in the next and acc_before/acc_after would measure memorisation."""
    from fedpft.shared.records import LocalData

    held_out_sets = []
    real_split = LocalData.split

    def spy(self, holdout, seed):
        train, held = real_split(self, holdout, seed)
        held_out_sets.append([r.where for r in held])
        return train, held

    monkeypatch.setattr(LocalData, "split", spy)
    for round_seed in (1, 2, 3):
        train_round(tiny_bert_bundle, text_data, EdgeTrainConfig(seed=round_seed, holdout=0.3, max_steps=1))
    assert len(held_out_sets) == 3 and held_out_sets[0]
    assert held_out_sets[0] == held_out_sets[1] == held_out_sets[2]


def test_a_seed_fixes_the_dropout_masks_so_a_round_repeats_exactly(tmp_path, tiny_bert_dropout_bundle, text_data):
    """With dropout in the graph, the same seed, data and adapters train the same adapters bit for bit;
    another seed draws other masks. (Unseeded, onnxruntime seeds its generator from the clock.)"""
    def adapters(seed: int, dropout_seed: int | None):
        cfg = EdgeTrainConfig(lr=1e-2, batch_size=4, seed=seed, dropout_seed=dropout_seed, threads=1)
        return train_round(tiny_bert_dropout_bundle, text_data, cfg).adapters

    first, again, other = adapters(0, 7), adapters(0, 7), adapters(0, 8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)  # the masks matter: dropout is in the graph
    # the CLI's --seed seeds dropout too: two offline rounds write the same tensors
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        res = train_cli(tiny_bert_dropout_bundle, text_data, out, "--lr", "1e-2", "--seed", "3")
        assert res.exit_code == 0, res.output
    a, b = (load_file(str(p)) for p in outs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_each_device_draws_its_own_dropout_seed_from_the_task_seed():
    from fedpft.edge.task_training import dropout_seed

    assert dropout_seed(5, "dev1") == dropout_seed(5, "dev1")
    assert len({dropout_seed(5, "dev1"), dropout_seed(5, "dev2"), dropout_seed(6, "dev1")}) == 3
    assert 0 <= dropout_seed(2**40, "x" * 64) < 2**63
