"""Privileged-state behaviour cloning: how far do the demonstrations teach the task from perfect state?

A diagnostic reference, not a deployable policy: an MLP maps the simulator's exact state (both arms' proprioception
and robosuite's object state: the hammer's, trash cube's and lid handle's poses, the bins') to the next chunk of
the demonstrator's joint actions, trained with mean-squared error on the noise-free labels where the file has
them. Closed loop it runs in the simulation without cameras. ``StateBCConfig.view="per-arm"`` splits it as the
per-arm π0 is split: one MLP per arm on that arm's proprioception and the objects, predicting its own seven action
dimensions, so an arm sees its partner only through the objects they both move.

It separates two causes of a failing π0 policy. If this reference, which needs no perception and sees the partner
arm, fails at a task stage too, the demonstrations (their amount, or a demonstrator whose decisions depend on
what a single state does not show: stage memory, timers, velocities) limit imitation there; if it passes a stage
where π0 fails, perception or the per-arm view does. robomimic reports its low-dimensional BC figures on Transport
the same way.

Checkpoints: ``model.safetensors`` (the MLP's weights) and ``config.json`` (its sizes, the chunk, the feature
statistics, the object layout of the training file).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from coop_transport.adapters import StateHistory
from coop_transport.constants import ARMS, JOINT_ACTION_DIM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "coop_transport.state_bc/1"
HISTORY_OF = ("all", "arms", "objects")
VIEWS = ("joint", "per-arm")
PROPRIO_DIM = 36  # both arms' arm_proprio, first in every state vector (load_states, state_from_sim)
ARM_PROPRIO_DIM = PROPRIO_DIM // len(ARMS)


@dataclass(frozen=True)
class StateBCConfig:
    """Train a privileged-state MLP on a demonstration file."""

    chunk: int = 8
    """Actions predicted per state (a short chunk smooths the targets; the controller executes ``execute``)."""
    width: int = 384
    depth: int = 3
    steps: int = 16000
    """Optimizer steps. On 180 demonstrations 8,000 under-trained (24% closed loop on reset seeds 1-50 against
    34% at 16,000; 32,000 gave 34% again: README)."""
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_noise: float = 0.01
    """Gaussian noise (in units of each feature's std) on the normalized state during training."""
    action_labels: str = "auto"
    """expert (the demonstrator's noise-free actions), executed, or auto (expert where recorded)."""
    seed: int = 0
    history: int = 1
    """States the MLP sees: the current one and history - 1 earlier ones, ``history_stride`` control steps apart
    (the first state repeated before an episode's start). 1: the current state only (Markov). A test of whether the
    demonstrator's decisions depend on more than one state shows (its stage memory, timers, the partner's motion):
    robomimic's BC-RNN sees 10 steps."""
    history_stride: int = 1
    """Control steps between the stacked states."""
    history_of: str = "all"
    """Which features the earlier states contribute: all, arms (both arms' proprioception only) or objects
    (robosuite's object state only); the current state is always whole. Tells which motion the decisions need."""
    handover_weight: float = 1.0
    """Sampling weight, relative to every other step, of the steps in which both arms hold the payload (the files'
    phase label hand_over: 2.4% of the scripted demonstrations' steps, about 7 per episode, where robot0's release
    must follow robot1's grasp). 1: uniform sampling. Needs phase labels in the file."""
    view: str = "joint"
    """joint: one MLP sees both arms and the objects and predicts the 14-D chunk. per-arm: one MLP per arm sees its
    own proprioception and the objects (the partner only through the objects it moves) and predicts its own 7-D
    chunk: the per-arm π0's decomposition without cameras. Whether an arm can time the hand-over without seeing
    its partner."""

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.history_of not in HISTORY_OF:
            raise ValueError(f"history_of must be one of {HISTORY_OF}, got {self.history_of!r}")
        if not (np.isfinite(self.handover_weight) and self.handover_weight > 0):
            raise ValueError(f"handover_weight must be a positive number, got {self.handover_weight}")
        if min(self.chunk, self.width, self.depth, self.steps, self.batch_size, self.history,
               self.history_stride) < 1:
            raise ValueError(f"chunk, width, depth, steps, batch_size, history and history_stride must be >= 1: "
                             f"{self}")


class StateMLP(nn.Module):
    """Normalized state -> (chunk, action_dim) actions."""

    def __init__(self, state_dim: int, chunk: int, width: int, depth: int, action_dim: int = JOINT_ACTION_DIM):
        super().__init__()
        layers, d = [], state_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU()]
            d = width
        layers.append(nn.Linear(d, chunk * action_dim))
        self.net = nn.Sequential(*layers)
        self.chunk, self.action_dim = chunk, action_dim

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).view(-1, self.chunk, self.action_dim)


# ------------------------------------------------------------------------------------------------------- state
def state_from_sim(sim, object_keys: list[str]) -> np.ndarray:
    """The feature vector of the simulator's current state, laid out as ``load_states`` lays out a file's."""
    from coop_transport.data.generate import object_vector
    from coop_transport.sim.frames import arm_proprio

    obs = sim.lowdim_observation
    proprio = [arm_proprio(a, obs[f"{a}_eef_pos"], obs[f"{a}_eef_quat"], obs[f"{a}_gripper_qpos"],
                           obs[f"{a}_joint_pos"]) for a in ARMS]
    return np.concatenate([*proprio, object_vector(obs, object_keys)]).astype(np.float32)


def load_states(data: str | Path, split: str | None, action_labels: str
                ) -> tuple[list[np.ndarray], list[np.ndarray], list | None, str, list[np.ndarray | None]]:
    """Per demonstration of ``split`` (all when None or when the file has no such mask): (T, 36 + object) states
    and (T, 14) actions in each arm's base frame; the file's object layout (None for robomimic files); the labels
    used; and per demonstration the (T,) bool steps in which both arms hold the payload (``handover_steps``; None
    where the file has no phase labels)."""
    from coop_transport.data.dataset import load_demonstrations

    with load_demonstrations(data, action_labels=action_labels) as demos:
        trajs = demos.joint_trajectories(split if split in demos.masks else None, images="none")
        states = [np.concatenate([t.proprio, demos.object_states(t.demo)], -1).astype(np.float32) for t in trajs]
        actions = [t.actions.astype(np.float32) for t in trajs]
        layout = demos.meta.get("object_layout")  # None for robomimic files
        labels = demos.action_labels
    if not states:
        raise ValueError(f"no demonstrations selected from {data}")
    return states, actions, layout, labels, [handover_steps(t.labels) for t in trajs]


def handover_steps(labels: dict[str, np.ndarray]) -> np.ndarray | None:
    """(T,) bool from one demonstration's per-step labels: both arms in the hand_over phase (``constants.PHASES``);
    None without phase labels."""
    from coop_transport.constants import PHASES

    if "robot0_phase" not in labels or "robot1_phase" not in labels:
        return None
    return ((labels["robot0_phase"] == PHASES["robot0"].index("hand_over"))
            & (labels["robot1_phase"] == PHASES["robot1"].index("hand_over")))


def history_columns(state_dim: int, history_of: str, proprio_dim: int = PROPRIO_DIM) -> np.ndarray:
    """Indices of the features that earlier states contribute (``StateBCConfig.history_of``), in a state vector
    whose first ``proprio_dim`` features are the arms' proprioception."""
    return {"all": np.arange(state_dim), "arms": np.arange(proprio_dim),
            "objects": np.arange(proprio_dim, state_dim)}[history_of]


def view_models(state_dim: int, view: str) -> dict[str, tuple[np.ndarray, slice, int]]:
    """The MLPs of a view: name -> (the state features it sees, the joint action dimensions it predicts, how many
    of its features are proprioception). The objects' features follow the arms' in every state vector."""
    objects = np.arange(PROPRIO_DIM, state_dim)
    if view == "joint":
        return {"joint": (np.arange(state_dim), slice(0, JOINT_ACTION_DIM), PROPRIO_DIM)}
    arm_dim = JOINT_ACTION_DIM // len(ARMS)
    return {arm: (np.r_[np.arange(i * ARM_PROPRIO_DIM, (i + 1) * ARM_PROPRIO_DIM), objects],
                  slice(i * arm_dim, (i + 1) * arm_dim), ARM_PROPRIO_DIM) for i, arm in enumerate(ARMS)}


def model_input(states: np.ndarray, columns: np.ndarray, proprio_dim: int, config: "StateBCConfig") -> np.ndarray:
    """(T, S) full states of one episode -> (T, features) inputs of one MLP: its columns, with the history."""
    own = states[:, columns]
    past = history_columns(own.shape[1], config.history_of, proprio_dim)
    return stack_history(own, config.history, config.history_stride, past)


def stack_history(states: np.ndarray, history: int, stride: int, columns: np.ndarray | None = None) -> np.ndarray:
    """(T, S) states of one episode -> (T, S + (history - 1) * len(columns)): each row the whole state at t, then
    the ``columns`` of the states at t - stride, t - 2 stride, ... (all columns when None), the episode's first
    state standing in before its start."""
    index = StateHistory(history, stride).step_index(len(states))[:, 1:]  # (T, history - 1), as π0's history
    past = states[index] if columns is None else states[index][..., columns]
    return np.concatenate([states, past.reshape(len(states), -1)], axis=1)


def _chunks(actions: np.ndarray, chunk: int) -> np.ndarray:
    """(T, chunk, 14): the next ``chunk`` actions from every step, the last one repeated past the end."""
    index = np.minimum(np.arange(len(actions))[:, None] + np.arange(chunk)[None], len(actions) - 1)
    return actions[index]


# ---------------------------------------------------------------------------------------------------- training
def train(data: str | Path, out: str | Path, config: StateBCConfig = StateBCConfig(), split: str | None = "train",
          progress: bool = True) -> Path:
    """Train on ``split`` of ``data``; write the checkpoint to ``out``; returns ``out``."""
    from safetensors.torch import save_file

    states, actions, layout, labels, handover = load_states(data, split, config.action_labels)
    weights = None
    if config.handover_weight != 1.0:
        if any(h is None for h in handover):
            raise ValueError(f"{data} has demonstrations without phase labels (handover_weight needs them; "
                             "training/demos.py writes them with --labels)")
        weights = torch.from_numpy(np.where(np.concatenate(handover), config.handover_weight, 1.0))
    start = time.perf_counter()
    tensors, models, final_losses = {}, {}, []
    for name, (columns, action_dims, proprio_dim) in view_models(states[0].shape[1], config.view).items():
        x = np.concatenate([model_input(s, columns, proprio_dim, config) for s in states])
        y = np.concatenate([_chunks(a[:, action_dims], config.chunk) for a in actions])
        mean, std = x.mean(0), x.std(0) + 1e-6  # constant features (a bin's position) stay finite
        model, loss = _fit(torch.from_numpy((x - mean) / std), torch.from_numpy(y), config, weights, progress,
                           f"state-bc {name}" if config.view != "joint" else "state-bc")
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in model.state_dict().items()})
        models[name] = {"state_dim": int(x.shape[1]), "state_mean": mean.tolist(), "state_std": std.tolist()}
        final_losses.append(loss)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_FILE)
    meta = {"format": FORMAT, "config": asdict(config), "full_state_dim": int(states[0].shape[1]), "models": models,
            "object_layout": layout, "data": str(data), "split": split, "action_labels": labels, "samples": int(sum(len(s) for s in states)),
            "demos": len(states), "final_loss": float(np.mean(final_losses)),
            "train_seconds": time.perf_counter() - start}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _fit(xs: torch.Tensor, ys: torch.Tensor, config: StateBCConfig, weights: torch.Tensor | None, progress: bool,
         desc: str) -> tuple[StateMLP, float]:
    """One MLP fitted to normalized inputs ``xs`` and action chunks ``ys``; returns it and its final loss."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    model = StateMLP(xs.shape[1], config.chunk, config.width, config.depth, ys.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)  # linear warm-up over 5%, then cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1.0 + np.cos(np.pi * min(1.0, step / config.steps))))
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if weights is None:
            i = torch.randint(len(xs), (config.batch_size,), generator=generator)
        else:
            i = torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)
        noisy = xs[i] + config.input_noise * torch.randn(config.batch_size, xs.shape[1], generator=generator)
        loss = nn.functional.mse_loss(model(noisy), ys[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"training diverged (loss {losses[-1]}); nothing written")
    return model, float(np.mean(losses[-100:]))


# ------------------------------------------------------------------------------------------------- closed loop
class StateBCController:
    """The trained MLP(s) as an evaluation controller: predicts a chunk, executes its first ``execute`` actions
    (per-arm: each arm's MLP predicts its own seven action dimensions of the chunk)."""

    def __init__(self, policy: str | Path, execute: int = 1):
        from safetensors.torch import load_file

        policy = Path(policy)
        try:
            meta = json.loads((policy / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{policy} is not a state-bc checkpoint ({CONFIG_FILE}: {err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{policy}/{CONFIG_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
        config = StateBCConfig(**meta["config"])
        if not 1 <= execute <= config.chunk:
            raise ValueError(f"execute must lie in [1, {config.chunk}], got {execute}")
        if "models" not in meta or "full_state_dim" not in meta:
            raise ValueError(f"{policy} is a state-bc checkpoint from before per-arm views (one MLP, no 'models' in "
                             f"{CONFIG_FILE}): train it again")
        tensors = load_file(policy / WEIGHTS_FILE)
        self.config = config
        self.models = {}  # name -> (MLP, columns of the full state, joint action dims, proprio dim, mean, std)
        for name, (columns, action_dims, proprio_dim) in view_models(meta["full_state_dim"], config.view).items():
            m = meta["models"][name]
            model = StateMLP(m["state_dim"], config.chunk, config.width, config.depth,
                             action_dims.stop - action_dims.start)
            prefix = f"{name}."
            # strict: a file with other sizes or missing tensors is refused
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            model.eval()
            self.models[name] = (model, columns, action_dims, proprio_dim, np.asarray(m["state_mean"], np.float32),
                                 np.asarray(m["state_std"], np.float32))
        self.layout = meta["object_layout"]
        self.execute = execute
        self._queue: list[np.ndarray] = []
        self._object_keys: list[str] | None = None
        self._states: list[np.ndarray] = []  # this episode's states, oldest first (history > 1)

    def reset(self, sim, seed: int) -> None:
        from coop_transport.data.generate import object_layout, object_state_keys

        self._queue = []
        self._states = []
        self._object_keys = object_state_keys(sim)
        if self.layout is not None and object_layout(sim.lowdim_observation, self._object_keys) != self.layout:
            raise ValueError("the simulation's object state is laid out differently from the training file's "
                             f"({self.layout})")

    @torch.no_grad()
    def act(self, sim) -> np.ndarray:
        history = self.config.history
        if history > 1:  # every step's state is kept: the stack reaches back over executed steps too
            self._states.append(state_from_sim(sim, self._object_keys))
            del self._states[: -(history - 1) * self.config.history_stride - 1]
        if not self._queue:
            past = np.stack(self._states) if history > 1 else state_from_sim(sim, self._object_keys)[None]
            chunk = np.zeros((self.config.chunk, JOINT_ACTION_DIM), np.float32)
            for model, columns, action_dims, proprio_dim, mean, std in self.models.values():
                state = model_input(past, columns, proprio_dim, self.config)[-1]
                chunk[:, action_dims] = model(torch.from_numpy((state - mean) / std)[None])[0].numpy()
            self._queue = list(np.clip(chunk[:self.execute], -1.0, 1.0))
        return self._queue.pop(0)

    def stats(self) -> dict:
        return {}
