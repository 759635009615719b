"""Run one closed-loop TwoArmTransport episode, save it as a video and print whether it succeeded.

Usage:
    python training/rollout.py                      # the scripted expert on reset seed 1 -> data/rollout.mp4
    python training/rollout.py --seed 7 --video data/seed7.mp4 --video-size 320
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from coop_transport.evaluation import ControllerSpec, build_controller, run_episode
from coop_transport.sim import SimConfig, TransportSim


@dataclass
class Config:
    controller: str = "expert"
    """What acts: 'expert' (the privileged scripted demonstrator)."""
    seed: int = 1
    """Reset seed of the scene."""
    video: Path = Path("data/rollout.mp4")
    """Where to write the mp4."""
    camera: str = "frontview"
    """Camera shown in the video."""
    video_size: int = 256
    """Video frame size in pixels (square)."""


def main(config: Config) -> dict:
    controller, sim_overrides = build_controller(ControllerSpec(config.controller))
    start = time.perf_counter()
    with TransportSim(SimConfig(**sim_overrides)) as sim:
        result = run_episode(sim, controller, config.seed, config.video, config.camera, config.video_size)
    wall = time.perf_counter() - start
    verdict = "SUCCESS" if result["success"] else "FAILURE"
    print(f"{config.controller} on reset seed {config.seed}: {verdict} after {result['length']} steps "
          f"({wall:.0f} s); video: {config.video}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
