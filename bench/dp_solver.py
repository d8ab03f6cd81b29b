"""Time qcore's knapsack DP at DeiT-B scale (1,324 groups x 11 rates) and compare it with the exact optimum.

    python bench/dp_solver.py [--groups 1324] [--target 4] [--repeat 3] [--grid auto|resolution|exact]
                              [--no-reference]

Group sizes are DeiT-B's weight groups of 64 output channels (64 x 768 = 49,152 weights for patch embedding,
qkv, proj and fc1; 64 x 3,072 = 196,608 for fc2; 40 x 768 = 30,720 for the head's last group), the curves
synthetic (decreasing, noisy, exponential in the rate, as measured RD curves are). ``--grid auto`` is
``solve_dp``'s default (reduced-cost fixing around the Lagrangian answer, then an exact DP over the open items);
``--grid resolution`` forces a DP over all items on the rounded 1e-3-bit grid, ``--grid exact`` one over all items
on the exact gcd grid (6,144 bits here; seconds).
Prints the best of ``--repeat`` wall-clock timings, which solver's answer the DP returned and its gap to the
Lagrangian dual bound (no allocation within the budget has lower distortion), the Lagrangian solve time, and
(unless ``--no-reference``) the exact optimum from the full exact-grid DP, timed once, with the DP's distance to it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core/src"))

import numpy as np  # noqa: E402

from qcore.knapsack import lagrangian_for_budget, solve_dp  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=1324)
    p.add_argument("--target", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--grid", choices=["auto", "resolution", "exact"], default="auto",
                   help="auto: solve_dp's default; resolution: force the 1e-3-bit grid; exact: force the gcd grid")
    p.add_argument("--no-reference", action="store_true", help="skip the exact optimum (a full exact-grid DP)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    sizes = rng.choice([49_152, 49_152, 49_152, 196_608, 30_720], size=args.groups).astype(float)
    rates = np.arange(11, dtype=float)
    scale = rng.uniform(1e-6, 1e-2, args.groups)[:, None]
    dists = scale * 2.0 ** (-2 * rates[None, :]) * rng.uniform(0.8, 1.2, (args.groups, 11))
    budget = args.target * sizes.sum()
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        unit = {"auto": None, "resolution": max(1.0, float(int(1e-3 * sizes.sum()))),
                "exact": float(np.gcd.reduce(sizes.astype(np.int64)))}[args.grid]
        sol = solve_dp(sizes, dists, rates, budget, unit=unit)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    lg, _ = lagrangian_for_budget(sizes, dists, rates, budget)
    t_lg = time.perf_counter() - t0
    print(f"DP: {args.groups} groups x 11 rates, target {args.target} bits, grid {args.grid}: {best:.3f} s "
          f"(best of {args.repeat}); average bits {sol.total_bits / sizes.sum():.4f}, distortion {sol.distortion:.9g}; "
          f"answer from {sol.solver}, {100 * sol.gap:.4f} % above the Lagrangian dual bound {sol.lower_bound:.6g}")
    print(f"Lagrangian: {t_lg:.3f} s; average bits {lg.total_bits / sizes.sum():.4f}, distortion {lg.distortion:.9g}")
    if not args.no_reference:
        t0 = time.perf_counter()
        ref = solve_dp(sizes, dists, rates, budget, unit=float(np.gcd.reduce(sizes.astype(np.int64))))
        t_ref = time.perf_counter() - t0
        print(f"exact optimum (DP over all groups on the gcd grid, {ref.solver}): {t_ref:.3f} s; average bits "
              f"{ref.total_bits / sizes.sum():.4f}, distortion {ref.distortion:.9g}; the DP above is "
              f"{100 * (sol.distortion - ref.distortion) / ref.distortion:.2g} % above it, the Lagrangian "
              f"{100 * (lg.distortion - ref.distortion) / ref.distortion:.4f} %")
    print(f"machine: {platform.machine()} {platform.processor()}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
