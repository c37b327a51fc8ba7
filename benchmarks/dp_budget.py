"""What client-level DP costs: epsilon (RDP accountant, dp-accounting) per noise multiplier for a
small fleet and for 1,000 devices per round carrying the same noise on the averaged update.

    python benchmarks/dp_budget.py --write BENCHMARKS.md

The noise on the mean update is Z*C/n (n devices per round): a thousand devices reach a given
accuracy cost with a multiplier n/10 times larger than ten devices, which is what makes
federated DP affordable at fleet scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_section  # noqa: E402

from fedpft.cloud import dp  # noqa: E402

SECTION = "dp_budget"


def rows(multipliers: list[float], rounds: int, delta: float, small: tuple[int, int], large: tuple[int, int]) -> list[str]:
    (n_s, fleet_s), (n_l, fleet_l) = small, large
    q_s, q_l = dp.sampling_rate(n_s, fleet_s), dp.sampling_rate(n_l, fleet_l)
    out = []
    for z in multipliers:
        z_l = z * n_l / n_s  # the same noise std on the averaged update
        e_s = dp.epsilon_uniform(q_s, z, rounds, delta)
        e_s_stats = dp.epsilon_uniform(q_s, dp.effective_multiplier(z, True), rounds, delta)
        e_l = dp.epsilon_uniform(q_l, z_l, rounds, delta)
        # Under ~0.01 the RDP bound is set by its largest order, not by the noise: say "< 0.01".
        large_eps = "< 0.01" if e_l < 0.01 else f"{e_l:.3g}"
        out.append(f"| {z:g} | {z / n_s:.3f} C | {e_s:.2f} | {e_s_stats:.2f} | {z_l:g} | {large_eps} |")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args(argv)
    small, large = (10, 100), (1000, 100_000)
    text = "\n".join([
        "## Differential privacy: epsilon per noise multiplier", "",
        f"Command: `{command_line()}`  ",
        f"Accountant: `cloud/dp.py` (dp-accounting {_version()}, RDP, Poisson-subsampled Gaussian), delta = "
        f"{args.delta:g}, {args.rounds} rounds. Small fleet: {small[0]} devices per round of {small[1]} (q = "
        f"{small[0] / small[1]:g}); large: {large[0]} of {large[1]:,} (q = {large[0] / large[1]:g}). Accuracy under "
        "DP in a live run: the privacy_accuracy section (benchmarks/privacy_accuracy.py).", "",
        f"| Z ({small[0]}/round) | noise std on the mean update | epsilon | epsilon, alignment every round (Z/sqrt 2) | "
        f"Z at {large[0]}/round, same std on the mean | epsilon at {large[0]}/round |",
        "|---|---|---|---|---|---|",
        *rows(args.multipliers, args.rounds, args.delta, small, large),
    ])
    print(text)
    if args.write:
        write_section(SECTION, text, args.write)


def _version() -> str:
    from importlib.metadata import version

    return version("dp-accounting")


if __name__ == "__main__":
    main()
