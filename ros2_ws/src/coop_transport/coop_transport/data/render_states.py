"""Camera images from saved MuJoCo states: at generation time, and later for a whole file.

Images of a demonstration are always rendered the same way, from the flattened state ``[time, qpos, qvel]`` that
the file stores: the state is copied into a private ``MjData``, ``mj_forward`` computes the kinematics, and
``CameraRenderer`` draws each camera (fast flags, natural orientation). Generation-time images and images rendered
later from ``states`` are therefore identical, pixel for pixel, and rendering never touches the simulation that is
being stepped (the recorded physics are the same with and without cameras).

(The live ``TransportSim`` renders its cameras right after ``env.step``, whose kinematics lag the final physics
substep by 2 ms; images from states are exact for the stored state. Measured over an expert episode at 96x96: mean
|difference| 0.07-1.4 / 255, at most 2.5% of pixels off by more than 8 levels, where edges of moving parts shift
by about a pixel.)

Rendering a file later (``render_file``) copies it to ``<out>.tmp``, adds ``obs/<camera>_image`` (and optionally
``next_obs/<camera>_image``) to every demonstration, validates the copy and renames it into place: an interrupted
run leaves the input untouched. On a GPU machine set ``MUJOCO_GL=egl``; this is where bulk rendering belongs
(measured on an H100: about 120-130 steps/s with three 96x96 cameras, 48 steps/s at 224x224 with 4 workers, versus
about 4 steps/s with Mesa's software renderer on the 2-core CPU machine).

"Identical" holds for one OpenGL implementation. Mesa (CPU) and NVIDIA (GPU) rasterise the same state slightly
differently (measured: mean |difference| about 2.6 / 255, some 7% of pixels off by more than 8 levels, at texture
detail and edges), so render a whole dataset on one kind of machine, and expect that small gap between images
rendered for training on a GPU and images rendered at evaluation time on a CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from coop_transport.constants import AGENTVIEW_CAMERA, ARMS, SMALL_IMAGE_SIZE, WRIST_CAMERA, image_key
from coop_transport.data import hdf5_format as fmt
from coop_transport.sim.rendering import CameraRenderer, configure_gl

try:  # tyro is only needed to name the ``--in`` flag; keep the library importable without it.
    import tyro

    _IN_FLAG = tyro.conf.arg(name="in")
except ImportError:  # pragma: no cover
    _IN_FLAG = None

DEFAULT_CAMERAS = (WRIST_CAMERA[ARMS[0]], WRIST_CAMERA[ARMS[1]], AGENTVIEW_CAMERA)


class StateRenderer:
    """Renders named cameras of a MuJoCo model at flattened states ``[time, qpos, qvel]``."""

    def __init__(self, model, cameras: tuple[str, ...], height: int, width: int | None = None, fast: bool = True):
        import mujoco

        self._mujoco = mujoco
        self.model = model
        self.cameras = tuple(cameras)
        known = [model.camera(i).name for i in range(model.ncam)]
        unknown = [c for c in self.cameras if c not in known]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; the model has {known}")
        self._data = mujoco.MjData(model)
        self._renderer = CameraRenderer(model, height, width or height, fast=fast)
        self.state_dim = 1 + model.nq + model.nv

    def render(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """{``<camera>_image``: (H, W, 3) uint8} at one flattened state."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            raise ValueError(f"state has shape {state.shape}, this model needs ({self.state_dim},)")
        nq = self.model.nq
        self._data.time = state[0]
        self._data.qpos[:] = state[1:1 + nq]
        self._data.qvel[:] = state[1 + nq:]
        self._mujoco.mj_forward(self.model, self._data)
        return {image_key(c): self._renderer.render(self._data, c) for c in self.cameras}

    def render_many(self, states: np.ndarray) -> dict[str, np.ndarray]:
        """{``<camera>_image``: (T, H, W, 3) uint8} at T states."""
        frames = [self.render(s) for s in states]
        h, w = self._renderer.height, self._renderer.width
        return {image_key(c): (np.stack([f[image_key(c)] for f in frames]) if frames
                               else np.zeros((0, h, w, 3), np.uint8)) for c in self.cameras}

    def close(self) -> None:
        self._renderer.close()


# --------------------------------------------------------------------------------------------- whole files
@dataclass(frozen=True)
class RenderConfig:
    """Add camera images to an existing demonstration file, rendered from its saved MuJoCo states."""

    in_: Annotated[Path, _IN_FLAG] = Path("data/transport_scripted.hdf5")
    """Demonstration file written by ``training/demos.py`` (it must hold ``states``)."""
    out: Path | None = None
    """Where to write the file with images; default: replace the input (atomically, once complete)."""
    image_size: int = SMALL_IMAGE_SIZE
    """Square image resolution in pixels."""
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    """MuJoCo cameras to render (stored as ``obs/<camera>_image``)."""
    next_obs_images: bool = False
    """Also store images in ``next_obs`` (doubles the image storage; robomimic's BC does not need them)."""
    compression: Literal["gzip", "lzf", "none"] = "gzip"
    """HDF5 compression of image datasets (gzip is readable everywhere, lzf only through h5py but faster)."""
    overwrite: bool = False
    """Replace image datasets that already exist (at another size, say) and an existing ``out``; otherwise refuse."""
    workers: int = 1
    """Rendering processes (each builds its own simulation and renderer)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be within [8, 1024], got {self.image_size}")
        if not self.cameras:
            raise ValueError("cameras must name at least one camera")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def output(self) -> Path:
        return self.out if self.out is not None else self.in_


def _strip_paths(xml: str) -> str:
    # Mesh and texture paths are absolute (they point into robosuite's installation): compare file names only.
    return re.sub(r'file="[^"]*/([^"/]*)"', r'file="\1"', xml)


def same_model(xml_a: str, xml_b: str) -> bool:
    """Whether two MJCF strings describe the same model up to where robosuite is installed."""
    return _strip_paths(xml_a) == _strip_paths(xml_b)


_WORKER: dict = {}


def _render_worker_init(image_size: int, cameras: tuple[str, ...]) -> None:
    configure_gl()
    from coop_transport.sim import SimConfig, TransportSim

    sim = TransportSim(SimConfig(image_size=image_size))
    # robosuite hides its visualisation sites (negative alpha) on reset, not before: reset once so the model is
    # the one the demonstrations were recorded and rendered with.
    sim.reset(0)
    _WORKER.update(sim=sim, renderer=StateRenderer(sim.rs_env.sim.model._model, cameras, image_size),
                   xml=sim.model_xml())


def _render_demo(job: tuple[str, np.ndarray, np.ndarray | None, str]) -> tuple[str, dict, dict]:
    name, states, final_state, model_file = job
    if model_file and not same_model(model_file, _WORKER["xml"]):
        raise fmt.DatasetError(f"data/{name}: its model_file differs from this installation's TwoArmTransport model "
                               f"(another robosuite version?); its states cannot be rendered here")
    renderer: StateRenderer = _WORKER["renderer"]
    obs = renderer.render_many(states)
    next_obs = {}
    if final_state is not None:  # next_obs[t] = obs[t + 1]; the last one is rendered at final_state
        last = renderer.render(final_state)
        next_obs = {k: np.concatenate([v[1:], last[k][None]], 0) for k, v in obs.items()}
    return name, obs, next_obs


def render_file(config: RenderConfig) -> Path:
    """Render ``config.cameras`` from every demonstration's states into a copy of the file, then move it into place.

    Returns the output path. Raises ``DatasetError`` for unusable inputs and ``FileExistsError`` when images are
    present and ``overwrite`` is off.
    """
    src, dst = Path(config.in_), Path(config.output)
    if dst != src and dst.exists() and not config.overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    with fmt.open_hdf5(src) as f:
        summary = fmt.validate(f, str(src))
        keys = [image_key(c) for c in config.cameras]
        for name in summary.demos:
            g = f[fmt.DATA][name]
            if fmt.STATES not in g:
                raise fmt.DatasetError(f"{src}: data/{name} has no 'states'; images cannot be rendered from it")
            present = [k for k in keys if k in g[fmt.OBS]]
            if present and not config.overwrite:
                shape = g[fmt.OBS][present[0]].shape
                raise FileExistsError(f"{src}: data/{name}/obs already holds {present} (shape {shape}); pass "
                                      f"--overwrite to replace them")
            if config.next_obs_images and "final_state" not in g.attrs:
                raise fmt.DatasetError(f"{src}: data/{name} has no 'final_state' attribute, so next_obs images "
                                       f"cannot be rendered for its last step")

    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    shutil.copyfile(src, tmp)
    t0 = time.time()
    try:
        import h5py

        with h5py.File(tmp, "r+") as f:
            data = f[fmt.DATA]
            jobs = [(n, fmt.read_array(data[n], fmt.STATES, str(src)),
                     np.asarray(data[n].attrs["final_state"]) if config.next_obs_images else None,
                     str(data[n].attrs.get("model_file", ""))) for n in summary.demos]
            for name, obs, next_obs in _map_render(jobs, config):
                g = data[name]
                for key, frames in obs.items():
                    fmt.write_obs(g[fmt.OBS], key, frames, config.compression)
                for key, frames in next_obs.items():
                    fmt.write_obs(g.require_group(fmt.NEXT_OBS), key, frames, config.compression)
            meta = json.loads(data.attrs[fmt.META_ATTR]) if fmt.META_ATTR in data.attrs else {}
            cams = sorted(set(meta.get("cameras") or []) | set(config.cameras)) if meta.get("images") else \
                list(config.cameras)
            meta.update(images=True, image_size=config.image_size, cameras=cams,
                        image_convention=fmt.IMAGES_NATURAL, next_obs_images=config.next_obs_images,
                        rendered_from_states={"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "seconds": round(time.time() - t0, 1), "config": asdict(config)})
            data.attrs[fmt.META_ATTR] = json.dumps(meta, default=fmt.json_default)
            env_meta = json.loads(data.attrs["env_args"])
            env_meta["env_kwargs"].update(camera_names=cams, camera_heights=config.image_size,
                                          camera_widths=config.image_size)
            data.attrs["env_args"] = json.dumps(env_meta, default=fmt.json_default)
        fmt.publish_validated(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _map_render(jobs: list, config: RenderConfig):
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="render", unit="demo", disable=not config.progress, file=sys.stderr)
    args = (config.image_size, tuple(config.cameras))
    try:
        if config.workers == 1:
            _render_worker_init(*args)
            try:
                for job in jobs:
                    yield _render_demo(job)
                    bar.update()
            finally:
                _WORKER.pop("renderer").close()
                _WORKER.pop("sim").close()
        else:
            from coop_transport.data._workers import process_map

            for result in process_map(_render_demo, jobs, config.workers, _render_worker_init, args):
                yield result
                bar.update()
    finally:
        bar.close()
