"""Plug aggregated adapters into the full FM and evaluate it: what the FM owner actually gets."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from fedpft.modeling.adapters import add_adapters, load_adapter_state
from fedpft.modeling.families import load_fm

from .device import autocast, model_device

Batch = tuple[dict[str, np.ndarray], np.ndarray]


class PluggedFM:
    """The FM wrapped once with the proxy's LoRA config; each round only swaps adapter values.

    The model lives on `device`; adapters arrive as CPU arrays and are copied there."""

    def __init__(self, model_source: str, labels: list[str], lora_rank: int, lora_alpha: float, seed: int = 0,
                 device: torch.device | str = "cpu"):
        fm = load_fm(model_source, labels, dropout=None, seed=seed)
        # adapters are initialised on CPU from `seed`, so every device starts from the same values
        self.model = add_adapters(fm, lora_rank, lora_alpha, seed).eval().to(device)

    def plug(self, adapters: dict[str, np.ndarray]) -> None:
        load_adapter_state(self.model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapters.items()})

    def evaluate(self, batches: Iterable[Batch]) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) over the batches."""
        return evaluate_model(self.model, batches)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a sequence classifier (the FM or a proxy) over the batches.

    Runs on the model's device under its "inference" autocast; logits are scored in fp32 on CPU."""
    model.eval()
    device = model_device(model)
    correct, loss_sum, n = 0, 0.0, 0
    for inputs, labels in batches:
        feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        with autocast(device, "inference"):
            logits = model(**feed).logits
        logits = logits.float().cpu()
        y = torch.from_numpy(labels).long()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("no evaluation samples")
    return correct / n, loss_sum / n
