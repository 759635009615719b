"""One architecture at inference: frozen π0 + the agents' networks, batched over environments (Figure 2, right).

``ResidualSystem.boundary(observations)`` is what happens at a chunk boundary for E environments at once:

1. π0 (frozen, one batched call over all E x A agent rows, mean-of-N and ±kσ clipping of the recipe) gives each
   agent its reference chunk ``ref`` (C, D) and its prefix tokens;
2. each agent's frozen RL token encoder maps prefix + proprioception to z;
3. messages: V5 agents emit m_i from their message head (sampled in training, the mean otherwise), V6 agents
   send their reference chunk; agent i receives its partner's (``received``); an optional ``message_override``
   replaces what is received (the communication probes);
4. each agent's actor gives the executed chunk clip(ref + s tanh(Δ + noise), -1, 1) (noise only when exploring);
   with ``config.candidates`` K > 1, evaluation draws K reference chunks per agent in step 1 and each agent executes
   the actor's chunk over the one its critics rate highest (``choose_candidate``);
5. with ``config.gate_margin`` set, evaluation (deterministic, no exploration) keeps an agent's residual chunk only
   where both of its critics rate it above the reference chunk by more than the margin (``critic_gate``), and executes
   the reference otherwise. Each agent consults its own critics only, so V4's agents stay independent.

Rows are environment-major: per-arm architectures put robot0 then robot1 of environment e at rows 2e, 2e + 1.
The same code serves training rollouts, batched evaluation, the evaluation-registry controller and the ROS node's
``ArmPolicy`` (which runs one agent of one environment: ``agent_plan``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from coop_transport.adapters import arm_images, joint_images, joint_proprio, policy_state
from coop_transport.constants import ARMS
from coop_transport.recipe import ClipCounters, RecipeConfig, reduce_chunk
from coop_transport.residual.architectures import ArchSpec
from coop_transport.residual.networks import ResidualAgent, gripper_dims
from coop_transport.sim.env import arm_observation


@dataclass
class Boundary:
    """Everything computed at one chunk boundary for E environments and A agents."""

    ref: torch.Tensor  # (E, A, C, D) π0 reference chunks (recipe applied)
    proprio: torch.Tensor  # (E, A, P) normalized proprioception
    latent: torch.Tensor | None  # (E, A, Z) RL tokens (None without residual)
    sent: torch.Tensor | None  # (E, A, M) messages each agent emits (None without a message)
    received: torch.Tensor | None  # (E, A, M) messages each agent receives
    action: torch.Tensor | None = None  # (E, A, C, D) executed chunks
    candidates: torch.Tensor | None = None  # (E, A, K, C, D) π0 draws the critics choose among (K > 1); ref: the chosen
    prefix: torch.Tensor | None = None  # (E * A, L, D_vlm) π0 prefix tokens (kept on request)
    prefix_mask: torch.Tensor | None = None  # (E * A, L)

    def joint_action(self) -> np.ndarray:
        """(E, C, 14) float64: robot0's 7 then robot1's 7 (per-arm), or the joint chunk as it is."""
        a = self.action if self.action is not None else self.ref
        e, n_agents, c, d = a.shape
        return a.permute(0, 2, 1, 3).reshape(e, c, n_agents * d).double().cpu().numpy()


MessageOverride = Callable[[Boundary, dict], torch.Tensor]


@dataclass
class GateCounters:
    """How often the critic gate let the residual through: agent chunks gated, and of those, residual ones."""

    chunks: int = 0
    residual_chunks: int = 0

    @property
    def residual_rate(self) -> float:
        return self.residual_chunks / max(self.chunks, 1)


@dataclass
class CandidateCounters:
    """How often the critics chose another of π0's draws than the first: agent chunks chosen, and of those, the
    ones that switched. Beside them, summed over the agent chunks, what says whether the ranking rests on more than
    the twin critics' disagreement: the spread of the lower critic's values over the K draws (max - min); the twin
    critics' mean absolute difference (``critic_gap``), most of which can be an offset shared by all draws of a
    chunk and so cannot reorder them; the part of their difference that changes from draw to draw
    (``critic_gap_spread``: max - min over the draws of Q1 - Q2); and the chunks in which Q1 and Q2 alone would
    pick the same draw (``critics_agree``; at random 1/K of them)."""

    chunks: int = 0
    switched_chunks: int = 0
    value_spread: float = 0.0
    critic_gap: float = 0.0
    critic_gap_spread: float = 0.0
    critics_agree: int = 0

    @property
    def switch_rate(self) -> float:
        return self.switched_chunks / max(self.chunks, 1)


def choose_candidate(agent, latent, proprio, candidates, received,
                     counters: CandidateCounters | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, executed chunk) per row: of the K reference chunks ``candidates`` (B, K, C, D), the one whose
    executed chunk (the actor's, without exploration) the lower of ``agent``'s twin critics rates highest. Ties go
    to the earliest draw. Reads nothing but this agent's own networks and inputs."""
    b, k = candidates.shape[:2]

    def repeat(x):
        return None if x is None else x.repeat_interleave(k, dim=0)

    refs = candidates.flatten(0, 1)
    actions = agent.actor(repeat(latent), repeat(proprio), refs, repeat(received))
    q1, q2 = agent.q(repeat(latent), repeat(proprio), actions, repeat(received))
    value = torch.minimum(q1, q2).view(b, k)
    best = value.argmax(dim=1)
    if counters is not None:
        counters.chunks += b
        counters.switched_chunks += int((best != 0).sum())
        counters.value_spread += float((value.max(dim=1).values - value.min(dim=1).values).sum())
        gap = (q1 - q2).view(b, k)
        counters.critic_gap += float(gap.abs().mean(dim=1).sum())
        counters.critic_gap_spread += float((gap.max(dim=1).values - gap.min(dim=1).values).sum())
        counters.critics_agree += int((q1.view(b, k).argmax(dim=1) == q2.view(b, k).argmax(dim=1)).sum())
    rows = torch.arange(b, device=best.device)
    return refs.view(b, k, *refs.shape[1:])[rows, best], actions.view(b, k, *actions.shape[1:])[rows, best]


def critic_gate(agent, latent, proprio, ref, received, action, margin: float,
                counters: GateCounters | None = None) -> torch.Tensor:
    """Per row, the executed chunk ``action`` where both of ``agent``'s critics rate it above π0's reference chunk by
    more than ``margin``, else the reference (clipped to [-1, 1], as executed chunks are: the critics learned from
    executed chunks, and a zero residual executes the clipped reference). Reads nothing but this agent's own
    networks and inputs."""
    ref = ref.clamp(-1.0, 1.0)
    q_action = agent.q(latent, proprio, action, received)
    q_ref = agent.q(latent, proprio, ref, received)
    gain = torch.minimum(q_action[0] - q_ref[0], q_action[1] - q_ref[1])  # the critic that likes it least
    keep = gain > margin
    if counters is not None:
        counters.chunks += keep.numel()
        counters.residual_chunks += int(keep.sum())
    return torch.where(keep.view(-1, *[1] * (action.dim() - 1)), action, ref)


def agent_chunk(system, agent, latent, proprio, ref, received, candidates=None, noise=None,
                gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, executed chunk) of one agent's rows, as the batched boundary and the ROS node's single agent
    both decide it: with ``candidates`` (B, K, C, D) the agent's critics choose among π0's draws
    (``choose_candidate``), else its actor acts on ``ref`` (with exploration ``noise``); then, where ``gated`` and
    ``system.config.gate_margin`` is set, the critic gate against the (chosen) reference."""
    if candidates is not None:
        ref, action = choose_candidate(agent, latent, proprio, candidates, received, system.candidate_counters)
    else:
        action = agent.actor(latent, proprio, ref, received, noise)
    if gated and system.config.gate_margin is not None:
        action = critic_gate(agent, latent, proprio, ref, received, action, system.config.gate_margin,
                             system.gate_counters)
    return ref, action


def exploration_std(config, action_dim: int, device) -> torch.Tensor:
    """(D,) exploration noise per action dimension: explore_std, or gripper_explore_std in the gripper rows."""
    std = torch.full((action_dim,), float(config.explore_std), device=device)
    if config.gripper_explore_std is not None:
        std[list(gripper_dims(action_dim))] = float(config.gripper_explore_std)
    return std


def make_agents(spec: ArchSpec, config, vla) -> nn.ModuleDict:
    """Fresh agents for ``spec`` sized from the π0 checkpoint (prefix width and length) and ``config``."""
    pc = vla.config
    prefix_dim = pc.vlm.width
    prefix_len = pc.num_prefix_tokens
    received = spec.message_dim(config.message_dim, config.chunk)
    learned = config.message_dim if spec.message == "learned" else 0
    return nn.ModuleDict({
        name: ResidualAgent(prefix_dim, prefix_len, spec.proprio_dim, config.chunk, spec.action_dim, received,
                            learned, config)
        for name in spec.agents
    })


class ResidualSystem:
    """Frozen π0 (per-arm or joint) and, for V3-V6, one ``ResidualAgent`` per agent."""

    def __init__(self, spec: ArchSpec, config, vla, agents: nn.ModuleDict | None, device: torch.device,
                 recipe: RecipeConfig | None = None):
        self.spec, self.config, self.vla, self.device = spec, config, vla, torch.device(device)
        if vla.variant != spec.vla_variant:
            raise ValueError(f"{spec.name} needs a {spec.vla_variant} π0 policy, got a {vla.variant} one")
        if recipe is None:
            default_c = config.chunk if spec.residual else (
                config.baseline_chunk or (10 if spec.vla_variant == "per-arm" else 25))
            recipe = RecipeConfig(execute_steps=default_c, num_samples=config.num_samples,
                                  clip_sigma=config.clip_sigma)
        if spec.residual and recipe.execute_steps != config.chunk:
            raise ValueError(f"the residual acts on chunks of {config.chunk} steps; a recipe with "
                             f"execute_steps={recipe.execute_steps} does not apply")
        if recipe.execute_steps > vla.horizon:
            raise ValueError(f"chunk {recipe.execute_steps} exceeds the π0 policy's horizon {vla.horizon}")
        if recipe.gripper_latch is not None:  # the residual acts on the reference's continuous gripper value
            raise ValueError("gripper_latch applies to π0 policies run by the recipe's ChunkedActor, not to the "
                             "residual system's reference chunks")
        if recipe.temporal_ensemble is not None:  # the residual corrects one reference chunk at a time
            raise ValueError("temporal_ensemble applies to π0 policies run by the recipe's ChunkedActor, not to the "
                             "residual system's reference chunks")
        self.recipe = recipe
        self.agents = agents.to(self.device) if agents is not None else None
        # The agents see the current proprioception only: the leading entries of π0's state vector (a state history
        # follows them), z-scored with π0's statistics of it.
        self.proprio_dim = spec.proprio_dim
        self.state_mean = torch.as_tensor(vla.state_mean[:spec.proprio_dim], device=self.device)
        self.state_std = torch.as_tensor(vla.state_std[:spec.proprio_dim], device=self.device)
        self.counters = ClipCounters()
        self.gate_counters = GateCounters()
        self.candidate_counters = CandidateCounters()
        self.pose_mean = torch.zeros(6, device=self.device)  # sender-pose standardization for V5 (set from demos)
        self.pose_std = torch.ones(6, device=self.device)

    def with_recipe(self, recipe: RecipeConfig) -> "ResidualSystem":
        """The same π0 and networks under another inference recipe (Table 2's ablation, ROS parameters)."""
        other = ResidualSystem(self.spec, self.config, self.vla, self.agents, self.device, recipe)
        other.pose_mean, other.pose_std = self.pose_mean, self.pose_std
        return other

    def weights_digest(self) -> dict:
        """What an evaluation's episode key records of the networks it ran: π0's weights digest (from its
        checkpoint) and the sha256 of the residual networks' inference weights. A checkpoint or prior replaced in
        place then starts its evaluation afresh instead of continuing another network's episodes."""
        from coop_transport.residual.checkpoint import inference_state

        residual = None
        if self.agents is not None:
            digest = hashlib.sha256()
            for name, tensor in sorted(inference_state(self.agents).items()):
                digest.update(name.encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
            residual = digest.hexdigest()
        return {"vla": getattr(self.vla, "weights_sha256", None), "residual": residual}

    def choice_stats(self) -> dict:
        """The critic gate's and the candidate choice's running counters and settings, as
        ``evaluation.stats_delta`` takes per-episode differences of the counters (passing the settings through) and
        ``evaluation.summarize`` sums them (none with neither)."""
        out = {}
        if self.config.gate_margin is not None:
            out.update(gate_chunks=self.gate_counters.chunks, gate_residual_chunks=self.gate_counters.residual_chunks,
                       gate_settings={"margin": self.config.gate_margin})
        if self.config.candidates > 1:
            c = self.candidate_counters
            out.update(candidate_chunks=c.chunks, candidate_switched_chunks=c.switched_chunks,
                       candidate_value_spread=c.value_spread, candidate_critic_gap=c.critic_gap,
                       candidate_critic_gap_spread=c.critic_gap_spread, candidate_critics_agree=c.critics_agree,
                       candidate_settings={"candidates": self.config.candidates})
        return out

    def with_config(self, **changes) -> "ResidualSystem":
        """The same π0, networks and recipe under a config with ``changes`` (settings of acting, not of the
        networks' shapes)."""
        other = self.with_recipe(self.recipe)
        other.config = self.config.replace(**changes)
        return other

    def with_gate(self, margin: float | None) -> "ResidualSystem":
        """The same π0, networks and recipe with the critic gate at ``margin`` (None: off)."""
        return self.with_config(gate_margin=margin)

    def with_candidates(self, candidates: int) -> "ResidualSystem":
        """The same π0, networks and recipe, choosing among ``candidates`` draws of π0 per agent and boundary."""
        return self.with_config(candidates=candidates)

    @property
    def agent_names(self) -> tuple[str, ...]:
        return self.spec.agents

    @property
    def chunk(self) -> int:
        return self.recipe.execute_steps

    # ---------------------------------------------------------------------------------------------- π0 rows
    def rows(self, observations: list[dict]) -> tuple[list[dict], list[np.ndarray], list[str]]:
        """π0 inputs (images per slot, raw state, prompt) of every agent of every environment, environment-major.

        An observation is a simulation observation, or pre-split: ``{arm: arm_observation}`` (per-arm) or
        ``{"joint": {"images": {slot: image}, "proprio": (36,)}}`` (joint).
        """
        images, states, prompts = [], [], []
        history = self.vla.state_history
        for obs in observations:
            if self.spec.vla_variant == "per-arm":
                for arm in ARMS:
                    if arm in obs:  # per-arm dicts accepted as-is
                        view = obs[arm]
                    else:
                        view = arm_observation(obs, arm)
                        if f"{arm}_proprio_history" in obs:  # rollout workers send each arm's latest states
                            view["proprio_history"] = obs[f"{arm}_proprio_history"]
                    images.append(arm_images(view))
                    states.append(policy_state(view, history))
                    prompts.append(self.vla.prompts[arm])
            elif "joint" in obs:  # pre-split: {"joint": {"images": {slot: image}, "proprio": (36,)}} (demonstrations)
                images.append(obs["joint"]["images"])
                states.append(policy_state(obs["joint"], history))
                prompts.append(self.vla.prompts["joint"])
            else:
                images.append(joint_images(obs))
                view = {"proprio": joint_proprio(obs)}
                if all(f"{arm}_proprio_history" in obs for arm in ARMS):
                    view["proprio_history"] = np.concatenate([obs[f"{arm}_proprio_history"] for arm in ARMS], -1)
                states.append(policy_state(view, history))
                prompts.append(self.vla.prompts["joint"])
        return images, states, prompts

    @torch.no_grad()
    def vla_infer(self, images, states, prompts, generator: torch.Generator | list[torch.Generator],
                  keep_prefix: bool = True):
        """Reference chunks (R, C, D) float32 and prefix tokens (R, L, D_vlm), mask (R, L) for R rows.

        ``generator``: one for all rows, or a list of G generators, each drawing the noise of its R / G consecutive
        rows (one environment's agents: evaluation episodes with noise streams of their own)."""
        ref, prefix, mask = self.vla_draws(images, states, prompts, generator, 1, keep_prefix)
        return ref[:, 0], prefix, mask

    @torch.no_grad()
    def vla_draws(self, images, states, prompts, generator: torch.Generator | list[torch.Generator],
                  draws: int, keep_prefix: bool = True, one_pass: bool = False):
        """``vla_infer`` with ``draws`` reference chunks per row, each the recipe's mean of its own N samples:
        (R, K, C, D). π0's prefix is computed once per row. Each generator draws the noise of draw 0 of all its rows
        first, as ``vla_infer`` would, then draw 1's, and so on: draw 0 is the reference of one draw. The clip
        counters count every draw's actions. Each draw's N samples run in a pass of their own (``Pi0Policy.
        sample_batch(groups=K)``), which is faster for batched rows; ``one_pass`` puts all K x N samples of a row
        into one pass instead, which is faster for a single row (``bench/candidate_draws.py --rows 1``), the same
        actions up to float rounding."""
        vla, per_draw = self.vla, self.recipe.num_samples
        n = per_draw * draws
        batch = vla.make_batch(images, states, prompts)
        rows = len(states)
        shape = (vla.config.action_horizon, vla.config.action_pad_dim)
        generators = [generator] if isinstance(generator, torch.Generator) else generator
        if rows % len(generators):
            raise ValueError(f"{rows} rows cannot be split over {len(generators)} generators")
        per = rows // len(generators)
        # (rows of a generator, draws, N) in the row-major order sample_batch takes (a row's samples together)
        noise = torch.cat([torch.stack([torch.randn((per, per_draw, *shape), generator=g) for _ in range(draws)], 1)
                           for g in generators]).reshape(rows * n, *shape)
        passes = 1 if one_pass else draws
        samples, cache = vla.sample_batch(batch, n // passes, noise=noise.to(self.device), return_prefix=True,
                                          groups=passes)
        refs = np.stack([[reduce_chunk(s[k * per_draw:(k + 1) * per_draw], self.recipe, vla.action_mean,
                                       vla.action_std, self.counters, vla.action_min, vla.action_max)
                          for k in range(draws)] for s in samples])  # (R, K, C, D)
        prefix = cache.prefix_embeddings if self.config.prefix_source == "embeddings" else cache.prefix_hidden
        ref = torch.as_tensor(refs, dtype=torch.float32, device=self.device)
        return ref, (prefix.float() if keep_prefix else None), cache.prefix_mask

    @torch.no_grad()
    def vla_prefix(self, images, states, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix tokens (R, L, D_vlm) float32 and mask (R, L) without sampling actions."""
        batch = self.vla.make_batch(images, states, prompts)
        if self.config.prefix_source == "embeddings":
            prefix, mask = self.vla.model.embed_prefix(batch)
        else:
            cache = self.vla.model.prepare_prefix(batch, 1)
            prefix, mask = cache.prefix_hidden, cache.prefix_mask
        return prefix.float(), mask

    def normalize_proprio(self, states: list[np.ndarray]) -> torch.Tensor:
        """z-scored current proprioception (R, proprio_dim) from raw π0 states (or the proprioception itself)."""
        raw = torch.as_tensor(np.stack(states)[:, :self.proprio_dim], dtype=torch.float32, device=self.device)
        return (raw - self.state_mean) / self.state_std

    # --------------------------------------------------------------------------------------------- boundary
    @torch.no_grad()
    def boundary(self, observations: list[dict], generator: torch.Generator | list[torch.Generator],
                 explore: bool = False, deterministic: bool = True, message_override: MessageOverride | None = None,
                 context: dict | None = None, keep_prefix: bool = False) -> Boundary:
        """π0 + encoders + messages + actors for E environments (see the module docstring).

        ``generator`` may be a list of E generators, one per environment, for π0's noise: evaluation, where nothing
        else draws noise (no exploration, message means)."""
        e, n_agents = len(observations), len(self.agent_names)
        if not isinstance(generator, torch.Generator):
            if len(generator) != e:
                raise ValueError(f"{len(generator)} generators for {e} environments")
            if explore or not deterministic:
                raise ValueError("per-environment generators serve deterministic evaluation only (no exploration, "
                                 "message means)")
        images, states, prompts = self.rows(observations)
        choose = deterministic and not explore and self.agents is not None and self.config.candidates > 1
        draws, prefix, mask = self.vla_draws(images, states, prompts, generator,
                                             self.config.candidates if choose else 1)
        draws = draws.view(e, n_agents, *draws.shape[1:])
        ref = draws[:, :, 0]  # until the critics choose: what V6 agents send
        proprio = self.normalize_proprio(states).view(e, n_agents, -1)
        out = Boundary(ref=ref, proprio=proprio, latent=None, sent=None, received=None,
                       candidates=draws if choose else None)
        if keep_prefix:
            out.prefix, out.prefix_mask = prefix, mask
        if self.agents is None:
            out.action = ref
            return out
        prefix = prefix.view(e, n_agents, *prefix.shape[1:])
        mask = mask.view(e, n_agents, -1)
        out.latent = torch.stack([self.agents[a].encoder(prefix[:, i], mask[:, i], proprio[:, i])
                                  for i, a in enumerate(self.agent_names)], dim=1)  # (E, A, Z)
        shared = generator if isinstance(generator, torch.Generator) else None  # per-environment: π0's noise only
        out.sent, out.received = self.messages(out.latent, proprio, ref, shared, deterministic)
        if message_override is not None and out.received is not None:
            out.received = message_override(out, context or {})
        out.action = self.act(out, shared, explore, gated=deterministic and not explore)
        return out

    def messages(self, latent, proprio, ref, generator=None, deterministic=True):
        """(sent, received), each (B, A, M), or (None, None) without a message. Used by rollouts and updates."""
        kind = self.spec.message
        if kind == "none":
            return None, None
        if kind == "learned":
            sent = torch.stack([self.agents[a].message(latent[:, i], proprio[:, i], generator, deterministic)
                                for i, a in enumerate(self.agent_names)], dim=1)
        else:  # "chunk": the raw reference chunk (C x 7 -> C*7)
            sent = ref.flatten(2)
        partner = [self.agent_names.index(self.spec.partner(a)) for a in self.agent_names]
        return sent, sent[:, partner]

    def act(self, b: Boundary, generator: torch.Generator, explore: bool, gated: bool = False) -> torch.Tensor:
        """Executed chunks (E, A, C, D) from a boundary's latents, references and received messages; ``gated``
        applies the critic gate when ``config.gate_margin`` is set. With ``b.candidates`` each agent's critics
        choose among π0's draws first, and ``b.ref`` becomes the chosen reference."""
        actions, refs = [], []
        std = exploration_std(self.config, self.spec.action_dim, self.device) if explore else None
        for i, name in enumerate(self.agent_names):
            received = b.received[:, i] if b.received is not None else None
            noise = None
            if std is not None and b.candidates is None and bool((std > 0).any()):
                noise = std * torch.randn(b.ref[:, i].shape, generator=generator).to(self.device)
            ref, action = agent_chunk(self, self.agents[name], b.latent[:, i], b.proprio[:, i], b.ref[:, i], received,
                                      b.candidates[:, i] if b.candidates is not None else None, noise, gated)
            actions.append(action)
            refs.append(ref)
        b.ref = torch.stack(refs, dim=1)
        return torch.stack(actions, dim=1)

    # ------------------------------------------------------------------------------------ one agent (ROS node)
    @torch.no_grad()
    def agent_plan(self, arm: str, arm_obs: dict, generator: torch.Generator,
                   received: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """One per-arm agent alone: (C, 7) executed chunk and the message it sends (V5 (16,), V6 (C, 7), else
        None). ``received`` is the partner's latest message; None (missing or stale) is the zero message, which
        FiLM maps to the identity."""
        if self.spec.vla_variant != "per-arm":
            raise ValueError(f"{self.spec.name} is not a per-arm architecture")
        draws = self.config.candidates if self.agents is not None else 1
        refs, prefix, mask = self.vla_draws([arm_images(arm_obs)], [policy_state(arm_obs, self.vla.state_history)],
                                            [self.vla.prompts[arm]], generator, draws, one_pass=True)  # one row
        ref = refs[:, 0]
        if self.agents is None:
            return ref[0].cpu().numpy(), None
        agent = self.agents[arm]
        proprio = self.normalize_proprio([arm_obs["proprio"]])
        z = agent.encoder(prefix, mask, proprio)
        sent = None
        if self.spec.message == "learned":
            sent = agent.message(z, proprio, deterministic=True)[0].cpu().numpy()
        elif self.spec.message == "chunk":
            sent = ref[0].cpu().numpy()
        message = None
        if agent.received_dim:
            message = torch.zeros(1, agent.received_dim, device=self.device)
            if received is not None:
                flat = np.asarray(received, dtype=np.float32).reshape(-1)
                if flat.shape[0] != agent.received_dim:
                    raise ValueError(f"partner message has {flat.shape[0]} values, {self.spec.name} expects "
                                     f"{agent.received_dim}")
                message = torch.as_tensor(flat, device=self.device)[None]
        _, action = agent_chunk(self, agent, z, proprio, ref, message, refs if draws > 1 else None)
        return action[0].cpu().numpy(), sent
