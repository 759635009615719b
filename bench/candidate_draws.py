"""π0's cost of the critics' K draws (``--candidates K``): K draws of N samples per row in one pass against K passes
of N over one prefix; prints a markdown table.

Usage:
    python bench/candidate_draws.py                                  # shipped default, CPU, 20 rows (10 envs x 2)
    python bench/candidate_draws.py --device cuda --rows 30 --draws 1 4 8 16

A residual evaluation's chunk boundary samples K x N chunks for each of its rows (environments x agents). In one
pass all K x N samples of a row form one token sequence, whose attention grows with the square of their number;
in K passes each draw's N samples are one sequence, as a single draw's are (``Pi0Policy.sample_batch(...,
groups=K)``, what ``ResidualSystem.vla_draws`` uses). Both ways are timed in the same process, interleaved round by
round, so their ratio holds on a noisy machine; the table also gives the largest difference between their actions
(the same noise: float rounding only), and the load average before and after.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro


@dataclass(frozen=True)
class Config:
    vla: Path | None = None
    """π0 checkpoint (per-arm); default: the shipped per-arm policy."""
    device: str = "auto"
    """cuda | cpu | auto."""
    rows: int = 20
    """Rows per boundary: environments x agents (10 environments of two per-arm agents: 20)."""
    samples: int = 4
    """N, the recipe's mean-of-N."""
    draws: tuple[int, ...] = (1, 4, 8)
    """K values."""
    reps: int = 3
    """Timed rounds per K (each times both ways once, in alternating order), after one untimed round."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""


def main(config: Config) -> list[dict]:
    from coop_transport.pi0_policy import Pi0Policy, resolve_device
    from coop_transport.utils.synthetic import random_arm_batch

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    vla = Pi0Policy.load(config.vla, device=str(device))
    batch = random_arm_batch(vla, config.rows, np.random.default_rng(0))
    pad = (vla.config.action_horizon, vla.config.action_pad_dim)
    load_before = os.getloadavg()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for k in config.draws:
        noise = torch.randn((config.rows * k * config.samples, *pad), generator=torch.Generator().manual_seed(k))
        noise = noise.to(device)
        one_pass = lambda: vla.sample_batch(batch, k * config.samples, noise=noise)  # noqa: E731
        k_passes = lambda: vla.sample_batch(batch, config.samples, noise=noise, groups=k)  # noqa: E731
        diff = float(np.abs(one_pass() - k_passes()).max())  # also the untimed warm-up round
        times = {"one pass": [], "K passes": []}
        for rep in range(config.reps):
            order = [("one pass", one_pass), ("K passes", k_passes)][:: 1 if rep % 2 == 0 else -1]
            for name, fn in order:
                times[name].append(timed(fn))
        one, split = float(np.median(times["one pass"])), float(np.median(times["K passes"]))
        rows.append({"K": k, "samples per row": k * config.samples, "one pass (ms)": 1000 * one,
                     "K passes (ms)": 1000 * split, "one pass / K passes": one / split,
                     "max abs difference": diff})
    print(f"π0 {config.vla or 'shipped default'} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f"; {config.rows} rows, N = {config.samples}; median of {config.reps} rounds; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| K | samples per row | one pass (ms) | K passes (ms) | one pass / K passes | max abs difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['samples per row']} | {r['one pass (ms)']:.0f} | {r['K passes (ms)']:.0f} | "
              f"{r['one pass / K passes']:.2f} | {r['max abs difference']:.2g} |")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
