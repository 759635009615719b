"""robomimic's HDF5 demonstration layout: names, the writer of one demonstration, and the layout validator.

The layout (robomimic ``docs/datasets/overview.md``), as coop_transport writes it::

    data/                         attrs: total (int, samples in all demos), env_args (JSON, see ``env_args``),
                                         coop_transport (JSON: generation metadata, action frame, image convention)
      demo_<i>/                   attrs: num_samples (T), model_file (MJCF xml), seed (reset seed), success (bool),
                                         failed_seeds (reset seeds the expert failed on before this demo),
                                         final_state (nstate,) MuJoCo state after the last action
        actions    (T, 14) float64  joint action in [-1, 1]: robot0's 7 then robot1's 7, OSC deltas in each arm's
                                    *base* frame (robosuite 1.5), gripper -1 open / +1 close
        expert_actions (T, 14) float64  the scripted expert's noise-free action at each state (``actions`` adds its
                                    exploration noise); optional, absent in robomimic's files
        states     (T, nstate) float64  flattened MuJoCo state [time, qpos, qvel] *before* each action
        rewards    (T,) float64     sparse task reward r(s') after each action (1 at success)
        dones      (T,) int64       1 at the last step (success or horizon), else 0
        obs/<key>       (T, ...)    observation before each action (robosuite / robomimic key names)
        next_obs/<key>  (T, ...)    observation after each action (low-dim keys; images only on request)
        labels/<key>    (T, ...)    per-step labels of the state before each action (coop_transport.sim.labels)
    mask/train, mask/valid        arrays of demo names (bytes), a seeded 90/10 split

Observations are the live ones ``TransportSim`` returns, exactly what a policy sees at evaluation (robosuite
computes them after the last 2 ms physics substep's kinematics, so recomputing them from ``states`` with
``set_state`` differs by up to about 1e-3; replaying ``actions`` from ``states[0]`` reproduces them bit for bit).
Images are rendered from ``states`` (``render_states``), identically at generation time and later.

Observation keys: every ``robot0_*`` / ``robot1_*`` array robosuite returns (``robot0_eef_pos`` (3,) m world
frame, ``robot0_eef_quat`` (4,) xyzw, ``robot0_gripper_qpos`` (2,), ``robot0_joint_pos`` (7,), ...), ``object``
(robosuite's 41-D ``object-state``; layout in ``data.attrs['coop_transport']['object_layout']``), and camera images
``<camera>_image`` (T, H, W, 3) uint8, natural orientation (row 0 at the top), chunked one frame per chunk and
compressed. robomimic's readers ignore the extra ``labels`` group and the extra attributes.

Reset seeds: demonstration ``i`` is reset with ``demo_seed(i, attempt)`` = 1000 + i + 100000 * attempt, where
``attempt`` counts expert failures before the first success. Evaluation uses seeds 1-100, so evaluation never runs
on a training scene (for fewer than 100000 demonstrations).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from coop_transport.constants import JOINT_ACTION_DIM

FORMAT_VERSION = 1
ENV_NAME = "TwoArmTransport"
ROBOSUITE_ENV_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE

DATA = "data"
MASK = "mask"
DEMO_PREFIX = "demo_"
OBS, NEXT_OBS, LABELS = "obs", "next_obs", "labels"
ACTIONS, STATES, REWARDS, DONES = "actions", "states", "rewards", "dones"
EXPERT_ACTIONS = "expert_actions"  # noise-free labels of a scripted expert (imitation targets; ``actions`` ran)
OBJECT_KEY = "object"  # robosuite's concatenated "object-state"
META_ATTR = "coop_transport"  # JSON attribute of ``data`` written by this package (absent in robomimic's files)
TRAIN, VALID = "train", "valid"

ACTION_FRAME_BASE = "base"  # robosuite >= 1.5: OSC deltas in each arm's base frame
ACTION_FRAME_WORLD = "world"  # robosuite <= 1.4 (robomimic's published files): OSC deltas in the world frame
IMAGES_NATURAL = "opencv"  # row 0 at the top (ours)
IMAGES_FLIPPED = "opengl"  # row 0 at the bottom (robomimic's files rendered through robosuite 1.2 / mujoco-py)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

DEMO_SEED_BASE = 1000
DEMO_SEED_STRIDE = 100_000
EVAL_SEEDS = range(1, 101)
VALID_SPLIT_SEED = 0


class DatasetError(ValueError):
    """A demonstration file that cannot be used: not HDF5, truncated, corrupt, foreign or inconsistent."""


def demo_seed(index: int, attempt: int = 0) -> int:
    """Reset seed of demonstration ``index`` at its ``attempt``-th try (0 first); disjoint from ``EVAL_SEEDS``."""
    if not 0 <= index < DEMO_SEED_STRIDE or attempt < 0:
        raise ValueError(f"demo index must lie in [0, {DEMO_SEED_STRIDE}) and attempt >= 0, got {index}, {attempt}")
    return DEMO_SEED_BASE + index + DEMO_SEED_STRIDE * attempt


def demo_name(index: int) -> str:
    return f"{DEMO_PREFIX}{index}"


def demo_index(name: str) -> int:
    """``'demo_17'`` -> 17 (robomimic orders demonstrations by this number, not lexically)."""
    if not name.startswith(DEMO_PREFIX) or not name[len(DEMO_PREFIX):].isdigit():
        raise ValueError(f"not a demonstration name: {name!r}")
    return int(name[len(DEMO_PREFIX):])


def sorted_demo_names(names) -> list[str]:
    return sorted((n for n in names if n.startswith(DEMO_PREFIX) and n[len(DEMO_PREFIX):].isdigit()), key=demo_index)


def train_valid_split(names: list[str], valid_fraction: float = 0.1, seed: int = VALID_SPLIT_SEED
                      ) -> tuple[list[str], list[str]]:
    """Seeded split of demo names: ``round(valid_fraction * n)`` validation demos, at least one when n >= 2."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1), got {valid_fraction}")
    names = sorted_demo_names(names)
    n_valid = int(round(valid_fraction * len(names)))
    if valid_fraction > 0 and len(names) >= 2:
        n_valid = max(n_valid, 1)
    perm = np.random.default_rng(seed).permutation(len(names))
    valid = sorted_demo_names([names[i] for i in perm[:n_valid]])
    train = sorted_demo_names([names[i] for i in perm[n_valid:]])
    return train, valid


def env_args(env_kwargs: dict, controller_config: dict, env_version: str, cameras: tuple[str, ...] = (),
             image_size: int | None = None) -> dict:
    """robomimic's ``env_args``: how to rebuild the environment with ``robosuite.make``."""
    kwargs = dict(env_kwargs, controller_configs=controller_config)
    if cameras:
        kwargs.update(camera_names=list(cameras), camera_heights=image_size, camera_widths=image_size)
    return {"env_name": ENV_NAME, "type": ROBOSUITE_ENV_TYPE, "env_kwargs": kwargs, "env_version": env_version}


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    parts = []
    for p in str(version).split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def json_default(o):
    """JSON encoder for numpy scalars / arrays and paths in metadata."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------------------------------- writer
@dataclass
class EpisodeRecord:
    """One recorded episode, arrays aligned on the T actions (see the module docstring for shapes)."""

    actions: np.ndarray  # (T, 14)
    states: np.ndarray  # (T, nstate) before each action
    final_state: np.ndarray  # (nstate,) after the last action
    rewards: np.ndarray  # (T,)
    dones: np.ndarray  # (T,)
    obs: dict[str, np.ndarray]  # key -> (T, ...)
    next_obs: dict[str, np.ndarray]  # key -> (T, ...)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, ...)
    seed: int = -1
    success: bool = False
    failed_seeds: tuple[int, ...] = ()
    model_file: str = ""
    expert_actions: np.ndarray | None = None  # (T, 14) noise-free expert actions, or None

    def __len__(self) -> int:
        return len(self.actions)


def image_dataset_kwargs(shape: tuple[int, ...], compression: str) -> dict:
    """One frame per chunk (random access by a chunk sampler), compressed (``gzip`` level 4, ``lzf`` or ``none``)."""
    kw: dict = {"chunks": (1, *shape[1:])} if shape[0] > 0 else {}
    if compression == "gzip":
        kw.update(compression="gzip", compression_opts=4)
    elif compression == "lzf":
        kw.update(compression="lzf")
    elif compression != "none":
        raise ValueError(f"compression must be 'gzip', 'lzf' or 'none', got {compression!r}")
    return kw


def is_image_key(key: str, array: np.ndarray | None = None) -> bool:
    return key.endswith("_image") or (array is not None and array.dtype == np.uint8 and array.ndim == 4)


def write_obs(group, key: str, array: np.ndarray, compression: str) -> None:
    """One observation array; images get per-frame chunks and compression, low-dim arrays are stored plainly."""
    if key in group:
        del group[key]
    if is_image_key(key, array):
        group.create_dataset(key, data=np.asarray(array, dtype=np.uint8), **image_dataset_kwargs(array.shape,
                                                                                                 compression))
    else:
        group.create_dataset(key, data=array)


def write_demo(group, episode: EpisodeRecord, compression: str = "gzip") -> None:
    """Write one episode into an (empty) ``data/demo_i`` group."""
    T = len(episode)
    group.create_dataset(ACTIONS, data=np.asarray(episode.actions, dtype=np.float64))
    if episode.expert_actions is not None:
        if np.shape(episode.expert_actions) != np.shape(episode.actions):
            raise ValueError(f"expert_actions has shape {np.shape(episode.expert_actions)}, actions "
                             f"{np.shape(episode.actions)}")
        group.create_dataset(EXPERT_ACTIONS, data=np.asarray(episode.expert_actions, dtype=np.float64))
    group.create_dataset(STATES, data=np.asarray(episode.states, dtype=np.float64))
    group.create_dataset(REWARDS, data=np.asarray(episode.rewards, dtype=np.float64))
    group.create_dataset(DONES, data=np.asarray(episode.dones, dtype=np.int64))
    for sub, arrays in ((OBS, episode.obs), (NEXT_OBS, episode.next_obs), (LABELS, episode.labels)):
        if not arrays and sub == LABELS:
            continue
        g = group.create_group(sub)
        for key, value in arrays.items():
            if len(value) != T:
                raise ValueError(f"{sub}/{key} has {len(value)} steps, actions have {T}")
            write_obs(g, key, np.asarray(value), compression)
    group.attrs["num_samples"] = T
    group.attrs["model_file"] = episode.model_file
    group.attrs["seed"] = int(episode.seed)
    group.attrs["success"] = bool(episode.success)
    group.attrs["failed_seeds"] = np.asarray(episode.failed_seeds, dtype=np.int64)
    group.attrs["final_state"] = np.asarray(episode.final_state, dtype=np.float64)


def write_masks(f, train: list[str], valid: list[str]) -> None:
    for key, names in ((TRAIN, train), (VALID, valid)):
        path = f"{MASK}/{key}"
        if path in f:
            del f[path]
        f.create_dataset(path, data=np.array(names, dtype="S"))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a finished file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ validator
def check_signature(path: str | os.PathLike) -> None:
    """Raise ``DatasetError`` unless ``path`` exists and starts like an HDF5 file (signature at 0, 512, 1024...)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DatasetError(f"{path}: is a directory, not an HDF5 demonstration file")
    size = os.path.getsize(path)
    if size == 0:
        raise DatasetError(f"{path}: empty file (0 bytes), not an HDF5 demonstration file")
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= size:
            fh.seek(offset)
            if fh.read(8) == HDF5_SIGNATURE:
                return
            offset = 512 if offset == 0 else offset * 2
    raise DatasetError(f"{path}: not an HDF5 file (no HDF5 signature in its first bytes; {size} bytes)")


def open_hdf5(path: str | os.PathLike, mode: str = "r"):
    """Open an HDF5 file, turning HDF5's low-level errors into a ``DatasetError`` that names the problem."""
    import h5py

    check_signature(path)
    try:
        return h5py.File(path, mode)
    except OSError as e:
        msg = str(e)
        what = "truncated (shorter than its header says; an interrupted write or copy?)" if "truncated" in msg \
            else "corrupt or unreadable"
        raise DatasetError(f"{os.fspath(path)}: HDF5 file is {what}: {msg}") from e


def publish_validated(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Validate a finished temporary file, flush it to disk and move it to ``dst`` in one rename: a file at ``dst``
    is always complete."""
    with open_hdf5(tmp) as f:
        validate(f, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, dst)


def read_array(f, name: str, path: str = "") -> np.ndarray:
    """Read a whole dataset, naming it in the error if its bytes cannot be read (truncated or corrupt file)."""
    try:
        return f[name][()]
    except (OSError, RuntimeError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read '{name}' (file truncated or corrupt?): {e}") from e


def read_env_args(f, path: str = "") -> dict:
    if DATA not in f or not hasattr(f[DATA], "keys"):
        raise DatasetError(f"{path}: no 'data' group; not a robomimic-layout demonstration file "
                           f"(top-level keys: {sorted(f.keys())})")
    raw = f[DATA].attrs.get("env_args")
    if raw is None:
        raise DatasetError(f"{path}: 'data' has no 'env_args' attribute; not a robomimic-layout demonstration file")
    try:
        env_meta = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'data' attribute 'env_args' is not valid JSON: {e}") from e
    name = env_meta.get("env_name")
    if name != ENV_NAME:
        raise DatasetError(f"{path}: foreign file: env_name is {name!r}, expected {ENV_NAME!r} "
                           f"(this reader only handles TwoArmTransport demonstrations)")
    return env_meta


@dataclass(frozen=True)
class FileSummary:
    """What the validator learned about a file."""

    env_meta: dict
    meta: dict  # our ``coop_transport`` attribute ({} for robomimic's files)
    demos: tuple[str, ...]
    lengths: dict[str, int]
    masks: dict[str, tuple[str, ...]]
    obs_keys: tuple[str, ...]  # keys of the first demo's obs group

    @property
    def total(self) -> int:
        return sum(self.lengths.values())


REQUIRED_OBS = tuple(f"robot{i}_{k}" for i in range(2) for k in ("eef_pos", "eef_quat", "gripper_qpos", "joint_pos"))


def validate(f, path: str = "", check_values: bool = True) -> FileSummary:
    """Check robomimic's layout and the consistency of every demonstration; raise ``DatasetError`` naming the
    first problem found. Reads actions (for NaN checks) but no images."""
    env_meta = read_env_args(f, path)
    data = f[DATA]
    try:
        meta = json.loads(data.attrs[META_ATTR]) if META_ATTR in data.attrs else {}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'data' attribute '{META_ATTR}' is not valid JSON: {e}") from e
    demos = sorted_demo_names(data.keys())
    if not demos:
        raise DatasetError(f"{path}: 'data' holds no demonstrations (expected groups demo_0, demo_1, ...)")
    lengths: dict[str, int] = {}
    obs_keys: tuple[str, ...] = ()
    for name in demos:
        g = data[name]
        where = f"{path}: data/{name}"
        if ACTIONS not in g:
            raise DatasetError(f"{where} has no 'actions' dataset")
        if OBS not in g:
            raise DatasetError(f"{where} has no 'obs' group")
        shape = g[ACTIONS].shape
        if len(shape) != 2 or shape[1] != JOINT_ACTION_DIM:
            raise DatasetError(f"{where}/actions has shape {shape}, expected (T, {JOINT_ACTION_DIM})")
        T = shape[0]
        if T == 0:
            raise DatasetError(f"{where} is empty (0 steps)")
        if "num_samples" in g.attrs and int(g.attrs["num_samples"]) != T:
            raise DatasetError(f"{where}: attribute num_samples={int(g.attrs['num_samples'])} but actions has {T} "
                               f"steps")
        if EXPERT_ACTIONS in g and g[EXPERT_ACTIONS].shape != shape:
            raise DatasetError(f"{where}/{EXPERT_ACTIONS} has shape {g[EXPERT_ACTIONS].shape}, actions {shape}")
        for key in (STATES, REWARDS, DONES):
            if key in g and g[key].shape[0] != T:
                raise DatasetError(f"{where}/{key} has {g[key].shape[0]} steps, actions have {T} (length mismatch)")
        for sub in (OBS, NEXT_OBS, LABELS):
            if sub not in g:
                continue
            for key, ds in g[sub].items():
                if ds.shape[0] != T:
                    raise DatasetError(f"{where}/{sub}/{key} has {ds.shape[0]} steps, actions have {T} "
                                       f"(length mismatch between observations and actions)")
        missing = [k for k in REQUIRED_OBS if k not in g[OBS]]
        if missing:
            raise DatasetError(f"{where}/obs lacks {missing} (needed for proprioception)")
        if not obs_keys:
            obs_keys = tuple(sorted(g[OBS].keys()))
        if check_values:
            for key in (ACTIONS, EXPERT_ACTIONS):
                if key not in g:
                    continue
                bad = ~np.isfinite(read_array(g, key, where))
                if bad.any():
                    t, j = np.argwhere(bad)[0]
                    raise DatasetError(f"{where}/{key} contains NaN or inf ({int(bad.sum())} values, first at step "
                                       f"{t}, dimension {j})")
        lengths[name] = T
    if "total" in data.attrs and int(data.attrs["total"]) != sum(lengths.values()):
        raise DatasetError(f"{path}: data attribute total={int(data.attrs['total'])} but the demonstrations hold "
                           f"{sum(lengths.values())} samples")
    masks: dict[str, tuple[str, ...]] = {}
    if MASK in f:
        for key, ds in f[MASK].items():
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in read_array(f[MASK], key, path))
            unknown = [n for n in names if n not in lengths]
            if unknown:
                raise DatasetError(f"{path}: mask/{key} names demonstrations that do not exist: {unknown[:5]}")
            masks[key] = names
    return FileSummary(env_meta, meta, tuple(demos), lengths, masks, obs_keys)

