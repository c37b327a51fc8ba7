"""The training graph lowered to standard ops (export/lowering.py) and the plain-onnxruntime device.

- each rewrite rule against the training build's own kernel, op by op (the cloud venv's
  onnxruntime is onnxruntime-training, whose InferenceSession registers the training ops);
- N steps of the device (lowered graph, numpy AdamW) against N steps of onnxruntime-training's
  Module + Optimizer on the bundle's reference artifacts, for tiny ViT, BERT, RoBERTa and MiniLM;
  dropout off. (tests/test_export_parity.py checks the same device against torch.)
- the allow-list: every bundle's device graphs pass it, a leftover training op fails naming it;
- old bundles, unknown and uninstalled providers: one line, non-zero exit, nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fedpft.export.lowering import LoweringError, check_edge_ops, edge_ops, lower_training_model
from fedpft.shared.manifest import MANIFEST_NAME, ROLE_EVAL, ROLE_TRAINING, verify_bundle

from conftest import LABELS, TINY_DIMS, copy_bundle, make_bundle, save_tiny_tokenizer, write_text_data
from test_export_parity import make_batch, random_adapters

ort = pytest.importorskip("onnxruntime")
F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _training_kernels() -> bool:
    """Is this onnxruntime the training build (whose sessions run GeluGrad & co)?"""
    node = helper.make_node("GeluGrad", ["dy", "x"], ["dx"], domain="com.microsoft")
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info(n, F, None) for n in ("dy", "x")],
                              [helper.make_tensor_value_info("dx", F, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - plain onnxruntime: "Could not find an implementation for GeluGrad"
        return False


needs_training_build = pytest.mark.skipif(not _training_kernels(), reason="needs onnxruntime-training's kernels as the reference")


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def one_node(op: str, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int]], inits=(), **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, [n for n, _, _ in inputs] + [i.name for i in inits], [n for n, _ in outputs], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs], list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16), helper.make_opsetid("com.microsoft", 1)], ir_version=8)


rng = np.random.default_rng(0)
X = rng.standard_normal((2, 5, 6)).astype(np.float32)
DY = rng.standard_normal((2, 5, 6)).astype(np.float32)
SOFT = np.exp(X) / np.exp(X).sum(-1, keepdims=True)
IDX = np.array([[0, 3, 3], [1, 0, 7]], np.int64)  # repeats: gradients of one row must add up


def _ln_stats(x):
    mu = x.mean(-1, keepdims=True)
    return mu.astype(np.float32), (1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)).astype(np.float32)


CASES = {
    "GeluGrad": (dict(op="GeluGrad", inputs=[("dy", F, None), ("x", F, None)], outputs=[("dx", F)]), {"dy": DY, "x": X}),
    "BiasGeluGrad_dX": (dict(op="BiasGeluGrad_dX", inputs=[("dy", F, None), ("x", F, None), ("b", F, None)], outputs=[("dx", F)]),
                        {"dy": DY, "x": X, "b": rng.standard_normal(6).astype(np.float32)}),
    "TanhGrad": (dict(op="TanhGrad", inputs=[("dy", F, None), ("y", F, None)], outputs=[("dx", F)]), {"dy": DY, "y": np.tanh(X)}),
    "SoftmaxGrad_13-last": (dict(op="SoftmaxGrad_13", inputs=[("dy", F, None), ("y", F, None)], outputs=[("dx", F)], axis=-1), {"dy": DY, "y": SOFT}),
    "SoftmaxGrad_13-axis1": (dict(op="SoftmaxGrad_13", inputs=[("dy", F, None), ("y", F, None)], outputs=[("dx", F)], axis=1),
                             {"dy": DY, "y": np.exp(X) / np.exp(X).sum(1, keepdims=True)}),
    "DropoutGrad": (dict(op="DropoutGrad", inputs=[("dy", F, None), ("mask", TensorProto.BOOL, None)], outputs=[("dx", F)],
                         inits=[numpy_helper.from_array(np.array(0.3, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "training")]),
                    {"dy": DY, "mask": rng.random((2, 5, 6)) > 0.3}),
    "DropoutGrad-no-training-input": (dict(op="DropoutGrad", inputs=[("dy", F, None), ("mask", TensorProto.BOOL, None)], outputs=[("dx", F)],
                                           inits=[numpy_helper.from_array(np.array(0.3, np.float32), "ratio")]),
                                      {"dy": DY, "mask": rng.random((2, 5, 6)) > 0.3}),
    "DropoutGrad-default-ratio": (dict(op="DropoutGrad", inputs=[("dy", F, None), ("mask", TensorProto.BOOL, None)], outputs=[("dx", F)]),
                                  {"dy": DY, "mask": rng.random((2, 5, 6)) > 0.5}),
    "SCELossGrad-mean": (dict(op="SoftmaxCrossEntropyLossGrad", inputs=[("dl", F, []), ("lp", F, None), ("y", I64, None)], outputs=[("d", F)], reduction="mean"),
                         {"dl": np.array(0.7, np.float32), "lp": np.log(SOFT[:, 0, :]), "y": np.array([2, 5], np.int64)}),
    "SCELossGrad-sum": (dict(op="SoftmaxCrossEntropyLossGrad", inputs=[("dl", F, []), ("lp", F, None), ("y", I64, None)], outputs=[("d", F)], reduction="sum"),
                        {"dl": np.array(1.3, np.float32), "lp": np.log(SOFT[:, 0, :]), "y": np.array([2, 5], np.int64)}),
    "SCELossGrad-ignore": (dict(op="SoftmaxCrossEntropyLossGrad", inputs=[("dl", F, []), ("lp", F, None), ("y", I64, None)], outputs=[("d", F)],
                                reduction="mean", ignore_index=-100),
                           {"dl": np.array(1.0, np.float32), "lp": np.log(SOFT[0]), "y": np.array([1, -100, 4, 0, -100], np.int64)}),
    "GatherGrad-axis0": (dict(op="GatherGrad", inputs=[("shape", I64, None), ("idx", I64, None), ("dy", F, None)], outputs=[("dx", F)], axis=0),
                         {"shape": np.array([9, 4], np.int64), "idx": IDX, "dy": rng.standard_normal((2, 3, 4)).astype(np.float32)}),
    "GatherGrad-axis1-scalar": (dict(op="GatherGrad", inputs=[("shape", I64, None), ("idx", I64, []), ("dy", F, None)], outputs=[("dx", F)], axis=1),
                                {"shape": np.array([2, 5, 6], np.int64), "idx": np.array(0, np.int64), "dy": rng.standard_normal((2, 6)).astype(np.float32)}),
    "LayerNormalizationGrad": (dict(op="LayerNormalizationGrad", inputs=[("dy", F, None), ("x", F, None), ("s", F, None), ("mu", F, None), ("r", F, None)],
                                    outputs=[("dx", F), ("ds", F), ("db", F)], axis=-1, epsilon=1e-5),
                               {"dy": DY, "x": X, "s": rng.standard_normal(6).astype(np.float32), "mu": _ln_stats(X)[0], "r": _ln_stats(X)[1]}),
    "ConcatTraining": (dict(op="ConcatTraining", inputs=[("a", F, None), ("b", F, None)], outputs=[("c", F), ("lengths", I64)], axis=1),
                       {"a": X, "b": DY[:, :2]}),
}


@needs_training_build
@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_matches_the_training_kernel(case):
    spec, feeds = CASES[case]
    model = one_node(**spec)
    lowered = lower_training_model(model, trainable=[]).model
    assert not any(n.domain == "com.microsoft" for n in lowered.graph.node), edge_ops(lowered)
    want = run(model, feeds)
    got = run(lowered, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=case)
    assert max(float(np.abs(w).max()) for w in want) > 0  # a zero reference would prove nothing


def test_a_training_op_left_in_the_graph_fails_naming_it():
    model = one_node("GeluGrad", [("dy", F, None), ("x", F, None)], [("dx", F)])
    with pytest.raises(LoweringError, match=r"com.microsoft:GeluGrad"):
        check_edge_ops(model)
    unknown = one_node("ReluGrad", [("dy", F, None), ("x", F, None)], [("dx", F)])
    with pytest.raises(LoweringError, match=r"com.microsoft:ReluGrad"):
        lower_training_model(unknown, trainable=[])


# ---------------------------------------------------------------- whole bundles

@pytest.fixture(scope="session")
def tiny_roberta_bundle(tmp_path_factory):
    from transformers import RobertaConfig

    from fedpft.modeling.families import model_from_config

    folder = tmp_path_factory.mktemp("models") / "tiny-roberta"
    folder.mkdir()
    config = RobertaConfig(vocab_size=128, max_position_embeddings=70, pad_token_id=0, num_labels=len(LABELS), **TINY_DIMS)
    config._attn_implementation = "eager"
    save_tiny_tokenizer(folder)
    model_from_config(config, seed=0).save_pretrained(str(folder))
    return make_bundle(str(folder), tmp_path_factory.mktemp("bundles") / "tiny-roberta")


@pytest.fixture(scope="session")
def tiny_bert_dropout_bundle(tmp_path_factory, tiny_bert_dir):
    return make_bundle(str(tiny_bert_dir), tmp_path_factory.mktemp("bundles") / "tiny-bert-dropout", dropout=0.1)


@pytest.fixture(params=["tiny_vit", "tiny_bert", "tiny_roberta", pytest.param("minilm", marks=pytest.mark.slow)])
def bundle(request):
    return request.getfixturevalue(f"{request.param}_bundle")


def test_device_graphs_hold_only_allowed_ops(bundle):
    m = verify_bundle(bundle, device_only=True)
    for role in (ROLE_TRAINING, ROLE_EVAL):
        model = onnx.load(str(bundle / m.files[role].path))
        check_edge_ops(model)
        assert not {i.name for i in model.graph.input} & {"lazy_reset_grad"}
    train = onnx.load(str(bundle / m.files[ROLE_TRAINING].path))
    outputs = {o.name for o in train.graph.output}
    assert {t.name + "_grad" for t in m.trainable} <= outputs
    assert not any(i.name.endswith(".accumulation.buffer") for i in train.graph.input)


@needs_training_build
def test_steps_match_onnxruntime_training_module(bundle):
    """3 steps of the plain-ORT device vs ORT-training's Module/Optimizer on the same start,
    batches and learning rate: losses to 1e-5, adapters to 1e-5, statistics exactly (up to a
    pre-activation within float noise of 0)."""
    from fedpft.edge.runtime import ort as _  # noqa: F401  (keeps torch out of `import onnxruntime`)
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from fedpft.edge.trainer import open_session

    session = open_session(bundle)
    m = session.manifest
    ref_dir = bundle / "ort"
    state = CheckpointState.load_checkpoint(str(ref_dir / "checkpoint"))
    module = Module(str(ref_dir / "training_model.onnx"), state, str(ref_dir / "eval_model.onnx"))
    opt = Optimizer(str(ref_dir / "optimizer_model.onnx"), module)
    adapters = random_adapters(m, 7)
    session.set_adapters(adapters)
    for t in m.trainable:
        state.parameters[t.name].data = adapters[t.key]
    lr = 2e-3
    session.set_learning_rate(lr)
    opt.set_learning_rate(lr)
    outs_index = {n: i for i, n in enumerate(module.output_names())}
    for k in range(3):
        batch = make_batch(bundle, m, 4, seed=20 + k)
        got = session.train_step(batch)
        feed = dict(batch.inputs, labels=batch.labels)
        ref = module(*[feed[n] for n in module.input_names()])
        opt.step()
        module.lazy_reset_grad()
        assert got.loss == pytest.approx(float(ref[0]), abs=1e-5)
        for s in m.stat_outputs:
            off = np.asarray(ref[outs_index[s.off_counts]])
            assert np.abs(got.stats[s.layer][0] - off).max() <= 1
            assert got.stats[s.layer][1] == float(ref[outs_index[s.positions]])
    moved = 0.0
    for t in m.trainable:
        want = state.parameters[t.name].data
        np.testing.assert_allclose(session.params[t.name], want, atol=1e-5, rtol=0, err_msg=t.key)
        moved = max(moved, float(np.abs(want - adapters[t.key]).max()))
    assert moved > lr  # the steps moved the adapters, so the comparison has teeth


def test_dropout_bundle_trains_on_the_lowered_graph(tiny_bert_dropout_bundle):
    from fedpft.edge.trainer import open_session

    session = open_session(tiny_bert_dropout_bundle)
    m = session.manifest
    train = onnx.load(str(tiny_bert_dropout_bundle / m.files[ROLE_TRAINING].path))
    assert any(n.op_type == "Dropout" for n in train.graph.node)
    session.set_learning_rate(1e-2)
    batch = make_batch(tiny_bert_dropout_bundle, m, 6, seed=3)
    before = session.adapters()
    losses = [session.train_step(batch).loss for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(np.abs(session.adapters()[k] - before[k]).max() > 0 for k in before)
    # dropout is on while training and off in the eval graph: two predictions agree exactly
    np.testing.assert_array_equal(session.predict(batch), session.predict(batch))


# ---------------------------------------------------------------- bad input, one line each

def _train_cli(bundle, tmp_path, *extra):
    from fedpft.edge.cli import app

    data = write_text_data(tmp_path / "d.jsonl", n=10)
    out = tmp_path / "u.safetensors"
    res = CliRunner().invoke(app, ["train", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "-q", *extra])
    return res, out


def test_old_training_build_bundle_is_refused_in_one_line(tiny_bert_bundle, tmp_path):
    old = copy_bundle(tiny_bert_bundle, tmp_path / "old")
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest.pop("runtime")  # what a pre-schema-2 manifest looks like
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    res, out = _train_cli(old, tmp_path)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "onnxruntime-training" in lines[0] and "prepare" in lines[0], res.output
    assert not out.exists()


@pytest.mark.parametrize("providers,message", [("warp-drive", "unknown execution provider 'warp-drive'"),
                                                ("coreml", "is not in this onnxruntime")])
def test_bad_provider_is_one_line_and_writes_nothing(tiny_bert_bundle, tmp_path, providers, message):
    res, out = _train_cli(tiny_bert_bundle, tmp_path, "--providers", providers)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()


def test_lowering_leaves_the_input_model_untouched(tiny_bert_bundle):
    ref = onnx.load(str(tiny_bert_bundle / "ort" / "training_model.onnx"))
    before = ref.SerializeToString()
    trainable = [t.name for t in verify_bundle(tiny_bert_bundle).trainable]
    lowered = lower_training_model(ref, trainable)
    assert ref.SerializeToString() == before
    assert lowered.rewritten.get("InPlaceAccumulatorV2") == len(trainable)


def _swap_graph(bundle, tmp_path, graph: onnx.ModelProto):
    from fedpft.shared.manifest import BundleManifest, file_entry

    bad = copy_bundle(bundle, tmp_path / "bad")
    m = BundleManifest.load(bad)
    onnx.save(graph, str(bad / m.files[ROLE_TRAINING].path))
    m.files[ROLE_TRAINING] = file_entry(bad, m.files[ROLE_TRAINING].path)
    m.save(bad)
    return bad


def test_graph_still_needing_training_ops_is_refused_in_one_line(tiny_bert_bundle, tmp_path):
    """A bundle whose manifest says plain onnxruntime but whose graph is onnxruntime-training's
    (a buggy or hostile cloud): refused before training, one line, nothing written."""
    bad = _swap_graph(tiny_bert_bundle, tmp_path, onnx.load(str(tiny_bert_bundle / "ort" / "training_model.onnx")))
    res, out = _train_cli(bad, tmp_path)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    # plain onnxruntime names the op it lacks; the training build loads it and the shape check names an input
    assert "ConcatTraining" in lines[0] or "GeluGrad" in lines[0] or "accumulation.buffer" in lines[0] or "lazy_reset_grad" in lines[0], lines[0]
    assert not out.exists()


def test_graph_onnxruntime_cannot_load_is_refused_in_one_line(tiny_bert_bundle, tmp_path):
    model = onnx.load(str(tiny_bert_bundle / "training_model.onnx"))
    model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.output[0].name], ["never"], domain="com.microsoft"))
    model.graph.output.append(helper.make_tensor_value_info("never", F, None))
    bad = _swap_graph(tiny_bert_bundle, tmp_path, model)
    res, out = _train_cli(bad, tmp_path)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "NoSuchOp" in lines[0], res.output
    assert not out.exists()


def test_prepare_fails_naming_an_op_outside_the_allow_list(tiny_bert_dir, tmp_path, monkeypatch):
    """Were `Gelu` not registered by every onnxruntime build, prepare must stop and say so."""
    from fedpft.cloud.cli import app
    from fedpft.export import lowering

    monkeypatch.setattr(lowering, "EDGE_CONTRIB_OPS", lowering.EDGE_CONTRIB_OPS - {"Gelu", "BiasGelu"})
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["prepare", "--model", str(tiny_bert_dir), "--out", str(out), "--num-labels", "3",
                                   "--distill-steps", "0", "--max-length", "16", "--quiet"])
    assert res.exit_code != 0
    assert "com.microsoft:BiasGelu" in res.output or "com.microsoft:Gelu" in res.output, res.output
    assert not out.exists() or not any(out.iterdir())
