"""Run one closed-loop TwoArmTransport episode, save it as a video and print whether it succeeded.

Usage:
    python training/rollout.py                      # the shipped π0 default on reset seed 1 -> data/rollout.mp4
    python training/rollout.py --controller expert  # the scripted demonstrator instead
    python training/rollout.py --policy runs/imitation/per-arm-small/checkpoints/step_030000 --seed 7
    python training/rollout.py --seed 17 --noise-seed 0  # the flow noise fixed too: the same episode every run
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from coop_transport.evaluation import ControllerSpec, build_controller, run_episode
from coop_transport.sim import SimConfig, TransportSim
from coop_transport.sim.labels import HANDOVER_OUTCOMES


@dataclass
class Config:
    controller: str = "pi0"
    """What acts: 'pi0' (a π0 checkpoint under the inference recipe) or 'expert' (the privileged scripted
    demonstrator)."""
    policy: Path | None = None
    """π0 checkpoint directory (default: the per-arm policy shipped in the package)."""
    seed: int = 1
    """Reset seed of the scene."""
    video: Path = Path("data/rollout.mp4")
    """Where to write the mp4."""
    camera: str = "frontview"
    """Camera shown in the video."""
    video_size: int = 256
    """Video frame size in pixels (square)."""
    horizon: int = 400
    """Control steps before the episode ends (20 Hz: 20 s; the expert needs about 300)."""
    noise_seed: int | None = None
    """π0 only: draw the flow-matching noise from a stream restarted at the episode's start, so a run can be
    repeated (as training/evaluate.py --noise-seed). Default: fresh noise every run."""


def main(config: Config) -> dict:
    params = {}
    if config.controller == "pi0":
        params = {"policy": str(config.policy) if config.policy else None, "device": "cpu", "threads": 2,
                  "noise_seed": config.noise_seed}
    elif config.policy is not None or config.noise_seed is not None:
        raise ValueError("--policy and --noise-seed apply to --controller pi0 only")
    controller, sim_overrides = build_controller(ControllerSpec(config.controller, params))
    start = time.perf_counter()
    with TransportSim(SimConfig(horizon=config.horizon, **sim_overrides)) as sim:
        result = run_episode(sim, controller, config.seed, config.video, config.camera, config.video_size)
    wall = time.perf_counter() - start
    verdict = "SUCCESS" if result["success"] else "FAILURE"
    reached = result["milestones"][-1] if result["milestones"] else "none"
    print(f"{config.controller} on reset seed {config.seed}: {verdict} after {result['length']} steps "
          f"({wall:.0f} s); last milestone: {reached}; hand-over: {result['handover']['outcome']} "
          f"({HANDOVER_OUTCOMES[result['handover']['outcome']]}); video: {config.video}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
