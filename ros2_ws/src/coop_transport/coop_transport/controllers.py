"""Controllers the evaluator, the demo generator and the main job can run (see ``evaluation.Controller``).

Each registered factory returns (controller, SimConfig overrides) — a policy that reads wrist cameras asks the
simulation to render them at its image size.
"""

from __future__ import annotations

import numpy as np

from coop_transport.evaluation import register_controller


class ExpertController:
    """The privileged scripted expert (demonstrator), as a controller."""

    def __init__(self, noise: float | None = None, expert_seed: int | None = None, handover: str | None = None):
        from coop_transport.sim.expert import ExpertConfig, ScriptedExpert

        overrides = {k: v for k, v in (("noise", noise), ("handover", handover)) if v is not None}
        config = ExpertConfig(**overrides)
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
                image_size: int | None = None, handover: str | None = None):
    overrides = {"wrist_cameras": cameras}
    if image_size:
        overrides["image_size"] = image_size
    return ExpertController(noise, expert_seed, handover), overrides


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


def _reset_noise(policy, seed: int) -> None:
    """Restart a seeded flow-noise stream (export.runtime.EpisodeNoise) at each episode: paired backends."""
    source = getattr(policy, "noise_source", None)
    if hasattr(source, "reset"):
        source.reset(seed)


class PerArmPi0Controller:
    """B1: the per-arm π0 policy run independently for each arm under the recipe (decentralized: each arm plans
    from its own wrist camera, the agentview camera and its own proprioception)."""

    def __init__(self, policy, recipe):
        from coop_transport.constants import ARMS
        from coop_transport.recipe import ChunkedActor

        self.policy = policy
        self.actors = {arm: ChunkedActor.for_arm(policy, arm, recipe) for arm in ARMS}

    def reset(self, sim, seed: int) -> None:
        _reset_noise(self.policy, seed)
        for actor in self.actors.values():
            actor.reset()

    def act(self, sim) -> np.ndarray:
        from coop_transport.sim.env import join_actions

        # An arm's observation is read only when it re-plans: the simulation then renders its cameras (once) for
        # that step, and skips them at the steps in between (evaluation.run_episode steps it with render=False).
        return join_actions({arm: actor.act(sim.arm_observation(arm) if actor.needs_plan else None)
                             for arm, actor in self.actors.items()})

    def stats(self) -> dict:
        return _clip_stats(self.actors.values())


class JointPi0Controller:
    """B2: the joint π0 policy, run centrally on the full bimanual observation under the recipe."""

    def __init__(self, policy, recipe):
        from coop_transport.recipe import ChunkedActor

        self.policy = policy
        self.actor = ChunkedActor.for_joint(policy, recipe)

    def reset(self, sim, seed: int) -> None:
        _reset_noise(self.policy, seed)
        self.actor.reset()

    def act(self, sim) -> np.ndarray:
        from coop_transport.constants import ARMS

        if not self.actor.needs_plan:  # mid-chunk: no observation read, so no cameras rendered
            return self.actor.act(None)
        # The state history of both arms, [robot0 | robot1] as joint_proprio orders them (policies with one).
        history = np.concatenate([sim.proprio_history(arm) for arm in ARMS], -1)
        return self.actor.act({**sim.observation, "proprio_history": history})

    def stats(self) -> dict:
        return _clip_stats([self.actor])


@register_controller("pi0")
def make_pi0(policy: str | None = None, recipe: dict | None = None, device: str = "auto", threads: int = 1,
             seed: int = 0, backend: str = "torch", export: str | None = None, noise_seed: int | None = None,
             policy_server: str | None = None, server_timeout: float = 30.0):
    """A π0 checkpoint (the shipped default when ``policy`` is None), per-arm or joint as the checkpoint says.

    backend: an inference backend of ``coop_transport.export.backends`` (torch, onnxruntime, tensorrt, ...);
    exported backends read ``export`` (an export directory of this checkpoint; ``policy`` may also be the export
    directory itself). noise_seed: draw the flow noise from a stream restarted at every episode (same noise for
    every backend on the same reset seeds: paired closed-loop parity); None keeps torch's RNG, seeded by ``seed``.
    policy_server: ``host:port`` of a policy server (``python -m coop_transport.serve``) to query instead of loading
    a policy here (``policy`` must be None); the recipe runs here and noise_seed's noise is drawn here and sent.
    """
    import torch

    from coop_transport.export.backends import canonical_backend
    from coop_transport.export.runtime import EpisodeNoise, is_export_dir, load_backend_policy
    from coop_transport.pi0_policy import Pi0Policy

    torch.set_num_threads(threads)  # one thread per worker process: workers, not threads, scale evaluation
    torch.manual_seed(seed)
    backend = canonical_backend(backend)
    if policy_server:
        from coop_transport.serving.client import RemotePolicy

        if policy:
            raise ValueError("give a policy or a policy_server, not both (the server's --policy decides)")
        loaded = RemotePolicy(policy_server, timeout=server_timeout)
    elif backend == "torch" and not is_export_dir(policy):
        loaded = Pi0Policy.load(policy, device=device)
    else:
        loaded = load_backend_policy(policy, backend, device=device, threads=threads, export_dir=export)
    if noise_seed is not None:
        loaded.noise_source = EpisodeNoise(noise_seed)
    overrides = {"wrist_cameras": True, "agentview": True, "image_size": loaded.image_size}
    config = _recipe(recipe, loaded.variant)
    if loaded.variant == "per-arm":
        return PerArmPi0Controller(loaded, config), overrides
    return JointPi0Controller(loaded, config), overrides


@register_controller("residual")
def make_residual(checkpoint: str, device: str = "cpu", threads: int = 1, recipe: dict | None = None,
                  gate_margin: float | None = None, candidates: int | None = None):
    """A residual-RL policy (V3-V6) from a checkpoint or a run directory (its best checkpoint); see
    ``coop_transport.residual.policy``. ``recipe`` overrides fields of the trained recipe (e.g. num_samples);
    ``gate_margin`` turns on the critic gate (``ResidualConfig.gate_margin``), ``candidates`` the critics' choice
    among π0's draws (``ResidualConfig.candidates``)."""
    from coop_transport.residual.policy import make_residual_controller

    return make_residual_controller(checkpoint, device=device, threads=threads, recipe=recipe,
                                    gate_margin=gate_margin, candidates=candidates)


@register_controller("state-bc")
def make_state_bc(policy: str, execute: int = 1, threads: int = 1):
    """The privileged-state BC reference (``coop_transport.state_bc``): exact simulator state in, no cameras."""
    import torch

    from coop_transport.state_bc import StateBCController

    torch.set_num_threads(threads)
    return StateBCController(policy, execute), {"wrist_cameras": False, "agentview": False}
