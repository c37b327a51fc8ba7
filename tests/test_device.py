"""`--device`: parsing, resolution (auto, absent GPUs), the autocast policy, and where tensors end up.

This machine has no GPU: CUDA and MPS are exercised through the resolver's probes and device
objects that need no hardware; everything that computes runs on CPU.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from fedpft.cloud.cli import app
from fedpft.cloud.config import ExportConfig, PrepareConfig, ServeConfig, SimulateConfig
from fedpft.cloud.device import DeviceError, autocast, autocast_dtype, exact_fp32, parse_device, resolve_device

from conftest import LABELS, make_bundle
from test_proxy import TINY, inputs_for

CUDA, MPS = torch.device("cuda", 0), torch.device("mps")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of an absent GPU")


@pytest.mark.parametrize("text, name", [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:3", "cuda:3"), ("mps", "mps")])
def test_parse_accepts_the_names(text, name):
    assert parse_device(text) == name


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda0", "", "tpu:0"])
def test_parse_refuses_anything_else(text):
    with pytest.raises(ValueError, match="is not a device: give auto, cpu, cuda, cuda:N or mps"):
        parse_device(text)


def test_every_cloud_config_carries_a_validated_device(tmp_path):
    configs = [lambda d: PrepareConfig(model="m", out=tmp_path, **d), lambda d: ServeConfig(bundle=tmp_path, out=tmp_path, **d),
               lambda d: SimulateConfig(out=tmp_path, **d), lambda d: ExportConfig(run=tmp_path, out=tmp_path, **d)]
    for make in configs:
        assert make({}).device == "auto"
        assert make({"device": "CUDA:1"}).device == "cuda:1"
        with pytest.raises(ValidationError, match="'gpu' is not a device"):
            make({"device": "gpu"})


def test_auto_is_cpu_on_this_machine_and_cpu_is_always_there():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def probes(gpus: int, mps: bool) -> dict:
    return dict(cuda_count=lambda: gpus, mps_available=lambda: mps)


@pytest.mark.parametrize("gpus, mps, expected", [(2, True, CUDA), (0, True, MPS), (0, False, torch.device("cpu"))])
def test_auto_prefers_the_first_gpu_then_mps_then_cpu(gpus, mps, expected):
    assert resolve_device("auto", **probes(gpus, mps)) == expected


def test_named_devices_must_exist():
    assert resolve_device("cuda", **probes(2, False)) == CUDA
    assert resolve_device("cuda:1", **probes(2, False)) == torch.device("cuda", 1)
    assert resolve_device("mps", **probes(0, True)) == MPS
    with pytest.raises(DeviceError, match=r"^--device cuda:2: this machine has 2 CUDA GPUs \(cuda:0..cuda:1\)$"):
        resolve_device("cuda:2", **probes(2, False))
    with pytest.raises(DeviceError, match="^--device cuda: no CUDA GPU is available"):
        resolve_device("cuda", **probes(0, True))
    with pytest.raises(DeviceError, match="^--device mps: Apple MPS is not available"):
        resolve_device("mps", **probes(4, False))
    with pytest.raises(DeviceError, match="^--device: 'gpu' is not a device"):
        resolve_device("gpu")


@pytest.mark.parametrize("device", [torch.device("cpu"), MPS])
def test_no_autocast_off_cuda(device):
    for work in ("inference", "training", "export"):
        assert autocast_dtype(device, work, bf16_supported=lambda d: True) is None


def test_cuda_autocast_policy():
    bf16, no_bf16 = (lambda d: True), (lambda d: False)
    assert autocast_dtype(CUDA, "inference", bf16) == torch.bfloat16
    assert autocast_dtype(CUDA, "training", bf16) == torch.bfloat16
    assert autocast_dtype(CUDA, "inference", no_bf16) == torch.float16
    # fp16 training would need loss scaling: fp32 instead
    assert autocast_dtype(CUDA, "training", no_bf16) is None
    assert autocast_dtype(CUDA, "export", bf16) is None


def test_autocast_on_cpu_leaves_fp32_and_exact_fp32_restores_the_flags():
    with autocast(torch.device("cpu"), "training"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with exact_fp32(CUDA):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


# -- tensors where they belong

def test_distill_refuses_models_on_two_devices():
    from fedpft.cloud.distill import distill
    from fedpft.modeling.families import model_from_config
    from fedpft.modeling.proxy import build_fedpft

    fm = model_from_config(TINY["bert"])
    proxy, spec = build_fedpft(fm, None, 0.5)
    with pytest.raises(ValueError, match="teacher on meta and student on cpu"):
        distill(fm.to("meta"), proxy, spec, iter(lambda: inputs_for("bert"), None), steps=1)


def test_alignment_returns_cpu_fp32_and_keeps_the_models_on_their_device():
    from fedpft.cloud.alignment import align
    from fedpft.modeling.families import encoder_layers, ffn_linears, model_from_config
    from fedpft.modeling.adapters import adapter_state, add_adapters

    from fedpft.modeling.proxy import build_fedpft

    base = model_from_config(TINY["bert"])
    proxy, spec = build_fedpft(base, None, 0.5)
    fm, proxy = add_adapters(base, 4, 8.0), add_adapters(proxy, 4, 8.0)
    adapters = {k: v.numpy() for k, v in adapter_state(fm, list(range(4))).items()}
    stats = {spec.layer_map[p]: (np.arange(spec.ffn_sizes[p], dtype=np.float32), 100.0) for p in spec.compressed}
    batches = iter(lambda: inputs_for("bert"), None)
    res = align(fm, proxy, spec, adapters, stats, batches, 0.5, steps=2, lr=1e-3, held_out=[inputs_for("bert")])
    assert res.ffn and all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in res.ffn.values())
    assert np.isfinite(res.gap_before) and np.isfinite(res.gap_after)
    assert {p.device.type for m in (fm, proxy) for p in m.parameters()} == {"cpu"}
    assert ffn_linears(encoder_layers(proxy)[spec.compressed[0]])[0].weight.dtype == torch.float32


def test_evaluation_feeds_the_models_device_and_scores_in_fp32():
    from fedpft.cloud.evaluate import evaluate_model

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.seen = []

        def forward(self, input_ids):
            self.seen.append(input_ids.device)
            return type("Out", (), {"logits": self.w.expand(len(input_ids), 3) + torch.eye(3)[input_ids[:, 0] % 3]})()

    model = Recorder()
    batches = [({"input_ids": np.array([[0], [1], [2], [0]])}, np.array([0, 1, 2, 1]))]
    acc, loss = evaluate_model(model, batches)
    assert acc == 0.75 and isinstance(loss, float) and model.seen == [torch.device("cpu")]


def test_plugged_fm_is_placed_on_the_configured_device(tiny_bert_dir, monkeypatch):
    from fedpft.cloud import evaluate

    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    evaluate.PluggedFM(str(tiny_bert_dir), LABELS, 4, 8.0, device=CUDA)
    assert (CUDA,) in moved


# -- end to end on CPU

def bundle_facts(folder: Path) -> dict:
    """What two prepares of one FM must share: every file, except the names the ONNX exporter
    numbers per process (graphs are compared by their ops and initializer values) and the --out path."""
    import onnx
    from onnx import numpy_helper

    facts = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        rel = str(path.relative_to(folder))
        if path.suffix == ".onnx":
            graph = onnx.load(str(path)).graph
            values = sorted((tuple(i.dims), i.data_type, numpy_helper.to_array(i).tobytes()) for i in graph.initializer)
            facts[rel] = ([n.op_type for n in graph.node], values)
        elif path.name == "prepare_config.json":
            facts[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k != "out"}
        else:
            facts[rel] = path.read_bytes()
    return facts


def test_prepare_on_cpu_with_distillation_writes_the_default_bundle(tiny_bert_dir, tmp_path):
    public = tmp_path / "public.txt"
    public.write_text("\n".join(f"alpha beta {w} gamma {w}" for w in ("red", "green", "blue", "sound", "mail", "web") * 6) + "\n")
    opts = dict(distill_steps=3, public_data=public, batch_size=4)
    default = make_bundle(str(tiny_bert_dir), tmp_path / "default", **opts)
    on_cpu = make_bundle(str(tiny_bert_dir), tmp_path / "cpu", device="cpu", **opts)
    facts = bundle_facts(on_cpu)
    assert facts == bundle_facts(default)
    assert "proxy.safetensors" in facts and "device" not in facts["prepare_config.json"]


@no_gpu
@pytest.mark.parametrize("command", [
    ["prepare", "--model", "m", "--out", "{out}"], ["serve", "--bundle", "b", "--out", "{out}"],
    ["simulate", "--out", "{out}"], ["export", "--run", "r", "--out", "{out}"],
])
def test_an_absent_gpu_is_one_line_and_no_work(command, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [a.format(out=out) for a in command] + ["--device", "cuda"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [f"error: --device cuda: no CUDA GPU is available to torch {torch.__version__} on this machine"]
    assert not out.exists()


@pytest.mark.parametrize("command", ["prepare", "serve", "simulate", "export"])
def test_help_explains_device(command):
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    text = " ".join(res.output.replace("│", " ").split())
    assert "--device" in text and "auto (the first CUDA GPU, else Apple MPS, else CPU)" in text
    assert ("no autocast" if command == "export" else "bf16 autocast") in text


def test_serve_cloud_evaluates_and_aligns_on_its_device(tiny_bert_bundle, tmp_path):
    from fedpft.cloud.serve import Cloud
    from fedpft.shared.codec import decode_tensors
    from fedpft.shared.manifest import verify_bundle

    from conftest import write_text_data

    manifest = verify_bundle(tiny_bert_bundle)
    public = tmp_path / "public.txt"
    public.write_text("\n".join(f"red {w} blue {w} mail" for w in ("alpha", "beta", "gamma", "delta") * 8) + "\n")
    cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", eval_data=write_text_data(tmp_path / "eval.jsonl"),
                      public_data=public, align_steps=2, device="cpu")
    cloud = Cloud(cfg, manifest)
    adapters = decode_tensors((tiny_bert_bundle / manifest.files["adapters_init"].path).read_bytes())[0]
    acc, loss = cloud.evaluate(adapters)
    assert 0 <= acc <= 1 and isinstance(loss, float) and cloud.device == torch.device("cpu")
    stats = {s.layer: (np.arange(s.neurons, dtype=np.float32), 100.0) for s in manifest.stat_outputs}
    ffn, facts = cloud.align(adapters, stats, None, round_id=0)
    assert ffn.keys() == {t.key for t in manifest.ffn}
    assert all(v.dtype == np.float32 and v.shape == tuple(t.shape) for t in manifest.ffn for v in [ffn[t.key]])
    assert facts["steps"] == 2 and facts["proxy_accuracy_after"] is not None
    proxy, _ = cloud._proxy
    assert {p.device for m in (proxy, cloud.fm.model) for p in m.parameters()} == {cloud.device}


@no_gpu
def test_export_refuses_an_absent_gpu_before_reading_the_run(tmp_path):
    from fedpft.cloud.hf_export import ExportError, export_run

    with pytest.raises(ExportError, match="^--device cuda:0: no CUDA GPU"):
        export_run(tmp_path / "no-such-run", tmp_path / "out", device="cuda:0")
    assert not (tmp_path / "out").exists()


def test_simulate_threads_its_device_to_prepare_and_serve(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedpft.cloud import prepare, serve, simulate

    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(cfg, show_progress=True):
        seen["prepare"] = cfg.device
        return SimpleNamespace(seconds=0.0, proxy_params=1, fm_params=1)

    def fake_serve(cfg, show_progress=True):
        seen["serve"] = cfg.device
        raise Stop

    monkeypatch.setattr(prepare, "prepare", fake_prepare)
    monkeypatch.setattr(serve, "serve", fake_serve)
    monkeypatch.setattr(simulate, "start_devices", lambda *a, **k: [])
    cfg = SimulateConfig(out=tmp_path / "sim", device="CPU", broker="mqtt://127.0.0.1:1", max_samples=30, eval_samples=10)
    with pytest.raises(Stop):
        simulate.simulate(cfg, show_progress=False)
    assert seen == {"prepare": "cpu", "serve": "cpu"}


def test_export_cli_on_cpu_writes_cpu_fp32_models(tmp_path):
    from safetensors import safe_open

    from test_export_hf import make_bundle as export_bundle, make_run, tiny_bert

    run = make_run(export_bundle(str(tiny_bert(tmp_path / "fm")), tmp_path / "bundle"), tmp_path / "run")
    res = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "x"), "--no-onnx", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "x" / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
