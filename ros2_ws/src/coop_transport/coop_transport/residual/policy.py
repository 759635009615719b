"""Trained residual policies where the rest of the project runs policies: the evaluator and the ROS node.

- ``ResidualController`` is the evaluation registry's ``"residual"`` kind (registered in
  ``coop_transport.controllers``): ``ControllerSpec("residual", {"checkpoint": RUN_OR_CHECKPOINT})`` evaluates
  any architecture (V3-V6, and B1/B2 result directories are not checkpoints) in ``evaluation.evaluate``'s worker
  processes, one environment each.
- ``ResidualArmPolicy`` is ``deploy.ArmPolicy``'s interface for one arm of a per-arm architecture (V4, V5, V6):
  ``plan(arm_obs) -> (C, 7)``, ``message(arm_obs) -> (16,) | (C, 7) | None``, ``accepts_message``,
  ``architecture``. ``deploy.load_arm_policy`` hands residual checkpoints to ``load_residual_arm_policy``.

Deployment semantics: the received message is ``arm_obs["partner_message"]`` (the node drops it when stale or
missing), a missing one is the zero message, which FiLM maps to the identity (the V4 behaviour). V5 sends the mean
of its message distribution, V6 its π0 reference chunk. π0 noise is seeded per episode (``reset``).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from coop_transport.residual.rollout import episode_generator, state_histories

EPISODE_NOISE_SEED = 7_919


class ResidualController:
    """A residual system (both arms, or V3's joint agent) as an ``evaluation.Controller``."""

    def __init__(self, system):
        self.system = system
        self.queue: deque[np.ndarray] = deque()
        self.generator = torch.Generator().manual_seed(EPISODE_NOISE_SEED)
        self.chunks = 0

    def reset(self, sim, seed: int) -> None:
        self.queue.clear()
        self.generator = episode_generator(EPISODE_NOISE_SEED, seed)  # as the pipeline's evaluation draws it

    def act(self, sim) -> np.ndarray:
        if not self.queue:
            obs = {**sim.observation, **state_histories(sim)}  # as the rollout workers send it
            b = self.system.boundary([obs], self.generator, explore=False, deterministic=True)
            self.queue.extend(b.joint_action()[0])
            self.chunks += 1
        return self.queue.popleft()

    def stats(self) -> dict:
        c = self.system.counters
        return {"clip_actions": c.actions, "clip_clipped_actions": c.clipped_actions, "clip_per_dim": c.per_dim,
                "chunks": self.chunks, **self.system.choice_stats()}


def make_residual_controller(checkpoint: str, device: str = "cpu", threads: int = 1, recipe: dict | None = None,
                             gate_margin: float | None = None, candidates: int | None = None):
    """Factory of the ``"residual"`` controller kind: (controller, SimConfig overrides). ``gate_margin`` turns
    on the critic gate (``ResidualConfig.gate_margin``), ``candidates`` the critics' choice among π0's draws
    (``ResidualConfig.candidates``); None keeps the checkpoint's setting."""
    from coop_transport.residual.checkpoint import load_policy

    torch.set_num_threads(threads)
    system = load_policy(checkpoint, device)
    if recipe:
        system = system.with_recipe(system.recipe.with_(**recipe))
    if gate_margin is not None:
        system = system.with_gate(gate_margin)
    if candidates is not None:
        system = system.with_candidates(candidates)
    overrides = {"wrist_cameras": True, "agentview": True, "image_size": system.vla.image_size}
    return ResidualController(system), overrides


class ResidualArmPolicy:
    """One arm's residual agent behind ``deploy.ArmPolicy``'s interface (the ROS policy node's policy)."""

    uses_agentview = True

    def __init__(self, system, arm: str):
        from coop_transport.constants import ARMS

        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
        if system.spec.vla_variant != "per-arm":
            raise ValueError(f"{system.spec.name} is centralized (one agent for both arms): it has no per-arm policy "
                             "for a ROS node; run it with the evaluator")
        self.system, self.arm = system, arm
        self.architecture = system.spec.name
        self.accepts_message = system.spec.message != "none"
        self.recipe = system.recipe
        self.generator = torch.Generator().manual_seed(EPISODE_NOISE_SEED)
        self._sent: tuple[int, np.ndarray | None] | None = None
        self.chunks_planned = 0

    @property
    def image_size(self) -> int:
        return self.system.vla.image_size

    def plan(self, arm_obs: dict) -> np.ndarray:
        """(C, 7) executed actions: π0 reference (recipe applied) plus the bounded residual."""
        actions, sent = self.system.agent_plan(self.arm, arm_obs, self.generator, arm_obs.get("partner_message"))
        self._sent = (id(arm_obs), sent)
        self.chunks_planned += 1
        return actions.astype(np.float64)

    def message(self, arm_obs: dict) -> np.ndarray | None:
        """What this arm sends its partner, computed by the ``plan`` of the same observation: V5 (16,), V6 the
        (C, 7) reference chunk, V4 None."""
        if not self.accepts_message:
            return None
        if self._sent is None or self._sent[0] != id(arm_obs):
            self.plan(arm_obs)
        return self._sent[1]

    def reset(self) -> None:
        self._sent = None
        self.generator.manual_seed(EPISODE_NOISE_SEED)

    def stats(self) -> dict:
        c, g = self.system.counters, self.system.gate_counters
        out = {"chunks": self.chunks_planned, "clip_action_rate": c.action_rate, "clipped_actions": c.clipped_actions,
               "architecture": self.architecture}
        if self.system.config.gate_margin is not None:
            out["gate_residual_rate"] = g.residual_rate
        if self.system.config.candidates > 1:
            out["candidate_switch_rate"] = self.system.candidate_counters.switch_rate
        return out


def load_residual_arm_policy(path, arm: str, recipe=None, device: str = "auto", threads: int | None = None
                             ) -> ResidualArmPolicy:
    """The ``ArmPolicy`` of ``arm`` from a residual checkpoint or run directory. The chunk length is the trained
    one; N and the clipping come from ``recipe`` when given."""
    from coop_transport.residual.checkpoint import load_policy

    if threads:
        torch.set_num_threads(threads)
    system = load_policy(path, device)
    if recipe is not None:
        system = system.with_recipe(system.recipe.with_(num_samples=recipe.num_samples, clip_sigma=recipe.clip_sigma,
                                                        clip_beyond_demonstrated=recipe.clip_beyond_demonstrated))
    return ResidualArmPolicy(system, arm)
