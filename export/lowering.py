"""Lower an onnxruntime-training graph to ops that every onnxruntime build registers.

`generate_artifacts` (onnxruntime-training, a cloud-side build tool only) writes a training graph
whose backward pass uses a few training-only kernels, plus `InPlaceAccumulatorV2` nodes that add
each gradient into a buffer the training runtime owns. Plain onnxruntime (the inference build,
the only one that exists for aarch64, Jetson and current Pythons) has none of them. Each of those
ops has a closed form in standard ONNX ops, so we rewrite them here:

    GeluGrad(dY, X)                  dY * (Phi(X) + X * phi(X))
    BiasGeluGrad_dX(dY, X, B)        GeluGrad(dY, X + B)
    TanhGrad(dY, Y)                  dY * (1 - Y^2)
    SoftmaxGrad_13(dY, Y; axis)      Y * (dY - sum(dY * Y, axis))
    DropoutGrad(dY, mask, ratio, t)  t ? dY * mask / (1 - ratio) : dY   (no t: as t; no ratio: 0.5)
    SoftmaxCrossEntropyLossGrad      (exp(log_prob) - onehot(label)) * dLoss / N  (N: non-ignored labels)
    GatherGrad(shape, idx, dY; axis) ScatterElements(zeros(shape), idx, dY, axis, reduction=add)
    LayerNormalizationGrad           dX = r * (g - mean(g) - x^ * mean(g * x^)), g = dY * scale, x^ = (X - mu) * r
    ConcatTraining                   Concat (+ the per-input lengths, if anything reads them)
    InPlaceAccumulatorV2(buf, g, _)  removed: `g` becomes a graph output named `<param>_grad`

The accumulation buffers and `lazy_reset_grad` inputs disappear; the graph returns the gradients
of this step and the device's optimizer (numpy AdamW) applies them. Dead nodes (e.g. gradients of
frozen LayerNorm weights) are pruned. `check_edge_ops` is the allow-list: anything else left in the
graph fails `prepare` naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedpft.shared.manifest import GRAD_SUFFIX

MS = "com.microsoft"

# Contrib ops in the `com.microsoft` domain that every full onnxruntime build registers on CPU
# (and CUDA): ORT's own graph optimiser emits them for inference too. Standard-domain ops are
# allowed as long as the opset is one onnxruntime >= 1.17 supports (<= 20).
EDGE_CONTRIB_OPS = frozenset({"Gelu", "BiasGelu", "FastGelu", "FusedMatMul", "SkipLayerNormalization", "BiasSoftmax"})
MAX_STANDARD_OPSET = 20
STANDARD_DOMAINS = ("", "ai.onnx")


class LoweringError(ValueError):
    """The training graph holds an op this pass cannot lower, or the result is not edge-safe."""


@dataclass
class _Builder:
    """Appends nodes/initializers with unique names; every rule builds through one of these."""

    prefix: str
    opset: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _n: int = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def op(self, op_type: str, inputs: Iterable[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        outs = [self.name(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type + "_node"), **attrs))
        return outs

    def one(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, [out] if out else 1, **attrs)[0]

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def like(self, value: float, ref: str) -> str:
        """A scalar of `ref`'s element type (CastLike keeps float16/float32 graphs both right)."""
        return self.one("CastLike", self.const(value), ref)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        # ReduceSum takes axes as an input from opset 13, the others from opset 18
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.one(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.one(op_type, x, axes=axes, keepdims=keepdims)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _gelu_grad(b: _Builder, dy: str, x: str, out: str) -> None:
    # d/dx x*Phi(x) = Phi(x) + x*phi(x), Phi(x) = (1 + erf(x/sqrt2))/2, phi(x) = exp(-x^2/2)/sqrt(2 pi)
    cdf = b.one("Mul", b.one("Add", b.like(1.0, x), b.one("Erf", b.one("Mul", x, b.like(1 / math.sqrt(2), x)))), b.like(0.5, x))
    pdf = b.one("Mul", b.one("Exp", b.one("Mul", b.one("Mul", x, x), b.like(-0.5, x))), b.like(1 / math.sqrt(2 * math.pi), x))
    b.one("Mul", dy, b.one("Add", cdf, b.one("Mul", x, pdf)), out=out)


def _rule_gelu_grad(b: _Builder, n: onnx.NodeProto) -> None:
    _gelu_grad(b, n.input[0], n.input[1], n.output[0])


def _rule_bias_gelu_grad(b: _Builder, n: onnx.NodeProto) -> None:
    _gelu_grad(b, n.input[0], b.one("Add", n.input[1], n.input[2]), n.output[0])


def _rule_tanh_grad(b: _Builder, n: onnx.NodeProto) -> None:
    dy, y = n.input[0], n.input[1]
    b.one("Mul", dy, b.one("Sub", b.like(1.0, y), b.one("Mul", y, y)), out=n.output[0])


def _rule_softmax_grad(b: _Builder, n: onnx.NodeProto) -> None:
    dy, y = n.input[0], n.input[1]
    axis = _attrs(n).get("axis", -1)
    s = b.reduce("ReduceSum", b.one("Mul", dy, y), [axis])
    b.one("Mul", y, b.one("Sub", dy, s), out=n.output[0])


def _rule_dropout_grad(b: _Builder, n: onnx.NodeProto) -> None:
    dy, mask = n.input[0], n.input[1]
    ratio = n.input[2] if len(n.input) > 2 and n.input[2] else None
    training = n.input[3] if len(n.input) > 3 and n.input[3] else None
    r = b.one("CastLike", ratio, dy) if ratio else b.like(0.5, dy)  # ONNX Dropout's default ratio
    scale = b.one("Div", b.like(1.0, dy), b.one("Sub", b.like(1.0, dy), r))
    kept = b.one("Mul", b.one("Mul", dy, b.one("CastLike", mask, dy)), scale)
    if training:
        b.one("Where", training, kept, dy, out=n.output[0])
    else:  # as ORT's kernel: without a training_mode input the mask and scale apply
        b.one("Identity", kept, out=n.output[0])


def _rule_sce_loss_grad(b: _Builder, n: onnx.NodeProto) -> None:
    a = _attrs(n)
    if len(n.input) > 3 and n.input[3]:
        raise LoweringError(f"node '{n.name}': SoftmaxCrossEntropyLossGrad with class weights is not supported")
    dloss, log_prob, label = n.input[0], n.input[1], n.input[2]
    reduction = a.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    depth = b.one("Gather", b.one("Shape", log_prob), b.const(1, np.int64), axis=0)
    if "ignore_index" in a:
        keep = b.one("Not", b.one("Equal", label, b.const(a["ignore_index"], np.int64)))
        label = b.one("Where", keep, label, b.one("CastLike", b.const(0, np.int64), label))
    else:
        keep = None
    onehot = b.one("OneHot", label, depth, b.one("CastLike", b.const([0.0, 1.0]), log_prob), axis=1)
    grad = b.one("Sub", b.one("Exp", log_prob), onehot)
    if keep is not None:
        grad = b.one("Mul", grad, b.one("Unsqueeze", b.one("CastLike", keep, log_prob), b.const([1], np.int64)))
    if reduction == "none":
        scaled = b.one("Mul", grad, b.one("Unsqueeze", dloss, b.const([1], np.int64)))
    else:
        scaled = b.one("Mul", grad, dloss)
        if reduction == "mean":  # N counts the labels that are not ignored, over every label dimension
            count = b.one("CastLike", b.one("Size", label), log_prob) if keep is None else b.one("ReduceSum", b.one("CastLike", keep, log_prob), keepdims=0)
            scaled = b.one("Div", scaled, count)
    b.one("Identity", scaled, out=n.output[0])


def _rule_gather_grad(b: _Builder, n: onnx.NodeProto) -> None:
    shape, idx, dy = n.input[0], n.input[1], n.input[2]
    axis = int(_attrs(n).get("axis", 0))
    if axis < 0:
        raise LoweringError(f"node '{n.name}': GatherGrad with a negative axis ({axis}) is not supported")
    # Flatten the indices to (k,), bring dY to data.shape[:axis] + (k,) + data.shape[axis+1:], then
    # scatter-add along `axis` with the indices broadcast to dY's shape: duplicates add up, as they must.
    head = b.one("Slice", shape, b.const([0], np.int64), b.const([axis], np.int64))
    tail = b.one("Slice", shape, b.const([axis + 1], np.int64), b.const([np.iinfo(np.int64).max], np.int64))
    dy_shape = b.one("Concat", head, b.const([-1], np.int64), tail, axis=0)
    dy_flat = b.one("Reshape", dy, dy_shape)
    tail_ones = b.one("ConstantOfShape", b.one("Shape", tail), value=numpy_helper.from_array(np.array([1], np.int64)))
    idx_shape = b.one("Concat", b.const([1] * axis, np.int64), b.const([-1], np.int64), tail_ones, axis=0)
    idx_full = b.one("Expand", b.one("Reshape", b.one("Cast", idx, to=TensorProto.INT64), idx_shape), b.one("Shape", dy_flat))
    zeros = b.one("CastLike", b.one("ConstantOfShape", shape), dy)
    b.one("ScatterElements", zeros, idx_full, dy_flat, axis=axis, reduction="add", out=n.output[0])


def _rule_layer_norm_grad(b: _Builder, n: onnx.NodeProto) -> None:
    dy, x, scale, mean, inv_std = n.input[:5]
    axis = int(_attrs(n).get("axis", -1))
    if axis >= 0:
        raise LoweringError(f"node '{n.name}': LayerNormalizationGrad over a positive axis ({axis}) is not supported")
    axes = list(range(axis, 0))  # the normalised (trailing) axes
    xhat = b.one("Mul", b.one("Sub", x, mean), inv_std)
    outs = list(n.output) + [""] * (3 - len(n.output))
    if outs[0]:
        g = b.one("Mul", dy, scale)
        mg = b.reduce("ReduceMean", g, axes)
        mgx = b.reduce("ReduceMean", b.one("Mul", g, xhat), axes)
        b.one("Mul", inv_std, b.one("Sub", b.one("Sub", g, mg), b.one("Mul", xhat, mgx)), out=outs[0])
    # dscale, dbias: sums over every leading position, reshaped to (-1, *scale.shape) first
    flat = b.one("Concat", b.const([-1], np.int64), b.one("Shape", scale), axis=0)
    if outs[1]:
        b.one("ReduceSum", b.one("Reshape", b.one("Mul", dy, xhat), flat), b.const([0], np.int64), keepdims=0, out=outs[1])
    if outs[2]:
        b.one("ReduceSum", b.one("Reshape", dy, flat), b.const([0], np.int64), keepdims=0, out=outs[2])


def _rule_concat_training(b: _Builder, n: onnx.NodeProto) -> None:
    axis = int(_attrs(n).get("axis", 0))
    b.one("Concat", *n.input, out=n.output[0], axis=axis)
    if len(n.output) > 1 and n.output[1]:
        lengths = [b.one("Gather", b.one("Shape", i), b.const([axis], np.int64), axis=0) for i in n.input]
        b.one("Concat", *lengths, out=n.output[1], axis=0)


RULES: dict[str, Callable[[_Builder, onnx.NodeProto], None]] = {
    "GeluGrad": _rule_gelu_grad,
    "BiasGeluGrad_dX": _rule_bias_gelu_grad,
    "TanhGrad": _rule_tanh_grad,
    "SoftmaxGrad_13": _rule_softmax_grad,
    "DropoutGrad": _rule_dropout_grad,
    "SoftmaxCrossEntropyLossGrad": _rule_sce_loss_grad,
    "GatherGrad": _rule_gather_grad,
    "LayerNormalizationGrad": _rule_layer_norm_grad,
    "ConcatTraining": _rule_concat_training,
}
ACCUMULATOR = "InPlaceAccumulatorV2"
RESET_INPUT = "lazy_reset_grad"


@dataclass
class LoweredGraph:
    model: onnx.ModelProto
    loss_output: str
    grad_outputs: dict[str, str]  # parameter name -> gradient output name
    rewritten: dict[str, int]  # op type -> nodes rewritten


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def lower_training_model(model: onnx.ModelProto, trainable: list[str]) -> LoweredGraph:
    """The training graph with every training-only op rewritten and the gradients of `trainable`
    (ONNX parameter names) as outputs `<name>_grad`, after the graph's own outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's copy
    g = model.graph
    b = _Builder("lowered", _opset(model))
    grads: dict[str, str] = {}
    buffers: set[str] = set()
    acc_outputs: set[str] = set()
    rewritten: dict[str, int] = {}
    kept: list[onnx.NodeProto] = []
    for n in g.node:
        if n.domain == MS and n.op_type == ACCUMULATOR:
            buffers.add(n.input[0])
            acc_outputs.update(n.output)
            grads[n.input[0]] = n.input[1]
            rewritten[n.op_type] = rewritten.get(n.op_type, 0) + 1
            continue
        rule = RULES.get(n.op_type) if n.domain == MS else None
        if rule is None:
            kept.append(n)
            continue
        before = len(b.nodes)
        rule(b, n)
        kept.extend(b.nodes[before:])
        rewritten[n.op_type] = rewritten.get(n.op_type, 0) + 1
    by_param = {}
    for buf, grad in grads.items():
        param = grad[: -len(GRAD_SUFFIX)] if grad.endswith(GRAD_SUFFIX) else None
        if param is None:
            raise LoweringError(f"accumulator for '{buf}' does not take a '<param>{GRAD_SUFFIX}' gradient ('{grad}')")
        by_param[param] = grad
    missing = [p for p in trainable if p not in by_param]
    if missing:
        raise LoweringError(f"the training graph has no gradient for {missing[:3]}")

    inputs = {i.name: i for i in g.input}
    loss_output = g.output[0].name
    user_outputs = [o for o in g.output if o.name not in acc_outputs]
    grad_values = []
    for p in trainable:
        src = inputs[p].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in src.shape.dim]
        grad_values.append(helper.make_tensor_value_info(by_param[p], src.elem_type, dims))
    del g.output[:]
    g.output.extend(user_outputs + grad_values)
    keep_inputs = [i for i in g.input if i.name not in buffers and i.name != RESET_INPUT]
    del g.input[:]
    g.input.extend(keep_inputs)
    del g.node[:]
    g.node.extend(_live(kept, {o.name for o in g.output}))
    g.initializer.extend(b.inits)
    _prune_initializers(g)
    _keep_used_domains(model)
    del g.value_info[:]  # stale shapes of rewritten values; ORT infers its own
    check_edge_ops(model)
    return LoweredGraph(model, loss_output, {p: by_param[p] for p in trainable}, rewritten)


def _live(nodes: list[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """Nodes that (transitively) feed `wanted`, in their original (topological) order."""
    needed = set(wanted)
    live = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            live.append(n)
            needed.update(i for i in n.input if i)
    return live[::-1]


def _prune_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _keep_used_domains(model: onnx.ModelProto) -> None:
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def check_edge_ops(model: onnx.ModelProto) -> None:
    """Raise LoweringError naming the first node that plain onnxruntime would not load."""
    opset = _opset(model)
    if opset > MAX_STANDARD_OPSET:
        raise LoweringError(f"the graph uses ONNX opset {opset}; devices support up to {MAX_STANDARD_OPSET}")
    for n in model.graph.node:
        if n.domain in STANDARD_DOMAINS:
            continue
        if n.domain == MS and n.op_type in EDGE_CONTRIB_OPS:
            continue
        raise LoweringError(f"op {n.domain}:{n.op_type} (node '{n.name}') is not registered by every onnxruntime build; the device graph cannot use it")


def edge_ops(model: onnx.ModelProto) -> set[str]:
    """`domain:op` of every node (for reports and tests)."""
    return {f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node}
