"""Speed of cooperative residual RL: env steps/s, chunk updates/s and the wall time of one seed.

Usage:
    python bench/residual_speed.py --arch V5 --envs 16 --device cuda                   # the shipped per-arm π0
    python bench/residual_speed.py --vla runs/imitation/per-arm-small/checkpoints/step_030000 --envs 16
    python bench/residual_speed.py --tiny --envs 2 --device cpu --image-size 32         # no policy needed (CPU)

Measures, with the real networks (2048-D latent, 512-wide MLPs) and the real simulation (wrist cameras +
agentview at the policy's image size, shaping on):
  - collection: ``--boundaries`` chunk boundaries of all environments (π0 batched over every agent of every
    environment, encoders, actors, one chunk per environment): env steps/s, and the split π0+networks / simulation;
  - learning: ``--updates`` updates on batches of 256 (every agent): chunk updates/s;
  - the short run's wall time (collection + its updates), and one seed: 3,000 chunks at ``--updates-per-chunk`` plus ``--eval-count`` evaluations of ``--eval-episodes``
    episodes (average episode length ``--episode-steps``), projected from the two rates (preparation of the
    demonstration buffer not included: seconds on a GPU).
Prints a table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class BenchConfig:
    """Throughput of residual-RL collection and updates."""

    arch: str = "V5"
    """Architecture (V3-V6)."""
    vla: Path | None = None
    """π0 checkpoint (per-arm; joint for V3); default: the shipped per-arm policy."""
    tiny: bool = False
    """Use a random tiny π0 made on the fly (CPU smoke benchmark when no trained policy exists)."""
    small_random: bool = False
    """Use a random π0 of the shipped default's size ("small" config, 96 px) made on the fly."""
    image_size: int = 32
    """Camera size of the tiny π0 (with --tiny)."""
    sim: bool = True
    """Run the real simulation; --no-sim times the learner side (π0 + networks at a boundary) on synthetic
    observations instead (machines without MuJoCo)."""
    envs: int = 4
    """Parallel simulations (worker processes)."""
    device: str = "auto"
    """cuda | cpu | auto."""
    boundaries: int = 5
    """Chunk boundaries timed (after one warm-up boundary)."""
    updates: int = 20
    """Updates timed (after two warm-up updates)."""
    chunks: int = 3000
    """Chunks of one seed, for the projection."""
    updates_per_chunk: float = 1.0
    """Update-to-data ratio of the projection."""
    eval_count: int = 3
    """Evaluations per seed in the projection."""
    eval_episodes: int = 100
    """Episodes per evaluation in the projection."""
    episode_steps: int = 400
    """Average evaluation episode length (steps) in the projection."""
    latent_dim: int = 2048
    """RL token width."""
    hidden_dim: int = 512
    """MLP width."""
    json_out: Path | None = None
    """Also write the numbers here."""


def random_vla(directory: Path, variant: str, image_size: int, name: str = "tiny") -> Path:
    """A randomly initialized π0 checkpoint (speed only: its actions mean nothing)."""
    from coop_transport.adapters import ARM_PROMPTS, JOINT_PROMPT
    from coop_transport.policy import build_model, get_config, save_checkpoint
    from coop_transport.policy.config import VisionConfig

    setting = "per_arm" if variant == "per-arm" else "joint"
    if name == "tiny":
        config = get_config("tiny", setting=setting, action_horizon=16,
                            vision=VisionConfig(image_size=image_size, patch_size=8, width=32, depth=1, num_heads=2,
                                                mlp_dim=64))
    else:
        config = get_config(name, setting=setting, action_horizon=16)
    state, action = (18, 7) if variant == "per-arm" else (36, 14)
    norm = {"state": {"mean": [0.0] * state, "std": [1.0] * state},
            "actions": {"mean": [0.0] * action, "std": [0.3] * action}}
    prompts = dict(ARM_PROMPTS) if variant == "per-arm" else {"joint": JOINT_PROMPT}
    return save_checkpoint(directory / variant, build_model(config), config, norm, 0,
                           {"variant": variant, "prompts": prompts})


def time_collection(config, system, rc, vla, device) -> dict:
    """Chunks in the real simulation: env steps/s and the π0+networks / simulation split of a boundary."""
    from coop_transport.residual.rollout import Collector, make_pool
    from coop_transport.residual.train import sim_config_for

    rows = {}
    t0 = time.perf_counter()
    pool = make_pool(config.envs, sim_config_for(rc, vla.image_size), rc.gamma)
    rows["pool start (s)"] = time.perf_counter() - t0
    try:
        collector = Collector(system, pool, 0, rc.gamma)
        collector.start()
        collector.step()  # warm-up
        infer_s, total_s, steps = 0.0, 0.0, 0
        original = system.boundary

        def timed_boundary(*args, **kwargs):
            nonlocal infer_s
            s = time.perf_counter()
            out = original(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            infer_s += time.perf_counter() - s
            return out

        system.boundary = timed_boundary
        for _ in range(config.boundaries):
            s = time.perf_counter()
            _, _, n = collector.step()
            total_s += time.perf_counter() - s
            steps += n * rc.chunk
        system.boundary = original
    finally:
        pool.close()
    rows["envs"] = config.envs
    rows["short run: chunks"] = config.boundaries * config.envs
    rows["short run: collection wall (s)"] = total_s
    rows["env steps/s"] = steps / total_s
    rows["boundary π0+networks (ms)"] = 1000 * infer_s / config.boundaries
    rows["boundary simulation (ms)"] = 1000 * (total_s - infer_s) / config.boundaries

    return rows


def time_boundaries(config, system, vla, device) -> dict:
    """π0 + encoders + messages + actors for ``envs`` synthetic observations (no simulation)."""
    from coop_transport.constants import ARMS
    from coop_transport.utils.synthetic import random_arm_observation

    rng = np.random.default_rng(0)
    size = vla.image_size

    def observation():  # still arms: each state history is the present state once
        if system.spec.vla_variant == "per-arm":
            return {a: random_arm_observation(size, rng, history=1) for a in ARMS}
        views = [random_arm_observation(size, rng, history=1) for _ in ARMS]
        joint = np.concatenate([v["proprio"] for v in views])
        return {"joint": {"images": {"robot0_wrist": views[0]["wrist_image"], "robot1_wrist": views[1]["wrist_image"],
                                     "agentview": views[0]["agentview_image"]},
                          "proprio": joint, "proprio_history": joint[None]}}

    observations = [observation() for _ in range(config.envs)]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        system.boundary(observations, g, explore=True, deterministic=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(config.boundaries):
        system.boundary(observations, g, explore=True, deterministic=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"envs": config.envs, "boundary π0+networks (ms)": 1000 * (time.perf_counter() - s) / config.boundaries}


def main(config: BenchConfig) -> dict:
    from coop_transport.pi0_policy import Pi0Policy, resolve_device
    from coop_transport.residual.buffers import ReplayBuffer, RLPDSampler, transition_fields
    from coop_transport.residual.config import ResidualConfig
    from coop_transport.residual.rollout import Collector, make_pool
    from coop_transport.residual.system import ResidualSystem, make_agents
    from coop_transport.residual.train import sim_config_for
    from coop_transport.residual.update import Learner

    device = resolve_device(config.device)
    tmp = tempfile.TemporaryDirectory()
    rc = ResidualConfig(arch=config.arch, device=str(device), latent_dim=config.latent_dim,
                        hidden_dim=config.hidden_dim, progress=False)
    spec = rc.spec
    vla_dir = config.vla
    if config.tiny or config.small_random:
        vla_dir = random_vla(Path(tmp.name), spec.vla_variant, config.image_size,
                             "tiny" if config.tiny else "small")
    vla = Pi0Policy.load(vla_dir, device=str(device))
    system = ResidualSystem(spec, rc, vla, make_agents(spec, rc, vla), device)
    learner = Learner(system, rc)
    rows = {}

    # ---- collection
    if config.sim:
        rows.update(time_collection(config, system, rc, vla, device))
    else:
        rows.update(time_boundaries(config, system, vla, device))

    # ---- updates
    fields = transition_fields(len(spec.agents), rc.latent_dim, spec.proprio_dim, rc.chunk, spec.action_dim)
    buffer = ReplayBuffer(fields, 2048, device)
    g = torch.Generator().manual_seed(0)
    fake = {k: (torch.randint(2, (2048, *s), generator=g) if dt == torch.int64 else torch.randn((2048, *s),
                                                                                                  generator=g))
            for k, (s, dt) in fields.items()}
    buffer.add(fake)
    sampler = RLPDSampler(buffer, buffer, rc.batch_size, rc.demo_fraction)
    for _ in range(2):
        learner.update(sampler.sample(g), g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(config.updates):
        learner.update(sampler.sample(g), g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows["chunk updates/s"] = config.updates / (time.perf_counter() - s)
    if "short run: chunks" in rows:  # the short run's chunks, updated at --updates-per-chunk
        rows["short run: wall incl. updates (s)"] = rows["short run: collection wall (s)"] + (
            rows["short run: chunks"] * config.updates_per_chunk / rows["chunk updates/s"])

    # ---- one seed, projected
    if "env steps/s" not in rows:
        rows["env steps/s"] = float("nan")
    collect = config.chunks * rc.chunk / rows["env steps/s"]
    update = config.chunks * config.updates_per_chunk / rows["chunk updates/s"]
    evaluate = config.eval_count * config.eval_episodes * config.episode_steps / rows["env steps/s"]
    rows["seed: collection (s)"] = collect
    rows["seed: updates (s)"] = update
    rows["seed: evaluations (s)"] = evaluate
    rows["wall time per seed (s)"] = collect + update + evaluate
    rows["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    rows["arch"] = spec.name
    rows["π0"] = "tiny (random)" if config.tiny else str(vla_dir or "shipped default")
    print("| quantity | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if config.json_out:
        config.json_out.write_text(json.dumps(rows, indent=2))
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    import tyro

    main(tyro.cli(BenchConfig))
