"""π0 imitation fine-tuning (seed paper phase 1): the per-arm (B1) and joint (B2) policies.

Usage:
    python training/imitation.py --variant per-arm                       # small model, data/transport_scripted.hdf5
    python training/imitation.py --variant joint --steps 30000 --out runs/joint
    python training/imitation.py --model pi0-3b --weights /path/to/pi0 --variant per-arm   # LoRA on real π0
    python training/imitation.py --variant per-arm --demos 1 --steps 5000 --out runs/overfit  # overfit probe

Checkpoints land in <out>/checkpoints/step_XXXXXX (select by simulated success: training/evaluate.py); rerunning
the same command resumes from <out>/train_state.
"""

import json

import tyro

from coop_transport.imitation import ImitationConfig, train


def main(config: ImitationConfig) -> dict:
    summary = train(config)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(tyro.cli(ImitationConfig))
