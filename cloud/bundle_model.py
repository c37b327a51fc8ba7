"""Rebuild a bundle's torch proxy (+ its LoRA adapters) from the files the cloud keeps in it.

A bundle holds proxy.safetensors (the plain proxy's state dict), proxy.json (ProxySpec),
fm_config.json (the FM's config, labels and dropout as prepared), adapters_init.safetensors
(the fresh adapters + head in FM numbering) and prepare_config.json (LoRA rank/alpha). The
cloud needs the proxy for neuron-level alignment; tests need it as the reference the ORT
artifacts must agree with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fedpft.export.bundle import ADAPTERS_INIT, FM_CONFIG, PREPARE_CONFIG, PROXY_SPEC, PROXY_WEIGHTS
from fedpft.modeling.adapters import add_adapters, load_adapter_state
from fedpft.modeling.proxy import ProxySpec, skeleton_from_spec


def load_fm_config(bundle_dir: Path):
    """The FM's transformers config as prepared (labels, dropout), with eager attention."""
    from transformers import AutoConfig

    raw = json.loads((Path(bundle_dir) / FM_CONFIG).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "eager"  # what the bundle was exported with (STACK.md)
    return config


def load_proxy(bundle_dir: Path, with_adapters: bool = True) -> tuple[nn.Module, ProxySpec]:
    """(model, spec): the plain proxy with the bundle's weights, PEFT-wrapped with the bundle's
    initial adapters when `with_adapters`. The model is in eval mode."""
    from safetensors.torch import load_file

    bundle_dir = Path(bundle_dir)
    spec = ProxySpec.load(bundle_dir / PROXY_SPEC)
    model = skeleton_from_spec(load_fm_config(bundle_dir), spec)
    model.load_state_dict(load_file(str(bundle_dir / PROXY_WEIGHTS)), strict=True)
    if with_adapters:
        prep = json.loads((bundle_dir / PREPARE_CONFIG).read_text())
        model = add_adapters(model, int(prep.get("lora_rank", 8)), float(prep.get("lora_alpha", 16.0)), int(prep.get("seed", 0)))
        load_adapter_state(model, load_file(str(bundle_dir / ADAPTERS_INIT)), spec.layer_map)
    return model.eval(), spec


def set_ffn_state(model: nn.Module, ffn: dict[str, torch.Tensor]) -> None:
    """Install FFN tensors keyed like the plain proxy's state dict (manifest.ffn keys)."""
    from fedpft.modeling.families import unwrap

    missing, unexpected = unwrap(model).load_state_dict(ffn, strict=False)
    if unexpected:
        raise KeyError(f"FFN keys the proxy does not have: {unexpected[:3]}")
