"""Controllers the evaluator, the demo generator and the main job can run (see ``evaluation.Controller``).

Each registered factory returns (controller, SimConfig overrides) — a policy that reads wrist cameras asks the
simulation to render them at its image size.
"""

from __future__ import annotations

import numpy as np

from coop_transport.evaluation import register_controller


class ExpertController:
    """The privileged scripted expert (demonstrator), as a controller."""

    def __init__(self, noise: float | None = None, expert_seed: int | None = None):
        from coop_transport.sim.expert import ExpertConfig, ScriptedExpert

        config = ExpertConfig() if noise is None else ExpertConfig(noise=noise)
        self.expert = ScriptedExpert(config, seed=expert_seed)
        self.expert_seed = expert_seed

    def reset(self, sim, seed: int) -> None:
        self.expert.reset(sim, seed if self.expert_seed is None else self.expert_seed)

    def act(self, sim) -> np.ndarray:
        return self.expert.act(sim)

    def stats(self) -> dict:
        return {}


@register_controller("expert")
def make_expert(noise: float | None = None, expert_seed: int | None = None, cameras: bool = False,
                image_size: int | None = None):
    overrides = {"wrist_cameras": cameras}
    if image_size:
        overrides["image_size"] = image_size
    return ExpertController(noise, expert_seed), overrides
