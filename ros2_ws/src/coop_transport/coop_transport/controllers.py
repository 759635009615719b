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


def _recipe(recipe: dict | None, variant: str):
    from coop_transport.recipe import RecipeConfig

    base = RecipeConfig.per_arm() if variant == "per-arm" else RecipeConfig.joint()
    return base.with_(**(recipe or {}))


def _clip_stats(actors) -> dict:
    from coop_transport.recipe import ClipCounters

    total = ClipCounters()
    for actor in actors:
        total = total.merge(actor.counters)
    return {"clip_actions": total.actions, "clip_clipped_actions": total.clipped_actions,
            "clip_per_dim": total.per_dim, "chunks": sum(a.chunks_planned for a in actors)}


class PerArmPi0Controller:
    """B1: the per-arm π0 policy run independently for each arm under the recipe (decentralized: each arm plans
    from its own wrist camera, the agentview camera and its own proprioception)."""

    def __init__(self, policy, recipe):
        from coop_transport.constants import ARMS
        from coop_transport.recipe import ChunkedActor

        self.policy = policy
        self.actors = {
            arm: ChunkedActor(lambda obs, n, arm=arm: policy.sample_arm(obs, arm, n), recipe,
                              policy.action_mean, policy.action_std)
            for arm in ARMS
        }

    def reset(self, sim, seed: int) -> None:
        for actor in self.actors.values():
            actor.reset()

    def act(self, sim) -> np.ndarray:
        from coop_transport.sim.env import join_actions

        return join_actions({arm: actor.act(sim.arm_observation(arm)) for arm, actor in self.actors.items()})

    def stats(self) -> dict:
        return _clip_stats(self.actors.values())


class JointPi0Controller:
    """B2: the joint π0 policy, run centrally on the full bimanual observation under the recipe."""

    def __init__(self, policy, recipe):
        from coop_transport.recipe import ChunkedActor

        self.policy = policy
        self.actor = ChunkedActor(lambda obs, n: policy.sample_joint(obs, n), recipe, policy.action_mean,
                                  policy.action_std)

    def reset(self, sim, seed: int) -> None:
        self.actor.reset()

    def act(self, sim) -> np.ndarray:
        return self.actor.act(sim.observation)

    def stats(self) -> dict:
        return _clip_stats([self.actor])


@register_controller("pi0")
def make_pi0(policy: str | None = None, recipe: dict | None = None, device: str = "auto", threads: int = 1,
             seed: int = 0):
    """A π0 checkpoint (the shipped default when ``policy`` is None), per-arm or joint as the checkpoint says."""
    import torch

    from coop_transport.pi0_policy import Pi0Policy

    torch.set_num_threads(threads)  # one thread per worker process: workers, not threads, scale evaluation
    torch.manual_seed(seed)
    loaded = Pi0Policy.load(policy, device=device)
    overrides = {"wrist_cameras": True, "agentview": True, "image_size": loaded.image_size}
    config = _recipe(recipe, loaded.variant)
    if loaded.variant == "per-arm":
        return PerArmPi0Controller(loaded, config), overrides
    return JointPi0Controller(loaded, config), overrides
