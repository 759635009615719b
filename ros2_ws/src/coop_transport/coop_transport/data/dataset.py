"""Read demonstration files (ours or robomimic's TwoArmTransport) into joint and per-arm trajectories.

``load_demonstrations(path)`` validates the file (``DatasetError`` naming the problem for files that are not HDF5,
truncated, without ``data``, foreign, or inconsistent) and returns a ``DemoFile``:

- ``joint_trajectories(split)``: one ``JointTrajectory`` per demonstration: ``actions`` (T, 14), ``proprio``
  (T, 36) = [robot0 | robot1] ``frames.arm_proprio``, images per camera, labels.
- ``arm_trajectories(split)``: two ``ArmTrajectory`` per demonstration (robot0 first): ``actions`` (T, 7),
  ``proprio`` (T, 18), ``wrist_image``, ``agentview_image``; 200 cooperative demonstrations give 400 single-arm
  trajectories.
- ``norm_stats(variant, split)``: per-dimension ``NormStats`` of ``proprio`` and ``actions`` over a split.

Low-dimensional arrays are read into memory (float32); images stay on disk as ``ImageSequence`` objects that read
frames on indexing (and reopen the file in each process, so they survive DataLoader workers).

Conventions after reading, whatever the source:

- actions are OSC deltas in each arm's *base* frame (robosuite 1.5). robomimic's published files were recorded with
  robosuite 1.2, whose deltas were in the world frame: they are converted with ``frames.world_to_base_action``. The
  source frame comes from our ``coop_transport`` metadata, else from ``env_args['env_version']`` (< 1.5: world;
  missing: world, robomimic's v0.1 files predate the field), or from the ``action_frame`` argument.
- images are in the natural orientation (row 0 at the top). robomimic's files store them as rendered through
  mujoco-py (OpenGL convention, upside down) and are flipped on read; ``flip_images`` overrides.
- robomimic's TwoArmTransport image files have no ``agentview_image`` (their cameras are ``shouldercamera0/1`` and
  the two wrist cameras): ``ArmTrajectory.agentview_image`` is then ``None``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from coop_transport.constants import AGENTVIEW_CAMERA, ARM_ACTION_DIM, ARMS, WRIST_CAMERA, image_key
from coop_transport.data import hdf5_format as fmt
from coop_transport.data.hdf5_format import DatasetError
from coop_transport.sim.frames import arm_proprio, world_to_base_action

ImagesMode = Literal["lazy", "memory", "none"]


# --------------------------------------------------------------------------------------------------- images
_HANDLES: dict[tuple[int, str], object] = {}


def _h5(path: str):
    """This process's read-only handle of ``path`` (h5py handles must not cross ``fork``)."""
    key = (os.getpid(), path)
    if key not in _HANDLES:
        _HANDLES[key] = fmt.open_hdf5(path)
    return _HANDLES[key]


def close_cached_handles() -> None:
    for key in [k for k in _HANDLES if k[0] == os.getpid()]:
        _HANDLES.pop(key).close()


class ImageSequence:
    """(T, H, W, 3) uint8 frames of one camera in one demonstration, read from disk on indexing."""

    def __init__(self, path: str, dataset: str, shape: tuple[int, ...], flip: bool):
        self.path, self.dataset, self.shape, self.flip = path, dataset, tuple(shape), flip

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        ds = _h5(self.path)[self.dataset]
        if isinstance(index, (int, np.integer)):
            frames = ds[int(index)]
            return frames[::-1].copy() if self.flip else frames
        if isinstance(index, slice):
            frames = ds[index]
        else:  # h5py needs increasing unique indices: read those and reorder
            index = np.asarray(index)
            unique, inverse = np.unique(index, return_inverse=True)
            frames = ds[unique][inverse]
        return frames[:, ::-1].copy() if self.flip else frames

    def numpy(self) -> np.ndarray:
        return self[:]

    def __array__(self, dtype=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ImageSequence({self.dataset!r}, shape={self.shape}, flip={self.flip})"


def _images(seq: ImageSequence, mode: ImagesMode):
    return seq.numpy() if mode == "memory" else seq


# ----------------------------------------------------------------------------------------------- trajectories
@dataclass
class JointTrajectory:
    """One cooperative demonstration seen by a joint (two-arm) policy."""

    demo: str
    actions: np.ndarray  # (T, 14) float32, [robot0 | robot1], each arm's base frame
    proprio: np.ndarray  # (T, 36) float32, [robot0 | robot1] arm_proprio
    images: dict[str, ImageSequence | np.ndarray] = field(default_factory=dict)  # "<camera>_image" -> (T, H, W, 3)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # "robot0_phase" -> (T,), ...
    seed: int | None = None
    success: bool | None = None

    def __len__(self) -> int:
        return len(self.actions)

    def images_at(self, t: int) -> dict[str, np.ndarray]:
        return {k: v[t] for k, v in self.images.items()}


@dataclass
class ArmTrajectory:
    """One arm's half of a cooperative demonstration, seen by a per-arm policy."""

    demo: str
    arm: str  # "robot0" or "robot1"
    actions: np.ndarray  # (T, 7) float32, the arm's base frame
    proprio: np.ndarray  # (T, 18) float32, arm_proprio
    wrist_image: ImageSequence | np.ndarray | None = None  # (T, H, W, 3) uint8, the arm's eye-in-hand camera
    agentview_image: ImageSequence | np.ndarray | None = None  # (T, H, W, 3) uint8, shared agentview camera
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # "phase" -> (T,), "gripper_closed", "ready", "pose"
    seed: int | None = None
    success: bool | None = None

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def images(self) -> dict[str, ImageSequence | np.ndarray]:
        out = {}
        if self.wrist_image is not None:
            out["wrist_image"] = self.wrist_image
        if self.agentview_image is not None:
            out["agentview_image"] = self.agentview_image
        return out

    def images_at(self, t: int) -> dict[str, np.ndarray]:
        return {k: v[t] for k, v in self.images.items()}


# ------------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one array, for normalising model inputs and outputs.

    ``q01`` / ``q99`` are the 1st and 99th percentiles (numpy's linear interpolation), ``count`` the number of rows.
    """

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: int

    @classmethod
    def compute(cls, x: np.ndarray) -> "NormStats":
        """Statistics of the rows of ``x`` (N, D)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"expected a non-empty (N, D) array, got shape {x.shape}")
        q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
        f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        return cls(f(x.mean(0)), f(x.std(0)), f(q01), f(q99), f(x.min(0)), f(x.max(0)), int(len(x)))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def normalize(self, x: np.ndarray, mode: Literal["meanstd", "quantile"] = "quantile", eps: float = 1e-6
                  ) -> np.ndarray:
        """``meanstd``: (x - mean) / std; ``quantile``: q01..q99 mapped to -1..1 (π0's choice for actions)."""
        x = np.asarray(x, dtype=np.float32)
        if mode == "meanstd":
            return (x - self.mean) / (self.std + eps)
        if mode == "quantile":
            return 2.0 * (x - self.q01) / (self.q99 - self.q01 + eps) - 1.0
        raise ValueError(f"unknown normalisation mode {mode!r}")

    def unnormalize(self, y: np.ndarray, mode: Literal["meanstd", "quantile"] = "quantile", eps: float = 1e-6
                    ) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        if mode == "meanstd":
            return y * (self.std + eps) + self.mean
        if mode == "quantile":
            return (y + 1.0) / 2.0 * (self.q99 - self.q01 + eps) + self.q01
        raise ValueError(f"unknown normalisation mode {mode!r}")

    def to_dict(self) -> dict:
        """JSON-serialisable dictionary (lists of floats)."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        keys = ("mean", "std", "q01", "q99", "min", "max")
        missing = [k for k in (*keys, "count") if k not in d]
        if missing:
            raise ValueError(f"normalisation statistics lack {missing}")
        arrays = {k: np.asarray(d[k], dtype=np.float32) for k in keys}
        dims = {v.shape for v in arrays.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"normalisation statistics have inconsistent shapes {dims}")
        return cls(**arrays, count=int(d["count"]))


def compute_norm_stats(trajectories: Sequence[JointTrajectory | ArmTrajectory],
                       keys: tuple[str, ...] = ("proprio", "actions")) -> dict[str, NormStats]:
    """Statistics of each key over all steps of ``trajectories`` (per-arm trajectories pool both arms)."""
    if not trajectories:
        raise ValueError("no trajectories to compute statistics over")
    return {k: NormStats.compute(np.concatenate([getattr(tr, k) for tr in trajectories], 0)) for k in keys}


def stats_to_dict(stats: dict[str, NormStats]) -> dict:
    return {k: v.to_dict() for k, v in stats.items()}


def stats_from_dict(d: dict) -> dict[str, NormStats]:
    return {k: NormStats.from_dict(v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------------- file
class DemoFile:
    """A validated demonstration file. Use ``load_demonstrations`` to open one."""

    def __init__(self, path: str, summary: fmt.FileSummary, action_frame: str, flip_images: bool, f,
                 action_labels: str = "executed"):
        self.path = path
        self.summary = summary
        self.env_meta = summary.env_meta
        self.meta = summary.meta
        self.action_frame = action_frame
        self.flip_images = flip_images
        self._f = f
        self._lowdim: dict[str, dict] = {}
        self.action_labels = self._resolve_action_labels(action_labels)
        """``executed`` (``actions``: what ran) or ``expert`` (``expert_actions``: the expert's noise-free labels);
        what ``*_trajectories`` and ``norm_stats`` return as actions."""

    def _resolve_action_labels(self, requested: str) -> str:
        if requested not in ("executed", "expert", "auto"):
            raise ValueError(f"action_labels must be 'executed', 'expert' or 'auto', got {requested!r}")
        if requested == "executed":
            return requested
        have = all(fmt.EXPERT_ACTIONS in self._f[fmt.DATA][name] for name in self.demos)
        if requested == "auto":
            return "expert" if have else "executed"
        if not have:
            raise DatasetError(f"{self.path}: action_labels='expert' but not every demonstration has "
                               f"'{fmt.EXPERT_ACTIONS}' (files from robomimic or from before they were recorded); "
                               f"use 'executed' or 'auto'")
        return requested

    # -------------------------------------------------------------------------------------------- description
    @property
    def source(self) -> str:
        """``coop_transport`` for files this package wrote, else ``robomimic``."""
        return "coop_transport" if self.meta else "robomimic"

    @property
    def env_version(self) -> str | None:
        return self.env_meta.get("env_version")

    @property
    def demos(self) -> tuple[str, ...]:
        return self.summary.demos

    @property
    def masks(self) -> dict[str, tuple[str, ...]]:
        return self.summary.masks

    @property
    def cameras(self) -> tuple[str, ...]:
        """Image keys (``<camera>_image``) of the first demonstration."""
        return tuple(k for k in self.summary.obs_keys if k.endswith("_image"))

    def demo_names(self, split: str | None = None) -> list[str]:
        """Demonstrations of a mask (``train``, ``valid`` or any robomimic filter key); ``None``: all of them."""
        if split is None:
            return list(self.demos)
        if split not in self.masks:
            raise DatasetError(f"{self.path}: no mask/{split} (masks: {sorted(self.masks)})")
        return fmt.sorted_demo_names(self.masks[split])

    def default_stats_split(self) -> str | None:
        return fmt.TRAIN if fmt.TRAIN in self.masks else None

    def __len__(self) -> int:
        return len(self.demos)

    def __repr__(self) -> str:
        return (f"DemoFile({self.path!r}, {len(self.demos)} demos, {self.summary.total} steps, source={self.source}, "
                f"action_frame={self.action_frame}, action_labels={self.action_labels}, cameras={list(self.cameras)})")

    # ----------------------------------------------------------------------------------------------- reading
    def _demo_lowdim(self, name: str) -> dict:
        if name not in self._lowdim:
            g = self._f[fmt.DATA][name]
            where = f"{self.path}: data/{name}"
            obs = {k: fmt.read_array(g[fmt.OBS], k, where) for k in fmt.REQUIRED_OBS}
            key = fmt.EXPERT_ACTIONS if self.action_labels == "expert" else fmt.ACTIONS
            actions = fmt.read_array(g, key, where).astype(np.float64)
            per_arm = {arm: actions[:, i * ARM_ACTION_DIM:(i + 1) * ARM_ACTION_DIM] for i, arm in enumerate(ARMS)}
            if self.action_frame == fmt.ACTION_FRAME_WORLD:
                per_arm = {arm: world_to_base_action(arm, a) for arm, a in per_arm.items()}
            proprio = {arm: arm_proprio(arm, obs[f"{arm}_eef_pos"], obs[f"{arm}_eef_quat"],
                                        obs[f"{arm}_gripper_qpos"], obs[f"{arm}_joint_pos"]) for arm in ARMS}
            labels = {}
            if fmt.LABELS in g:
                labels = {k: fmt.read_array(g[fmt.LABELS], k, where) for k in g[fmt.LABELS]}
            self._lowdim[name] = {
                "actions": {arm: a.astype(np.float32) for arm, a in per_arm.items()},
                "proprio": proprio,
                "labels": labels,
                "seed": int(g.attrs["seed"]) if "seed" in g.attrs else None,
                "success": bool(g.attrs["success"]) if "success" in g.attrs else None,
            }
        return self._lowdim[name]

    def _image(self, name: str, key: str, mode: ImagesMode):
        obs = self._f[fmt.DATA][name][fmt.OBS]
        if mode == "none" or key not in obs:
            return None
        ds = obs[key]
        if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
            raise DatasetError(f"{self.path}: data/{name}/obs/{key} has shape {ds.shape} {ds.dtype}, expected "
                               f"(T, H, W, 3) uint8")
        return _images(ImageSequence(self.path, ds.name, ds.shape, self.flip_images), mode)

    def object_states(self, name: str) -> np.ndarray:
        """(T, object_dim) robosuite's object state (``obs/object``) of demonstration ``name``: privileged, for
        references and analysis (policies do not see it). Its layout is ``meta["object_layout"]`` in files this
        package wrote."""
        obs = self._f[fmt.DATA][name][fmt.OBS]
        where = f"{self.path}: data/{name}"
        if fmt.OBJECT_KEY not in obs:
            raise DatasetError(f"{where} has no obs/{fmt.OBJECT_KEY} (robosuite's object state)")
        return fmt.read_array(obs, fmt.OBJECT_KEY, where)

    def joint_trajectories(self, split: str | None = None, images: ImagesMode = "lazy") -> list[JointTrajectory]:
        """One trajectory per demonstration of ``split`` (``None``: all)."""
        out = []
        for name in self.demo_names(split):
            d = self._demo_lowdim(name)
            obs = self._f[fmt.DATA][name][fmt.OBS]
            imgs = {k: self._image(name, k, images) for k in obs if k.endswith("_image")} if images != "none" else {}
            out.append(JointTrajectory(
                demo=name,
                actions=np.concatenate([d["actions"][a] for a in ARMS], -1),
                proprio=np.concatenate([d["proprio"][a] for a in ARMS], -1),
                images=imgs, labels=dict(d["labels"]), seed=d["seed"], success=d["success"]))
        return out

    def arm_trajectories(self, split: str | None = None, images: ImagesMode = "lazy") -> list[ArmTrajectory]:
        """Two trajectories per demonstration of ``split`` (robot0's, then robot1's)."""
        out = []
        for name in self.demo_names(split):
            d = self._demo_lowdim(name)
            for arm in ARMS:
                prefix = f"{arm}_"
                out.append(ArmTrajectory(
                    demo=name, arm=arm, actions=d["actions"][arm], proprio=d["proprio"][arm],
                    wrist_image=self._image(name, image_key(WRIST_CAMERA[arm]), images),
                    agentview_image=self._image(name, image_key(AGENTVIEW_CAMERA), images),
                    labels={k[len(prefix):]: v for k, v in d["labels"].items() if k.startswith(prefix)},
                    seed=d["seed"], success=d["success"]))
        return out

    def norm_stats(self, variant: Literal["arm", "joint"] = "arm", split: str | None = "train"
                   ) -> dict[str, NormStats]:
        """``proprio`` and ``actions`` statistics over ``split`` (falls back to all demos if the file has no masks).

        ``arm``: 18-D proprio and 7-D actions pooled over both arms (both are in each arm's base frame);
        ``joint``: 36-D proprio and 14-D actions.
        """
        if split is not None and split not in self.masks and not self.masks:
            split = None
        if variant == "arm":
            trajs = self.arm_trajectories(split, images="none")
        elif variant == "joint":
            trajs = self.joint_trajectories(split, images="none")
        else:
            raise ValueError(f"variant must be 'arm' or 'joint', got {variant!r}")
        return compute_norm_stats(trajs)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def infer_action_frame(meta: dict, env_meta: dict) -> str:
    if meta.get("action_frame"):
        return meta["action_frame"]
    version = fmt.version_tuple(env_meta.get("env_version"))
    if version is None or version < (1, 5):
        return fmt.ACTION_FRAME_WORLD
    return fmt.ACTION_FRAME_BASE


def infer_flip_images(meta: dict, env_meta: dict) -> bool:
    if meta.get("image_convention"):
        return meta["image_convention"] == fmt.IMAGES_FLIPPED
    version = fmt.version_tuple(env_meta.get("env_version"))
    return version is None or version < (1, 5)


def load_demonstrations(path: str | os.PathLike, action_frame: Literal["base", "world"] | None = None,
                        flip_images: bool | None = None, check_values: bool = True,
                        action_labels: Literal["executed", "expert", "auto"] = "executed") -> DemoFile:
    """Open and validate a TwoArmTransport demonstration file (ours or robomimic's).

    ``action_frame`` / ``flip_images`` override what the file's metadata implies (see the module docstring).
    ``action_labels`` picks the actions the trajectories carry: ``executed`` (what ran: transitions, RL),
    ``expert`` (the scripted expert's noise-free actions; an error where the file lacks them) or ``auto`` (expert
    where every demonstration has them, else executed: imitation targets).
    Raises ``DatasetError`` naming the problem for unusable files.
    """
    path = os.fspath(Path(path))
    f = fmt.open_hdf5(path)
    try:
        summary = fmt.validate(f, path, check_values=check_values)
    except BaseException:
        f.close()
        raise
    if action_frame not in (None, fmt.ACTION_FRAME_BASE, fmt.ACTION_FRAME_WORLD):
        f.close()
        raise ValueError(f"action_frame must be 'base', 'world' or None, got {action_frame!r}")
    frame = action_frame or infer_action_frame(summary.meta, summary.env_meta)
    flip = infer_flip_images(summary.meta, summary.env_meta) if flip_images is None else flip_images
    try:
        return DemoFile(path, summary, frame, flip, f, action_labels)
    except BaseException:
        f.close()
        raise


def read_meta(path: str | os.PathLike) -> dict:
    """The ``coop_transport`` metadata of a file ({} for robomimic's)."""
    with fmt.open_hdf5(path) as f:
        raw = f[fmt.DATA].attrs.get(fmt.META_ATTR) if fmt.DATA in f else None
        return json.loads(raw) if raw else {}


# ------------------------------------------------------------------------------------------- chunk sampling
class ChunkDataset:
    """(observation at t, action chunk t..t+H-1) samples over trajectories: π0's training sample.

    Item ``i`` is a dict of numpy arrays:
    ``proprio`` (D,) float32 at t; ``actions`` (H, A) float32 from t, past the end padded by repeating the last
    action; ``action_is_pad`` (H,) bool, True on padded steps (mask them out of the loss); one (h, w, 3) uint8 array
    per image key at t; ``labels/<key>`` at t; ``traj`` and ``t`` (int64 scalars). Torch-free: wrap it in a
    ``torch.utils.data.Dataset`` for training.
    """

    def __init__(self, trajectories: Sequence[JointTrajectory | ArmTrajectory], horizon: int,
                 image_keys: Sequence[str] | None = None, with_labels: bool = True):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not trajectories:
            raise ValueError("no trajectories")
        self.trajectories = list(trajectories)
        self.horizon = horizon
        available = set(self.trajectories[0].images)
        self.image_keys = tuple(sorted(available)) if image_keys is None else tuple(image_keys)
        missing = [k for k in self.image_keys if k not in available]
        if missing:
            raise ValueError(f"image keys {missing} not in the trajectories (they have {sorted(available)})")
        self.with_labels = with_labels
        lengths = np.array([len(tr) for tr in self.trajectories])
        self.index = np.stack([np.repeat(np.arange(len(lengths)), lengths),
                               np.concatenate([np.arange(n) for n in lengths])], 1)  # (N, 2): (traj, t)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k, t = (int(v) for v in self.index[i])
        tr = self.trajectories[k]
        T = len(tr)
        steps = np.arange(t, t + self.horizon)
        item = {
            "proprio": tr.proprio[t],
            "actions": tr.actions[np.minimum(steps, T - 1)],  # (H, A)
            "action_is_pad": steps >= T,  # (H,)
            "traj": np.int64(k),
            "t": np.int64(t),
        }
        for key in self.image_keys:
            item[key] = tr.images[key][t]
        if self.with_labels:
            for key, value in tr.labels.items():
                item[f"labels/{key}"] = value[t]
        return item
