"""`fedpft-cloud export`: a run's global adapters -> a PEFT adapter, a merged HF model and ONNX.

What the FM owner takes away from a federated run. Every translation is checked before anything
is kept: the merged model must give the PEFT (unmerged) model's logits, and ONNX Runtime must give
the merged model's logits; both max abs differences go into export.json next to the provenance.
Everything is written into a temporary sibling folder and renamed into place at the end, so a
failed export never leaves a half-written folder behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fedpft.shared.manifest import BundleError, BundleManifest, InputSpec, sha256_file

from .config import PrepareConfig, load_prepare_config

log = logging.getLogger("fedpft.export")

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
ONNX_DIR = "onnx"
EXPORT_JSON = "export.json"
ONNX_FILE = "model.onnx"  # what optimum's main_export names the graph
ATOL = 1e-4
_ROUND_FILE = re.compile(r"adapters_round_(\d+)\.safetensors$")
# A few inputs for the parity checks; padded to different lengths so the attention mask matters.
PARITY_TEXTS = ("the package installs a daemon", "a library", "fonts for the console and the X server, with hinting")
PARITY_IMAGES = 3


class ExportError(Exception):
    """An export request that cannot be carried out; the message is one line for the user."""


@dataclass
class ExportSource:
    """Where a run's adapters and its bundle are, resolved and checked before any model loads."""

    run: Path
    run_id: str
    adapters: Path
    round: int | None  # None: the adapters before any round (the bundle's initial ones)
    bundle: Path
    manifest: BundleManifest
    prepare_config: PrepareConfig


@dataclass
class ExportResult:
    out: Path
    source: ExportSource
    merge_max_diff: float
    onnx_max_diff: float | None
    seconds: dict[str, float] = field(default_factory=dict)


def locate(run: Path, round_id: int | None = None) -> ExportSource:
    """Resolve the run folder, the adapters to export (latest or of round `round_id`) and the bundle."""
    from .state import STATE, RunState

    run = Path(run)
    if not run.is_dir():
        raise ExportError(f"--run {run}: no such run folder")
    state_file = run / STATE
    if not state_file.is_file():
        raise ExportError(f"--run {run}: no {STATE} here (not a folder written by `fedpft-cloud serve`)")
    try:
        state = RunState.model_validate_json(state_file.read_text())
    except ValueError as exc:
        raise ExportError(f"{state_file}: invalid run state: {_first_line(exc)}") from exc

    if round_id is None:
        adapters = run / state.adapters
        m = _ROUND_FILE.search(state.adapters)
        round_done = int(m.group(1)) if m else None
    else:
        adapters = run / "checkpoints" / f"adapters_round_{round_id:04d}.safetensors"
        round_done = round_id
        if not adapters.is_file():
            have = sorted(int(m.group(1)) for p in (run / "checkpoints").glob("adapters_round_*.safetensors")
                          if (m := _ROUND_FILE.search(p.name)))
            raise ExportError(f"--round {round_id}: no adapters of that round in {run} "
                              f"(rounds with adapters: {', '.join(map(str, have)) or 'none'})")
    if not adapters.is_file():
        raise ExportError(f"{adapters}: the run's adapter file is missing")

    bundle = _bundle_of(run)
    try:
        manifest = BundleManifest.load(bundle)
    except BundleError as exc:
        raise ExportError(str(exc)) from exc
    if manifest.bundle_id != state.bundle_id:
        raise ExportError(f"{bundle} is bundle {manifest.bundle_id[:12]}, but run {run} was made with {state.bundle_id[:12]}")
    try:
        prepare_config = load_prepare_config(bundle, manifest)
    except BundleError as exc:
        raise ExportError(str(exc)) from exc
    return ExportSource(run, state.run_id, adapters, round_done, bundle, manifest, prepare_config)


def _bundle_of(run: Path) -> Path:
    cfg_file = run / "serve_config.json"
    try:
        bundle = json.loads(cfg_file.read_text())["bundle"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{cfg_file}: cannot read the run's bundle folder ({_first_line(exc)})") from exc
    bundle = Path(bundle)
    if not bundle.is_absolute() and not bundle.is_dir():
        bundle = run / bundle  # a relative path that only makes sense from the run folder
    if not bundle.is_dir():
        raise ExportError(f"bundle {bundle} of run {run} is missing")
    return bundle


def export_run(run: Path, out: Path, round_id: int | None = None, onnx: bool = True, atol: float = ATOL,
               device: str = "auto") -> ExportResult:
    """Write out/adapter (PEFT), out/merged (HF model + preprocessing), out/onnx and out/export.json.

    device: where the FM is loaded, plugged and merged (fedpft.cloud.device names; fp32, no TF32);
    the saved merged model and everything the ONNX export sees are on CPU."""
    from .device import DeviceError, resolve_device

    try:
        torch_device = resolve_device(device)
    except DeviceError as exc:
        raise ExportError(str(exc)) from None
    src = locate(run, round_id)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty folder")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        result = _export(src, tmp, onnx, atol, torch_device)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        result.out = out
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export(src: ExportSource, tmp: Path, onnx: bool, atol: float, device: torch.device) -> ExportResult:
    from .device import exact_fp32, to_device
    from .evaluate import PluggedFM
    from fedpft.modeling.families import ModelError, resolve_model_id
    from fedpft.shared.codec import decode_tensors
    from fedpft.shared.messages import ProtocolError

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    pc, manifest = src.prepare_config, src.manifest
    fm_source = resolve_model_id(pc.model)
    try:
        adapters = decode_tensors(src.adapters.read_bytes())[0]
    except ProtocolError as exc:
        raise ExportError(f"{src.adapters}: {exc}") from exc
    try:
        fm = PluggedFM(fm_source, manifest.labels, pc.lora_rank, pc.lora_alpha, pc.seed, device)
        fm.plug(adapters)
    except ModelError as exc:
        raise ExportError(str(exc)) from exc
    except KeyError as exc:
        raise ExportError(f"{src.adapters} does not fit FM {manifest.fm_id}: {exc.args[0]}") from exc
    peft_model = fm.model.eval()
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
    preprocessor = _preprocessor(manifest.input, fm_source, src.bundle)
    inputs = parity_inputs(manifest.input, preprocessor, peft_model.config)
    on_device = to_device(inputs, device)
    with torch.no_grad(), exact_fp32(device):
        unmerged = peft_model(**on_device).logits.cpu().numpy()
        merged_model = peft_model.merge_and_unload().eval()
        merged = merged_model(**on_device).logits.cpu().numpy()
    merge_diff = _check("merged model vs PEFT model", merged, unmerged, atol)
    # what is saved, and what ONNX Runtime is checked against, is the CPU fp32 model
    merged_model.to("cpu")
    if device.type != "cpu":
        with torch.no_grad():
            merged = merged_model(**inputs).logits.numpy()
    merged_model.save_pretrained(str(tmp / MERGED_DIR))
    preprocessor.save_pretrained(str(tmp / MERGED_DIR))
    seconds["merge"] = time.perf_counter() - t

    onnx_diff = None
    if onnx:
        t = time.perf_counter()
        onnx_diff = _export_onnx(tmp / MERGED_DIR, tmp / ONNX_DIR, manifest.input.kind, inputs, merged, atol)
        seconds["onnx"] = time.perf_counter() - t

    _write_provenance(tmp / EXPORT_JSON, src, fm_source, merge_diff, onnx_diff, atol)
    log.info("export of run %s round %s: merge diff %.2e, onnx diff %s", src.run_id, src.round, merge_diff,
             "-" if onnx_diff is None else f"{onnx_diff:.2e}")
    return ExportResult(tmp, src, merge_diff, onnx_diff, seconds)


def _preprocessor(spec: InputSpec, fm_source: str, bundle: Path):
    """The FM's own tokenizer / image processor, else one rebuilt from the bundle's preprocessing."""
    if spec.kind == "text":
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            tok = AutoTokenizer.from_pretrained(fm_source, use_fast=True)
        except (OSError, ValueError, TypeError):  # TypeError: a local folder with config but no vocab files
            if spec.tokenizer_file is None:
                raise ExportError(f"no tokenizer for {fm_source}, and the bundle has no tokenizer file") from None
            tok = PreTrainedTokenizerFast(tokenizer_file=str(bundle / spec.tokenizer_file))
            tok.add_special_tokens(_special_tokens(tok))
        if spec.max_length is not None:
            tok.model_max_length = spec.max_length
        return tok
    from transformers import AutoImageProcessor, ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    try:
        return AutoImageProcessor.from_pretrained(fm_source)
    except (OSError, ValueError):
        resample = {"nearest": PILImageResampling.NEAREST, "bicubic": PILImageResampling.BICUBIC}.get(spec.resample, PILImageResampling.BILINEAR)
        return ViTImageProcessor(size={"height": spec.image_size, "width": spec.image_size}, image_mean=list(spec.mean),
                                 image_std=list(spec.std), resample=resample, rescale_factor=spec.rescale_factor)


def _special_tokens(tok) -> dict[str, str]:
    """BERT- or RoBERTa-style special tokens present in a bare tokenizer.json's vocabulary."""
    names = {"pad_token": ("[PAD]", "<pad>"), "unk_token": ("[UNK]", "<unk>"), "cls_token": ("[CLS]", "<s>"),
             "sep_token": ("[SEP]", "</s>"), "mask_token": ("[MASK]", "<mask>")}
    vocab = tok.get_vocab()
    return {role: next(t for t in cands if t in vocab) for role, cands in names.items() if any(t in vocab for t in cands)}


def parity_inputs(spec: InputSpec, preprocessor, config) -> dict[str, torch.Tensor]:
    """A small fixed batch through the saved preprocessing: (3, tokens) ids/masks or (3, C, H, W) pixels."""
    if spec.kind == "text":
        enc = preprocessor(list(PARITY_TEXTS), padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        return dict(enc)
    g = np.random.default_rng(0)
    images = [g.integers(0, 256, (spec.image_size, spec.image_size, config.num_channels), dtype=np.uint8) for _ in range(PARITY_IMAGES)]
    return {"pixel_values": preprocessor(images, return_tensors="pt")["pixel_values"]}


def _export_onnx(merged: Path, out: Path, kind: str, inputs: dict[str, torch.Tensor], expected: np.ndarray, atol: float) -> float:
    import onnxruntime as ort
    from optimum.exporters.onnx import main_export

    task = "text-classification" if kind == "text" else "image-classification"
    # optimum's own validation runs the model again; the check below is the one we keep.
    main_export(str(merged), output=str(out), task=task, device="cpu", do_validation=False)
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ExportError(f"the ONNX graph wants inputs {missing} that the preprocessing does not give")
    (logits,) = sess.run(["logits"], {n: inputs[n].numpy() for n in names})
    return _check("ONNX Runtime vs the merged model", logits, expected, atol)


def _check(what: str, got: np.ndarray, expected: np.ndarray, atol: float) -> float:
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:  # NaN fails too
        raise ExportError(f"parity check failed: {what} logits differ by {diff:.3g} (> {atol:g})")
    return diff


def _write_provenance(path: Path, src: ExportSource, fm_source: str, merge_diff: float, onnx_diff: float | None, atol: float) -> None:
    from fedpft.export.bundle import versions

    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(src.run.resolve()),
        "run_id": src.run_id,
        "round": src.round,
        "adapters": str(src.adapters.relative_to(src.run)),
        "adapters_sha256": sha256_file(src.adapters),
        "bundle": str(src.bundle.resolve()),
        "bundle_id": src.manifest.bundle_id,
        "method": src.manifest.method,
        "fm_id": src.manifest.fm_id,
        "fm_source": fm_source,
        "labels": src.manifest.labels,
        "lora_rank": src.prepare_config.lora_rank,
        "lora_alpha": src.prepare_config.lora_alpha,
        "files": {"adapter": ADAPTER_DIR, "merged": MERGED_DIR, "onnx": f"{ONNX_DIR}/{ONNX_FILE}" if onnx_diff is not None else None},
        "parity": {"atol": atol, "merged_vs_peft_max_abs_diff": merge_diff, "onnx_vs_torch_max_abs_diff": onnx_diff},
        "versions": versions(),
    }
    path.write_text(json.dumps(record, indent=2))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
