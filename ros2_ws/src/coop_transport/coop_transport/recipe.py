"""The inference recipe: chunk length, mean-of-N sampling and per-dimension ±kσ clipping (seed paper §3.5).

A chunked policy predicts H actions at once; the recipe decides what is executed:
- **chunk length** C: execute the first C predicted actions, then re-plan from a fresh observation;
- **mean-of-N**: draw N samples of the chunk in one batched call and average them (flow matching is stochastic;
  averaging independent 7-D samples denoises, though it can blur distinct modes of a 14-D joint chunk);
- **±kσ clipping**: clip each action dimension to mean ± k·std of the demonstration actions, which suppresses the
  rare large-magnitude outliers that otherwise compound in open-loop execution. Counters record how often it fired.
  By default a bound never cuts inside the range the demonstrations span (it is widened to their min / max): on
  this project's demonstrations, plain ±2σ cut 18% of executed actions, among them robot1's wrist turns at
  the trash grasp, and took the retrained per-arm policy from 15% to 3% success (README). Statistics without a
  min / max (openpi's keep mean, std and quantiles) fall back to plain ±kσ, with a warning at load.
- **gripper latch** (this project's, off by default): the gripper command executed as a crisp ±1 with hysteresis.
- **temporal ensembling** (ACT's, Zhao et al. 2023; off by default): every step's action is the weighted mean of what
  each still-valid chunk predicted for that step, rather than what the latest chunk alone predicted; with C = 1 the
  policy re-plans every step and still moves smoothly.

Each intervention is switchable, so the paper's Table 2 ablation is a matter of configuration. Defaults are the
paper's final per-arm recipe (C=10, N=4, ±2σ); the joint policy's chunk is 25 (``RecipeConfig.joint()``).
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from coop_transport.constants import ARM_ACTION_DIM, GRIPPER_INDEX


@dataclass(frozen=True)
class RecipeConfig:
    """Inference-time settings applied on top of any chunk sampler."""

    execute_steps: int = 10
    """C: predicted actions executed before re-planning (chunk length)."""
    num_samples: int = 4
    """N: samples drawn in one batched forward pass and averaged (1 disables mean-of-N)."""
    clip_sigma: float | None = 2.0
    """k: clip every action dimension to mean ± k·std of the demonstration actions (None disables clipping)."""
    clip_beyond_demonstrated: bool = True
    """Widen each ±kσ bound to the demonstrations' min / max where it falls inside them, so that clipping removes
    only values beyond anything demonstrated (the seed paper's outliers, 1.8-2.1x the nominal range). Dimensions
    with a few large legitimate values (a wrist turn) have a small σ; plain ±kσ (False) cuts those too."""
    gripper_latch: float | None = None
    """h: execute the gripper command as ±1, switching to closed when the value rises above +h and to open when it
    falls below -h, else keeping the last state (None: the value as predicted). The demonstrator commands a crisp
    ±1; averaging N samples that disagree near a grasp or a release gives values near 0, which half-open a hand
    that holds something (seen as drops of a carried payload in closed loop)."""

    temporal_ensemble: float | None = None
    """m: ACT's temporal ensembling. A new chunk is still planned every C steps, but every chunk is kept for its
    whole horizon H, and the executed action for step t is the mean of every kept chunk's prediction for t, weighted
    exp(-m·i) with i = 0 for the oldest of them (ACT's rule: m > 0 favours older predictions, m = 0 weighs all alike;
    ACT uses 0.01). Clipping and the gripper latch apply to the ensembled action. None: execute the latest chunk's
    actions as they are."""

    def __post_init__(self):
        if self.execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {self.execute_steps}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.clip_sigma is not None and not self.clip_sigma > 0:
            raise ValueError(f"clip_sigma must be positive or None, got {self.clip_sigma}")
        if self.gripper_latch is not None and not 0.0 <= self.gripper_latch < 1.0:
            raise ValueError(f"gripper_latch must lie in [0, 1) or be None, got {self.gripper_latch}")
        if self.temporal_ensemble is not None and not (np.isfinite(self.temporal_ensemble)
                                                       and self.temporal_ensemble >= 0):
            raise ValueError(f"temporal_ensemble must be a finite m >= 0 or None, got {self.temporal_ensemble}")

    @staticmethod
    def per_arm() -> "RecipeConfig":
        return RecipeConfig(execute_steps=10, num_samples=4, clip_sigma=2.0)

    @staticmethod
    def joint() -> "RecipeConfig":
        return RecipeConfig(execute_steps=25, num_samples=4, clip_sigma=2.0)

    @staticmethod
    def baseline(execute_steps: int = 10) -> "RecipeConfig":
        """No inference-time interventions: one sample, no clipping (Table 2's first row)."""
        return RecipeConfig(execute_steps=execute_steps, num_samples=1, clip_sigma=None)

    def with_(self, **changes) -> "RecipeConfig":
        return replace(self, **changes)


# Table 2 of the seed paper as cumulative configurations.
ABLATION_LADDER: dict[str, RecipeConfig] = {
    "baseline (chunk 10, N=1, no clip)": RecipeConfig(execute_steps=10, num_samples=1, clip_sigma=None),
    "+ mean-of-N=4": RecipeConfig(execute_steps=10, num_samples=4, clip_sigma=None),
    "+ ±2σ clipping": RecipeConfig(execute_steps=10, num_samples=4, clip_sigma=2.0),
    "+ chunk 25": RecipeConfig(execute_steps=25, num_samples=4, clip_sigma=2.0),
}


@dataclass
class ClipCounters:
    """How often clipping fired: per executed action (any dimension) and per value."""

    actions: int = 0
    clipped_actions: int = 0
    values: int = 0
    clipped_values: int = 0
    per_dim: list[int] = field(default_factory=list)

    @property
    def action_rate(self) -> float:
        return self.clipped_actions / self.actions if self.actions else 0.0

    def to_dict(self) -> dict:
        return {"actions": self.actions, "clipped_actions": self.clipped_actions, "values": self.values,
                "clipped_values": self.clipped_values, "action_rate": self.action_rate, "per_dim": self.per_dim}

    def merge(self, other: "ClipCounters") -> "ClipCounters":
        dims = max(len(self.per_dim), len(other.per_dim))
        pad = lambda v: v + [0] * (dims - len(v))  # noqa: E731
        return ClipCounters(self.actions + other.actions, self.clipped_actions + other.clipped_actions,
                            self.values + other.values, self.clipped_values + other.clipped_values,
                            [a + b for a, b in zip(pad(self.per_dim), pad(other.per_dim))])


# A chunk sampler maps an observation and a sample count N to (N, H, D) actions in the environment's units.
ChunkSampler = Callable[[dict, int], np.ndarray]


def clip_bounds(config: RecipeConfig, action_mean: np.ndarray | None, action_std: np.ndarray | None,
                action_min: np.ndarray | None = None, action_max: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per action dimension of the recipe's clipping: mean ± k·std, widened to the demonstrated
    [min, max] when ``config.clip_beyond_demonstrated`` and the statistics have them (``demonstrated_range`` warns
    when a policy's do not: its clipping is then the plain ±k·std)."""
    if action_mean is None or action_std is None:
        raise ValueError("clipping needs the demonstration action mean and std")
    lo = np.asarray(action_mean, np.float64) - config.clip_sigma * np.asarray(action_std, np.float64)
    hi = np.asarray(action_mean, np.float64) + config.clip_sigma * np.asarray(action_std, np.float64)
    if config.clip_beyond_demonstrated and action_min is not None and action_max is not None:
        lo = np.minimum(lo, np.asarray(action_min, np.float64))
        hi = np.maximum(hi, np.asarray(action_max, np.float64))
    return lo, hi


def mean_chunk(samples: np.ndarray, execute_steps: int) -> np.ndarray:
    """(N, H, D) sampled chunks -> their (H, D) float64 mean. Non-finite samples raise ValueError (they must never
    reach a robot), as does a horizon H shorter than the ``execute_steps`` to be executed of it."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3:
        raise ValueError(f"expected samples of shape (N, H, D), got {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise ValueError("policy produced NaN or inf actions")
    if execute_steps > samples.shape[1]:
        raise ValueError(f"execute_steps={execute_steps} exceeds the policy's horizon {samples.shape[1]}")
    return samples.mean(axis=0)


def clip_actions(actions: np.ndarray, config: RecipeConfig, action_mean: np.ndarray | None,
                 action_std: np.ndarray | None, counters: ClipCounters | None = None,
                 action_min: np.ndarray | None = None, action_max: np.ndarray | None = None) -> np.ndarray:
    """(C, D) actions clipped as the recipe says (``clip_bounds``; unchanged when clipping is off), counted in
    ``counters``."""
    if config.clip_sigma is not None:
        lo, hi = clip_bounds(config, action_mean, action_std, action_min, action_max)
        clipped = np.clip(actions, lo, hi)
        if counters is not None:
            fired = clipped != actions  # (C, D)
            if not counters.per_dim:
                counters.per_dim = [0] * actions.shape[1]
            counters.actions += actions.shape[0]
            counters.clipped_actions += int(fired.any(axis=1).sum())
            counters.values += fired.size
            counters.clipped_values += int(fired.sum())
            counters.per_dim = [c + int(n) for c, n in zip(counters.per_dim, fired.sum(axis=0))]
        return clipped
    if counters is not None:
        counters.actions += actions.shape[0]
        counters.values += actions.size
    return actions


def reduce_chunk(samples: np.ndarray, config: RecipeConfig, action_mean: np.ndarray | None,
                 action_std: np.ndarray | None, counters: ClipCounters | None = None,
                 action_min: np.ndarray | None = None, action_max: np.ndarray | None = None) -> np.ndarray:
    """(N, H, D) sampled chunks -> (C, D) actions to execute: average the N samples, keep the first C steps,
    clip (``clip_bounds``). Non-finite samples raise ValueError (they must never reach a robot)."""
    mean = mean_chunk(samples, config.execute_steps)
    chunk = clip_actions(mean[: config.execute_steps], config, action_mean, action_std, counters, action_min,
                         action_max)
    return chunk.astype(np.float32)


def demonstrated_range(norm_stats: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(min, max) float32 of the demonstration actions from a checkpoint's or manifest's normalization
    statistics; (None, None), with a warning, where they were not recorded (statistics from elsewhere, e.g.
    openpi's, keep mean / std / quantiles only): clipping is then the plain ±k·std."""
    actions = norm_stats.get("actions", {})
    if actions.get("min") is None or actions.get("max") is None:
        warnings.warn("the policy's normalization statistics have no action min / max: the recipe clips at plain "
                      "mean ± k·std (clip_beyond_demonstrated needs the demonstrated range)", stacklevel=2)
        return None, None
    return np.asarray(actions["min"], dtype=np.float32), np.asarray(actions["max"], dtype=np.float32)


def demonstrated_action_stats(policy) -> tuple:
    """(mean, std, min, max) of a policy's demonstration actions; min / max are None where its statistics lack
    them (clipping is then the plain ±k·std)."""
    return (policy.action_mean, policy.action_std, getattr(policy, "action_min", None),
            getattr(policy, "action_max", None))


class ChunkedActor:
    """Executes a chunk sampler under the recipe: one action per control step, re-planning every C steps."""

    def __init__(self, sampler: ChunkSampler, config: RecipeConfig = RecipeConfig(),
                 action_mean: np.ndarray | None = None, action_std: np.ndarray | None = None,
                 action_min: np.ndarray | None = None, action_max: np.ndarray | None = None):
        self.sampler = sampler
        self.config = config
        as64 = lambda x: None if x is None else np.asarray(x, dtype=np.float64)  # noqa: E731
        self.action_mean, self.action_std = as64(action_mean), as64(action_std)
        self.action_min, self.action_max = as64(action_min), as64(action_max)
        self.counters = ClipCounters()
        self._queue: deque[np.ndarray] = deque()
        self.chunks_planned = 0
        self._gripper_state: np.ndarray | None = None  # the latched command per gripper (gripper_latch)
        # temporal_ensemble: (first step, (H, D) mean chunk) of every chunk still covering a coming step
        self._kept: deque[tuple[int, np.ndarray]] = deque()
        self._step = 0  # control steps since reset

    @classmethod
    def for_arm(cls, policy, arm: str, config: RecipeConfig) -> "ChunkedActor":
        """One arm of a per-arm policy (anything with ``sample_arm(obs, arm, n)`` and the demonstration
        ``action_mean`` / ``action_std`` / ``action_min`` / ``action_max``: the PyTorch policy or an exported
        backend)."""
        return cls(lambda obs, n: policy.sample_arm(obs, arm, n), config, *demonstrated_action_stats(policy))

    @classmethod
    def for_joint(cls, policy, config: RecipeConfig) -> "ChunkedActor":
        """A joint (14-D) policy with ``sample_joint(obs, n)``."""
        return cls(lambda obs, n: policy.sample_joint(obs, n), config, *demonstrated_action_stats(policy))

    def reset(self) -> None:
        self._queue.clear()
        self._gripper_state = None
        self._kept.clear()
        self._step = 0

    def plan(self, obs: dict) -> np.ndarray:
        """Sample N chunks for ``obs`` and reduce them to the (C, D) actions to execute."""
        if self.config.temporal_ensemble is not None:
            raise ValueError("with temporal_ensemble every step's action depends on several chunks: run the recipe "
                             "step by step with ChunkedActor.act, not chunk by chunk with plan")
        samples = self.sampler(obs, self.config.num_samples)
        self.chunks_planned += 1
        chunk = reduce_chunk(samples, self.config, self.action_mean, self.action_std, self.counters,
                             self.action_min, self.action_max)
        if self.config.gripper_latch is not None:
            chunk = self._latch_grippers(chunk)
        return chunk

    def _latch_grippers(self, chunk: np.ndarray) -> np.ndarray:
        """Replace each arm's gripper column (the last of every 7) by the latched ±1 command, step by step."""
        h = self.config.gripper_latch
        columns = np.arange(GRIPPER_INDEX, chunk.shape[1], ARM_ACTION_DIM)
        state = self._gripper_state
        if state is None:  # the first command of an episode: its sign (open at exactly 0)
            state = np.where(chunk[0, columns] > 0, 1.0, -1.0)
        out = chunk.copy()
        for t in range(len(out)):
            value = out[t, columns]
            state = np.where(value > h, 1.0, np.where(value < -h, -1.0, state))
            out[t, columns] = state
        self._gripper_state = state
        return out

    def act(self, obs: dict | None) -> np.ndarray:
        """The action for this control step; re-plans from ``obs`` when the current chunk is used up (``needs_plan``:
        callers may pass None at the other steps, and skip making the observation)."""
        if obs is None and self.needs_plan:
            raise ValueError("this step re-plans: it needs an observation (see needs_plan)")
        if self.config.temporal_ensemble is not None:
            return self._act_ensembled(obs)
        if not self._queue:
            self._queue.extend(self.plan(obs))
        return self._queue.popleft()

    def _act_ensembled(self, obs: dict) -> np.ndarray:
        """temporal_ensemble: plan every C steps, keep each chunk for its horizon, execute the weighted mean of the
        kept chunks' predictions for this step (oldest first, weights exp(-m·i)), then clip and latch it."""
        t = self._step
        if self.needs_plan:
            self._kept.append((t, mean_chunk(self.sampler(obs, self.config.num_samples), self.config.execute_steps)))
            self.chunks_planned += 1
        while self._kept and t - self._kept[0][0] >= len(self._kept[0][1]):
            self._kept.popleft()  # expired: it predicted no action for this step or later
        predictions = np.stack([chunk[t - start] for start, chunk in self._kept])  # oldest first
        weights = np.exp(-self.config.temporal_ensemble * np.arange(len(predictions)))
        action = (weights[:, None] * predictions).sum(0) / weights.sum()
        action = clip_actions(action[None], self.config, self.action_mean, self.action_std, self.counters,
                              self.action_min, self.action_max)
        if self.config.gripper_latch is not None:
            action = self._latch_grippers(action)
        self._step += 1
        return action[0].astype(np.float32)

    @property
    def needs_plan(self) -> bool:
        if self.config.temporal_ensemble is not None:  # C steps after the newest kept chunk (C <= H: still kept)
            return not self._kept or self._step - self._kept[-1][0] >= self.config.execute_steps
        return not self._queue
