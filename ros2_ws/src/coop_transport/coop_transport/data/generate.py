"""Parallel, resumable, atomic generation of scripted demonstrations in robomimic's HDF5 layout.

``generate(GenerateConfig(out=..., episodes=200))``:

1. Worker processes (``spawn``; ``workers`` of them, each with its own ``TransportSim``) take demonstration indices.
   Demo ``i`` runs the expert (``runner``, by default ``coop_transport.sim.expert.run_expert_episode``) from reset
   seed ``demo_seed(i, 0)``; an unsuccessful episode is retried from ``demo_seed(i, 1)``, ... (at most
   ``max_attempts``), and the seeds that failed are recorded. Each finished demonstration is written to its own shard
   ``<out>.partial/demo_000017.hdf5`` (written as ``.tmp`` and renamed, so a shard is complete or absent).
2. The parent shows a progress bar (demonstrations done, expert successes / attempts) and, once all shards exist,
   merges them in index order into ``<out>.tmp``, adds ``env_args``, metadata and the seeded train/valid masks,
   validates the result and renames it to ``<out>``. Only then is ``<out>.partial/`` removed.

An interrupted run (Ctrl-C, ``kill``, a crash) leaves no ``<out>``; rerunning the same command reuses the finished
shards after checking that they were produced with the same settings (``shard_fingerprint``), and refuses with a
clear error if not. An existing ``<out>`` is never replaced without ``overwrite``.

Images are rendered from the recorded MuJoCo states after each successful episode (``render_states.StateRenderer``),
so the physics are the same with and without cameras and ``render_states.render_file`` can add the same images
later, on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from coop_transport.constants import HORIZON, SMALL_IMAGE_SIZE
from coop_transport.data import hdf5_format as fmt
from coop_transport.data._workers import process_map
from coop_transport.data.render_states import DEFAULT_CAMERAS

DEFAULT_RUNNER = "coop_transport.sim.expert:run_expert_episode"
LABELS_MODULE = "coop_transport.sim.labels"
SHARD_GROUP = "demo"
LABELLING_STAGE_TIMEOUT = 10**9  # steps: never, while the expert labels a learner's episode


class GenerationError(RuntimeError):
    """Generation cannot proceed (mismatched shards from another configuration, expert failures, a second run)."""


@dataclass(frozen=True)
class GenerateConfig:
    """Generate scripted TwoArmTransport demonstrations into one robomimic-layout HDF5 file."""

    out: Path = Path("data/transport_scripted.hdf5")
    """Output file; shards of an unfinished run live in ``<out>.partial/``."""
    episodes: int = 200
    """Number of demonstrations (successful expert episodes unless ``successful_only`` is off)."""
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    """Worker processes, each with its own simulation."""
    images: bool = False
    """Render camera images at generation time (slow on CPU: ~8 steps/s with three 96x96 cameras). Without them,
    add images later from the saved states: ``training/demos.py render --in OUT``."""
    image_size: int = SMALL_IMAGE_SIZE
    """Square image resolution in pixels (with ``--images``)."""
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    """Cameras rendered with ``--images`` (stored as ``obs/<camera>_image``)."""
    next_obs_images: bool = False
    """Also store images in ``next_obs`` (doubles image storage; BC and π0 training do not read them)."""
    horizon: int = HORIZON
    """Episode length limit in control steps (20 Hz)."""
    successful_only: bool = True
    """Keep only successful expert episodes, retrying with the next seed; off: keep every episode (tests)."""
    max_attempts: int = 10
    """Seeds tried per demonstration before giving up."""
    seed_offset: int = 0
    """Demonstration i starts from the reset seed of index i + seed_offset: a held-out test file (e.g. 50000)
    shares no initial state with a training file made with the default 0."""
    valid_fraction: float = 0.1
    """Fraction of demonstrations in ``mask/valid`` (seeded split, at least one when there are two or more)."""
    split_seed: int = fmt.VALID_SPLIT_SEED
    """Seed of the train/valid split."""
    compression: Literal["gzip", "lzf", "none"] = "gzip"
    """HDF5 compression of image datasets."""
    labels: bool = True
    """Store per-step labels from ``coop_transport.sim.labels`` (skipped when that module is absent)."""
    runner: str = DEFAULT_RUNNER
    """``module:function`` with ``run_expert_episode``'s signature ``(sim, seed, expert=None, on_step=None)``."""
    expert_handover: Literal["observed", "planned"] = "observed"
    """The scripted expert's hand-over rule (``ExpertConfig.handover``): observed, or planned to regenerate the
    demonstrations the shipped default policy was trained on. Only for the default runner."""
    expert_handover_spread: float = 0.0
    """Std (m) of where the expert's robot0 presents the payload around the hand-over point
    (``ExpertConfig.handover_spread``; 0: millimetres apart, as in earlier demonstrations). Default runner only."""
    expert_handover_hold_steps: int = 3
    """Control steps the expert's robot1 holds the payload before its robot0 lets go
    (``ExpertConfig.handover_hold_steps``). Default runner only."""
    expert_handover_close_dwell: int = 0
    """Control steps the expert's robot1 waits at its hand-over grip point, fingers open, before closing
    (``ExpertConfig.handover_close_dwell``). Default runner only."""
    learner: Path | None = None
    """DAgger: a π0 policy directory that drives every episode (under its variant's default recipe) instead of the
    expert, while the scripted expert labels each state the policy visits with what it would do there
    (``expert_actions``; ``actions`` holds what the policy did). Every episode is kept, successful or not. Give
    a ``seed_offset`` no other file used, so that the scenes are new ones."""
    learner_device: str = "auto"
    """Device of the learner policy in each worker (cuda, cpu, auto)."""
    learner_backend: str = "torch"
    """Inference backend of the learner policy (``coop_transport.export.backends``: torch, cudagraph, ...)."""
    overwrite: bool = False
    """Replace an existing complete ``out`` (only once the new file is complete)."""
    keep_shards: bool = False
    """Keep ``<out>.partial/`` after a successful merge."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        bad = []
        if self.episodes < 1:
            bad.append(f"episodes={self.episodes} (must be >= 1)")
        if self.episodes > fmt.DEMO_SEED_STRIDE:
            bad.append(f"episodes={self.episodes} (at most {fmt.DEMO_SEED_STRIDE}, or reset seeds would collide)")
        if not 0 <= self.seed_offset or self.seed_offset + self.episodes > fmt.DEMO_SEED_STRIDE:
            bad.append(f"seed_offset={self.seed_offset} (seed_offset + episodes must lie in [0, "
                       f"{fmt.DEMO_SEED_STRIDE}])")
        if self.workers < 1:
            bad.append(f"workers={self.workers} (must be >= 1)")
        if self.max_attempts < 1:
            bad.append(f"max_attempts={self.max_attempts} (must be >= 1)")
        if not 8 <= self.image_size <= 1024:
            bad.append(f"image_size={self.image_size} (must lie in [8, 1024])")
        if self.images and not self.cameras:
            bad.append("cameras=() with images on")
        if not 0.0 <= self.valid_fraction < 1.0:
            bad.append(f"valid_fraction={self.valid_fraction} (must lie in [0, 1))")
        if self.horizon < 1:
            bad.append(f"horizon={self.horizon} (must be >= 1)")
        if ":" not in self.runner:
            bad.append(f"runner={self.runner!r} (expected 'module:function')")
        if self.expert_handover_spread and self.runner != DEFAULT_RUNNER:
            bad.append(f"expert_handover_spread={self.expert_handover_spread} with runner={self.runner!r} (it "
                       f"configures the scripted expert of the default runner {DEFAULT_RUNNER!r})")
        handover_timing = (self.expert_handover_hold_steps, self.expert_handover_close_dwell)
        default_timing = (GenerateConfig.expert_handover_hold_steps, GenerateConfig.expert_handover_close_dwell)
        if handover_timing != default_timing and self.runner != DEFAULT_RUNNER:
            bad.append(f"expert_handover_hold_steps / expert_handover_close_dwell with runner={self.runner!r} (they "
                       f"configure the scripted expert of the default runner {DEFAULT_RUNNER!r})")
        if self.expert_handover != "observed" and self.runner != DEFAULT_RUNNER:
            bad.append(f"expert_handover={self.expert_handover!r} with runner={self.runner!r} (it configures the "
                       f"scripted expert of the default runner {DEFAULT_RUNNER!r})")
        if self.learner is not None:
            if self.runner != DEFAULT_RUNNER:
                bad.append(f"learner with runner={self.runner!r} (the learner's episodes are labelled by the scripted "
                           f"expert of the default runner {DEFAULT_RUNNER!r})")
            if not (Path(self.learner) / "config.json").is_file():
                bad.append(f"learner={str(self.learner)!r} (not a π0 policy directory: no config.json)")
        if bad:
            raise ValueError("invalid GenerateConfig: " + "; ".join(bad))

    @property
    def keeps_failures(self) -> bool:
        """Failed episodes are kept: on request, and always for a learner (its failures are what DAgger is for)."""
        return not self.successful_only or self.learner is not None


def paths(out: Path) -> tuple[Path, Path]:
    """(``<out>.partial`` shard directory, ``<out>.tmp`` merge target)."""
    out = Path(out)
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".tmp")


def shard_path(partial: Path, index: int) -> Path:
    return partial / f"demo_{index:06d}.hdf5"


def resolve_runner(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise GenerationError(f"cannot import the episode runner {spec!r}: {e}") from e


def _expert_config(spec: str, overrides: dict | None = None) -> dict | None:
    # The runner's module may define an ``ExpertConfig`` dataclass (the scripted expert does): record the
    # configuration it runs with (its defaults, with ``overrides`` for the default runner).
    resolve_runner(spec)  # a clear error now rather than in every worker
    module = importlib.import_module(spec.partition(":")[0])
    cls = getattr(module, "ExpertConfig", None)
    if cls is not None and dataclasses.is_dataclass(cls):
        return json.loads(json.dumps(asdict(cls(**(overrides or {}))), default=fmt.json_default))
    return None


def _expert_overrides(config: GenerateConfig) -> dict:
    if config.runner != DEFAULT_RUNNER:
        return {}
    overrides = {"handover": config.expert_handover, "handover_hold_steps": config.expert_handover_hold_steps,
                 "handover_close_dwell": config.expert_handover_close_dwell}
    if config.expert_handover_spread:
        overrides["handover_spread"] = config.expert_handover_spread
    if config.learner is not None:
        # The stage timeout rescues the expert from its own jams by backing off to the home pose; while it only
        # labels, a slow learner would trip it and the labels would say "go home" in the middle of a grasp.
        overrides["stage_timeout"] = LABELLING_STAGE_TIMEOUT
        overrides["labelling"] = True  # the learner grasps its own way: follow it down and into the lift
    return overrides


def _runner(config: GenerateConfig, learner=None) -> Callable:
    """The episode runner; the default one gets a scripted expert configured by ``config``. With a ``learner``
    controller, the learner acts and the expert only labels (``run_learner_episode``)."""
    runner = resolve_runner(config.runner)
    overrides = _expert_overrides(config)
    if not overrides and learner is None:
        return runner
    from coop_transport.sim.expert import ExpertConfig, ScriptedExpert, run_learner_episode

    expert_config = ExpertConfig(**overrides)
    if learner is not None:
        return lambda sim, seed, on_step=None: run_learner_episode(sim, seed, learner,
                                                                   ScriptedExpert(expert_config), on_step=on_step)
    # A fresh expert per episode, seeded as the runner's own default (expert seed 0).
    return lambda sim, seed, on_step=None: runner(sim, seed, expert=ScriptedExpert(expert_config), on_step=on_step)


def _learner_identity(config: GenerateConfig) -> dict | None:
    """The learner policy a DAgger file was collected with: its weights' sha256, step and inference backend."""
    if config.learner is None:
        return None
    meta = json.loads((Path(config.learner) / "config.json").read_text())
    return {"weights_sha256": meta.get("weights_sha256"), "step": meta.get("step"), "backend": config.learner_backend}


def _labels_available() -> bool:
    try:
        return importlib.util.find_spec(LABELS_MODULE) is not None
    except ModuleNotFoundError:
        return False


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def shard_fingerprint(config: GenerateConfig) -> dict:
    """Everything that decides a shard's content; shards are reused only when this matches exactly."""
    import coop_transport

    return {
        "format_version": fmt.FORMAT_VERSION,
        "coop_transport": coop_transport.__version__,
        "robosuite": _package_version("robosuite"),
        "mujoco": _package_version("mujoco"),
        "runner": config.runner,
        "expert_config": _expert_config(config.runner, _expert_overrides(config)),
        "horizon": config.horizon,
        "successful_only": not config.keeps_failures,
        "learner": _learner_identity(config),
        "seed_scheme": f"{fmt.DEMO_SEED_BASE} + i + {config.seed_offset} + {fmt.DEMO_SEED_STRIDE} * attempt"
        if config.seed_offset else f"{fmt.DEMO_SEED_BASE} + i + {fmt.DEMO_SEED_STRIDE} * attempt",
        "images": config.images,
        "image_size": config.image_size if config.images else None,
        "cameras": list(config.cameras) if config.images else [],
        "next_obs_images": config.next_obs_images and config.images,
        "compression": config.compression,
        "labels": config.labels and _labels_available(),
        "expert_actions": True,  # shards record the expert's noise-free actions (files before this did not)
    }


def _fingerprint_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: shard {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------ recording
def object_state_keys(sim) -> list[str]:
    """robosuite's ``object-state`` is the concatenation of the active object-modality observables, in order."""
    return [name for name, o in sim.rs_env._observables.items()
            if o.modality == "object" and o.is_enabled() and o.is_active()]


def object_layout(obs: dict, object_keys: list[str]) -> list[list]:
    """[[key, start, end], ...]: where each object observable sits in the ``object`` vector."""
    layout, start = [], 0
    for key in object_keys:
        size = int(np.asarray(obs[key]).size)
        layout.append([key, start, start + size])
        start += size
    return layout


def object_vector(obs: dict, object_keys: list[str]) -> np.ndarray:
    """robosuite's ``object-state``: the object observables ``object_keys`` concatenated (41-D for TwoArmTransport)."""
    return np.concatenate([np.atleast_1d(np.asarray(obs[k], dtype=np.float64)) for k in object_keys])


def lowdim_obs(obs: dict, object_keys: list[str]) -> dict[str, np.ndarray]:
    """robomimic's low-dim observation: every ``robot{i}_*`` array plus ``object`` (``object_vector``)."""
    out = {k: np.array(v) for k, v in obs.items()
           if k.startswith(("robot0_", "robot1_")) and not fmt.is_image_key(k, np.asarray(v))}
    out[fmt.OBJECT_KEY] = object_vector(obs, object_keys)
    return out


def _stack(dicts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]} if dicts else {}


def record_episode(sim, seed: int, runner: Callable, object_keys: list[str], labels_fn: Callable | None = None
                   ) -> tuple[fmt.EpisodeRecord, dict]:
    """Run ``runner(sim, seed, on_step=...)`` and record the episode in robomimic's alignment (no images).

    The observation and state *before* the first action are captured by wrapping ``sim.reset`` for the duration
    of the call (the runner resets the simulation itself); everything after comes from ``on_step``.
    """
    snaps: list[tuple[dict, np.ndarray, dict | None]] = []  # (low-dim obs, state, labels) at t = 0..T
    actions: list[np.ndarray] = []
    intended: list[np.ndarray | None] = []  # the expert's noise-free actions, where the runner reports them
    rewards: list[float] = []
    dones: list[bool] = []

    def snapshot(obs: dict) -> None:
        snaps.append((lowdim_obs(obs, object_keys), sim.get_state(), labels_fn(sim) if labels_fn else None))

    original_reset = sim.reset

    def recording_reset(*args, **kwargs):
        obs = original_reset(*args, **kwargs)
        snaps.clear(), actions.clear(), intended.clear(), rewards.clear(), dones.clear()
        snapshot(obs)
        return obs

    def on_step(obs, action, reward, done, info) -> None:
        actions.append(np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0))  # what the simulation applied
        clean = info.get("expert_action") if isinstance(info, dict) else None
        intended.append(None if clean is None else np.clip(np.asarray(clean, dtype=np.float64), -1.0, 1.0))
        rewards.append(float(reward))
        dones.append(bool(done))
        snapshot(obs)

    sim.reset = recording_reset  # instance attribute: shadows the method for this episode only
    try:
        result = runner(sim, seed, on_step=on_step)
    finally:
        del sim.reset
    T = len(actions)
    if not snaps or len(snaps) != T + 1:
        raise GenerationError(f"runner {runner!r} did not reset the simulation or reported steps inconsistently "
                              f"({len(snaps)} observations for {T} actions)")
    if T == 0:
        raise GenerationError(f"runner {runner!r} produced an episode without steps (seed {seed})")
    if "length" in result and int(result["length"]) != T:
        raise GenerationError(f"runner reported length {result['length']} but {T} steps were observed (seed {seed})")
    obs_list = [s[0] for s in snaps]
    labels = _stack([s[2] for s in snaps[:-1]]) if labels_fn else {}
    record = fmt.EpisodeRecord(
        actions=np.stack(actions),
        states=np.stack([s[1] for s in snaps[:-1]]),
        final_state=snaps[-1][1],
        rewards=np.asarray(rewards),
        dones=np.asarray(dones, dtype=np.int64),
        obs=_stack(obs_list[:-1]),
        next_obs=_stack(obs_list[1:]),
        labels={k: np.asarray(v) for k, v in labels.items()},
        seed=int(seed),
        success=bool(result["success"]),
        model_file=sim.model_xml(),
        expert_actions=np.stack(intended) if all(a is not None for a in intended) else None,
    )
    return record, result


def add_images(record: fmt.EpisodeRecord, renderer, next_obs_images: bool) -> None:
    """Render every camera at the recorded states (and at the final state for ``next_obs``)."""
    images = renderer.render_many(record.states)
    record.obs.update(images)
    if next_obs_images:
        last = renderer.render(record.final_state)
        record.next_obs.update({k: np.concatenate([v[1:], last[k][None]], 0) for k, v in images.items()})


# --------------------------------------------------------------------------------------------------- worker
_W: dict = {}


def _worker_init(config: GenerateConfig, fingerprint: dict, in_process: bool = False) -> None:
    if in_process:
        _setup_worker(config, fingerprint)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    try:
        _setup_worker(config, fingerprint)
    except BaseException:  # noqa: BLE001 - report the traceback through the first task instead of a broken pool
        import traceback

        _W["init_error"] = traceback.format_exc()


def _setup_worker(config: GenerateConfig, fingerprint: dict) -> None:
    from coop_transport.sim import SimConfig, TransportSim  # configures MUJOCO_GL first

    learner, sim_overrides = None, {}
    if config.learner is not None:
        from coop_transport.evaluation import ControllerSpec, build_controller

        learner, sim_overrides = build_controller(ControllerSpec("pi0", {
            "policy": str(config.learner), "device": config.learner_device, "backend": config.learner_backend}))
        if config.images and sim_overrides.get("image_size") != config.image_size:
            raise GenerationError(f"the learner {config.learner} sees {sim_overrides.get('image_size')} px images "
                                  f"but --image-size is {config.image_size}: its training data would not match it")
    sim = TransportSim(SimConfig(horizon=config.horizon, **sim_overrides))
    renderer = None
    if config.images:
        from coop_transport.data.render_states import StateRenderer

        renderer = StateRenderer(sim.rs_env.sim.model._model, tuple(config.cameras), config.image_size)
    labels_fn = None
    if fingerprint["labels"]:
        labels_fn = importlib.import_module(LABELS_MODULE).step_labels
    _W.update(config=config, fingerprint=fingerprint, sim=sim, renderer=renderer, labels_fn=labels_fn,
              runner=_runner(config, learner), object_keys=object_state_keys(sim),
              env_args=fmt.env_args(sim.env_kwargs | {"seed": 0}, sim.controller_config,
                                    _package_version("robosuite") or "unknown",
                                    tuple(config.cameras) if config.images else (), config.image_size))


def _worker_close() -> None:
    if _W.get("renderer") is not None:
        _W["renderer"].close()
    if _W.get("sim") is not None:
        _W["sim"].close()
    _W.clear()


def _run_demo(index: int) -> dict:
    """Produce demonstration ``index`` (retrying seeds) and write its shard; returns a small summary."""
    if "init_error" in _W:
        raise GenerationError(f"worker process {os.getpid()} could not start:\n{_W['init_error']}")
    config: GenerateConfig = _W["config"]
    partial = paths(config.out)[0]
    failed: list[int] = []
    t_start = time.perf_counter()
    steps = 0
    for attempt in range(config.max_attempts):
        seed = fmt.demo_seed(index + config.seed_offset, attempt)
        t0 = time.perf_counter()
        record, _ = record_episode(_W["sim"], seed, _W["runner"], _W["object_keys"], _W["labels_fn"])
        if "object_layout" not in _W:
            _W["object_layout"] = object_layout(_W["sim"].lowdim_observation, _W["object_keys"])
        steps += len(record)
        if record.success or config.keeps_failures:
            t_render = time.perf_counter()
            if _W["renderer"] is not None:
                add_images(record, _W["renderer"], config.next_obs_images)
            t_end = time.perf_counter()
            record.failed_seeds = tuple(failed)
            timing = {"episode_seconds": t_render - t0, "render_seconds": t_end - t_render,
                      "total_seconds": t_end - t_start, "steps_simulated": steps}
            _write_shard(partial, index, record, timing)
            return {"index": index, "ok": True, "success": record.success, "seed": seed, "length": len(record),
                    "attempts": attempt + 1, "failed_seeds": failed, **timing}
        failed.append(seed)
    return {"index": index, "ok": False, "success": False, "seed": None, "length": 0, "attempts": config.max_attempts,
            "failed_seeds": failed, "total_seconds": time.perf_counter() - t_start, "steps_simulated": steps}


def _write_shard(partial: Path, index: int, record: fmt.EpisodeRecord, timing: dict) -> None:
    import h5py

    final = shard_path(partial, index)
    tmp = final.with_suffix(".hdf5.tmp")
    with h5py.File(tmp, "w") as f:
        fmt.write_demo(f.create_group(SHARD_GROUP), record, _W["config"].compression)
        f.attrs["index"] = index
        f.attrs["fingerprint"] = json.dumps(_W["fingerprint"], sort_keys=True)
        f.attrs["env_args"] = json.dumps(_W["env_args"], default=fmt.json_default)
        f.attrs["object_layout"] = json.dumps(_W["object_layout"])
        f.attrs["timing"] = json.dumps(timing)
    fmt.fsync_path(tmp)
    os.replace(tmp, final)


# --------------------------------------------------------------------------------------------------- parent
class _Lock:
    """``<out>.partial/LOCK`` holding the generator's pid: a second concurrent run on the same output refuses."""

    def __init__(self, directory: Path):
        self.path = directory / "LOCK"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise GenerationError(f"another generator (pid {pid}) is writing {self.path.parent}; wait for it "
                                          f"or stop it") from None
                self.path.unlink(missing_ok=True)  # stale lock of a killed run
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise GenerationError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only if no shard was written (a run that failed early)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scan_shards(partial: Path, fingerprint: dict, episodes: int) -> dict[int, dict]:
    """Finished shards with index < ``episodes``; raises ``GenerationError`` if one came from other settings."""
    import h5py

    found: dict[int, dict] = {}
    for p in sorted(partial.glob("demo_*.hdf5")):
        try:
            index = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if index >= episodes:
            continue
        try:
            with h5py.File(p, "r") as f:
                theirs = json.loads(f.attrs["fingerprint"])
                g = f[SHARD_GROUP]
                summary = {"index": index, "ok": True, "success": bool(g.attrs["success"]),
                           "seed": int(g.attrs["seed"]), "length": int(g.attrs["num_samples"]),
                           "failed_seeds": [int(s) for s in g.attrs["failed_seeds"]],
                           **json.loads(f.attrs.get("timing", "{}")), "reused": True}
                summary["attempts"] = len(summary["failed_seeds"]) + 1
        except (OSError, KeyError, ValueError) as e:
            warnings.warn(f"discarding unreadable shard {p} ({e}); it will be regenerated", stacklevel=2)
            p.unlink(missing_ok=True)
            continue
        diff = _fingerprint_diff(theirs, fingerprint)
        if diff:
            raise GenerationError(
                f"{p} was generated with other settings ({'; '.join(diff)}). Rerun with the original settings to "
                f"resume, or delete {partial} to start over.")
        found[index] = summary
    return found


def _map_demos(config: GenerateConfig, fingerprint: dict, todo: list[int]):
    """Yield demo summaries as workers finish them (in-process for one worker)."""
    if not todo:
        return
    workers = min(config.workers, len(todo))
    if workers == 1:
        _worker_init(config, fingerprint, in_process=True)
        try:
            for i in todo:
                yield _run_demo(i)
        finally:
            _worker_close()
        return
    yield from process_map(_run_demo, todo, workers, _worker_init, (config, fingerprint), ordered=False,
                           window=len(todo))


class _TermAsInterrupt:
    """Turn SIGTERM into KeyboardInterrupt while generating, so that ``kill`` also stops the worker processes."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    @staticmethod
    def _handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def generate(config: GenerateConfig) -> Path:
    """Generate (or finish generating) ``config.out``; returns its path once complete and validated."""
    from tqdm import tqdm

    out = Path(config.out).absolute()
    config = dataclasses.replace(config, out=out)  # workers may not share the caller's idea of relative paths
    partial, tmp = paths(out)
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (the new file replaces it only once "
                              f"complete)")
    partial.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with _Lock(partial), _TermAsInterrupt():
        for stray in partial.glob("*.tmp"):  # shards an interrupted run was writing
            stray.unlink()
        tmp.unlink(missing_ok=True)
        fingerprint = shard_fingerprint(config)
        done = scan_shards(partial, fingerprint, config.episodes)
        todo = [i for i in range(config.episodes) if i not in done]
        summaries = dict(done)
        bar = tqdm(total=config.episodes, initial=len(done), desc=f"demos -> {out.name}", unit="demo",
                   disable=not config.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            for s in _map_demos(config, fingerprint, todo):
                summaries[s["index"]] = s
                bar.update()
                new = [v for v in summaries.values() if not v.get("reused")]
                ok = sum(v["success"] for v in new)
                tried = sum(v["attempts"] for v in new)
                bar.set_postfix_str(f"expert success {ok}/{tried} episodes")
        finally:
            bar.close()
        failed = sorted(i for i, s in summaries.items() if not s["ok"])
        if failed:
            raise GenerationError(
                f"the expert failed on all {config.max_attempts} seeds of demos {failed[:10]}"
                f"{' ...' if len(failed) > 10 else ''}; raise --max-attempts. The {len(summaries) - len(failed)} "
                f"finished demos are kept in {partial} and will be reused.")
        try:
            _merge(config, fingerprint, partial, tmp, summaries, wall_seconds=time.time() - t0)
            fmt.publish_validated(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if not config.keep_shards:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _merge(config: GenerateConfig, fingerprint: dict, partial: Path, tmp: Path, summaries: dict[int, dict],
           wall_seconds: float) -> None:
    import h5py

    names = [fmt.demo_name(i) for i in range(config.episodes)]
    total = 0
    env_args = layout = None
    labels: list[str] = []
    with h5py.File(tmp, "w") as f:
        data = f.create_group(fmt.DATA)
        for i, name in enumerate(names):
            with h5py.File(shard_path(partial, i), "r") as shard:
                shard.copy(shard[SHARD_GROUP], data, name=name)
                total += int(shard[SHARD_GROUP].attrs["num_samples"])
                if env_args is None:
                    env_args = json.loads(shard.attrs["env_args"])
                    layout = json.loads(shard.attrs["object_layout"])
                    if fmt.LABELS in shard[SHARD_GROUP]:
                        labels = sorted(shard[SHARD_GROUP][fmt.LABELS].keys())
        train, valid = fmt.train_valid_split(names, config.valid_fraction, config.split_seed)
        fmt.write_masks(f, train, valid)
        import coop_transport

        s = [summaries[i] for i in range(config.episodes)]
        success_rate = sum(v["success"] for v in s) / max(1, sum(v["attempts"] for v in s))
        meta = {
            "format_version": fmt.FORMAT_VERSION,
            "generator": "coop_transport.data.generate",
            "code_version": coop_transport.__version__,
            "git_commit": _git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "fingerprint": fingerprint,
            "expert_config": fingerprint["expert_config"],
            "action_frame": fmt.ACTION_FRAME_BASE,
            "image_convention": fmt.IMAGES_NATURAL,
            "images": config.images,
            "image_size": config.image_size if config.images else None,
            "cameras": list(config.cameras) if config.images else [],
            "next_obs_images": config.next_obs_images and config.images,
            "labels": labels,
            "object_layout": layout,
            "seed_scheme": fingerprint["seed_scheme"],
            "eval_seeds": [fmt.EVAL_SEEDS.start, fmt.EVAL_SEEDS.stop - 1],
            "seeds": [v["seed"] for v in s],
            "failed_seeds": [v["failed_seeds"] for v in s],
            # A learner file's episodes are the learner's (DAgger): its success rate, not the expert's.
            "expert_success_rate": None if config.learner else success_rate,
            "learner_success_rate": success_rate if config.learner else None,
            "episode_seconds": sum(v.get("episode_seconds", 0.0) for v in s),
            "render_seconds": sum(v.get("render_seconds", 0.0) for v in s),
            "wall_seconds_last_run": wall_seconds,
            "workers": config.workers,
            "valid_fraction": config.valid_fraction,
            "split_seed": config.split_seed,
        }
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env_args, default=fmt.json_default)
        data.attrs[fmt.META_ATTR] = json.dumps(meta, default=fmt.json_default)

