"""π0 imitation fine-tuning on TwoArmTransport demonstrations (seed paper, phase 1): per-arm and joint variants.

    per-arm: 7-D chunks from one arm's wrist camera, agentview, its proprioception and its prompt;
             200 cooperative demonstrations -> 400 single-arm trajectories, one network for both arms.
    joint:   14-D chunks from both wrist cameras, agentview and both arms' proprioception.

The whole training set lives on the training device as tensors (a few GB of uint8 frames at the small default's
96 px), so a step is one gather plus the model: no data-loader processes to feed. The loop is the plain one:
sample a batch, augment, flow-matching loss, AdamW with warm-up and cosine decay, gradient clipping, EMA.
Every ``save_every`` steps it writes an inference checkpoint (safetensors + JSON with config, normalization
statistics, variant and prompts) for success-based selection, and a resumable training state.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from coop_transport.adapters import ARM_PROMPTS, JOINT_PROMPT, StateHistory, variant_spec
from coop_transport.constants import ARMS
from coop_transport.utils.atomic import replace_directory
from coop_transport.utils.jsonable import to_jsonable

STATE_STD_FLOOR = 1e-2  # proprio dims that barely vary in the demos must not blow up when z-scored
# A state history's displacements are small by nature (a hand moves ~1 cm in 5 steps): a floor of their own.
DELTA_STD_FLOOR = 1e-3
ACTION_STD_FLOOR = 1e-3


@dataclass
class ImitationConfig:
    """π0 imitation fine-tuning settings (defaults: the small per-arm policy)."""

    variant: Literal["per-arm", "joint"] = "per-arm"
    """per-arm: one arm's 7-D chunks (both arms' trajectories); joint: 14-D chunks of both arms."""
    model: str = "small"
    """Named model configuration (coop_transport.policy.config): small | pi0-3b | tiny."""
    data: Path = Path("data/transport_scripted.hdf5")
    """Demonstration file with images (ours or robomimic's Transport)."""
    action_labels: Literal["auto", "expert", "executed"] = "auto"
    """Imitation targets: the scripted expert's noise-free actions (``expert``: DART-style, learn the corrections
    the noise made the expert show, not the noise) or the actions that ran (``executed``: robomimic's files only
    have these); ``auto``: expert where the file has them."""
    out: Path | None = None
    """Run directory (default runs/imitation/<variant>-<model>)."""
    weights: Path | None = None
    """Local π0 weights (openpi or LeRobot PyTorch checkpoint directory) for pi0-3b; None: random init."""
    steps: int = 40_000
    """Optimizer steps (the paper: 40k at batch 64, checkpoints compared at 10k/20k/30k/40k)."""
    batch_size: int = 64
    """Samples per step."""
    action_horizon: int | None = None
    """Predicted chunk length H (must cover the recipe's chunk: 10 per-arm, 25 joint); None keeps the model
    configuration's: small 32, pi0-3b 50 (π0's, which also allows the paper's chunk-50 point)."""
    lr: float | None = None
    """Peak learning rate (default: 3e-4 from scratch, 2.5e-5 for π0 fine-tuning as openpi)."""
    warmup_steps: int = 1_000
    """Linear warm-up steps."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""
    weight_decay: float = 1e-10
    """AdamW weight decay (openpi's default)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    state_history: int = 1
    """K: the policy also sees K - 1 earlier proprioceptive states (adapters.StateHistory); 1: the current only."""
    state_history_stride: int = 5
    """S: control steps between those states."""
    state_history_encoding: Literal["delta", "absolute"] = "delta"
    """delta: the earlier states as displacements since then (s_t - s_{t-kS}); absolute: as they were."""
    object_state_weight: float = 0.0
    """> 0: also train an auxiliary head to read the simulator's object state (``obs/object``, z-scored: the
    hammer's, trash cube's and lid handle's poses, the bins', the grippers' offsets to them) from the VLM's image
    tokens, with this weight beside the flow-matching loss (Pi0Config.object_state_dim). Privileged information
    used in training only: the policy still acts from its cameras and proprioception."""
    ema_decay: float | None = None
    """Decay of the exponential moving average of the weights that checkpoints hold (the inference weights);
    None: the model configuration's (small 0.99 as openpi's full fine-tuning, pi0-3b with LoRA none); 0: no
    average (checkpoints hold the raw weights)."""
    augment: bool = True
    """openpi's image augmentation (crop/rotate on non-wrist cameras, colour jitter on all)."""
    extra_data: tuple[Path, ...] = ()
    """More demonstration files whose every trajectory joins the training set, e.g. DAgger rollouts of a policy
    labelled by the scripted expert (``training/demos.py --learner DIR``). Normalization statistics stay those of
    ``--data`` (or of ``--init-from``): the extra files are failures and corrections, not the demonstrated task."""
    init_from: Path | None = None
    """Start from this inference checkpoint's weights and normalization statistics (a warm start: fine-tune a
    trained policy further with a fresh schedule); the model configuration must match. Ignored when resuming."""
    demos: int | None = None
    """Use only the first K training demonstrations (1 for the single-trajectory overfit probe)."""
    demo_names: tuple[str, ...] = ()
    """Use exactly these demonstrations (overrides --demos)."""
    save_every: int = 2_500
    """Steps between inference checkpoints (all kept, for success-based selection)."""
    num_checkpoints: int | None = None
    """Instead of --save-every: this many evenly spaced checkpoints over the run (after --time-budget-s fits it)."""
    log_every: int = 100
    """Steps between loss-log rows."""
    seed: int = 0
    """Seed of initialization, batch sampling, augmentation and flow noise."""
    device: str = "auto"
    """cuda | cpu | auto."""
    compile: bool = False
    """torch.compile the loss (GPU)."""
    resume: bool = True
    """Continue from the run directory's training state if it exists."""
    progress: bool = True
    """Show a progress bar."""
    time_budget_s: float | None = None
    """Wall-clock budget from the start (data loading included): after 70 steps the run shortens ``steps`` (and
    its LR schedule) to what fits."""
    stop_at: int | None = None
    """Save and stop at this step without changing the schedule; the same command resumes (for machines that
    limit one command's time)."""
    stop_after_s: float | None = None
    """Save and stop once this many seconds have passed since the start (data loading included), without
    changing the schedule; the same command resumes (a long run split over calls of a machine that limits one
    command's time)."""

    def __post_init__(self):
        variant_spec(self.variant)
        _ = self.history  # refuses bad state-history values before any data is loaded
        if not (self.object_state_weight >= 0 and math.isfinite(self.object_state_weight)):
            raise ValueError(f"object_state_weight must be a finite number >= 0, got {self.object_state_weight}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {self.ema_decay}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError(f"steps, batch_size and save_every must be >= 1 "
                             f"(got {self.steps}, {self.batch_size}, {self.save_every})")

    @property
    def history(self) -> StateHistory:
        return StateHistory(self.state_history, self.state_history_stride, self.state_history_encoding)

    @property
    def run_dir(self) -> Path:
        return self.out or Path("runs/imitation") / f"{self.variant}-{self.model}"


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class StepTable:
    """Every demonstration step of one variant, as tensors on the training device.

    ``sample`` draws π0 training samples: the observation at step t and the action chunk t..t+H-1; steps past the
    end of a trajectory repeat its last action and are masked out of the loss (``action_pad_mask``).
    """

    images: dict[str, torch.Tensor]  # slot -> (N, S, S, 3) uint8
    state: torch.Tensor  # (N, state_dim) float32, z-scored
    actions: torch.Tensor  # (N, action_dim) float32, z-scored
    traj_end: torch.Tensor  # (N,) int64: one past the last step of the step's trajectory
    prompt_id: torch.Tensor  # (N,) int64 into prompt_tokens
    prompt_tokens: torch.Tensor  # (P, L) int64
    prompt_mask: torch.Tensor  # (P, L) bool
    horizon: int
    num_trajectories: int = 0
    object_state: torch.Tensor | None = None  # (N, object_dim) float32, z-scored; for the auxiliary head only

    def __len__(self) -> int:
        return self.state.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        device = self.state.device
        idx = torch.randint(len(self), (batch_size,), generator=generator).to(device)  # (B,)
        steps = idx[:, None] + torch.arange(self.horizon, device=device)[None]  # (B, H)
        end = self.traj_end[idx][:, None]
        pad = steps >= end
        steps = torch.minimum(steps, end - 1)
        prompt = self.prompt_id[idx]
        batch = {
            "images": {slot: frames[idx] for slot, frames in self.images.items()},
            "state": self.state[idx],
            "actions": self.actions[steps],  # (B, H, D)
            "action_pad_mask": ~pad,
            "prompt_tokens": self.prompt_tokens[prompt],
            "prompt_mask": self.prompt_mask[prompt],
        }
        if self.object_state is not None:
            batch["object_state"] = self.object_state[idx]
        return batch


def floored_stats(stats, floor: float) -> dict:
    d = stats.to_dict()
    d["std"] = np.maximum(np.asarray(d["std"]), floor).tolist()
    d["std_floor"] = floor
    return d


def _demo_norm_stats(config: ImitationConfig, demos, names: list[str]) -> dict:
    """Floored z-score statistics of the training demonstrations (the file's train split, or exactly ``names``)."""
    from coop_transport.data.dataset import NormStats, compute_norm_stats

    history = config.history
    if config.demos is None and not config.demo_names and history.frames == 1:
        stats = demos.norm_stats("arm" if config.variant == "per-arm" else "joint", split="train")
        state = floored_stats(stats["proprio"], STATE_STD_FLOOR)
    else:  # statistics of exactly the data trained on (and of the policy state a history makes of it)
        sel = set(names)
        trajs = (demos.arm_trajectories(None, images="none") if config.variant == "per-arm"
                 else demos.joint_trajectories(None, images="none"))
        trajs = [t for t in trajs if t.demo in sel]
        stats = compute_norm_stats(trajs, keys=("actions",))
        raw = NormStats.compute(np.concatenate([history.from_trajectory(t.proprio) for t in trajs]))
        state = floored_stats(raw, STATE_STD_FLOOR)
        if history.encoding == "delta" and history.frames > 1:  # the displacement blocks get their own floor
            width = variant_spec(config.variant).state_dim
            state["std"][width:] = np.maximum(raw.std[width:], DELTA_STD_FLOOR).tolist()
            state["delta_std_floor"] = DELTA_STD_FLOOR
    return {"state": state, "actions": floored_stats(stats["actions"], ACTION_STD_FLOOR)}


def _trajectories(variant: str, demos) -> list:
    return demos.arm_trajectories(None, images="memory") if variant == "per-arm" \
        else demos.joint_trajectories(None, images="memory")


class _ObjectStates:
    """Each demonstration's object state (``obs/object``), read from the file once: a per-arm run's two
    trajectories of a demonstration and the normalization statistics share it."""

    def __init__(self, demos):
        self.demos, self._read = demos, {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._read:
            self._read[name] = self.demos.object_states(name)
        return self._read[name]


def _objects(object_states_of: _ObjectStates, trajectory, model_config) -> np.ndarray:
    """The object state (T, object_dim) beside ``trajectory``'s steps, checked against the model's head width."""
    demos = object_states_of.demos
    object_states = object_states_of(trajectory.demo)
    if object_states.shape != (len(trajectory), model_config.object_state_dim):
        raise ValueError(f"{demos.path}: demonstration {trajectory.demo} has object state of shape "
                         f"{object_states.shape}, expected ({len(trajectory)}, {model_config.object_state_dim}): "
                         "every file of one run needs the same object layout")
    return object_states


def object_state_dim_of(path: Path) -> int:
    """Width of the object state (``obs/object``) of the first demonstration in ``path``."""
    from coop_transport.data.dataset import load_demonstrations

    with load_demonstrations(path) as demos:
        return int(demos.object_states(demos.demos[0]).shape[1])


def build_step_table(config: ImitationConfig, model_config, tokenizer, device: torch.device,
                     norm_override: dict | None = None):
    """Load the demonstrations of ``config.variant`` onto ``device``; returns (table, norm_stats, demo names).

    norm_override: z-score with these statistics instead of the file's (a warm start keeps its checkpoint's)."""
    from coop_transport.data.dataset import NormStats, load_demonstrations

    spec = variant_spec(config.variant)
    with load_demonstrations(config.data, action_labels=config.action_labels) as demos:
        print(f"imitation targets: {demos.action_labels} actions of {config.data}")
        names = demos.demo_names("train") or demos.demo_names()
        if config.demo_names:
            unknown = sorted(set(config.demo_names) - set(demos.demo_names()))
            if unknown:
                raise ValueError(f"{config.data} has no demonstrations {unknown}")
            names = list(config.demo_names)
        elif config.demos is not None:
            names = names[: config.demos]
        if norm_override is not None:  # a warm start or a resume: the statistics its weights were trained against
            norm = {key: to_jsonable(norm_override[key]) for key in ("state", "actions", "object_state")
                    if key in norm_override}
        else:
            norm = _demo_norm_stats(config, demos, names)
        object_states_of = _ObjectStates(demos)
        if model_config.object_state_dim and "object_state" not in norm:
            selected_objects = [object_states_of(name) for name in names]
            norm["object_state"] = floored_stats(NormStats.compute(np.concatenate(selected_objects)), STATE_STD_FLOOR)
        mean_s, std_s = (np.asarray(norm["state"][k], np.float32) for k in ("mean", "std"))
        if len(mean_s) != config.history.state_dim(spec.state_dim):
            raise ValueError(f"the state statistics have {len(mean_s)} values, a {config.variant} policy with "
                             f"{config.history.frames} states needs {config.history.state_dim(spec.state_dim)}: "
                             "resume or warm-start with the state history the run was started with")
        mean_a, std_a = (np.asarray(norm["actions"][k], np.float32) for k in ("mean", "std"))

        selected = set(names)
        with_objects = bool(model_config.object_state_dim)
        trajs = [(config.data, t, _objects(object_states_of, t, model_config) if with_objects else None)
                 for t in _trajectories(config.variant, demos) if t.demo in selected]
        if not trajs:
            raise ValueError(f"no trajectories selected from {config.data}")
        for path in config.extra_data:
            with load_demonstrations(path, action_labels=config.action_labels) as more:
                print(f"imitation targets: {more.action_labels} actions of {path} ({len(more)} episodes, all used)")
                more_object_states = _ObjectStates(more)
                trajs.extend((path, t, _objects(more_object_states, t, model_config) if with_objects else None)
                             for t in _trajectories(config.variant, more))
        if config.variant == "per-arm":
            prompts = [ARM_PROMPTS[a] for a in ARMS]
            prompt_of = lambda t: ARMS.index(t.arm)  # noqa: E731
            slot_frames = lambda t: {"wrist": t.wrist_image, "agentview": t.agentview_image}  # noqa: E731
        else:
            prompts = [JOINT_PROMPT]
            prompt_of = lambda t: 0  # noqa: E731
            slot_frames = lambda t: {"robot0_wrist": t.images.get("robot0_eye_in_hand_image"),  # noqa: E731
                                     "robot1_wrist": t.images.get("robot1_eye_in_hand_image"),
                                     "agentview": t.images.get("agentview_image")}
        images = {slot: [] for slot in spec.slots}
        states, actions, objects, ends, prompt_ids, total = [], [], [], [], [], 0
        if with_objects:
            mean_o, std_o = (np.asarray(norm["object_state"][k], np.float32) for k in ("mean", "std"))
        for source, t, object_states in trajs:
            frames = slot_frames(t)
            for slot in spec.slots:
                if frames[slot] is None:
                    raise ValueError(f"{source}: demonstration {t.demo} has no images for slot {slot!r}; "
                                     "render them first (python training/demos.py render ...)")
                images[slot].append(np.asarray(frames[slot]))
            states.append((config.history.from_trajectory(t.proprio) - mean_s) / std_s)
            actions.append((t.actions - mean_a) / std_a)
            if with_objects:
                objects.append((object_states - mean_o) / std_o)
            total += len(t)
            ends.append(np.full(len(t), total, dtype=np.int64))
            prompt_ids.append(np.full(len(t), prompt_of(t), dtype=np.int64))
    tokens, masks = tokenizer.encode_batch(prompts)
    as_t = lambda a, dt=None: torch.as_tensor(np.concatenate(a), dtype=dt).to(device)  # noqa: E731
    table = StepTable(
        images={slot: as_t(frames) for slot, frames in images.items()},
        state=as_t(states, torch.float32), actions=as_t(actions, torch.float32), traj_end=as_t(ends),
        prompt_id=as_t(prompt_ids), prompt_tokens=torch.as_tensor(tokens, device=device),
        prompt_mask=torch.as_tensor(masks, device=device), horizon=model_config.action_horizon,
        num_trajectories=len(trajs), object_state=as_t(objects, torch.float32) if with_objects else None,
    )
    return table, norm, names, prompts


# --------------------------------------------------------------------------------------------- optimization
def lr_at(step: int, peak: float, warmup: int, total: int, final_ratio: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``final_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Flatten AdamW state into safetensors-ready tensors + JSON scalars (never pickle)."""
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{key}"] = float(value)
    return tensors, scalars


def save_train_state(path: Path, model, optimizer, ema, step: int, generator: torch.Generator,
                     log_rows: list, rank_generators: list | None = None, norm_stats: dict | None = None) -> None:
    """Resumable training state: raw weights, AdamW moments, EMA shadow (safetensors) + step, RNG and the
    normalization statistics the weights are trained against (JSON).
    ``rank_generators``: every data-parallel rank's batch-sampling generator state, in rank order."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_tensors, opt_scalars = _optimizer_tensors(optimizer, names)
    tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    # Written beside the old state and swapped in, so a kill at any moment leaves one complete state on disk.
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"step": step, "optimizer_scalars": opt_scalars,
            "generator_state": generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
            "rank_generator_states": rank_generators if rank_generators and len(rank_generators) > 1 else None,
            "norm_stats": to_jsonable(norm_stats) if norm_stats is not None else None,
            "ema_decay": ema.decay if ema is not None else None,
            "log_rows": log_rows[-2000:]}
    (tmp / "state.json").write_text(json.dumps(meta))
    replace_directory(tmp, path)


def load_train_state(path: Path, model, optimizer, ema, generator: torch.Generator, rank: int = 0,
                     world_size: int = 1) -> tuple[int, list]:
    """Restore a state written by ``save_train_state``. Data-parallel ranks take their own sampling generator
    when the state was saved with as many ranks; otherwise rank r > 0 reseeds from (its seed, the step), so a
    run may resume on a different number of GPUs."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    saved = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    has_head = any(k.startswith("object_state_head.") for k in saved)
    if has_head != (model.object_state_head is not None):
        raise ValueError(f"{path} was saved {'with' if has_head else 'without'} the object-state head: resume with "
                         f"the run's --object-state-weight ({'> 0' if has_head else '0'})")
    # States saved before the decay was recorded have no "ema_decay": nothing to compare them with.
    if "ema_decay" in meta and meta["ema_decay"] != (ema.decay if ema is not None else None):
        raise ValueError(f"{path} was saved with EMA decay {meta['ema_decay']}: resume with the run's --ema-decay "
                         f"({meta['ema_decay'] or 0})")
    model.load_state_dict(saved)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if not param.requires_grad:
            continue
        state = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = tensors.get(f"opt/{name}/{key}")
            if t is not None:
                state[key] = t.to(param.device)
        step_value = meta["optimizer_scalars"].get(f"{name}/step")
        if state and step_value is not None:
            # Where torch's own load_state_dict puts it: a float32 tensor on the parameter's device for the fused
            # (and capturable) kernels, on the CPU otherwise (a CPU step makes the fused CUDA kernel fail).
            on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
            state["step"] = torch.tensor(float(step_value), dtype=torch.float32,
                                         device=param.device if on_device else "cpu")
            optimizer.state[param] = state
    if ema is not None:
        ema.load_state_dict({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
    by_rank = meta.get("rank_generator_states")
    if by_rank and len(by_rank) == world_size:
        generator.set_state(torch.tensor(by_rank[rank], dtype=torch.uint8))
    elif rank == 0:
        generator.set_state(torch.tensor(meta["generator_state"], dtype=torch.uint8))
    else:
        generator.manual_seed(generator.initial_seed() + 7919 * int(meta["step"]))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    if rank:  # only rank 0's global RNG is saved: the others continue from a stream of their own
        torch.manual_seed(torch.initial_seed() + rank + 7919 * int(meta["step"]))
    return int(meta["step"]), list(meta.get("log_rows", []))


def resumed_norm_stats(state_dir: Path, run: Path, init_from: Path | None) -> dict | None:
    """The normalization statistics a run being resumed was trained against: its training state's, else (a state
    written before the state kept them) its newest checkpoint's, else its warm start's. None: the data's own.
    A warm-started run z-scores with its source checkpoint's statistics; recomputing them from the data on resume
    would silently change every target under weights trained against the old ones."""
    meta = json.loads((state_dir / "state.json").read_text())
    if meta.get("norm_stats") is not None:
        return meta["norm_stats"]
    from coop_transport.policy.checkpoint import CONFIG_FILE

    sources = sorted((run / "checkpoints").glob("step_*"))[-1:] + ([Path(init_from)] if init_from else [])
    for source in sources:
        config_file = source / CONFIG_FILE
        if config_file.is_file():
            return json.loads(config_file.read_text())["norm_stats"]
    return None


# -------------------------------------------------------------------------------------------------- training
def train(config: ImitationConfig) -> dict:
    """Train (or resume) one imitation run; returns a summary dict (also written to <run>/train_summary.json)."""
    from tqdm import tqdm

    from coop_transport.pi0_policy import resolve_device
    from coop_transport.policy.checkpoint import save_checkpoint
    from coop_transport.policy.config import get_config
    from coop_transport.policy.ema import EMA
    from coop_transport.policy.image_transforms import augment_images
    from coop_transport.policy.model import build_model
    from coop_transport.policy.tokenizer import make_tokenizer
    from coop_transport.utils import distributed as dist_utils

    run_start = time.perf_counter()  # budgets count loading the data and compiling too: they fit a command's limit
    # torchrun sets the rank environment: one process per GPU, each with a 1/world share of --batch-size.
    ctx, rank_device = dist_utils.init_from_env(config.device)
    device = rank_device or resolve_device(config.device)
    if config.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must divide evenly over {ctx.world_size} processes")
    local_batch = config.batch_size // ctx.world_size
    torch.manual_seed(config.seed)
    spec = variant_spec(config.variant)
    overrides = {"action_horizon": config.action_horizon} if config.action_horizon else {}
    model_config = get_config(config.model, setting=spec.model_setting, **overrides)
    if config.history.frames > 1:  # a wider state token input (π0's 32 stays the floor)
        state_dim = config.history.state_dim(spec.state_dim)
        model_config = dataclasses.replace(model_config, state_dim=state_dim,
                                           state_pad_dim=max(model_config.state_pad_dim, state_dim))
    if config.object_state_weight > 0:  # the auxiliary head's width is the data's object-state width
        model_config = dataclasses.replace(model_config, object_state_dim=object_state_dim_of(config.data))
    if config.ema_decay is not None:
        model_config = dataclasses.replace(model_config, ema_decay=config.ema_decay or None)
    run = config.run_dir
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "imitation_config.json").write_text(json.dumps(to_jsonable(asdict(config)), indent=2))

    tokenizer = make_tokenizer(model_config, config.weights)
    state_dir = run / "train_state"
    resuming = config.resume and (state_dir / "state.json").exists()
    warm_start, norm_override = None, None
    if resuming:
        norm_override = resumed_norm_stats(state_dir, run, config.init_from)
    elif config.init_from:
        from coop_transport.policy.checkpoint import load_checkpoint

        warm_start = load_checkpoint(config.init_from, device="cpu")
        # The object-state head and the EMA decay are training-only, so a warm start may add, drop or re-size the
        # head and average with another decay: everything else must match.
        same_head = warm_start.config.object_state_dim == model_config.object_state_dim
        if dataclasses.replace(warm_start.config, object_state_dim=model_config.object_state_dim,
                               ema_decay=model_config.ema_decay) != model_config:
            raise ValueError(f"--init-from {config.init_from}: its model configuration differs from --model "
                             f"{config.model} with action_horizon {model_config.action_horizon}")
        norm_override = {k: v for k, v in warm_start.norm_stats.items() if same_head or k != "object_state"}
    table, norm, names, prompts = build_step_table(config, model_config, tokenizer, device,
                                                   norm_override=norm_override)
    model = build_model(model_config, weights=str(config.weights) if config.weights else None, device=device)
    if warm_start is not None:
        weights = {k: v for k, v in warm_start.model.state_dict().items()
                   if same_head or not k.startswith("object_state_head.")}
        model.load_state_dict(weights, strict=same_head or model.object_state_head is None)
        if ctx.is_main:
            print(f"warm start from {config.init_from} (step {warm_start.step})"
                  + ("" if same_head else "; the object-state head starts afresh" if model.object_state_head
                     is not None else "; without its object-state head"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak_lr = config.lr or (2.5e-5 if model_config.lora or config.weights else 3e-4)
    optimizer = make_optimizer(model, peak_lr, config.weight_decay)
    ema = EMA(model, model_config.ema_decay) if model_config.ema_decay else None
    # Rank r draws its own batches and flow noise (rank 0 exactly as a single-process run).
    generator = torch.Generator().manual_seed(config.seed + ctx.rank)

    step, log_rows = 0, []
    if resuming:
        step, log_rows = load_train_state(state_dir, model, optimizer, ema, generator, rank=ctx.rank,
                                          world_size=ctx.world_size)
        if ctx.is_main:
            print(f"resuming {run} at step {step}")
    dist_utils.broadcast_module(model, ctx)  # identical starting weights on every rank
    if ema is not None:
        dist_utils.broadcast_module(ema, ctx)
    if ctx.rank and step == 0:
        torch.manual_seed(config.seed + ctx.rank)  # after the (shared) initialization: each rank its own noise

    extra = {"variant": config.variant, "prompts": dict(zip(ARMS, prompts)) if config.variant == "per-arm"
             else {"joint": prompts[0]}, "demos": len(names), "trajectories": table.num_trajectories,
             "data": str(config.data), "imitation_config": to_jsonable(asdict(config)),
             "state_history": config.history.to_dict(),
             "weights_dir": str(config.weights) if config.weights else None, "world_size": ctx.world_size}
    train_step = make_train_step(model, optimizer, ema, config.grad_clip, compile=config.compile, dist_ctx=ctx,
                                 object_state_weight=config.object_state_weight)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    bar = tqdm(total=config.steps, initial=step, desc=f"imitation {config.variant}",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True)
    window_loss, window_object_loss, window_start, window_steps = 0.0, 0.0, time.perf_counter(), 0
    total_steps, start_step = config.steps, step
    save_every = _save_interval(config, total_steps)
    while step < total_steps:
        if config.time_budget_s and step == start_step + 20:
            rate_start = time.perf_counter()  # after warm-up steps (torch.compile, cuDNN autotuning)
        if config.time_budget_s and step == start_step + 70:
            # Fit the schedule to the budget: seconds per step measured over 50 warm steps, 10% kept back for
            # checkpoints.
            per_step = (time.perf_counter() - rate_start) / 50
            fit = step + int((0.9 * config.time_budget_s - (time.perf_counter() - run_start)) / per_step)
            fit = dist_utils.broadcast_int(fit, ctx, device)  # rank 0's clock decides for all
            if fit < total_steps:
                total_steps = max(step + 1, fit)
                save_every = _save_interval(config, total_steps)
                bar.total = total_steps
                if ctx.is_main:
                    print(f"time budget {config.time_budget_s:.0f} s: training {total_steps} steps "
                      f"({1e3 * per_step:.1f} ms/step)")
        lr = lr_at(step, peak_lr, config.warmup_steps, total_steps, config.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = table.sample(local_batch, generator)
        if config.augment:
            batch["images"] = augment_images(batch["images"], generator)
        loss, grad_norm, info = train_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; last good state is in {state_dir}")
        step += 1
        window_loss += loss.item()
        if "losses/object_state" in info:  # this rank's auxiliary term, for the log
            window_object_loss += info["losses/object_state"].item()
        window_steps += 1
        bar.update(1)
        if step % config.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "loss": window_loss / window_steps, "lr": lr, "grad_norm": float(grad_norm),
                   "samples_per_s": window_steps * config.batch_size / max(elapsed, 1e-9)}
            if config.object_state_weight > 0:  # "loss" is the total; this its auxiliary part before weighting
                row["object_state_mse"] = window_object_loss / window_steps
            log_rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
            window_loss, window_object_loss, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
        saved = step % save_every == 0 or step == total_steps
        if saved:
            dist_utils.check_in_sync(model, ctx, device)
            if ctx.is_main:
                _save_inference_checkpoint(run / "checkpoints" / f"step_{step:06d}", model, ema, model_config,
                                           norm, step, extra, save_checkpoint)
        at_stop_step = config.stop_at is not None and step >= config.stop_at
        out_of_time = config.stop_after_s is not None and dist_utils.any_rank(
            time.perf_counter() - run_start >= config.stop_after_s, ctx, device)
        stopping = step < total_steps and (at_stop_step or out_of_time)
        if saved or stopping:  # the resumable state: at every checkpoint, and wherever the run stops early
            generators = dist_utils.gather_objects(generator.get_state().tolist(), ctx)
            if ctx.is_main:
                save_train_state(state_dir, model, optimizer, ema, step, generator, log_rows, generators, norm)
                _write_log(run, log_rows)
        if stopping:
            if ctx.is_main:
                print(f"stopped at step {step} of {total_steps} "
                      f"({'--stop-at' if at_stop_step else '--stop-after-s'}); rerun the same command to continue")
            break
    bar.close()
    summary = {
        "run": str(run), "steps": step, "variant": config.variant, "model": config.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "final_object_state_mse": log_rows[-1].get("object_state_mse") if log_rows else None,
        "samples_per_s_median": float(np.median([r["samples_per_s"] for r in log_rows[1:]] or [0.0])),
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "trajectories": table.num_trajectories, "steps_in_table": len(table),
        "world_size": ctx.world_size, "batch_size_per_process": local_batch,
    }
    if ctx.is_main:
        (run / "train_summary.json").write_text(json.dumps(summary, indent=2))
        _write_log(run, log_rows)
    dist_utils.shutdown(ctx)
    return summary


def _save_interval(config: ImitationConfig, total_steps: int) -> int:
    if config.num_checkpoints:
        return max(1, math.ceil(total_steps / config.num_checkpoints))
    return config.save_every


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (openpi's betas and eps); fused on CUDA: one kernel for all
    parameters instead of several per tensor (the GPU host is launch-bound)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                             fused=next(model.parameters()).device.type == "cuda")


def make_train_step(model, optimizer, ema, grad_clip: float, compile: bool = False, dist_ctx=None,
                    object_state_weight: float = 0.0):
    """One optimization step as a function batch -> (loss, grad_norm, info), shared by training and bench/train_speed.py.

    bf16 autocast on CUDA (π0 trains in bf16); ``compile`` runs the loss through torch.compile (fewer, fused
    kernels: the small model is launch-bound on a GPU). A non-finite loss skips the update, so the caller can stop
    with the last good weights intact. With a data-parallel ``dist_ctx`` (coop_transport.utils.distributed) the
    returned loss is the mean over ranks, a non-finite loss on any rank skips the update on all of them, and the
    gradients are averaged before clipping. ``object_state_weight``: see ``Pi0Model.compute_loss`` (the returned
    loss then includes the auxiliary term).
    """
    from coop_transport.utils.distributed import DistContext, average_gradients, mean_loss_and_finite

    dist_ctx = dist_ctx or DistContext()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_fn = torch.compile(model.compute_loss) if compile else model.compute_loss

    def step(batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null_context():
            loss, info = loss_fn(batch, object_state_weight=object_state_weight)
        mean_loss, finite = mean_loss_and_finite(loss, dist_ctx)
        if not finite:
            return mean_loss, torch.tensor(float("nan")), info
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(trainable, dist_ctx)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        return mean_loss, grad_norm, info

    return step


def _save_inference_checkpoint(path, model, ema, model_config, norm, step, extra, save_checkpoint):
    """Inference weights are the EMA weights where training keeps an EMA (openpi evaluates those)."""
    if ema is None:
        save_checkpoint(path, model, model_config, norm, step, extra)
        return
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    save_checkpoint(path, averaged, model_config, norm, step, extra)
    del averaged


def _write_log(run: Path, rows: list) -> None:
    if not rows:
        return
    with open(run / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=110)
        plt.close(fig)
    except Exception as exc:  # a plot must never cost a training run
        print(f"warning: loss plot not written: {exc}")


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
