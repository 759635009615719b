"""Success rate of the scripted expert over reset seeds, with the Wilson 95% interval.

Usage:
    python bench/expert_success.py [--seeds 1-100] [--workers 2] [--expert-seed 0] [--noise 0.05] [--json out.json]
    python bench/expert_success.py --seeds 1-20 --handover planned --present-offset 0.07   # the hand-over rule's tolerance

Each worker process (multiprocessing "spawn") builds one ``TransportSim`` without cameras and runs the expert
(``coop_transport.sim.expert``) on the seeds it is handed. Prints the success rate with its Wilson 95% interval,
the mean and median episode length (steps at 20 Hz, successful episodes end at their first successful step), the
failing seeds with the stage each arm was in at the end, and the wall time. Physics runs at about 60-70 steps/s per
core, so 100 seeds take about 4-5 minutes on 2 workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, replace

import numpy as np

_SIM = None  # one simulation per worker process


def _init_worker() -> None:
    global _SIM
    from coop_transport.sim import TransportSim

    _SIM = TransportSim()


def _run_seed(job: tuple[int, int, dict]) -> dict:
    from coop_transport.sim.expert import ExpertConfig, ScriptedExpert, run_expert_episode

    seed, expert_seed, overrides = job
    expert = ScriptedExpert(replace(ExpertConfig(), **overrides), seed=expert_seed)
    result = run_expert_episode(_SIM, seed, expert)
    result["phases"] = {arm: expert.phase(arm) for arm in ("robot0", "robot1")}
    return result


def parse_seeds(spec: str) -> list[int]:
    """'1-100' or '1,5,9' or '1-10,42' to a sorted list of seeds."""
    seeds: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.update(range(int(lo), int(hi or lo) + 1))
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be non-negative integers, got {spec!r}")
    return sorted(seeds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-100", help="reset seeds, e.g. 1-100 or 1,4,9 (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")
    ap.add_argument("--expert-seed", type=int, default=0, help="the expert's own seed (default %(default)s)")
    ap.add_argument("--noise", type=float, help="override ExpertConfig.noise (action units)")
    ap.add_argument("--waypoint-jitter", type=float, help="override ExpertConfig.waypoint_jitter (m)")
    ap.add_argument("--handover", choices=("observed", "planned"), help="override ExpertConfig.handover")
    ap.add_argument("--present-offset", type=float, metavar="M",
                    help="robot0 presents the payload this far (m, along world x) off the planned hand-over point")
    ap.add_argument("--handover-spread", type=float, metavar="M",
                    help="override ExpertConfig.handover_spread: std (m) of where robot0 presents the payload")
    ap.add_argument("--handover-hold-steps", type=int, metavar="N",
                    help="override ExpertConfig.handover_hold_steps: steps robot1 holds before robot0 lets go")
    ap.add_argument("--handover-close-dwell", type=int, metavar="N",
                    help="override ExpertConfig.handover_close_dwell: steps robot1 waits at its grip point open")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", help="also write per-seed results and the summary here")
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        ap.error(str(e))
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    overrides = {k: v for k, v in (("noise", args.noise), ("waypoint_jitter", args.waypoint_jitter),
                                   ("handover", args.handover), ("handover_spread", args.handover_spread),
                                   ("handover_hold_steps", args.handover_hold_steps),
                                   ("handover_close_dwell", args.handover_close_dwell))
                 if v is not None}
    if args.present_offset is not None:
        overrides["present_offset"] = (args.present_offset, 0.0, 0.0)

    from tqdm import tqdm

    from coop_transport.sim.expert import ExpertConfig
    from coop_transport.utils.stats import format_rate

    config = replace(ExpertConfig(), **overrides)  # validates the overrides before any worker starts
    jobs = [(seed, args.expert_seed, overrides) for seed in seeds]
    t0 = time.perf_counter()
    results = []
    with mp.get_context("spawn").Pool(min(args.workers, len(jobs)), initializer=_init_worker) as pool:
        with tqdm(total=len(jobs), disable=args.no_progress, unit="episode") as bar:
            for r in pool.imap_unordered(_run_seed, jobs):
                results.append(r)
                bar.update()
                bar.set_postfix_str(f"success {sum(x['success'] for x in results)}/{len(results)}")
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r["seed"])

    successes = sum(r["success"] for r in results)
    lengths = np.array([r["length"] for r in results])
    failed = [r for r in results if not r["success"]]
    print(f"scripted expert (expert seed {args.expert_seed}, noise {config.noise}, waypoint jitter "
          f"{config.waypoint_jitter} m, hand-over {config.handover}, spread {config.handover_spread} m, "
          f"hold {config.handover_hold_steps} steps, close dwell {config.handover_close_dwell} steps, "
          f"presenting {list(config.present_offset)} m off) "
          f"on reset seeds {args.seeds}: {len(results)} episodes, {args.workers} workers")
    print(f"success: {format_rate(successes, len(results))}")
    print(f"episode length: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()} steps (horizon ends failures)")
    if failed:
        print("failing seeds: " + ", ".join(
            f"{r['seed']} (robot0 {r['phases']['robot0']}, robot1 {r['phases']['robot1']})" for r in failed))
    else:
        print("failing seeds: none")
    print(f"wall time: {wall:.1f} s ({len(results) / wall * 60:.1f} episodes/min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "expert_seed": args.expert_seed, "workers": args.workers,
                       "config": asdict(config), "successes": successes, "episodes": len(results),
                       "mean_length": float(lengths.mean()), "wall_s": wall, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
