"""Cooperative residual RL on the frozen π0 policies (seed paper §3.3-3.4): train, evaluate, ablate, probe.

Usage:
    python training/residual.py --arch V4                                   # 3,000 chunks, shipped per-arm π0
    python training/residual.py --arch V5 --seeds 4 --envs 16 --out runs/residual/V5 --data data/demos_96px.hdf5
    python training/residual.py --arch V3 --vla-joint runs/imitation/joint-small/checkpoints/step_030000
    python training/residual.py --arch B1 --out runs/residual/B1           # evaluation only (also B2)
    python training/residual.py --arch V4 --out runs/residual/V4 --seeds 4 --mode ablation   # Table 2 ladder
    python training/residual.py --arch V5 --out runs/residual/V5 --seeds 4 --mode probes     # message probes
    python training/report.py runs/residual/*                                # Table 1, Table 2, plots

Each seed writes <out>/seed_<k>/: result.json (best checkpoint by success at n episodes on reset seeds 1..n),
checkpoints/chunk_*/ (safetensors + JSON), eval/*/summary.json, log.csv, train_state/ (rerunning the same command
resumes after a kill). Settings and their defaults: coop_transport.residual.config.ResidualConfig.
"""

from __future__ import annotations

import json

import tyro

from coop_transport.residual.config import ResidualConfig
from coop_transport.residual.train import run


def main(config: ResidualConfig) -> list[dict]:
    results = run(config)
    for r in results:
        if "success_rate" in r and "arch" in r:
            lo, hi = r["wilson95"]
            print(f"{r['arch']} seed {r['seed']}: success {100 * r['success_rate']:.1f}% [{100 * lo:.1f}, "
                  f"{100 * hi:.1f}] (n={r['episodes']}), best {r.get('best_checkpoint')}")
        else:
            print(json.dumps({k: v for k, v in r.items() if k != "per_seed"}, indent=1, default=str)[:2000])
    return results


if __name__ == "__main__":
    main(tyro.cli(ResidualConfig))
