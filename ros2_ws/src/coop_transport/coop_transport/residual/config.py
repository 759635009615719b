"""Settings of cooperative residual RL (seed paper §3.3): one frozen dataclass, a docstring on every field.

Defaults are the paper's: C = 10, 2048-D latent, 16-D message, radius ≤ 0.10 starting at 0.05, IQL with τ = 0.6,
AWR with β = 3 and weights capped at 100, Polyak 0.005, clipping 1.0 / 5.0, RLPD batches of 256 (50/50), a ≈10k
demonstration buffer and a 10k FIFO online buffer, λ_sup = 0.1, KL weight 1e-4, 3,000 chunks per seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coop_transport.residual.architectures import ARCHS, get_arch


@dataclass(frozen=True)
class ResidualConfig:
    """Cooperative residual RL on top of frozen π0 policies (seed paper §3.3-3.4)."""

    arch: Literal["B1", "B2", "V3", "V4", "V5", "V6"]
    """Architecture: B1 B2 (π0 only, evaluation) V3 (centralized residual) V4 (per-arm, no message) V5 (+ learned
    16-D message) V6 (+ partner's raw reference chunk)."""
    chunks: int = 3000
    """Chunk transitions collected per seed (all environments together; one chunk = C control steps)."""
    out: Path | None = None
    """Run directory (default runs/residual/<arch>); seeds go to <out>/seed_<k>."""
    seed: int = 0
    """First seed (network init, π0 sampling noise, exploration, training episodes)."""
    seeds: int = 1
    """Number of seeds to run one after the other: seed, seed+1, ... (the paper: 4)."""
    vla: Path | None = None
    """Per-arm π0 checkpoint directory (default: the shipped per-arm policy, pi0_policy.default_policy_dir())."""
    vla_joint: Path | None = None
    """Joint π0 checkpoint directory (needed by B2 and V3)."""
    data: Path = Path("data/transport_scripted.hdf5")
    """Demonstrations with images for the demonstration buffer (ours or robomimic's Transport, rendered)."""
    envs: int = 8
    """Parallel simulations (one worker process each; 0 runs one simulation inside the learner process)."""
    ray_address: str | None = None
    """Ray cluster address ('auto' or host:port): the simulations run as Ray actors there instead of local
    processes (same results for the same seeds)."""
    device: str = "auto"
    """Device of π0 and of the RL networks: cuda | cpu | auto."""
    threads: int = 0
    """torch CPU threads in the learner (0: torch's default)."""

    # ---- chunks, recipe, episodes
    chunk: int = 10
    """C: control steps per chunk; the residual is a C x 7 (V3: C x 14) delta on the π0 reference chunk."""
    baseline_chunk: int | None = None
    """B1/B2: executed chunk length (default the recipe's: 10 for the per-arm π0, 25 for the joint one)."""
    num_samples: int = 4
    """Recipe N: π0 samples averaged into the reference chunk (mean-of-N)."""
    clip_sigma: float | None = 2.0
    """Recipe k: clip the reference to mean ± k·std of the demonstration actions (None: off)."""
    horizon: int = 500
    """Control steps per episode."""
    gamma: float = 0.99
    """Per-step discount; a k-step chunk transition bootstraps with gamma**k (also the shaping discount)."""
    shaped_reward: bool = True
    """Add the potential-based shaping term to the sparse reward during training (never in evaluation)."""

    # ---- networks
    latent_dim: int = 2048
    """Width of the RL token z (the encoder's output)."""
    encoder_width: int = 256
    """Token width inside the RL token encoder."""
    encoder_layers: int = 2
    """Transformer layers of the RL token encoder."""
    encoder_heads: int = 4
    """Attention heads of the RL token encoder."""
    prefix_source: Literal["embeddings", "hidden"] = "embeddings"
    """π0 prefix the encoder reads: the prefix input embeddings, or the VLM's final prefix hidden states."""
    hidden_dim: int = 512
    """Width of the actor, critic and value MLPs."""
    message_dim: int = 16
    """Width of the learned message (V5)."""
    max_radius: float = 0.10
    """Upper bound of the learned residual scale s = max_radius·sigmoid(ρ) (per action dimension)."""
    init_radius: float = 0.05
    """Initial residual scale (ρ0 = logit(init_radius / max_radius); 0.05 of 0.10 gives ρ0 = 0)."""
    gripper_radius: float | None = None
    """Bound of the residual scale in the gripper dimensions (None: max_radius, the paper's). robosuite's gripper
    follows the sign of its command, and the mean-of-4 reference's gripper value sits at ±0.5 or ±1 on all but a
    few steps, so under the 0.10 bound the residual cannot delay or advance a grasp or a release; 2 lets it set the
    gripper command anywhere in [-1, 1]. The gripper dimensions start at the same fraction of their bound as the
    others (init_radius / max_radius)."""
    explore_std: float = 0.5
    """Exploration noise added to Δ before the tanh while collecting (the bound still holds); 0 disables."""
    gripper_explore_std: float | None = None
    """Exploration noise of the gripper rows (None: explore_std). With ``gripper_radius`` 2 the noise times a radius
    near 1.3 moves a gripper command of ±0.5 across zero at about one step in five (computed at Δ = 0), and the last
    training episodes of the twenty-second session's runs mostly failed; 0 explores the arm rows alone."""
    gate_margin: float | None = None
    """Critic gate of evaluation and deployment (not of training's exploration): an agent executes its residual
    chunk only where both of its critics rate it above π0's reference chunk by more than this margin, and the
    reference chunk otherwise (None: always the residual, the paper). A residual fitted to critics learned from a
    few dozen episodes lowered success in every measured run; the gate falls back to π0 wherever the critics do not
    agree that the change helps. ``--mode eval --gate-margin M`` evaluates a trained run gated."""
    candidates: int = 1
    """Reference chunks π0 draws per agent and boundary at evaluation and deployment (not in training's
    exploration); the actor proposes an executed chunk over each, and the agent executes the one its critics rate
    highest (the lower of the twin critics' values). 1: one reference, the paper. π0's episodes succeed or fail
    with its sampling noise (two noise streams over one set of reset seeds agreed on 63 of 100 episodes), and a
    critic choosing among draws of π0 itself stays on the distribution it learned from, unlike the residual's own
    change. With ``gate_margin`` the gate then compares the chosen chunk with its own reference. V6 agents send
    their first draw's reference (the partner's choice depends on what it receives). ``--mode eval --candidates K``
    evaluates a trained run this way."""

    # ---- objective
    expectile: float = 0.6
    """IQL expectile τ of the value loss."""
    beta: float = 3.0
    """AWR inverse temperature β: weights min(exp(β·A), max_weight)."""
    max_weight: float = 100.0
    """Cap of the AWR weights."""
    advantage_norm: bool = False
    """Divide each batch's advantages by their standard deviation before the AWR exponent. Off: the paper's raw
    A, which left the weights at 0.99-1.00 (advantages ~1e-3) in the tenth session's 3,000-chunk runs."""
    polyak: float = 0.005
    """Target critic update rate."""
    lr: float = 3e-4
    """Adam learning rate of every network."""
    critic_grad_clip: float = 1.0
    """Gradient-norm clip of the critics and the value."""
    actor_grad_clip: float = 5.0
    """Gradient-norm clip of the actor."""
    lambda_sup: float = 0.1
    """V5: weight of the message supervision (sender's phase CE, gripper BCE, readiness BCE, pose MSE)."""
    kl_weight: float = 1e-4
    """V5: weight of KL(m || N(0, I)) on the message distribution."""

    # ---- data
    batch_size: int = 256
    """Transitions per update."""
    demo_fraction: float = 0.5
    """Share of each batch from the demonstration buffer (RLPD: 0.5)."""
    online_capacity: int = 10_000
    """FIFO online buffer size in chunk transitions."""
    demo_capacity: int = 10_000
    """Most demonstration chunk transitions kept (the paper: ≈10k)."""
    demo_stride: int | None = None
    """Steps between demonstration chunk starts (default C: non-overlapping chunks)."""
    demo_actions: Literal["executed", "expert"] = "executed"
    """Actions of the demonstration transitions: executed (what ran, the expert's exploration noise included) or
    expert (its noise-free labels, which the shipped π0 prior was trained on; files without them are refused). The
    actor regresses onto these on the demonstration half of each batch, where executed rotations differ from the
    labels by about 0.04, nearly all of their distance to π0's reference (fifteenth session). Measured since: V4
    solves 36% over this prior either way (sixteenth session), so the default stays."""
    actor_data: Literal["batch", "online"] = "batch"
    """Rows of each batch the actor's AWR loss reads: the whole RLPD batch (the paper), or only its online half. The
    value and the critics learn from the whole batch either way. With "batch" and AWR weights near 1, the
    demonstration half has the actor regress onto the demonstrations' departures from π0's reference, fitted on
    demonstration states and applied on the policy's own (fifteenth session); "online" keeps the demonstrations as
    value data and lets the actor move only towards what its own exploration found better."""
    updates_per_chunk: float = 1.0
    """Gradient updates per collected chunk transition (update-to-data ratio)."""
    learning_starts: int = 256
    """Online chunk transitions collected before updates begin."""
    pretrain_updates: int = 0
    """Updates on demonstration-only batches before collection (IQL offline warm start; 0: none)."""
    encoder_steps: int = 1000
    """Steps of RL-token encoder pre-training (reconstruction of the π0 prefix) before RL; then frozen."""
    encoder_batch: int = 64
    """Batch size of the encoder pre-training."""
    encoder_pool: int = 8192
    """π0 prefixes (per agent) kept in memory for encoder pre-training (reservoir sample of the demos)."""
    inference_batch: int = 128
    """Observations per π0 call while building the demonstration buffer."""

    # ---- evaluation and checkpoints
    eval_every: int = 1000
    """Chunks between evaluations; each writes a policy checkpoint, the best by success is kept (0: final only)."""
    eval_episodes: int = 100
    """Episodes per evaluation, from reset seeds 1..eval_episodes."""
    save_every: int = 250
    """Chunks between resumable training-state saves."""
    log_every: int = 50
    """Chunks between rows of the training log."""
    resume: bool = True
    """Continue from <run>/train_state if it exists."""
    stop_after_s: float | None = None
    """Save the training state and stop once this many seconds (wall clock, counted from the start of the command,
    across its seeds, loading included) have passed; rerunning the same command resumes. For machines that limit a
    job's time."""
    mode: Literal["train", "eval", "ablation", "probes"] = "train"
    """train (then evaluate), eval (the best checkpoint again), ablation (Table 2 recipe ladder on the best
    checkpoint), probes (communication probes, V5/V6)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        get_arch(self.arch)  # clear error listing the six
        bad = []
        for name in ("chunks", "chunk", "num_samples", "horizon", "latent_dim", "encoder_width", "encoder_layers",
                     "encoder_heads", "hidden_dim", "message_dim", "batch_size", "online_capacity", "demo_capacity",
                     "encoder_batch", "encoder_pool", "inference_batch", "eval_episodes", "save_every", "log_every",
                     "seeds"):
            if getattr(self, name) < 1:
                bad.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.stop_after_s is not None and self.stop_after_s <= 0:
            bad.append(f"stop_after_s={self.stop_after_s} (must be > 0)")
        if not 0 < self.init_radius < self.max_radius:
            bad.append(f"init_radius={self.init_radius} (must lie in (0, max_radius={self.max_radius}))")
        if self.gripper_radius is not None and not (math.isfinite(self.gripper_radius) and self.gripper_radius > 0):
            bad.append(f"gripper_radius={self.gripper_radius} (must be positive and finite, or None)")
        if self.gripper_radius is not None and not get_arch(self.arch).residual:
            bad.append(f"gripper_radius={self.gripper_radius}: {self.arch} has no residual to bound")
        if not 0.0 < self.expectile < 1.0:
            bad.append(f"expectile={self.expectile} (must lie in (0, 1))")
        if not 0.0 <= self.demo_fraction <= 1.0:
            bad.append(f"demo_fraction={self.demo_fraction} (must lie in [0, 1])")
        if not 0.0 < self.gamma <= 1.0:
            bad.append(f"gamma={self.gamma} (must lie in (0, 1])")
        if self.envs < 0 or self.updates_per_chunk < 0 or self.eval_every < 0 or self.explore_std < 0:
            bad.append("envs, updates_per_chunk, eval_every and explore_std must be >= 0")
        if self.gripper_explore_std is not None and not (math.isfinite(self.gripper_explore_std)
                                                         and self.gripper_explore_std >= 0):
            bad.append(f"gripper_explore_std={self.gripper_explore_std} (must be >= 0 and finite, or None)")
        if self.encoder_width % self.encoder_heads:
            bad.append(f"encoder_width={self.encoder_width} is not divisible by encoder_heads={self.encoder_heads}")
        if self.gate_margin is not None and not math.isfinite(self.gate_margin):
            bad.append(f"gate_margin={self.gate_margin} (must be finite or None)")
        if self.gate_margin is not None and not get_arch(self.arch).residual:
            bad.append(f"gate_margin={self.gate_margin}: {self.arch} has no residual and no critics to gate it")
        if self.candidates < 1:
            bad.append(f"candidates={self.candidates} (must be >= 1)")
        if self.candidates > 1 and not get_arch(self.arch).residual:
            bad.append(f"candidates={self.candidates}: {self.arch} has no critics to choose among π0's draws")
        if self.clip_sigma is not None and self.clip_sigma <= 0:
            bad.append(f"clip_sigma={self.clip_sigma} (must be positive or None)")
        if bad:
            raise ValueError("invalid ResidualConfig: " + "; ".join(bad))

    @property
    def spec(self):
        return get_arch(self.arch)

    @property
    def run_root(self) -> Path:
        return self.out or Path("runs/residual") / self.arch

    def run_dir(self, seed: int) -> Path:
        return self.run_root / f"seed_{seed}"

    @property
    def stride(self) -> int:
        return self.demo_stride or self.chunk

    def replace(self, **changes) -> "ResidualConfig":
        return dataclasses.replace(self, **changes)


def config_to_json(config: ResidualConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def config_from_json(data: dict) -> ResidualConfig:
    fields = {f.name: f for f in dataclasses.fields(ResidualConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown ResidualConfig fields {unknown}")
    values = dict(data)
    for key in ("out", "vla", "vla_joint", "data"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return ResidualConfig(**values)


__all__ = ["ARCHS", "ResidualConfig", "config_from_json", "config_to_json"]
