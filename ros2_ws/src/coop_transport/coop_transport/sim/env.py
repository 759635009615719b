"""TwoArmTransport as robomimic configures it, with seeded resets, per-arm views and labels.

``TransportSim`` wraps robosuite's ``TwoArmTransport`` (two Panda arms, opposed, OSC_POSE through the BASIC
composite controller, 20 Hz, 500-step horizon). It adds what robosuite does not give:

- ``reset(seed)``: the same seed gives the same scene, bit for bit (robosuite's generator is re-seeded in place,
  so the placement samplers that hold a reference to it follow);
- cameras rendered by ``CameraRenderer`` (MuJoCo's renderer, fast flags) at a configurable size, so the image
  pipeline is identical on a laptop, in CI and on a GPU machine with EGL;
- per-arm observations (``arm_observation``), per-arm actions (``split_action`` / ``join_actions``);
- the sparse success reward, plus an optional potential-based shaping term for RL (``SimConfig.shaped_reward``);
- per-step labels of each arm's phase, gripper, readiness and pose (``coop_transport.sim.labels``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from coop_transport.constants import (
    AGENTVIEW_CAMERA, ARM_ACTION_DIM, ARMS, CONTROL_FREQ, HORIZON, JOINT_ACTION_DIM, PROPRIO_HISTORY_STEPS,
    SMALL_IMAGE_SIZE, WRIST_CAMERA, image_key,
)
from coop_transport.sim.frames import arm_proprio
from coop_transport.sim.rendering import CameraRenderer, configure_gl

ENV_NAME = "TwoArmTransport"


@dataclass(frozen=True)
class SimConfig:
    """Settings of the simulated task."""

    horizon: int = HORIZON
    """Control steps per episode."""
    control_freq: int = CONTROL_FREQ
    """Control rate in Hz."""
    wrist_cameras: bool = False
    """Render each arm's eye-in-hand camera into the observation (``robot{i}_eye_in_hand_image``)."""
    agentview: bool = False
    """Render the shared agentview camera into the observation (``agentview_image``)."""
    image_size: int = SMALL_IMAGE_SIZE
    """Square camera resolution in pixels (224 for π0, smaller for the small default)."""
    fast_render: bool = True
    """Switch off shadows, reflections and skybox (about 3x faster software rendering)."""
    shaped_reward: bool = False
    """Add the potential-based shaping term gamma*Phi(s') - Phi(s) to the sparse reward (for RL training only)."""
    shaping_gamma: float = 0.99
    """Discount used by the shaping term (match the RL discount so that shaping leaves optimal policies unchanged)."""
    terminate_on_success: bool = True
    """End the episode at the first successful step (robomimic's rollout convention)."""

    def __post_init__(self):
        if self.horizon <= 0 or self.control_freq <= 0:
            raise ValueError(f"horizon and control_freq must be positive, got {self.horizon}, {self.control_freq}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be within [8, 1024], got {self.image_size}")

    @property
    def cameras(self) -> tuple[str, ...]:
        cams = tuple(WRIST_CAMERA[a] for a in ARMS) if self.wrist_cameras else ()
        return cams + ((AGENTVIEW_CAMERA,) if self.agentview else ())


def robosuite_env_kwargs(config: SimConfig) -> dict:
    """Keyword arguments of ``robosuite.make`` for this configuration (also stored as the HDF5 ``env_args``)."""
    return dict(
        robots=["Panda", "Panda"],
        env_configuration="opposed",
        control_freq=config.control_freq,
        horizon=config.horizon,
        ignore_done=True,  # episode ends are decided here (success / horizon), not inside robosuite
        use_camera_obs=False,  # cameras are rendered by CameraRenderer
        use_object_obs=True,
        has_renderer=False,
        has_offscreen_renderer=False,
        reward_shaping=False,
        reward_scale=1.0,
        hard_reset=False,  # keeps the compiled model; reset re-samples the scene from the seeded generator
        lite_physics=True,
    )


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _quiet_robosuite() -> None:
    """Keep robosuite's real errors, drop its import-time and per-env warnings (private macro file, optional
    robot packages, controller parts a Panda does not have). Must run before robosuite is imported."""
    logger = logging.getLogger("robosuite_logs")
    if _errors_only not in logger.filters:
        logger.addFilter(_errors_only)


class TransportSim:
    """robosuite TwoArmTransport with seeded resets, fast cameras, per-arm observations and labels."""

    def __init__(self, config: SimConfig = SimConfig()):
        configure_gl()
        _quiet_robosuite()
        import robosuite
        from robosuite.controllers import load_composite_controller_config

        self.config = config
        controller = load_composite_controller_config(controller="BASIC")
        # Only the arm part applies to Panda; dropping the others avoids robosuite's per-part warnings.
        controller["body_parts"] = {"right": controller["body_parts"]["right"]}
        self.env_kwargs = robosuite_env_kwargs(config)
        self.rs_env = robosuite.make(ENV_NAME, controller_configs=controller, seed=0, **self.env_kwargs)
        self.controller_config = controller
        self._renderer: CameraRenderer | None = None
        self._extra_renderers: dict[tuple[int, int], CameraRenderer] = {}
        self.t = 0
        self.seed: int | None = None
        self._potential = 0.0
        self._obs: dict | None = None
        # Each arm's proprioception at the latest control steps, newest first (policies with a state history).
        self._proprio_recent = {arm: deque(maxlen=PROPRIO_HISTORY_STEPS) for arm in ARMS}

    # ----------------------------------------------------------------------------------------------- episode
    def reset(self, seed: int) -> dict:
        """Reset to the scene of ``seed`` (same seed, same scene, bit for bit); returns the observation."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"reset seed must be a non-negative integer, got {seed!r}")
        # Re-seed robosuite's generator in place: samplers and robot init noise hold references to this object.
        self.rs_env.rng.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state
        raw = self.rs_env.reset()
        self.t, self.seed = 0, int(seed)
        self._obs = self._observation(raw)
        self._record_proprio(new_episode=True)
        if self.config.shaped_reward:
            from coop_transport.sim.labels import task_potential

            self._potential = task_potential(self)
        return self._obs

    def step(self, action: np.ndarray, render: bool = True) -> tuple[dict, float, bool, dict]:
        """Apply a joint (14,) action in [-1, 1]; returns (obs, reward, done, info).

        Non-finite actions are refused (ValueError) rather than passed to the controller; out-of-range values are
        clipped to [-1, 1] as robosuite does.

        ``render=False`` leaves the cameras out of the returned observation; ``observation`` (and
        ``arm_observation``) render them on first access. A chunked policy looks at images only every C steps, and
        with software rendering three cameras cost several times the physics of a step, so its rollouts skip the
        steps in between.
        Rendering reads the state without changing it: the trajectory is the same either way.
        """
        if self.seed is None:
            raise RuntimeError("call reset(seed) before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (JOINT_ACTION_DIM,):
            raise ValueError(f"expected a joint action of shape ({JOINT_ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains NaN or inf: {action}")
        raw, _, _, _ = self.rs_env.step(np.clip(action, -1.0, 1.0))
        self.t += 1
        success = self.success()
        reward = 1.0 if success else 0.0
        if self.config.shaped_reward:
            from coop_transport.sim.labels import task_potential

            potential = task_potential(self)
            reward += self.config.shaping_gamma * potential - self._potential
            self._potential = potential
        done = (success and self.config.terminate_on_success) or self.t >= self.config.horizon
        self._obs = self._observation(raw, render)
        self._record_proprio()
        return self._obs, float(reward), bool(done), {"success": success, "t": self.t, "seed": self.seed}

    def success(self) -> bool:
        """robosuite's own check: payload touching the target bin's base and trash touching the trash bin's."""
        return bool(self.rs_env._check_success())

    @property
    def observation(self) -> dict:
        obs = self.lowdim_observation
        if any(image_key(c) not in obs for c in self.config.cameras):  # step(render=False): render at that state
            self._render_cameras(obs)
        return obs

    @property
    def lowdim_observation(self) -> dict:
        """The current observation without rendering cameras that a ``step(render=False)`` left out: for readers of
        poses and object states (labels, shaping, the scripted expert), which then cost no rendering."""
        if self._obs is None:
            raise RuntimeError("no observation before reset()")
        return self._obs

    # ------------------------------------------------------------------------------------------------- state
    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state [time, qpos, qvel] as robomimic stores it in ``states``."""
        return np.array(self.rs_env.sim.get_state().flatten())

    def set_state(self, state: np.ndarray, render: bool = True) -> dict:
        """Restore a flattened MuJoCo state (ours or robomimic's) and return the observation there.

        The state itself is exact (replaying stored actions from it reproduces every later state bit for bit), but
        the returned observation is recomputed from it: robosuite's live observations during a rollout are sampled
        one physics substep (2 ms) apart from the stored state, so positions differ by up to ~1e-3, and joint
        accelerations (not part of the state) differ entirely. Demonstration files therefore store the live
        observations rather than recomputing them. ``render=False``: the cameras wait for a read, as in ``step``."""
        state = np.asarray(state, dtype=np.float64)
        expected = 1 + self.rs_env.sim.model.nq + self.rs_env.sim.model.nv
        if state.shape != (expected,):
            raise ValueError(f"state has shape {state.shape}, this model needs ({expected},)")
        self.rs_env.sim.set_state_from_flattened(state)
        self.rs_env.sim.forward()
        self._obs = self._observation(self.rs_env._get_observations(force_update=True), render)
        self._record_proprio(new_episode=True)  # no history across a jump: the restored state stands in for it
        return self._obs

    def model_xml(self) -> str:
        """The MJCF of the current model (robomimic stores it per demonstration as ``model_file``)."""
        return self.rs_env.sim.model.get_xml()

    # ----------------------------------------------------------------------------------------------- cameras
    def render(self, camera: str, height: int | None = None, width: int | None = None) -> np.ndarray:
        """(H, W, 3) uint8 image of a named camera at the current state."""
        h = height or self.config.image_size
        w = width or self.config.image_size
        model, data = self.rs_env.sim.model._model, self.rs_env.sim.data._data
        if (h, w) == (self.config.image_size,) * 2:
            if self._renderer is None:
                self._renderer = CameraRenderer(model, h, w, fast=self.config.fast_render)
            return self._renderer.render(data, camera)
        if (h, w) not in self._extra_renderers:
            self._extra_renderers[(h, w)] = CameraRenderer(model, h, w, fast=self.config.fast_render)
        return self._extra_renderers[(h, w)].render(data, camera)

    def _observation(self, raw: dict, render: bool = True) -> dict:
        obs = {k: np.array(v) for k, v in raw.items() if not k.endswith("-state")}
        if render:
            self._render_cameras(obs)
        return obs

    def _render_cameras(self, obs: dict) -> None:
        for camera in self.config.cameras:
            obs[image_key(camera)] = self.render(camera)

    # ------------------------------------------------------------------------------------------ per-arm view
    def arm_observation(self, arm: str, obs: dict | None = None) -> dict:
        """What one deployed arm sees: its wrist image, optionally agentview, and its proprioception; for the
        current observation also ``proprio_history`` (``proprio_history(arm)``)."""
        if obs is not None:
            return arm_observation(obs, arm)
        view = arm_observation(self.observation, arm)
        view["proprio_history"] = self.proprio_history(arm)
        return view

    def proprio_history(self, arm: str) -> np.ndarray:
        """(L, PROPRIO_DIM) the arm's proprioception at the latest L <= PROPRIO_HISTORY_STEPS control steps of this
        episode, newest (the current one) first."""
        if self._obs is None:
            raise RuntimeError("no observation before reset()")
        return np.stack(self._proprio_recent[arm])

    def _record_proprio(self, new_episode: bool = False) -> None:
        for arm in ARMS:
            if new_episode:
                self._proprio_recent[arm].clear()
            self._proprio_recent[arm].appendleft(arm_observation(self._obs, arm)["proprio"])

    def close(self) -> None:
        for renderer in [self._renderer, *self._extra_renderers.values()]:
            if renderer is not None:
                renderer.close()
        self._renderer, self._extra_renderers = None, {}
        self.rs_env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def arm_observation(obs: dict, arm: str) -> dict:
    """Per-arm view of a joint observation: ``proprio`` (PROPRIO_DIM,), ``wrist_image`` and ``agentview_image``
    where rendered."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    out = {
        "proprio": arm_proprio(arm, obs[f"{arm}_eef_pos"], obs[f"{arm}_eef_quat"], obs[f"{arm}_gripper_qpos"],
                               obs[f"{arm}_joint_pos"]),
    }
    wrist = image_key(WRIST_CAMERA[arm])
    if wrist in obs:
        out["wrist_image"] = obs[wrist]
    if image_key(AGENTVIEW_CAMERA) in obs:
        out["agentview_image"] = obs[image_key(AGENTVIEW_CAMERA)]
    return out


def split_action(action: np.ndarray) -> dict[str, np.ndarray]:
    """(…, 14) joint action to {arm: (…, 7)}; robot0's seven values come first, as robosuite orders them."""
    action = np.asarray(action)
    if action.shape[-1] != JOINT_ACTION_DIM:
        raise ValueError(f"expected last dimension {JOINT_ACTION_DIM}, got {action.shape}")
    return {arm: action[..., i * ARM_ACTION_DIM:(i + 1) * ARM_ACTION_DIM] for i, arm in enumerate(ARMS)}


def join_actions(per_arm: dict[str, np.ndarray]) -> np.ndarray:
    """{arm: (…, 7)} to the (…, 14) joint action."""
    missing = [a for a in ARMS if a not in per_arm]
    if missing:
        raise ValueError(f"missing actions for {missing}")
    for arm in ARMS:
        if np.shape(per_arm[arm])[-1] != ARM_ACTION_DIM:
            raise ValueError(f"{arm} action must have last dimension {ARM_ACTION_DIM}, got {np.shape(per_arm[arm])}")
    return np.concatenate([np.asarray(per_arm[a]) for a in ARMS], -1)
