"""Parallel simulation for residual RL: environment workers, chunk-level collection and batched evaluation.

Work split: every environment lives in its own worker (a local process by default, a Ray actor with
``--ray-address``); a worker runs whole chunks (C control steps, discounted reward sum, early stop at the episode end)
and answers with the observation, labels and outcome. The learner keeps π0 and the networks: at each chunk boundary
it batches π0 inference over all environments' agents (``ResidualSystem.boundary``), sends each worker its joint
(C, 14) chunk and waits for all answers. One round trip per chunk and environment.

Determinism: episode reset seeds come from a counter, π0 noise, exploration and message noise from one learner-side
generator in training and from one generator per episode in evaluation (``episode_generator``), and the simulation
is deterministic given its actions, so local processes, an in-process simulation and Ray actors give the same
results for the same seeds. The collector can be checkpointed mid-episode: it keeps each
running episode's executed chunks and replays them on resume (``replay``), which restores the simulation exactly.

Training episodes use reset seeds ``TRAIN_SEED_BASE + 1_000_000 * seed + episode`` (never the evaluation seeds
1-100, never the demonstrations' 1000 + i + 100000 * attempt).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from coop_transport.constants import AGENTVIEW_CAMERA, ARMS, WRIST_CAMERA, image_key

TRAIN_SEED_BASE = 10_000_000
OBS_KEYS = tuple(f"{arm}_{k}" for arm in ARMS for k in ("eef_pos", "eef_quat", "gripper_qpos", "joint_pos"))
IMAGE_KEYS = tuple(image_key(c) for c in (WRIST_CAMERA["robot0"], WRIST_CAMERA["robot1"], AGENTVIEW_CAMERA))


def train_episode_seed(seed: int, episode: int) -> int:
    return TRAIN_SEED_BASE + 1_000_000 * seed + episode


def state_histories(sim) -> dict[str, np.ndarray]:
    """Each arm's latest states (``{arm}_proprio_history``), which a π0 prior with a state history reads beside the
    observation (adapters.StateHistory)."""
    return {f"{arm}_proprio_history": sim.proprio_history(arm) for arm in ARMS}


# ------------------------------------------------------------------------------------------------ one simulation
class EnvWorker:
    """One ``TransportSim`` that executes whole chunks. The same class runs in-process, in a local process or as
    a Ray actor."""

    def __init__(self, sim_config, gamma: float):
        from coop_transport.sim import TransportSim
        from coop_transport.sim.labels import EpisodeRecord

        self.sim = TransportSim(sim_config)
        self.gamma = gamma
        self.record = EpisodeRecord()  # the episode's milestones and hand-over, kept when step(milestones=True)

    def _pack(self, obs: dict) -> dict:
        from coop_transport.sim.labels import step_labels

        slim = {k: obs[k] for k in OBS_KEYS + IMAGE_KEYS if k in obs}
        slim.update(state_histories(self.sim))
        return {"obs": slim, "labels": step_labels(self.sim)}

    def reset(self, seed: int) -> dict:
        self.record.reset()
        return self._pack(self.sim.reset(int(seed)))

    def step(self, actions: np.ndarray, milestones: bool = False) -> dict:
        """Run a (C, 14) chunk; stops early when the episode ends. Returns the packed observation after it and
        reward (sum_j γ^j r_j), steps, success, terminated (success), truncated (time limit), and with
        ``milestones`` the task milestones the episode has reached at any step so far, in task order (evaluation's
        stage funnel; off in training collection, where the check would cost ~1 ms a step for nothing), and at the
        episode's end how robot0's hold of the payload ended (``handover``; ``sim.labels.EpisodeRecord``)."""
        total, success, done, k = 0.0, False, False, 0
        for k, action in enumerate(np.asarray(actions, dtype=np.float64), start=1):
            _, reward, done, info = self.sim.step(action, render=False)  # images: only at the chunk's end
            total += self.gamma ** (k - 1) * reward
            success = success or info["success"]
            if milestones:
                self.record.update(self.sim, action)
            if done:
                break
        out = self._pack(self.sim.observation)
        out.update(reward=total, steps=k, success=success, terminated=bool(done and success),
                   truncated=bool(done and not success), t=self.sim.t)
        if milestones:  # absent, not empty, when not checked
            out["milestones"] = self.record.milestones()
            if done:
                out["handover"] = self.record.handover()
        return out

    def replay(self, seed: int, chunks: list[np.ndarray]) -> dict:
        """Reset to ``seed`` and re-execute ``chunks``: the simulation is back exactly where it was."""
        out = self.reset(seed)
        for i, chunk in enumerate(chunks):
            out = self.step(chunk)
            if (out["terminated"] or out["truncated"]) and i < len(chunks) - 1:
                raise RuntimeError(f"replay of seed {seed} ended after {i + 1} of {len(chunks)} chunks")
        return out

    def potentials(self, states: list[np.ndarray]) -> list[float]:
        """Shaping potential Φ at saved MuJoCo states (for the demonstration buffer's rewards)."""
        from coop_transport.sim.labels import task_potential

        out = []
        for state in states:
            self.sim.set_state(state, render=False)  # Φ reads object and gripper poses, not images
            out.append(task_potential(self.sim))
        return out

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.sim.close()


# ------------------------------------------------------------------------------------------------------ pools
class EnvPool:
    """N environments behind one ``call(method, {env: args})`` that runs the calls in parallel."""

    num_envs: int

    def call(self, method: str, args: dict[int, tuple]) -> dict[int, object]:
        raise NotImplementedError

    def reset(self, seeds: dict[int, int]) -> dict[int, dict]:
        return self.call("reset", {e: (s,) for e, s in seeds.items()})

    def step(self, actions: dict[int, np.ndarray], milestones: bool = False) -> dict[int, dict]:
        return self.call("step", {e: (a, milestones) for e, a in actions.items()})

    def replay(self, episodes: dict[int, tuple[int, list]]) -> dict[int, dict]:
        return self.call("replay", episodes)

    def potentials(self, states: list[np.ndarray]) -> list[float]:
        """Φ of many states, spread over the environments."""
        if not states:
            return []
        parts = np.array_split(np.arange(len(states)), min(self.num_envs, len(states)))
        results = self.call("potentials", {e: ([states[i] for i in idx],) for e, idx in enumerate(parts)})
        return [v for e in range(len(parts)) for v in results[e]]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessPool(EnvPool):
    """Simulations inside the learner process (tests, debugging, ``--envs 0``)."""

    def __init__(self, num_envs: int, sim_config, gamma: float):
        self.num_envs = num_envs
        self.workers = [EnvWorker(sim_config, gamma) for _ in range(num_envs)]

    def call(self, method, args):
        return {e: getattr(self.workers[e], method)(*a) for e, a in args.items()}

    def close(self):
        for w in self.workers:
            w.close()
        self.workers = []


def _process_main(conn, sim_config, gamma) -> None:
    try:
        worker = EnvWorker(sim_config, gamma)
    except BaseException:  # noqa: BLE001 - report to the learner instead of dying silently
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if method == "close":
            break
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    worker.close()


class ProcessPool(EnvPool):
    """One spawned process per environment, talking over a pipe (the default)."""

    def __init__(self, num_envs: int, sim_config, gamma: float):
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited GL contexts or torch threads
        self.num_envs = num_envs
        self.conns, self.procs = [], []
        for _ in range(num_envs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(child, sim_config, gamma), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for e, conn in enumerate(self.conns):
            status, payload = conn.recv()
            if status != "ok":
                self.close()
                raise RuntimeError(f"environment worker {e} failed to start:\n{payload}")

    def call(self, method, args):
        for e, a in args.items():
            self.conns[e].send((method, a))
        out = {}
        for e in args:
            status, payload = self.conns[e].recv()
            if status != "ok":
                raise RuntimeError(f"environment worker {e} failed in {method}:\n{payload}")
            out[e] = payload
        return out

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self.conns, self.procs = [], []


class RayPool(EnvPool):
    """One Ray actor per environment on a Ray cluster (``ray`` is imported only here)."""

    def __init__(self, num_envs: int, sim_config, gamma: float, address: str):
        try:
            import ray
        except ImportError as error:
            raise RuntimeError("--ray-address needs the 'ray' package (pip install ray); it is optional and not "
                               "installed here") from error
        self._ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        actor = ray.remote(num_cpus=1)(EnvWorker)
        self.num_envs = num_envs
        self.actors = [actor.remote(sim_config, gamma) for _ in range(num_envs)]
        ray.get([a.ping.remote() for a in self.actors])

    def call(self, method, args):
        refs = {e: getattr(self.actors[e], method).remote(*a) for e, a in args.items()}
        return {e: self._ray.get(ref) for e, ref in refs.items()}

    def close(self):
        for a in self.actors:
            try:
                self._ray.get(a.close.remote())
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.actors = []


def make_pool(envs: int, sim_config, gamma: float, ray_address: str | None = None) -> EnvPool:
    """``envs`` local processes, one in-process simulation for ``envs == 0``, or Ray actors."""
    if ray_address:
        return RayPool(max(envs, 1), sim_config, gamma, ray_address)
    if envs == 0:
        return InProcessPool(1, sim_config, gamma)
    return ProcessPool(envs, sim_config, gamma)


# ------------------------------------------------------------------------------------------------- collection
def labels_array(labels: dict) -> dict[str, np.ndarray]:
    """step_labels dict -> per-arm arrays phase (2,), gripper (2,), ready (2,), pose (2, 6)."""
    return {
        "phase": np.array([labels[f"{a}_phase"] for a in ARMS], dtype=np.int64),
        "gripper": np.array([labels[f"{a}_gripper_closed"] for a in ARMS], dtype=np.float32),
        "ready": np.array([labels[f"{a}_ready"] for a in ARMS], dtype=np.float32),
        "pose": np.stack([labels[f"{a}_pose"] for a in ARMS]).astype(np.float32),
    }


@dataclass
class EnvSlot:
    """A running training episode of one environment."""

    seed: int = -1
    chunks: list = field(default_factory=list)  # executed (C, 14) chunks so far, for replay
    ret: float = 0.0  # undiscounted sum of chunk rewards
    length: int = 0
    obs: dict | None = None
    labels: dict | None = None
    pending: dict | None = None  # transition waiting for its next boundary (tensors, per field)


class Collector:
    """Collects chunk transitions from a pool with the current networks (exploration on, messages sampled)."""

    def __init__(self, system, pool: EnvPool, seed: int, gamma: float):
        self.system, self.pool, self.seed, self.gamma = system, pool, seed, gamma
        self.generator = torch.Generator().manual_seed(10_007 * seed + 1)
        self.next_episode = 0
        self.slots = [EnvSlot() for _ in range(pool.num_envs)]

    def _new_seed(self) -> int:
        s = train_episode_seed(self.seed, self.next_episode)
        self.next_episode += 1
        return s

    def start(self) -> None:
        seeds = {e: self._new_seed() for e in range(len(self.slots))}
        for e, out in self.pool.reset(seeds).items():
            self.slots[e] = EnvSlot(seed=seeds[e], obs=out["obs"], labels=out["labels"])

    def _state_fields(self, b, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"latent": b.latent[rows], "proprio": b.proprio[rows], "ref": b.ref[rows]}

    def _finish(self, pending: list[dict], nexts: list[dict]) -> dict[str, torch.Tensor]:
        # A transition's fields live on two devices (network outputs on the learner's, reward and labels on the
        # CPU), and one restored from a training state has all of them on the learner's: stack on one device.
        device = self.system.device
        out = {k: torch.stack([p[k].to(device) for p in pending]) for k in pending[0]}
        for key in ("latent", "proprio", "ref"):
            out[f"next_{key}"] = torch.stack([n[key].to(device) for n in nexts])
        return out

    def step(self) -> tuple[dict[str, torch.Tensor] | None, list[dict], int]:
        """One chunk in every environment: (finished transitions or None, finished episodes, chunks executed)."""
        system, slots = self.system, self.slots
        b = system.boundary([s.obs for s in slots], self.generator, explore=True, deterministic=False)
        done_pending, done_next = [], []
        for e, slot in enumerate(slots):  # the previous chunk's transitions get their next state
            if slot.pending is not None:
                done_pending.append(slot.pending)
                done_next.append({k: v[0] for k, v in self._state_fields(b, [e]).items()})
                slot.pending = None
        actions = b.joint_action()
        results = self.pool.step({e: actions[e] for e in range(len(slots))})
        episodes, truncated_rows, truncated_obs, resets = [], [], [], {}
        for e, slot in enumerate(slots):
            r = results[e]
            labels = labels_array(slot.labels)
            pending = {**{k: v[0] for k, v in self._state_fields(b, [e]).items()},
                       "action": b.action[e], "reward": torch.tensor(r["reward"], dtype=torch.float32),
                       "discount": torch.tensor(self.gamma ** r["steps"], dtype=torch.float32),
                       "done": torch.tensor(float(r["terminated"])),
                       **{k: torch.as_tensor(v) for k, v in labels.items()}}
            slot.chunks.append(actions[e])
            slot.ret += r["reward"]
            slot.length += r["steps"]
            if r["terminated"] or r["truncated"]:
                episodes.append({"seed": slot.seed, "success": bool(r["success"]), "return": slot.ret,
                                 "length": slot.length})
                if r["terminated"]:  # V(s') is multiplied by 0: any next state will do
                    done_pending.append(pending)
                    done_next.append({k: pending[k] for k in ("latent", "proprio", "ref")})
                else:  # time limit: bootstrap from the final observation (computed below)
                    truncated_rows.append(pending)
                    truncated_obs.append(r["obs"])
                resets[e] = self._new_seed()
            else:
                slot.pending = pending
                slot.obs, slot.labels = r["obs"], r["labels"]
        if truncated_obs:
            bt = system.boundary(truncated_obs, self.generator, explore=False, deterministic=False)
            for i, pending in enumerate(truncated_rows):
                done_pending.append(pending)
                done_next.append({k: v[0] for k, v in self._state_fields(bt, [i]).items()})
        if resets:
            for e, out in self.pool.reset(resets).items():
                slots[e] = EnvSlot(seed=resets[e], obs=out["obs"], labels=out["labels"])
        transitions = self._finish(done_pending, done_next) if done_pending else None
        return transitions, episodes, len(slots)

    # ---- checkpoints: the running episodes are replayed on resume
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {"next_episode": self.next_episode, "generator": self.generator.get_state().tolist(),
                "slots": [{"seed": s.seed, "ret": s.ret, "length": s.length, "pending": s.pending is not None}
                          for s in self.slots]}
        tensors = {}
        for e, s in enumerate(self.slots):
            if s.chunks:
                tensors[f"collector/{e}/chunks"] = torch.as_tensor(np.stack(s.chunks))
            if s.pending is not None:
                tensors.update({f"collector/{e}/pending/{k}": v.detach().cpu().contiguous()
                                for k, v in s.pending.items()})
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor], device) -> None:
        if len(meta["slots"]) != len(self.slots):
            raise ValueError(f"the checkpoint ran {len(meta['slots'])} environments, this run has {len(self.slots)}: "
                             "resume with the same --envs")
        self.next_episode = int(meta["next_episode"])
        self.generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        for e, s in enumerate(meta["slots"]):
            chunks = tensors.get(f"collector/{e}/chunks")
            slot = EnvSlot(seed=int(s["seed"]), chunks=[c.numpy() for c in chunks] if chunks is not None else [],
                           ret=float(s["ret"]), length=int(s["length"]))
            if s["pending"]:
                prefix = f"collector/{e}/pending/"
                slot.pending = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            self.slots[e] = slot
        self.restore_envs()

    def restore_envs(self) -> None:
        """Bring every simulation back to its running episode (after a resume or an evaluation on this pool)."""
        out = self.pool.replay({e: (s.seed, s.chunks) for e, s in enumerate(self.slots)})
        for e, r in out.items():
            self.slots[e].obs, self.slots[e].labels = r["obs"], r["labels"]


# ------------------------------------------------------------------------------------------------- evaluation
def episode_generator(noise_seed: int, seed: int) -> torch.Generator:
    """π0's noise in the evaluation episode of reset seed ``seed``: a stream of its own, so the episode's outcome
    depends on its reset seed and ``noise_seed`` alone, not on which episodes run beside it, on the number of
    environments, or on whether the evaluation was resumed. The registry's residual controller
    (``residual.policy.ResidualController``) draws the same stream, so both evaluations agree."""
    return torch.Generator().manual_seed(int(noise_seed) + int(seed))


def run_episodes(system, pool: EnvPool, seeds: list[int], noise_seed: int, message_override=None, recorder=None,
                 progress=None, on_episode=None, deadline: float | None = None,
                 timing: dict | None = None) -> list[dict]:
    """Closed-loop episodes from ``seeds`` with the deterministic policy (no exploration, message means), each with
    π0 noise from ``episode_generator(noise_seed, seed)``.

    ``message_override(boundary, context)`` replaces received messages (probes); ``recorder(boundary, context)``
    sees every boundary; context holds ``envs``, ``seeds`` and ``boundary_index`` (chunk number in the episode)
    of the rows. ``on_episode(result)`` sees each episode as it ends (``progress(results)`` too). At ``deadline``
    (a time.perf_counter() value) the episodes still running are dropped and the finished ones returned.
    Returns one {seed, success, length, milestones, handover} per finished seed, in seed order (``milestones``:
    those of ``sim.labels.MILESTONES`` the episode reached at any step, in task order; ``handover``: how robot0's
    hold of the payload ended; both as ``evaluation.run_episode``'s).
    ``timing``, a dict, accumulates where the wall time went: ``boundaries`` (batched chunk boundaries),
    ``policy_s`` (π0 and the networks, up to the executed chunks on the host) and ``simulation_s`` (the pool's
    steps and resets, the simulation workers' share).
    """
    import time

    queue = list(seeds)
    active: dict[int, dict] = {}

    def start(resets: dict[int, int]) -> None:
        for e, out in pool.reset(resets).items() if resets else ():
            active[e] = {"seed": resets[e], "obs": out["obs"], "labels": out["labels"], "k": 0, "length": 0,
                         "success": False, "generator": episode_generator(noise_seed, resets[e])}

    clock = timing if timing is not None else {}
    for key in ("boundaries", "policy_s", "simulation_s"):
        clock.setdefault(key, 0)
    t = time.perf_counter()
    start({e: queue.pop(0) for e in range(min(pool.num_envs, len(queue)))})
    clock["simulation_s"] += time.perf_counter() - t
    results = []
    while active:
        if deadline is not None and time.perf_counter() >= deadline:
            break
        envs = sorted(active)
        context = {"envs": envs, "seeds": [active[e]["seed"] for e in envs],
                   "boundary_index": [active[e]["k"] for e in envs],
                   "labels": [active[e]["labels"] for e in envs]}
        t = time.perf_counter()
        b = system.boundary([active[e]["obs"] for e in envs], [active[e]["generator"] for e in envs],
                            explore=False, deterministic=True, message_override=message_override, context=context)
        if recorder is not None:
            recorder(b, context)
        actions = b.joint_action()  # on the host: the device's work is done
        t_policy = time.perf_counter()
        out = pool.step({e: actions[i] for i, e in enumerate(envs)}, milestones=True)
        t_sim = time.perf_counter()
        clock["boundaries"] += 1
        clock["policy_s"] += t_policy - t
        clock["simulation_s"] += t_sim - t_policy
        resets = {}
        for e in envs:
            r, ep = out[e], active[e]
            ep["k"] += 1
            ep["length"] += r["steps"]
            ep["success"] = ep["success"] or bool(r["success"])
            ep["obs"], ep["labels"] = r["obs"], r["labels"]
            if r["terminated"] or r["truncated"]:
                results.append({"seed": ep["seed"], "success": ep["success"], "length": ep["length"],
                                "milestones": r["milestones"], "handover": r["handover"]})
                if on_episode is not None:
                    on_episode(results[-1])
                if progress is not None:
                    progress(results)
                del active[e]
                if queue:
                    resets[e] = queue.pop(0)
        t = time.perf_counter()
        start(resets)
        clock["simulation_s"] += time.perf_counter() - t
    return sorted(results, key=lambda r: r["seed"])
