"""report.md and accuracy.png number rounds from 1, as people count them; metrics.jsonl keeps 0."""

import json

from fedpft.cloud.report import write_report


def test_report_numbers_rounds_from_one_in_every_table(tmp_path):
    rows = [
        {"round": 0, "clients": 3, "fm_accuracy": 0.5, "fm_loss": 1.0, "aligned": False},
        {"round": 1, "clients": 3, "fm_accuracy": 0.6, "fm_loss": 0.9, "aligned": True,
         "alignment": {"frozen": {"1": 10}, "mean_apoz": {"1": 0.5}, "gap_before": 0.2, "gap_after": 0.1}},
        {"round": 2, "clients": 0, "fm_accuracy": None, "skipped": "no device"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = write_report(tmp_path).read_text()
    table = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| round") and not l.startswith("| after")]
    assert [l.split("|")[1].strip().split(" ")[0] for l in table] == ["1", "2", "3", "2"]
    assert "| 3 (skipped: no device) |" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0
