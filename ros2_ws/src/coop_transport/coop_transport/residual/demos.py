"""The demonstration buffer and the RL-token encoder pre-training, from a demonstration file and the frozen π0.

``build_demo_buffer`` cuts every demonstration into chunks (starts t = 0, stride, 2 stride, ...; stride C by
default, ≈10k chunk transitions for 200 demonstrations), and for every chunk start:

- runs the frozen π0 on the recorded observation (images and proprioception at t, the same recipe as online) to get
  the reference chunk ``ref`` and the prefix tokens;
- takes the demonstrated (C, 14) actions as ``action`` (the executed ones, or the expert's noise-free labels with
  ``demo_actions="expert"``) and the chunk's reward: the sparse rewards discounted over the chunk plus, with
  shaping, the telescoped potential term γ^k Φ(s_{t+k}) - Φ(s_t) (the per-step shaping terms sum to exactly this;
  Φ comes from the saved MuJoCo states, evaluated in the environment workers);
- ``done`` = 1 for the chunk that ends a successful demonstration; chunks whose next state has no recorded images
  (the end of an unsuccessful demonstration) are dropped.

The encoder of each agent is pre-trained first, by reconstructing π0's prefix (and the proprioception) from z on a
reservoir sample of the demonstrations' prefixes, then frozen; the buffer stores z.
"""

from __future__ import annotations

import numpy as np
import torch

from coop_transport.constants import AGENTVIEW_CAMERA, ARMS, PROPRIO_DIM, WRIST_CAMERA, image_key
from coop_transport.residual.buffers import ReplayBuffer, transition_fields
from coop_transport.residual.networks import reconstruction_loss

WRIST_KEYS = {arm: image_key(WRIST_CAMERA[arm]) for arm in ARMS}
AGENTVIEW_KEY = image_key(AGENTVIEW_CAMERA)


def _rows_obs(traj, t_idx: np.ndarray, variant: str, history_steps: int = 1) -> list[dict]:
    """Observations at steps ``t_idx`` of a joint trajectory in ``ResidualSystem.rows``' pre-split format, with the
    latest ``history_steps`` states (``proprio_history``) for a π0 prior that sees earlier states."""
    missing = [k for k in (*WRIST_KEYS.values(), AGENTVIEW_KEY) if k not in traj.images]
    if missing:
        raise ValueError(f"demonstration {traj.demo} has no {missing} images; render them at the π0 policy's "
                         f"image size first (python training/demos.py render ...)")
    images = {k: np.asarray(traj.images[k][t_idx]) for k in (*WRIST_KEYS.values(), AGENTVIEW_KEY)}
    out = []
    for i, t in enumerate(t_idx):
        recent = traj.proprio[t::-1][:history_steps]  # the states up to t, newest first (a π0 state history)
        if variant == "per-arm":
            out.append({arm: {"wrist_image": images[WRIST_KEYS[arm]][i], "agentview_image": images[AGENTVIEW_KEY][i],
                              "proprio": traj.proprio[t, PROPRIO_DIM * a:PROPRIO_DIM * (a + 1)],
                              "proprio_history": recent[:, PROPRIO_DIM * a:PROPRIO_DIM * (a + 1)]}
                        for a, arm in enumerate(ARMS)})
        else:
            out.append({"joint": {"images": {"robot0_wrist": images[WRIST_KEYS["robot0"]][i],
                                             "robot1_wrist": images[WRIST_KEYS["robot1"]][i],
                                             "agentview": images[AGENTVIEW_KEY][i]},
                                  "proprio": traj.proprio[t], "proprio_history": recent}})
    return out


def _demo_arrays(path, name: str, T: int, success: bool) -> dict:
    """Sparse rewards (T,), states (T, S) and the final state of one demonstration."""
    from coop_transport.data import hdf5_format as fmt

    with fmt.open_hdf5(path) as f:
        g = f[fmt.DATA][name]
        rewards = g[fmt.REWARDS][()] if fmt.REWARDS in g else np.eye(T)[-1] * float(success)
        states = g[fmt.STATES][()] if fmt.STATES in g else None
        final = np.asarray(g.attrs["final_state"]) if "final_state" in g.attrs else None
    return {"rewards": np.asarray(rewards, dtype=np.float64), "states": states, "final_state": final}


def _labels_at(traj, t: int) -> dict[str, np.ndarray]:
    lab = traj.labels
    if not lab:
        return {"phase": np.zeros(2, np.int64), "gripper": np.zeros(2, np.float32), "ready": np.zeros(2, np.float32),
                "pose": np.zeros((2, 6), np.float32)}
    return {"phase": np.array([lab[f"{a}_phase"][t] for a in ARMS], np.int64),
            "gripper": np.array([lab[f"{a}_gripper_closed"][t] for a in ARMS], np.float32),
            "ready": np.array([lab[f"{a}_ready"][t] for a in ARMS], np.float32),
            "pose": np.stack([lab[f"{a}_pose"][t] for a in ARMS]).astype(np.float32)}


def plan_demo_chunks(T: int, chunk: int, stride: int, success: bool) -> list[tuple[int, int, bool]]:
    """(start t, executed steps k, done) of every usable chunk of a T-step demonstration."""
    out = []
    for t in range(0, T, stride):
        k = min(chunk, T - t)
        ends = t + k == T
        if ends and not success:
            continue  # no observation after the last step: cannot bootstrap, nothing to learn the end from
        if k < chunk and not ends:
            continue
        out.append((t, k, bool(ends and success)))
    return out


def pretrain_encoders(system, pools: dict[str, dict[str, torch.Tensor]], config, generator: torch.Generator,
                      progress: bool = False) -> dict[str, float]:
    """Train each agent's encoder + decoder to reconstruct its π0 prefixes; returns the final losses."""
    from tqdm import tqdm

    losses = {}
    for name, pool in pools.items():
        agent = system.agents[name]
        params = list(agent.encoder.parameters()) + list(agent.decoder.parameters())
        optimizer = torch.optim.Adam(params, lr=config.lr)
        n = pool["prefix"].shape[0]
        recent = []
        for _ in tqdm(range(config.encoder_steps), desc=f"encoder {name}", disable=not progress, leave=False):
            idx = torch.randint(n, (min(config.encoder_batch, n),), generator=generator)
            prefix = pool["prefix"][idx].to(system.device).float()
            mask = pool["mask"][idx].to(system.device)
            proprio = pool["proprio"][idx].to(system.device)
            loss = reconstruction_loss(agent.decoder, agent.encoder(prefix, mask, proprio), prefix, mask, proprio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            recent.append(loss.item())
        losses[name] = float(np.mean(recent[-20:])) if recent else float("nan")
        agent.encoder.requires_grad_(False)
    return losses


def build_demo_buffer(system, config, pool, generator: torch.Generator, progress: bool = False
                      ) -> tuple[ReplayBuffer, dict]:
    """Pre-train the encoders on the demonstrations and fill the demonstration buffer (see the module docstring)."""
    from tqdm import tqdm

    from coop_transport.data.dataset import load_demonstrations

    spec, C, gamma = system.spec, config.chunk, config.gamma
    n_agents = len(system.agent_names)
    with load_demonstrations(config.data, action_labels=config.demo_actions) as demos:
        names = demos.demo_names("train") if "train" in demos.masks else demos.demo_names()
        trajs = [t for t in demos.joint_trajectories(None, images="lazy") if t.demo in set(names)]
        if spec.message == "learned" and not all(t.labels for t in trajs):
            raise ValueError(f"{config.data} has no per-step labels: V5's message supervision needs them "
                             "(files from training/demos.py have them)")
        # ---- which chunks, and which observations they need (chunk starts and next states)
        plans, needed = [], []
        for d, traj in enumerate(trajs):
            arrays = _demo_arrays(config.data, traj.demo, len(traj), bool(traj.success))
            chunks = plan_demo_chunks(len(traj), C, config.stride, bool(traj.success))
            plans.append((traj, arrays, chunks))
            times = sorted({t for t, _, _ in chunks} | {t + k for t, k, done in chunks if not done})
            needed += [(d, t) for t in times]
        if not needed:
            raise ValueError(f"{config.data}: no usable demonstration chunks of {C} steps")

        # ---- pass 1: π0 reference chunks at every needed observation, reservoir of prefixes for the encoders
        ref_of: dict[tuple[int, int], torch.Tensor] = {}
        reservoir = {a: {"prefix": [], "mask": [], "proprio": []} for a in system.agent_names}
        seen = 0
        batch = max(1, config.inference_batch // n_agents)
        bar = tqdm(total=len(needed), desc="demo buffer: π0", disable=not progress, leave=False)
        for start in range(0, len(needed), batch):
            keys = needed[start:start + batch]
            obs = _gather(plans, keys, spec.vla_variant, system.vla.state_history.span + 1)
            images, states, prompts = system.rows(obs)
            ref, prefix, mask = system.vla_infer(images, states, prompts, generator)
            proprio = system.normalize_proprio(states)
            e = len(keys)
            ref = ref.view(e, n_agents, *ref.shape[1:])
            for i, key in enumerate(keys):
                ref_of[key] = ref[i]
            prefix = prefix.view(e, n_agents, *prefix.shape[1:]).half().cpu()
            mask = mask.view(e, n_agents, -1).cpu()
            proprio = proprio.view(e, n_agents, -1).cpu()
            for i in range(e):  # reservoir sampling (Vitter's algorithm R) of whole observations
                slot = seen if seen < config.encoder_pool else int(torch.randint(seen + 1, (1,), generator=generator))
                seen += 1
                if slot >= config.encoder_pool:
                    continue
                for j, a in enumerate(system.agent_names):
                    entry = (prefix[i, j], mask[i, j], proprio[i, j])
                    for field_name, value in zip(("prefix", "mask", "proprio"), entry):
                        lst = reservoir[a][field_name]
                        if slot < len(lst):
                            lst[slot] = value
                        else:
                            lst.append(value)
            bar.update(e)
        bar.close()
        pools = {a: {k: torch.stack(v) for k, v in r.items()} for a, r in reservoir.items()}
        encoder_losses = pretrain_encoders(system, pools, config, generator, progress)
        del pools, reservoir

        # ---- pass 2: latents with the frozen encoders
        latent_of: dict[tuple[int, int], torch.Tensor] = {}
        proprio_of: dict[tuple[int, int], torch.Tensor] = {}
        for start in range(0, len(needed), batch):
            keys = needed[start:start + batch]
            images, states, prompts = system.rows(_gather(plans, keys, spec.vla_variant,
                                                                 system.vla.state_history.span + 1))
            prefix, mask = system.vla_prefix(images, states, prompts)
            proprio = system.normalize_proprio(states)
            e = len(keys)
            prefix = prefix.view(e, n_agents, *prefix.shape[1:])
            mask = mask.view(e, n_agents, -1)
            proprio = proprio.view(e, n_agents, -1)
            with torch.no_grad():
                z = torch.stack([system.agents[a].encoder(prefix[:, j], mask[:, j], proprio[:, j])
                                 for j, a in enumerate(system.agent_names)], dim=1)
            for i, key in enumerate(keys):
                latent_of[key], proprio_of[key] = z[i], proprio[i]

        # ---- shaping potentials at chunk starts and ends
        potential_of: dict[tuple[int, int], float] = {}
        if config.shaped_reward:
            wanted, states = [], []
            for d, (traj, arrays, chunks) in enumerate(plans):
                if arrays["states"] is None:
                    raise ValueError(f"{config.data}: demonstration {traj.demo} has no saved states for shaping")
                for t in sorted({t for t, _, _ in chunks} | {t + k for t, k, _ in chunks}):
                    wanted.append((d, t))
                    states.append(arrays["states"][t] if t < len(traj) else arrays["final_state"])
            potential_of = dict(zip(wanted, pool.potentials(states)))

        # ---- transitions
        rows = []
        for d, (traj, arrays, chunks) in enumerate(plans):
            T = len(traj)
            for t, k, done in chunks:
                action = traj.actions[t:t + k]
                action = np.concatenate([action, np.repeat(action[-1:], C - k, 0)]) if k < C else action
                reward = float(sum(gamma ** j * arrays["rewards"][t + j] for j in range(k)))
                if config.shaped_reward:
                    reward += gamma ** k * potential_of[(d, t + k)] - potential_of[(d, t)]
                nxt = (d, t) if done else (d, t + k)
                rows.append({
                    "latent": latent_of[(d, t)], "proprio": proprio_of[(d, t)], "ref": ref_of[(d, t)],
                    "action": torch.as_tensor(_split_action(action, spec.vla_variant), dtype=torch.float32),
                    "reward": torch.tensor(reward, dtype=torch.float32),
                    "discount": torch.tensor(gamma ** k, dtype=torch.float32),
                    "done": torch.tensor(float(done)),
                    "next_latent": latent_of[nxt], "next_proprio": proprio_of[nxt], "next_ref": ref_of[nxt],
                    **{key: torch.as_tensor(v) for key, v in _labels_at(traj, t).items()},
                })
            del T
    if len(rows) > config.demo_capacity:
        keep = torch.randperm(len(rows), generator=generator)[: config.demo_capacity].sort().values
        rows = [rows[i] for i in keep.tolist()]
    fields = transition_fields(n_agents, config.latent_dim, spec.proprio_dim, C, spec.action_dim)
    buffer = ReplayBuffer(fields, len(rows), system.device)
    buffer.add({k: torch.stack([r[k].to(system.device) for r in rows]) for k in fields})
    pose = buffer.data["pose"].reshape(-1, 6)
    system.pose_mean = pose.mean(0)
    system.pose_std = pose.std(0).clamp(min=1e-3)
    info = {"demos": len(trajs), "transitions": len(rows), "encoder_reconstruction": encoder_losses,
            "success_demos": int(sum(bool(t.success) for t in trajs))}
    return buffer, info


def _split_action(action: np.ndarray, variant: str) -> np.ndarray:
    """(C, 14) joint actions -> (A, C, D): (2, C, 7) per arm or (1, C, 14)."""
    if variant == "per-arm":
        return np.stack([action[:, :7], action[:, 7:]])
    return action[None]


def _gather(plans, keys, variant, history_steps: int = 1) -> list[dict]:
    """Observations for (demo, t) keys, reading each demonstration's frames in one call."""
    out: dict[tuple[int, int], dict] = {}
    by_demo: dict[int, list[int]] = {}
    for d, t in keys:
        by_demo.setdefault(d, []).append(t)
    for d, times in by_demo.items():
        for t, obs in zip(times, _rows_obs(plans[d][0], np.asarray(times), variant, history_steps)):
            out[(d, t)] = obs
    return [out[k] for k in keys]
