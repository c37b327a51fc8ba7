"""Smoke test of benchmarks/scale.py: one real round, 5 simulated devices, the machine's Mosquitto."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
BROKER = ("127.0.0.1", 1883)


def _broker_up() -> bool:
    try:
        socket.create_connection(BROKER, 0.5).close()
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _broker_up(), reason="no MQTT broker on 127.0.0.1:1883")


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))
    try:
        import scale as mod

        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_one_round_with_five_simulated_devices(scale, tmp_path: Path) -> None:
    bundle = scale.synthetic_bundle(tmp_path / "bundle")
    res = scale.run_scale(scale.ScaleConfig(devices=5, bundle=bundle, broker="mqtt://%s:%d" % BROKER, train_s=0.3,
                                            jitter_s=0.1, round_timeout=30.0, ready_timeout=30.0))
    assert res["accepted"] == 5 and res["acked_ok"] == 5, res
    assert res["errors"] == [] and res["dropped_to_cloud"] == 0
    # every device got the real adapters blob, broadcast once (nobody had to ask), and uploaded one real-sized update
    adapters = (bundle / "adapters_init.safetensors").stat().st_size
    assert res["fetched"] == 5 and res["blob_requests"] == 0 and res["resent_chunks"] == 0
    assert adapters <= res["bytes_down_mb"] * 1e6 < 2 * adapters
    assert res["bytes_up_mb"] * 1e6 >= 5 * adapters
    assert res["max_train_s"] <= res["round_wall_s"] < 30.0
    assert res["overhead_s"] == pytest.approx(res["round_wall_s"] - res["max_train_s"])


def test_devices_sharing_one_connection_per_process(scale, tmp_path: Path) -> None:
    """--fleet shared-link: 6 devices over 2 connections (3 per worker process), each still its own
    device to the cloud: its Task, its adapters, its update, its receipt."""
    bundle = scale.synthetic_bundle(tmp_path / "bundle")
    res = scale.run_scale(scale.ScaleConfig(devices=6, bundle=bundle, broker="mqtt://%s:%d" % BROKER, train_s=0.3,
                                            jitter_s=0.1, round_timeout=30.0, ready_timeout=30.0, per_worker=3,
                                            shared_link=True, fleet_nice=5))
    assert res["workers"] == 2 and "one connection per 3 devices" in res["broker"], res
    assert res["accepted"] == 6 and res["acked_ok"] == 6 and res["fetched"] == 6, res
    assert res["errors"] == [] and res["dropped_to_cloud"] == 0 and res["blob_requests"] == 0
    assert res["bytes_up_mb"] * 1e6 >= 6 * (bundle / "adapters_init.safetensors").stat().st_size


def test_markdown_section_is_replaced_in_place(scale, tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkeep me\n\n{scale.BEGIN}\nold\n{scale.END}\n\n## other\n")
    scale.write_section(md, f"{scale.BEGIN}\nnew\n{scale.END}")
    text = md.read_text()
    assert "keep me" in text and "## other" in text and "new" in text and "old" not in text
    assert text.count(scale.BEGIN) == 1
