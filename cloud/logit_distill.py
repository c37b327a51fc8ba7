"""Alignment objective aimed at what the proxy is for: the classifier output the FM would give.

Teacher = FM + the round's adapters, student = proxy + the same adapters; the student's compressed
FFNs are trained to minimise KL(teacher || student) of the classifier's output distributions on
unlabeled public batches. The layer objective (cloud/distill.py) matches hidden states of the
compressed layers one by one, so an error it tolerates in a direction the head reads counts as much
as one in a direction nobody reads; this one weighs every error by what it does to the prediction the
adapters are trained against, through the FM's own (adapted) upper layers and head. Chosen over
LoRA-gradient matching for cost: one forward of each model and one backward of the student per
step, where matching gradients needs the gradient of a gradient (double backward) through both.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from fedpft.modeling.proxy import ProxySpec

from .distill import Batch, DistillResult, fit_ffns, mean_over_batches


def logit_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), summed over classes, mean over the batch, in fp32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def logit_distill(
    teacher: nn.Module,
    student: nn.Module,
    spec: ProxySpec,
    batches: Iterator[Batch],
    steps: int,
    lr: float = 5e-4,
    frozen: dict[int, torch.Tensor] | None = None,
) -> DistillResult:
    """Train the student's compressed FFNs (the same parameters as `distill`) to minimise
    KL(teacher || student) of the classifier outputs for `steps` batches; no labels needed.
    frozen: proxy layer -> bool mask (neurons,) of neurons that keep their current weights."""

    def loss_fn(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(**batch).logits
        return logit_kl(t_logits, student(**batch).logits)

    return fit_ffns(teacher, student, spec, batches, steps, lr, loss_fn, frozen)


def evaluate_logit_kl(teacher: nn.Module, student: nn.Module, batches: list[Batch]) -> float:
    """Mean KL(teacher || student) of the classifier outputs over fixed batches (before/after comparisons)."""
    return mean_over_batches(teacher, student, batches, lambda b: logit_kl(teacher(**b).logits, student(**b).logits))
