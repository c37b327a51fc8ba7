"""Rebuild a bundle's torch proxy (+ its LoRA adapters) from the files the cloud keeps in it.

A bundle's manifest names, by role, the plain proxy's state dict (proxy_weights), its ProxySpec
(proxy_spec), the FM's config with labels and dropout as prepared (fm_config), the fresh adapters
+ head in FM numbering (adapters_init) and the PrepareConfig (prepare_config: LoRA rank/alpha).
The cloud needs the proxy for neuron-level alignment; tests need it as the reference the ORT
artifacts must agree with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fedpft.modeling.adapters import add_adapters, load_adapter_state
from fedpft.modeling.proxy import ProxySpec, skeleton_from_spec
from fedpft.shared.manifest import ROLE_ADAPTERS_INIT, ROLE_FM_CONFIG, ROLE_PROXY_SPEC, ROLE_PROXY_WEIGHTS, BundleManifest

from .config import load_prepare_config


def load_fm_config(bundle_dir: Path, manifest: BundleManifest | None = None):
    """The FM's transformers config as prepared (labels, dropout), with eager attention."""
    from transformers import AutoConfig

    manifest = manifest or BundleManifest.load(bundle_dir)
    raw = json.loads(manifest.file_path(bundle_dir, ROLE_FM_CONFIG).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "eager"  # what the bundle was exported with (STACK.md)
    return config


def load_proxy(bundle_dir: Path, with_adapters: bool = True) -> tuple[nn.Module, ProxySpec]:
    """(model, spec): the plain proxy with the bundle's weights, PEFT-wrapped with the bundle's
    initial adapters when `with_adapters`. The model is in eval mode."""
    from safetensors.torch import load_file

    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.load(bundle_dir)
    spec = ProxySpec.load(manifest.file_path(bundle_dir, ROLE_PROXY_SPEC))
    model = skeleton_from_spec(load_fm_config(bundle_dir, manifest), spec)
    model.load_state_dict(load_file(str(manifest.file_path(bundle_dir, ROLE_PROXY_WEIGHTS))), strict=True)
    if with_adapters:
        prep = load_prepare_config(bundle_dir, manifest)
        model = add_adapters(model, prep.lora_rank, prep.lora_alpha, prep.seed)
        load_adapter_state(model, load_file(str(manifest.file_path(bundle_dir, ROLE_ADAPTERS_INIT))), spec.layer_map)
    return model.eval(), spec


def set_ffn_state(model: nn.Module, ffn: dict[str, torch.Tensor]) -> None:
    """Install FFN tensors keyed like the plain proxy's state dict (manifest.ffn keys)."""
    from fedpft.modeling.families import unwrap

    missing, unexpected = unwrap(model).load_state_dict(ffn, strict=False)
    if unexpected:
        raise KeyError(f"FFN keys the proxy does not have: {unexpected[:3]}")
