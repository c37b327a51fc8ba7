"""LoRA adapters on the proxy/FM attention + task head, and their PEFT state-dict keys.

Adapters are the only thing that moves between the FM and the proxy, so both sides use the
same LoraConfig, and keys are always the FM's (proxy layer p is FM layer layer_map[p]).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

# query, key, value and the attention output projection — never the FFN's output.dense
LORA_TARGETS = r".*\.(query|key|value|attention\.output\.dense)$"
HEAD = "classifier"
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=[HEAD],
    )


def add_adapters(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (A ~ kaiming from `seed`, B = 0) and a trainable head copy."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(rank, alpha))


def redraw_adapters(init: dict[str, np.ndarray], seed: int, head_std: float) -> dict[str, np.ndarray]:
    """Fresh initial adapters with the shapes (and keys) of `init`, drawn from `seed` the way
    add_adapters draws them: LoRA A ~ U(+-1/sqrt(fan_in)) (peft's kaiming_uniform, a=sqrt(5)),
    head weight ~ N(0, head_std) (the HF initialiser, std = the config's initializer_range); the rest
    (LoRA B = 0, so training starts from the model itself, and the head bias) kept as they are. Lets
    runs of one bundle start from seed-dependent adapters without preparing (and distilling) a
    bundle per seed."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(init):
        v = init[key]
        if "lora_A" in key:
            bound = 1.0 / np.sqrt(v.shape[1])
            out[key] = rng.uniform(-bound, bound, v.shape).astype(v.dtype)
        elif HEAD in key.split(".") and key.endswith("weight"):
            out[key] = (rng.standard_normal(v.shape) * head_std).astype(v.dtype)
        else:
            out[key] = v.copy()
    return out


def remap_layers(key: str, layer_map: list[int]) -> str:
    """Rename a proxy key to the FM's layer numbering."""
    return _LAYER.sub(lambda m: f"encoder.layer.{layer_map[int(m.group(1))]}.", key, count=1)


def unmap_layers(key: str, layer_map: list[int]) -> str | None:
    """FM key -> proxy key, or None when the FM layer is not in the proxy (dropped by FedOT)."""
    inverse = {fm: p for p, fm in enumerate(layer_map)}
    m = _LAYER.search(key)
    if m is None:
        return key
    p = inverse.get(int(m.group(1)))
    return None if p is None else _LAYER.sub(f"encoder.layer.{p}.", key, count=1)


def _keys_by_storage(peft_model: nn.Module) -> dict[int, str]:
    """data_ptr -> PEFT state-dict key: parameters matched by tensor identity against peft's own
    state dict, so we never re-implement its naming."""
    from peft import get_peft_model_state_dict

    return {t.data_ptr(): k for k, t in get_peft_model_state_dict(peft_model).items()}


def adapter_parameters(peft_model: nn.Module, layer_map: list[int]) -> dict[str, nn.Parameter]:
    """FM PEFT state-dict key -> the parameter holding that adapter tensor, trainable or not."""
    by_ptr = _keys_by_storage(peft_model)
    return {remap_layers(by_ptr[p.data_ptr()], layer_map): p for _, p in peft_model.named_parameters() if p.data_ptr() in by_ptr}


def trainable_keys(peft_model: nn.Module, layer_map: list[int]) -> dict[str, str]:
    """named_parameters() name -> FM PEFT state-dict key, for every trainable parameter."""
    by_ptr = _keys_by_storage(peft_model)
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = by_ptr.get(p.data_ptr())
            if key is None:
                raise RuntimeError(f"trainable parameter {name} has no PEFT state-dict key")
            out[name] = remap_layers(key, layer_map)
    return out


def adapter_state(peft_model: nn.Module, layer_map: list[int]) -> dict[str, torch.Tensor]:
    """The adapters as a PEFT state dict in FM numbering (what travels and what plugs into the FM)."""
    from peft import get_peft_model_state_dict

    return {remap_layers(k, layer_map): v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model: nn.Module, state: dict[str, torch.Tensor], layer_map: list[int] | None = None) -> None:
    """Set adapters from an FM-numbered PEFT state dict; keys of layers the model lacks are skipped."""
    from peft import set_peft_model_state_dict

    if layer_map is not None:
        state = {pk: v for k, v in state.items() if (pk := unmap_layers(k, layer_map)) is not None}
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or HEAD in k]
    if unexpected:
        raise KeyError(f"adapter keys the model does not have: {unexpected[:3]}")
