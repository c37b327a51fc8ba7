"""torch proxy + LoRA -> ONNX training graph -> ONNX Runtime on-device training artifacts.

Recipe (STACK.md): torch.onnx.export with dynamo=False, TrainingMode.TRAINING, no constant
folding, opset 16 (17 exports a fused LayerNormalization whose gradient ORT cannot build);
eager attention. The graph outputs logits plus, per compressed layer, the activation
statistics for neuron-level alignment; ORT appends the cross-entropy loss.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedpft.modeling.families import encoder_layers, ffn_linears, family_of, unwrap
from fedpft.shared.precision import FrozenDtype, for_storage

OPSET = 16
LOGITS = "logits"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
PARAMETERS = "parameters.safetensors"
# onnxruntime-training's own artifacts, kept in the cloud as the lowering's reference
ORT_DIR = "ort"
ORT_FILES = {"ort_training_model": "training_model.onnx", "ort_eval_model": "eval_model.onnx",
             "ort_optimizer_model": "optimizer_model.onnx", "ort_checkpoint": "checkpoint"}
LABELS_INPUT = "labels"


def stat_names(layer: int) -> tuple[str, str]:
    return f"apoz_off_{layer}", f"apoz_positions_{layer}"


def activation_counts(pre: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron count of unmasked positions with pre-activation <= 0, and the number of positions.

    pre: (batch, tokens, neurons) FFN pre-activation; mask: (batch, tokens) 1 for real tokens.
    GELU(x) <= 0 exactly when x <= 0, so this is the paper's "activation is zero" made exact.
    """
    m = mask.to(pre.dtype)
    off = (pre <= 0).to(pre.dtype)
    return torch.einsum("btk,bt->k", off, m), m.sum()


class TrainingGraph(nn.Module):
    """What gets exported: (inputs) -> logits, then (off_counts, positions) per stat layer.

    Pre-activations are read with forward hooks on the compressed layers' W_in: the documented
    torch extension point, so no model class is modified.
    """

    def __init__(self, model: nn.Module, stat_layers: list[int]):
        super().__init__()
        self.model = model
        self.kind = family_of(unwrap(model).config).kind
        self.stat_layers = list(stat_layers)
        self._captured: dict[int, torch.Tensor] = {}
        layers = encoder_layers(model)
        for p in self.stat_layers:
            ffn_linears(layers[p])[0].register_forward_hook(self._hook(p))

    def _hook(self, p: int):
        def hook(_module, _inputs, output):
            self._captured[p] = output

        return hook

    def forward(self, *inputs: torch.Tensor):
        logits, mask = self.logits(*inputs)
        return (logits, *self.statistics(mask))

    def logits(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, token mask or None), with the stat layers' pre-activations captured on the way."""
        self._captured.clear()
        if self.kind == "text":
            input_ids, attention_mask = inputs
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits, attention_mask
        (pixel_values,) = inputs
        return self.model(pixel_values=pixel_values).logits, None

    def statistics(self, mask: torch.Tensor | None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """(off_counts, positions) per stat layer from the last `logits` call; `dtype` (e.g. float32
        after a bf16 forward, whose 8-bit mantissa cannot count past 256) casts the pre-activations."""
        outs = []
        for p in self.stat_layers:
            pre = self._captured[p]  # (batch, tokens, neurons)
            if dtype is not None:
                pre = pre.to(dtype)
            m = mask if mask is not None else torch.ones(pre.shape[:2], dtype=pre.dtype, device=pre.device)
            outs.extend(activation_counts(pre, m))
        return outs


@dataclass
class ArtifactInfo:
    input_names: list[str]
    output_names: list[str]
    trainable: list[str]  # ONNX/checkpoint parameter names
    frozen: list[str]
    loss_output: str
    optimizer: dict  # OptimizerSpec fields, read from ORT's optimizer model
    rewritten: dict[str, int]  # training-only op -> nodes lowered
    halved: int = 0  # parameters stored as float16 (--frozen-dtype float16)


def example_inputs(kind: str, config, batch: int = 2, tokens: int = 16) -> tuple[torch.Tensor, ...]:
    if kind == "text":
        ids = torch.randint(5, min(config.vocab_size, 1000), (batch, tokens), dtype=torch.long)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[-1, tokens // 2 :] = 0  # exercise padding during tracing
        return ids, mask
    size = config.image_size
    return (torch.randn(batch, config.num_channels, size, size),)


def input_names_for(kind: str) -> list[str]:
    return ["input_ids", "attention_mask"] if kind == "text" else ["pixel_values"]


def export_training_onnx(graph: TrainingGraph, example: tuple[torch.Tensor, ...]) -> tuple[bytes, list[str], list[str]]:
    inputs = input_names_for(graph.kind)
    outputs = [LOGITS] + [n for p in graph.stat_layers for n in stat_names(p)]
    dyn = {n: {0: "batch", 1: "tokens"} for n in inputs} if graph.kind == "text" else {inputs[0]: {0: "batch"}}
    dyn[LOGITS] = {0: "batch"}
    buf = io.BytesIO()
    graph.train()  # dropout nodes belong in a training graph; ORT's eval model switches them off
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated but is the verified training-export path (STACK.md)
        warnings.simplefilter("ignore")
        _export(graph, example, buf, inputs, outputs, dyn)
    graph.eval()
    return buf.getvalue(), inputs, outputs


def _export(graph, example, buf, inputs, outputs, dyn) -> None:
    torch.onnx.export(
        graph,
        example,
        buf,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dyn,
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.TRAINING,
        export_params=True,
        dynamo=False,
    )


def generate_training_artifacts(graph: TrainingGraph, example: tuple[torch.Tensor, ...], out_dir: Path,
                                frozen_dtype: FrozenDtype = "float32") -> ArtifactInfo:
    """Write the device graphs (training graph lowered to standard ops, eval graph), the parameters
    (frozen matrices in `frozen_dtype` where that is exact, fedpft.shared.precision) and, under
    `ort/`, onnxruntime-training's own artifacts into out_dir."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)  # ORT logs every graph transform at INFO

    blob, inputs, outputs = export_training_onnx(graph, example)
    model = onnx.load_from_string(blob)
    init_names = {i.name for i in model.graph.initializer}
    trainable = [n for n, p in graph.named_parameters() if p.requires_grad and n in init_names]
    wanted = [n for n, p in graph.named_parameters() if p.requires_grad]
    missing = sorted(set(wanted) - set(trainable))
    if missing:
        raise RuntimeError(f"trainable parameters missing from the exported graph: {missing[:5]}")
    frozen = sorted(init_names - set(trainable))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # artifacts logs on root
    ort_dir = out_dir / ORT_DIR
    ort_dir.mkdir(exist_ok=True)
    with _native_stderr_captured():
        _generate(artifacts, model, trainable, frozen, ort_dir, outputs)
    lowered, optimizer, halved = write_device_graphs(model, trainable, ort_dir, out_dir, inputs, frozen_dtype)
    return ArtifactInfo(inputs, outputs, trainable, frozen, lowered.loss_output, optimizer, lowered.rewritten, halved)


def write_device_graphs(exported, trainable: list[str], ort_dir: Path, out_dir: Path, inputs: list[str],
                        frozen_dtype: FrozenDtype = "float32"):
    """ORT artifacts in ort_dir -> the plain-onnxruntime device files in out_dir: the lowered
    training graph, the eval graph (checked against the same allow-list) and every parameter the
    graphs take as an input, as safetensors (the ORT checkpoint format needs the training build)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    from .lowering import check_edge_ops, lower_training_model

    lowered = lower_training_model(onnx.load(str(ort_dir / ORT_FILES["ort_training_model"])), trainable)
    onnx.save(lowered.model, str(out_dir / TRAINING_MODEL))
    eval_model = onnx.load(str(ort_dir / ORT_FILES["ort_eval_model"]))
    check_edge_ops(eval_model)
    onnx.save(eval_model, str(out_dir / EVAL_MODEL))
    values = {t.name: t for t in exported.graph.initializer}
    user = set(inputs) | {LABELS_INPUT}
    names = [i.name for i in lowered.model.graph.input if i.name not in user]
    absent = [n for n in names if n not in values]
    if absent:
        raise RuntimeError(f"graph inputs with no exported value: {absent[:3]}")
    params = for_storage({n: numpy_helper.to_array(values[n]) for n in names}, set(names) - set(trainable), frozen_dtype)
    save_file(params, str(out_dir / PARAMETERS))
    halved = sum(str(a.dtype) == "float16" for a in params.values())
    return lowered, optimizer_spec(onnx.load(str(ort_dir / ORT_FILES["ort_optimizer_model"]))), halved


def optimizer_spec(optimizer_model) -> dict:
    """The AdamWOptimizer node's attributes, as OptimizerSpec fields; anything else is refused so
    the device never silently runs a different optimizer than the one the artifacts describe."""
    from onnx import helper

    nodes = [n for n in optimizer_model.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise RuntimeError(f"expected one AdamWOptimizer node in the optimizer model, found {len(nodes)}")
    a = {x.name: helper.get_attribute_value(x) for x in nodes[0].attribute}
    if int(a.get("adam_mode", 0)) != 1:
        raise RuntimeError(f"AdamWOptimizer adam_mode {a.get('adam_mode')} is not the HF mode (1) the device implements")
    return {"beta1": float(a.get("alpha", 0.9)), "beta2": float(a.get("beta", 0.999)), "eps": float(a.get("epsilon", 1e-8)),
            "weight_decay": float(a.get("weight_decay", 0.0)), "bias_correction": bool(a.get("correct_bias", 1))}


@contextmanager
def _native_stderr_captured():
    """ORT's offline graph optimiser logs every transform at INFO straight to fd 2, ignoring the
    logger severity; keep it out of the user's terminal and show it only if generation fails."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read()[-4000:].decode(errors="replace")
            sys.stderr.write(tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _generate(artifacts, model, trainable, frozen, out_dir, outputs) -> None:
    artifacts.generate_artifacts(
        model,
        requires_grad=trainable,
        frozen_params=frozen,
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(out_dir),
        additional_output_names=outputs,
        loss_input_names=[LOGITS],
    )
