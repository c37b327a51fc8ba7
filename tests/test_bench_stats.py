"""The multi-seed benchmark's statistics (benchmarks/stats.py) and its resumable plan (benchmarks/seeds.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import seeds
        import stats

        yield stats, seeds
    finally:
        sys.path.remove(str(BENCH))


def test_summary_is_mean_and_sample_sd(bench):
    stats, _ = bench
    s = stats.summarize([0.80, 0.82, 0.87])
    assert s.n == 3
    assert s.mean == pytest.approx(np.mean([0.80, 0.82, 0.87]))
    assert s.sd == pytest.approx(np.std([0.80, 0.82, 0.87], ddof=1))
    assert math.isnan(stats.summarize([0.8]).sd)
    assert stats.summarize([]).n == 0


def test_t_quantile_matches_tables(bench):
    stats, _ = bench
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)


def test_paired_difference_pairs_by_seed(bench):
    stats, _ = bench
    a = {0: 0.82, 1: 0.80, 2: 0.85, 7: 0.99}  # seed 7 has no partner: left out
    b = {0: 0.80, 1: 0.79, 2: 0.82, 3: 0.10}
    d = stats.paired_difference(a, b)
    diffs = np.array([0.02, 0.01, 0.03])
    half = 4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3)
    assert d.seeds == (0, 1, 2) and d.n == 3
    assert d.mean == pytest.approx(diffs.mean())
    assert (d.lo, d.hi) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert not d.excludes_zero()  # 2 ± 2.5 points: three seeds are few


def test_pairing_removes_the_shared_seed_effect(bench):
    """A constant gap over seeds that move both methods alike is certain when paired."""
    stats, _ = bench
    base = {0: 0.70, 1: 0.85, 2: 0.78}
    d = stats.paired_difference({s: v + 0.01 + 0.001 * s for s, v in base.items()}, base)
    assert d.lo > 0 and d.excludes_zero()
    noisy = stats.paired_difference({0: 0.80, 1: 0.78, 2: 0.83}, {0: 0.79, 1: 0.80, 2: 0.81})
    assert noisy.lo < 0 < noisy.hi and not noisy.excludes_zero()


def test_one_pair_has_no_interval(bench):
    stats, _ = bench
    d = stats.paired_difference({0: 0.8}, {0: 0.7})
    assert d.n == 1 and d.mean == pytest.approx(0.1)
    assert math.isnan(d.lo) and math.isnan(d.hi) and not d.excludes_zero()


def test_convergence_is_movement_of_the_mean_over_the_last_rounds(bench):
    stats, _ = bench
    climbing = [[70, 72, 74, 76, 78], [72, 74, 76, 78, 80]]
    assert stats.mean_curve(climbing) == [71, 73, 75, 77, 79]
    assert stats.last_rounds_movement(climbing) == pytest.approx(4.0)
    assert not stats.converged(climbing)
    flat = [[70, 80, 82.0, 82.2, 81.9], [71, 79, 82.4, 82.0, 82.3]]
    assert stats.last_rounds_movement(flat) == pytest.approx(0.1)  # means 82.2, 82.1, 82.1
    assert stats.converged(flat)
    # the mean over runs is taken only over rounds every run reached
    assert stats.mean_curve([[1, 2, 3], [3, 4]]) == [2, 3]
    assert math.isnan(stats.last_rounds_movement([[1, 2]]))


def test_block_drift_compares_the_last_rounds_with_the_ones_before(bench):
    stats, _ = bench
    noisy_flat = [[80, 82, 80, 82, 80, 82]]  # max - min of the last 3 rounds is 2, the blocks agree within 0.67
    assert stats.last_rounds_movement(noisy_flat) == pytest.approx(2.0)
    assert stats.block_drift(noisy_flat) == pytest.approx((82 + 80 + 82) / 3 - (80 + 82 + 80) / 3)
    assert stats.block_drift([[70, 72, 74, 76, 78, 80]]) == pytest.approx(6.0)  # still climbing: 2 points a round
    assert math.isnan(stats.block_drift([[1, 2, 3, 4, 5]]))


def test_plan_orders_methods_within_a_seed(bench):
    _, seeds = bench
    runs = seeds.plan(["fedpft", "fedot"], ["dirichlet:0.5"], [0, 1], rounds=12)
    assert [(r.method, r.seed) for r in runs] == [("fedpft", 0), ("fedot", 0), ("fedpft", 1), ("fedot", 1)]
    assert runs[0].name == "fedpft_keep0.25_dirichlet0.5_s0"
    assert seeds.Run("full", "iid", 2, 12, 0.1).name == "full_iid_s2"


def test_pending_skips_runs_whose_json_holds_enough_rounds(bench, tmp_path):
    _, seeds = bench
    runs = seeds.plan(["fedpft", "fedot", "full"], ["iid"], [0], rounds=12)
    done, short = runs[0], runs[1]
    (tmp_path / f"{done.name}.json").write_text(json.dumps({"fm_accuracy": [0.5] * 15}))
    (tmp_path / f"{short.name}.json").write_text(json.dumps({"fm_accuracy": [0.5] * 10}))
    assert seeds.pending(runs, tmp_path) == [short, runs[2]]
    assert seeds.pending(runs, tmp_path / "nothing-yet") == runs


def test_groups_cut_longer_runs_to_the_round_count(bench):
    _, seeds = bench
    rows = [
        {"method": "fedpft", "partition": "iid", "seed": 0, "ffn_keep": 0.25, "fm_accuracy": [0.1, 0.2, 0.3]},
        {"method": "fedpft", "partition": "iid", "seed": 1, "ffn_keep": 0.25, "fm_accuracy": [0.1]},  # too short
        {"method": "fedpft", "partition": "iid", "seed": 2, "ffn_keep": 0.5, "fm_accuracy": [0.1, 0.2]},  # other proxy
        {"method": "full", "partition": "iid", "seed": 0, "ffn_keep": None, "fm_accuracy": [0.4, 0.5]},
    ]
    g = seeds.groups(rows, rounds=2)
    assert g == {("iid", "fedpft"): {0: [0.1, 0.2]}, ("iid", "full"): {0: [0.4, 0.5]}}


def test_bundle_keys_share_a_proxy_only_where_it_is_the_same(bench):
    _, seeds = bench
    assert seeds.bundle_key("layeronly", 0.25) == seeds.bundle_key("fedpft", 0.25)
    assert seeds.bundle_key("noalign", 0.25) != seeds.bundle_key("fedpft", 0.25)  # not distilled
    assert seeds.bundle_key("fedpft", 0.1) != seeds.bundle_key("fedpft", 0.25)
    assert seeds.bundle_key("full", 0.1) == seeds.bundle_key("full", 0.5)
    # FedOT's budget is whole layers: MiniLM's 6 layers give 4 at --ffn-keep 0.1 and 0.25, 5 at 0.5
    assert seeds.bundle_key("fedot", 0.1) == seeds.bundle_key("fedot", 0.25) == "fedot-distilled-L4"
    assert seeds.bundle_key("fedot", 0.5) == "fedot-distilled-L5"


def test_the_logit_kl_variant_is_fedpft_with_another_objective(bench):
    _, seeds = bench
    assert seeds.simulate_method("fedpft-kl") == ("fedpft", {"align_objective": "logit-kl"})
    assert seeds.simulate_method("fedot") == ("fedot", {})
    assert seeds.bundle_key("fedpft-kl", 0.25) == seeds.bundle_key("fedpft", 0.25)  # same proxy, same distillation
    # a run folder's simulate_config.json names the variant it was made for, or the plain method
    assert seeds.method_of({"method": "fedpft", "align_objective": "logit-kl"}) == "fedpft-kl"
    assert seeds.method_of({"method": "fedpft", "align_objective": "hidden-mse"}) == "fedpft"
    assert seeds.method_of({"method": "layeronly", "align_objective": "logit-kl"}) == "layeronly"
    assert seeds.Run("fedpft-kl", "iid", 2, 20).name == "fedpft-kl_keep0.25_iid_s2"


def test_harvest_saves_rounds_so_far_without_marking_the_run_done(bench, tmp_path):
    _, seeds = bench
    run = seeds.Run("fedpft", "dirichlet:0.5", 1, 20)
    out = tmp_path / "work" / "runs" / run.name
    (out / "federation").mkdir(parents=True)
    cfg = {"method": "fedpft", "partition": "dirichlet:0.5", "seed": 1, "rounds": 20, "ffn_keep": 0.25}
    cfg.update({k: 1 for k in seeds.SCHEDULE})
    (out / "simulate_config.json").write_text(json.dumps(cfg))
    rows = [{"round": i, "fm_accuracy": 0.5 + i / 100} for i in range(3)]
    (out / "federation" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "results"
    assert seeds.harvest(tmp_path / "work", results, "cmd") == [f"{run.name}: 3 of 20 rounds"]
    saved = json.loads((results / f"{run.name}.json").read_text())
    assert saved["fm_accuracy"] == [0.5, 0.51, 0.52] and saved["complete"] is False
    assert seeds.pending([run], results) == [run]  # still to be run in full
    assert seeds.harvest(tmp_path / "work", results, "cmd") == []  # nothing new


def test_frontier_joins_a_proxy_with_the_runs_of_every_ffn_keep_that_builds_it(bench):
    sys.path.insert(0, str(BENCH))
    try:
        import frontier
    finally:
        sys.path.remove(str(BENCH))
    rows = [
        {"method": "fedot", "partition": "iid", "seed": 0, "ffn_keep": 0.1, "fm_accuracy": [0.5, 0.70]},
        {"method": "fedot", "partition": "iid", "seed": 0, "ffn_keep": 0.25, "fm_accuracy": [0.5, 0.70]},  # the same run
        {"method": "fedot", "partition": "iid", "seed": 1, "ffn_keep": 0.25, "fm_accuracy": [0.5, 0.80]},
        {"method": "fedot", "partition": "iid", "seed": 2, "ffn_keep": 0.5, "fm_accuracy": [0.5, 0.99]},  # another proxy
        {"method": "full", "partition": "iid", "seed": 0, "ffn_keep": None, "fm_accuracy": [0.6, 0.9]},
    ]
    s = frontier.accuracy(rows, {"method": "fedot", "ffn_keeps": [0.1, 0.25]}, "iid", rounds=2)
    assert s.n == 2 and s.mean == pytest.approx(0.75)
    assert frontier.accuracy(rows, {"method": "full", "ffn_keeps": None}, "iid", rounds=2).mean == pytest.approx(0.9)
    assert frontier.accuracy(rows, {"method": "fedot", "ffn_keeps": [0.1, 0.25]}, "dirichlet:0.5", rounds=2).n == 0
    assert list(frontier.proxies()) == ["fedpft-distilled-keep0.1", "fedpft-distilled-keep0.25", "fedpft-distilled-keep0.5",
                                        "fedot-distilled-L4", "fedot-distilled-L5", "full"]


def test_claims_need_an_interval_and_read_it_the_right_way(bench):
    stats, _ = bench
    above, within = stats.CLAIMS[1], stats.CLAIMS[0]
    assert within.kind == "within" and above.kind == "above"
    d = lambda a, b: stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)))  # noqa: E731
    assert stats.verdict(above, d([], [])) == "not measured yet"
    assert stats.verdict(above, d([0.80], [0.70])).startswith("one seed only (fedpft − fedot = +10.0 points)")
    assert stats.verdict(above, d([0.80, 0.81, 0.82], [0.70, 0.70, 0.71])).startswith("supported")
    assert stats.verdict(above, d([0.70, 0.70, 0.71], [0.80, 0.81, 0.82])).startswith("refuted: fedot is above")
    assert stats.verdict(above, d([0.80, 0.70, 0.75], [0.75, 0.75, 0.75])).startswith("not distinguishable")
    # within one point: a tight interval near 0 supports, a tight one far off refutes, a wide one is no evidence
    assert stats.verdict(within, d([0.802, 0.803, 0.801], [0.800, 0.801, 0.800])).startswith("supported")
    assert stats.verdict(within, d([0.85, 0.851, 0.849], [0.80, 0.80, 0.80])).startswith("refuted")
    assert stats.verdict(within, d([0.85, 0.78, 0.80], [0.80, 0.80, 0.80])).startswith("inconclusive")


def test_the_section_gives_a_verdict_per_claim_once_two_seeds_are_in(bench):
    stats, seeds = bench
    run = lambda m, s, acc: {"method": m, "partition": "dirichlet:0.5", "seed": s, "ffn_keep": None if m == "full" else 0.25,  # noqa: E731
                             "fm_accuracy": [0.5, acc], "complete": True, "wall_s": 60.0, "load_start": 1.0, "command": "x"}
    rows = [run("fedpft", 0, 0.80), run("fedpft", 1, 0.82), run("fedot", 0, 0.70), run("fedot", 1, 0.71), run("full", 0, 0.81)]
    text = seeds.section(rows, 2, "python benchmarks/seeds.py --report", 30)
    claims = [l for l in text.splitlines() if l.startswith("- *")]
    assert len(claims) == 3
    assert "dirichlet:0.5: supported (fedpft − fedot = +10.5 points" in claims[1]
    assert "dirichlet:0.5: one seed only (full − fedpft = +1.0 points)" in claims[0]
    assert "dirichlet:0.5: not measured yet; iid: not measured yet" in claims[2]


def test_the_secondary_endpoint_averages_the_last_rounds(bench):
    _, seeds = bench
    assert seeds.tail_mean([0.1, 0.5, 0.8, 0.9, 0.7]) == pytest.approx(0.8)
    assert seeds.last_round([0.1, 0.5, 0.7]) == 0.7
    g = {("iid", "fedpft"): {0: [0.5, 0.80, 0.84, 0.80], 1: [0.5, 0.82, 0.86, 0.84]},
         ("iid", "fedot"): {0: [0.5, 0.78, 0.80, 0.81], 1: [0.5, 0.80, 0.83, 0.80]}}
    row = next(r for r in seeds.pair_table(g, seeds.tail_mean) if r.startswith("| fedpft − fedot"))
    # per seed: 0.8133 - 0.7967 = +1.67 and 0.84 - 0.81 = +3.0 points; mean +2.3
    assert row.split(" | ")[2].startswith("2.3 [")
    assert seeds.pair_table(g, seeds.last_round)[2].startswith("| fedpft − fedot | - | 1.5 [")


def test_the_rounds_verdict_counts_rows_meeting_the_criterion_by_both_measures(bench):
    _, seeds = bench
    text = seeds.rounds_verdict(20, moves=[0.3, 1.2, 0.49], drifts=[0.1, -0.2, 0.7])
    assert "How many rounds: 20." in text
    assert "in 2 of 3 method x partition rows" in text
    assert "block drift is under 0.5 points in 2 of 3" in text
    assert "not met everywhere" in text
    assert "Every row meets the criterion." in seeds.rounds_verdict(30, moves=[0.1, 0.2], drifts=[0.0, 0.0])
    why = seeds.rounds_verdict(20, moves=[1.0], drifts=[0.6], slopes=[0.25], noise=[0.6, 0.5, 0.7])
    assert f"over rounds {21 - seeds.TREND_ROUNDS}-20 the seed-mean curves still rose by +0.25 points per round" in why
    assert "moves 3 rounds by about 0.5" in why and "by 0.60 points" in why


def test_tail_trend_fits_a_line_through_the_last_rounds(bench):
    stats, _ = bench
    slope, sd = stats.tail_trend([0.0] * 5 + [1 + 0.5 * i for i in range(10)], window=10)
    assert slope == pytest.approx(0.5) and sd == pytest.approx(0.0, abs=1e-12)
    # residuals +-1 alternating about a flat line: sd = sqrt(10 / 8)
    slope, sd = stats.tail_trend([5 + (1 if i % 2 else -1) for i in range(10)], window=10)
    assert abs(slope) < 0.1 and sd == pytest.approx((sum(r * r for r in [
        5 + (1 if i % 2 else -1) - (5 + slope * (i - 4.5)) for i in range(10)]) / 8) ** 0.5)
    assert all(map(lambda v: v != v, stats.tail_trend([1.0, 2.0], window=10)))


def test_what_it_takes_sums_each_methods_fastest_run_over_the_seeds(bench):
    _, seeds = bench
    done = [{"method": "fedot", "wall_s": 1200.0, "fm_accuracy": [0.5] * 20},
            {"method": "fedot", "wall_s": 600.0, "fm_accuracy": [0.5] * 10},  # 10 rounds: 1200 s for 20
            {"method": "noalign", "wall_s": 900.0, "fm_accuracy": [0.5] * 20}]
    text = seeds.what_it_takes(done, rounds=20, seeds=3)
    assert "fedot 20 min, noalign 15 min" in text
    assert f"{3 * (1200 + 900) / 3600:.1f} h" in text
    assert "plus fedpft, layeronly, full (no complete run yet" in text
    assert seeds.what_it_takes([], rounds=20) == ""


def test_pooled_differences_pair_by_partition_and_seed_and_need_both_partitions(bench):
    _, seeds = bench
    g = {("dirichlet:0.5", "fedpft"): {0: [0.80], 1: [0.82]}, ("dirichlet:0.5", "fedot"): {0: [0.79], 1: [0.80]},
         ("iid", "fedpft"): {0: [0.86], 1: [0.85]}, ("iid", "fedot"): {0: [0.84], 1: [0.85]}}
    pooled = seeds.paired(g, "fedpft", "fedot", seeds.last_round, tuple(seeds.PARTITIONS))
    # seed 0 of one partition is not seed 0 of the other: four pairs, not two
    assert pooled.n == 4 and math.isclose(pooled.mean, (0.01 + 0.02 + 0.02 + 0.0) / 4)
    one = seeds.paired(g, "fedpft", "fedot", seeds.last_round, ("iid",))
    assert one.n == 2 and math.isclose(one.mean, 0.01)
    del g[("iid", "fedot")]
    assert seeds.paired(g, "fedpft", "fedot", seeds.last_round, tuple(seeds.PARTITIONS)).n == 0
    assert "both, pooled" not in seeds.claim_cells(seeds.CLAIMS[1], g)
    rows = seeds.pair_table(g, seeds.last_round)
    assert rows[0] == "| difference | dirichlet:0.5 | iid | both, pooled |"
    assert rows[2].startswith("| fedpft − fedot | 1.5 [") and rows[2].endswith(" | - | - |")
