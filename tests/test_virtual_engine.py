"""`simulate --engine virtual` (edge agents on threads, in-memory hub) against the real engine
(edge processes over the machine's Mosquitto): same seed, dropout off, two rounds with one
alignment -> the same global adapters and the same metrics."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest

from conftest import LABELS, WORDS, make_bundle, mosquitto_up, write_text_data
from fedpft.cloud.config import SimulateConfig
from fedpft.shared.codec import decode_tensors
from test_federation import final_adapters

MOSQUITTO = "mqtt://127.0.0.1:1883"
# Both engines run the same ORT graphs with one intra-op thread on the same shards, tasks and
# seeds, and FedAvg sums in sorted device order, so nothing but the transport differs: the
# adapters agree to float32 rounding, and in practice bit for bit.
ATOL = 1e-6
# The torch trainer (`--virtual-trainer torch`) computes the same function with other kernels:
# float32 rounding differs per step, through 2 rounds, an alignment and FedAvg.
ATOL_TORCH = 2e-5


@pytest.fixture(scope="module")
def sim_inputs(tmp_path_factory, tiny_bert_dir):
    """A data folder as `--data` takes it, and the fedpft bundle both runs start from."""
    root = tmp_path_factory.mktemp("virtual")
    data = root / "data"
    data.mkdir()
    write_text_data(data / "train.jsonl", n=48, seed=1)
    write_text_data(data / "test.jsonl", n=18, seed=2)
    (data / "labels.json").write_text(json.dumps(LABELS))
    rng = np.random.default_rng(3)
    (data / "public.txt").write_text("\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(40)) + "\n")
    bundle = make_bundle(str(tiny_bert_dir), root / "bundle", public_data=data / "public.txt", batch_size=8)
    return data, bundle


def run_engine(sim_inputs, out, engine: str, **extra):
    from fedpft.cloud.simulate import simulate

    data, bundle = sim_inputs
    # simulate prepares only when the run folder has no bundle: both engines get the very same one
    shutil.copytree(bundle, out / "bundle")
    cfg = SimulateConfig(out=out, model="unused-bundle-given", data=data, clients=3, rounds=2, method="fedpft",
                         max_samples=45, eval_samples=18, align_every=1, align_steps=2, local_epochs=1,
                         batch_size=8, max_steps=3, max_length=16, round_timeout=120, seed=4, device="cpu",
                         engine=engine, **extra)
    t0 = time.time()
    simulate(cfg, show_progress=False)
    return time.time() - t0


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(not mosquitto_up(), reason="needs Mosquitto on 127.0.0.1:1883")
def test_virtual_engine_matches_real_processes(sim_inputs, tmp_path):
    took_v = run_engine(sim_inputs, tmp_path / "virtual", "virtual")
    took_p = run_engine(sim_inputs, tmp_path / "processes", "processes", broker=MOSQUITTO)
    took_t = run_engine(sim_inputs, tmp_path / "torch", "virtual", virtual_trainer="torch")
    print(f"\n2 rounds, 3 clients, tiny BERT: virtual {took_v:.1f}s (torch trainer {took_t:.1f}s), processes {took_p:.1f}s")
    v, p = tmp_path / "virtual", tmp_path / "processes"
    mv, mp = metrics(v), metrics(p)
    assert [r["round"] for r in mv] == [0, 1] and [r["clients"] for r in mv] == [3, 3]
    assert [r["aligned"] for r in mv] == [r["aligned"] for r in mp] and any(r["aligned"] for r in mv)
    for a, b in zip(mv, mp):
        assert a["devices"] == b["devices"]
        assert a["fm_accuracy"] == pytest.approx(b["fm_accuracy"], abs=1e-6)
        assert a["fm_loss"] == pytest.approx(b["fm_loss"], abs=1e-5)
    fa, fb = final_adapters(v / "federation"), final_adapters(p / "federation")
    assert fa.keys() == fb.keys() and fa
    diff = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
    init = decode_tensors((v / "federation" / "checkpoints" / "adapters_round_init.safetensors").read_bytes())[0]
    moved = max(float(np.max(np.abs(fa[k] - init[k]))) for k in fa)
    print(f"max |virtual - processes| over the global adapters: {diff:.3g} (tolerance {ATOL}); moved by training {moved:.3g}")
    assert moved > 100 * ATOL  # a parity of adapters that never moved would prove nothing
    assert diff <= ATOL
    ft = final_adapters(tmp_path / "torch" / "federation")
    diff_t = max(float(np.max(np.abs(ft[k] - fb[k]))) for k in fb)
    print(f"max |virtual torch trainer - processes|: {diff_t:.3g} (tolerance {ATOL_TORCH})")
    assert moved > 100 * ATOL_TORCH and diff_t <= ATOL_TORCH
    assert [r["aligned"] for r in metrics(tmp_path / "torch")] == [r["aligned"] for r in mp]
    # each virtual device logged to its own agent.log, as a device process does
    for i in range(3):
        log = (v / "clients" / f"client{i:03d}" / "agent.log").read_text()
        assert "round 1:" in log and "accepted" in log, log[-2000:]


def test_simulate_passes_the_influence_bounds_to_serve(sim_inputs, tmp_path):
    """--weight-cap-factor 0 --norm-bound-factor 0 on simulate: plain sample-weighted FedAvg in the run."""
    run_engine(sim_inputs, tmp_path / "plain", "virtual", weight_cap_factor=0.0, norm_bound_factor=0.0)
    served = json.loads((tmp_path / "plain" / "federation" / "serve_config.json").read_text())
    assert served["weight_cap_factor"] == 0.0 and served["norm_bound_factor"] == 0.0


def test_virtual_trainer_options(tmp_path):
    with pytest.raises(ValueError, match="only apply to --engine virtual"):
        SimulateConfig(out=tmp_path, virtual_trainer="torch")
    with pytest.raises(ValueError, match="needs --virtual-trainer torch"):
        SimulateConfig(out=tmp_path, engine="virtual", virtual_trainer="ort", virtual_precision="bf16")
    from fedpft.sim.virtual import pick_trainer

    assert pick_trainer("auto", "cpu") == "ort" and pick_trainer("auto", "cpu", "bf16") == "torch"
    assert pick_trainer("ort", "cpu") == "ort" and pick_trainer("torch", "cpu") == "torch"


def test_virtual_engine_refuses_a_broker(tmp_path):
    with pytest.raises(ValueError, match="--broker only applies to --engine processes"):
        SimulateConfig(out=tmp_path, engine="virtual", broker=MOSQUITTO)
    assert SimulateConfig(out=tmp_path).engine == "processes"
    with pytest.raises(ValueError, match="--virtual-parallel only applies to --engine virtual"):
        SimulateConfig(out=tmp_path, virtual_parallel=2)
    assert SimulateConfig(out=tmp_path, engine="virtual", virtual_parallel=2).virtual_parallel == 2


def test_a_seeded_virtual_run_with_dropout_repeats_bit_for_bit_at_any_parallelism(sim_inputs, tiny_bert_dir, tmp_path, monkeypatch, caplog):
    """Dropout on: each client seeds its round's masks from the Task's seed and its id, so a run
    training one client at a time and one training all three at once (in worker processes) end
    with identical global adapters (and moved ones). One ORT thread per client in both runs."""
    from fedpft.sim import virtual

    monkeypatch.setattr(virtual, "cores", lambda: 1)
    data, _ = sim_inputs
    bundle = make_bundle(str(tiny_bert_dir), tmp_path / "bundle-dropout", public_data=data / "public.txt", batch_size=8, dropout=0.3)
    runs = []
    for name, parallel in (("a", 1), ("b", 3)):
        with caplog.at_level(logging.INFO, logger="fedpft.simulate"):
            run_engine((data, bundle), tmp_path / name, "virtual", virtual_parallel=parallel)
        runs.append(final_adapters(tmp_path / name / "federation"))
    assert "virtual clients: 3 training at once in worker processes, 1 ORT thread(s) each" in caplog.text
    # what a client's round logged in its worker is in that client's agent.log, as with threads
    for name in ("a", "b"):
        assert "fedpft.agent: round 1: " in (tmp_path / name / "clients" / "client002" / "agent.log").read_text()
    a, b = runs
    init = decode_tensors((tmp_path / "a" / "federation" / "checkpoints" / "adapters_round_init.safetensors").read_bytes())[0]
    assert max(float(np.max(np.abs(a[k] - init[k]))) for k in a) > 1e-4
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
