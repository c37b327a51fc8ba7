"""Proxy sub-FM construction: FedPFT neuron compression and the FedOT layer-drop baseline.

Each method is a pure `build(model, ...) -> ProxySpec` that edits a *copy* of the FM; the spec
records exactly what was kept so a saved proxy can be rebuilt, its adapters mapped back to
the FM's layers, and its FFNs re-aligned later.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .families import encoder_layers, ffn_linears, unwrap


class ProxyError(ValueError):
    """Invalid proxy settings (layer index out of range, bad keep ratio)."""


@dataclass
class ProxySpec:
    method: str  # fedpft | fedot | full
    num_fm_layers: int
    layer_map: list[int]  # proxy layer index -> FM layer index
    compressed: list[int]  # proxy layers whose FFN was shrunk (or distilled, for fedot)
    kept_neurons: dict[int, list[int]] = field(default_factory=dict)  # proxy layer -> FM neuron ids
    ffn_sizes: list[int] = field(default_factory=list)  # per proxy layer

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ProxySpec":
        raw = json.loads(Path(path).read_text())
        raw["kept_neurons"] = {int(k): v for k, v in raw.get("kept_neurons", {}).items()}
        return cls(**raw)


# ---------------------------------------------------------------- pure math

def saliency(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """s_j = ||[W_in[j, :]; W_out[:, j]]||_2 for each FFN neuron j.

    w_in: (ffn, hidden) weight of the up-projection; w_out: (hidden, ffn) of the down-projection.
    """
    return torch.sqrt(w_in.pow(2).sum(dim=1) + w_out.pow(2).sum(dim=0))


def top_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties broken by lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def neurons_to_keep(ffn_size: int, keep: float) -> int:
    return max(1, int(round(ffn_size * keep)))


def default_keep_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers - 1})


def check_layers(layers: list[int], num_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ProxyError(f"layer index {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")


def fedot_layer_choice(num_layers: int, n_keep: int) -> list[int]:
    """First and last layers plus n_keep - 2 middle layers spread uniformly (Offsite-Tuning emulator)."""
    if n_keep >= num_layers:
        return list(range(num_layers))
    middle = np.linspace(1, num_layers - 2, n_keep - 2) if n_keep > 2 else np.array([])
    picked = sorted({0, num_layers - 1, *(int(round(x)) for x in middle)})
    return picked


def matching_layer_budget(num_layers: int, hidden: int, ffn: int, keep_layers: list[int], ffn_keep: float) -> int:
    """How many full layers hold as many transformer weights as the FedPFT proxy (FedOT's budget)."""
    attn = 4 * hidden * hidden
    full = attn + 2 * hidden * ffn
    compressed = attn + 2 * hidden * neurons_to_keep(ffn, ffn_keep)
    total = sum(full if i in keep_layers else compressed for i in range(num_layers))
    return max(2, min(num_layers, int(round(total / full))))


# ---------------------------------------------------------------- model surgery

def _shrunk_linear(src: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = src.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if src.bias is not None:
            out.bias.copy_(src.bias.detach()[rows] if rows is not None else src.bias.detach())
    return out


def shrink_ffn(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep FFN neurons `keep` of one layer: rows of W_in and b_in, columns of W_out, all of b_out."""
    w_in, w_out = ffn_linears(layer)
    layer.intermediate.dense = _shrunk_linear(w_in, keep, None)
    layer.output.dense = _shrunk_linear(w_out, None, keep)


def build_fedpft(fm: nn.Module, keep_layers: list[int] | None, ffn_keep: float) -> tuple[nn.Module, ProxySpec]:
    """FedPFT sub-FM: every layer kept; FFNs outside `keep_layers` shrunk to the top neurons by saliency."""
    if not 0.0 < ffn_keep <= 1.0:
        raise ProxyError(f"ffn_keep must be in (0, 1], got {ffn_keep}")
    proxy = copy.deepcopy(unwrap(fm)).eval()
    layers = encoder_layers(proxy)
    n = len(layers)
    keep_layers = default_keep_layers(n) if keep_layers is None else sorted(keep_layers)
    check_layers(keep_layers, n)
    spec = ProxySpec("fedpft", n, list(range(n)), [], {}, [])
    for i, layer in enumerate(layers):
        w_in, w_out = ffn_linears(layer)
        size = w_in.out_features
        if i not in keep_layers:
            idx = top_neurons(saliency(w_in.weight.detach(), w_out.weight.detach()), neurons_to_keep(size, ffn_keep))
            shrink_ffn(layer, idx)
            spec.compressed.append(i)
            spec.kept_neurons[i] = idx.tolist()
            size = len(idx)
        spec.ffn_sizes.append(size)
    return proxy, spec


def build_fedot(fm: nn.Module, n_keep: int) -> tuple[nn.Module, ProxySpec]:
    """FedOT emulator: keep first, last and uniformly spread middle layers; drop the rest."""
    proxy = copy.deepcopy(unwrap(fm)).eval()
    layers = encoder_layers(proxy)
    n = len(layers)
    chosen = fedot_layer_choice(n, n_keep)
    kept = nn.ModuleList([layers[i] for i in chosen])
    _set_encoder_layers(proxy, kept)
    # the middle kept layers stand in for the dropped ones: those are what distillation tunes
    middle = [p for p in range(len(chosen)) if 0 < p < len(chosen) - 1]
    spec = ProxySpec("fedot", n, chosen, middle, {}, [ffn_linears(l)[0].out_features for l in kept])
    return proxy, spec


def build_full(fm: nn.Module) -> tuple[nn.Module, ProxySpec]:
    """No compression: devices get the whole FM (the FedLoRA upper bound)."""
    proxy = copy.deepcopy(unwrap(fm)).eval()
    n = len(encoder_layers(proxy))
    return proxy, ProxySpec("full", n, list(range(n)), [], {}, [ffn_linears(l)[0].out_features for l in encoder_layers(proxy)])


def _set_encoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    from .families import backbone

    enc = backbone(model).encoder
    enc.layer = layers
    model.config.num_hidden_layers = len(layers)


def skeleton_from_spec(config, spec: ProxySpec) -> nn.Module:
    """An FM-shaped model of `config` edited to the proxy's shapes; load the proxy's weights into it."""
    from .families import model_from_config

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = spec.num_fm_layers
    model = model_from_config(cfg)
    if spec.method == "fedot":
        _set_encoder_layers(model, nn.ModuleList([encoder_layers(model)[i] for i in spec.layer_map]))
    for p, layer in enumerate(encoder_layers(model)):
        if ffn_linears(layer)[0].out_features != spec.ffn_sizes[p]:
            shrink_ffn(layer, torch.arange(spec.ffn_sizes[p]))
    return model


BUILDERS = {"fedpft": build_fedpft, "fedot": build_fedot, "full": build_full}
