"""Policy node, one per arm: chunked inference, double-buffered, one 7-D command per 20 Hz control tick.

Usage: ``ros2 run coop_transport policy_node --ros-args -r __ns:=/left -p arm:=robot0 [-p policy_path:=CKPT]``
(or ``python -m coop_transport.ros.policy_node --ros-args ...``; ``python -m coop_transport.bringup`` starts it).
Remote inference: ``-p policy_server:=host:port`` queries a policy server (``python -m coop_transport.serve``)
instead of loading the policy here; chunk execution, recipe and watchdog are the same.

Data flow (topics relative to the arm's namespace; layouts in TOPICS.md):
  wrist_camera/image_raw, joint_states, eef_pose [, agentview/image_raw, partner_message]  ->  command, message, plan

Every tick (timer on the node clock: simulated time when ``use_sim_time``) publishes exactly one command:
- the next action of the current chunk, through the safety filters (velocity limit, workspace box); or
- **hold** (zero delta, last gripper command) when the wrist image or the joint state/eef pose is older than its
  limit (watchdog), when the policy server is lost or has not answered within ``policy_server_timeout`` (watchdog:
  the chunk is dropped, planning retries and the node resumes when the server answers again), when the chunk is
  used up before the next one is ready (inference overrun), or before the first chunk.
A worker thread plans the next chunk from the latest observation when the current one runs low (``replan_margin``
actions left); the tick swaps it in when the current one is used up and never waits for inference. Each tick with
fresh inputs also records the arm's proprioception, so a policy that sees earlier states (the shipped default:
0.25, 0.5 and 0.75 s back) gets them in ticks, as it was trained on control steps.

The policy comes from ``policy_factory`` (default ``coop_transport.deploy:load_arm_policy``), called once as
``factory(policy_path or None, arm=..., recipe=RecipeConfig(...), backend=...)`` (plus ``policy_server=...,
server_timeout=..., server_wait=...`` in remote mode); see ``ArmPolicy`` below. A ``ConnectionError`` raised by
``plan`` (``serving.client.PolicyUnavailable``: a lost server) trips the watchdog.
"""

from __future__ import annotations

import importlib
import math
import queue
import statistics
import threading
import time
from collections import deque
from typing import Protocol

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory

from coop_transport.constants import (ARM_ACTION_DIM, ARMS, CONTROL_FREQ, GRIPPER_INDEX, OSC_POS_SCALE, OSC_ROT_SCALE,
                                      PROPRIO_HISTORY_STEPS)
from coop_transport.recipe import RecipeConfig
from coop_transport.ros import codec, topics
from coop_transport.ros.safety import SafetyLimits, apply_limits, hold_command
from coop_transport.ros.threads import quiet_on_shutdown

DEFAULT_POLICY_FACTORY = "coop_transport.deploy:load_arm_policy"
REQUIRED_POLICY_ATTRS = ("plan", "reset", "image_size", "uses_agentview", "message", "accepts_message", "stats")
LOG_THROTTLE_S = 2.0


class ArmPolicy(Protocol):
    """What the node needs from ``coop_transport.deploy.load_arm_policy`` (the recipe already applied)."""

    image_size: int  # square camera resolution the policy expects
    uses_agentview: bool  # subscribe to the shared agentview camera
    accepts_message: bool  # subscribe to the partner's message

    def plan(self, arm_obs: dict) -> np.ndarray: ...  # (C, 7) commands in [-1, 1]

    def message(self, arm_obs: dict) -> np.ndarray | None: ...  # outgoing message, None for none

    def reset(self) -> None: ...

    def stats(self) -> dict: ...  # numbers and strings, shown in diagnostics


def load_factory(spec: str):
    """``"package.module:function"`` -> the function."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"policy_factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def _p(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=description)


class PolicyNode(Node):
    """One arm's policy: observations in, one safe command per control tick out."""

    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        recipe_defaults = RecipeConfig()
        d = self.declare_parameter
        d("arm", "", _p(f"Which arm this node drives: one of {ARMS} (robot0 = payload arm)."))
        d("policy_path", "", _p("Checkpoint of this arm's policy; empty = the shipped default."))
        d("policy_factory", DEFAULT_POLICY_FACTORY, _p("'module:function' that loads the policy."))
        d("backend", "auto", _p("Inference backend passed to the factory (auto, torch, onnx, ...); auto: CUDA "
                                "graphs on a GPU, ONNX Runtime where the checkpoint has an export, else torch."))
        d("policy_server", "", _p("host:port of a policy server (python -m coop_transport.serve) to query instead "
                                  "of loading the policy here; empty = local inference. API key: environment "
                                  "variable COOP_TRANSPORT_API_KEY."))
        d("policy_server_timeout", 1.0, _p("Remote mode: a plan not answered within this many seconds (wall) trips "
                                           "the watchdog; the node reconnects and resumes when the server answers."))
        d("policy_server_wait", 30.0, _p("Remote mode: seconds to wait for the server at start-up."))
        d("inference_threads", 0, _p("CPU threads for inference (passed to the factory as threads=); 0 = its "
                                     "default. Leave a core for the control tick on small machines."))
        d("architecture", "", _p("Expected architecture (V4, V5, V6); empty = whatever the checkpoint says."))
        d("chunk_length", recipe_defaults.execute_steps, _p("Recipe C: actions executed per chunk."))
        d("num_samples", recipe_defaults.num_samples, _p("Recipe N: samples averaged per chunk."))
        d("clip_sigma", float(recipe_defaults.clip_sigma or 0.0), _p("Recipe k: clip to mean +- k std; <= 0 off."))
        d("clip_beyond_demonstrated", recipe_defaults.clip_beyond_demonstrated,
          _p("Recipe: widen each clip bound to the demonstrated action range (false: plain mean +- k std)."))
        d("gripper_latch", -1.0, _p("Recipe: execute the gripper as +-1, switching past +-h (hysteresis h in "
                                    "[0, 1)); < 0 off (the predicted value)."))
        d("control_rate", float(CONTROL_FREQ), _p("Command rate in Hz (on the node clock)."))
        d("replan_margin", -1, _p("Plan the next chunk when this many actions are left; -1 = adapt to the "
                                  "measured inference time and tick period (see _margin)."))
        d("max_image_age", 0.3, _p("Watchdog: hold when the newest wrist image is older (s)."))
        d("max_state_age", 0.3, _p("Watchdog: hold when the newest joint state or eef pose is older (s)."))
        d("partner_message_timeout", 1.5, _p("Partner message older than this (s) counts as missing."))
        d("initial_gripper", -1.0, _p("Gripper value of hold commands before any command (-1 open)."))
        d("resize_images", False, _p("Centre-crop and resize camera frames to the policy's size instead of "
                                     "rejecting other sizes (real cameras)."))
        d("base_frame", "", _p("Required frame_id of eef_pose; empty accepts any."))
        d("workspace_min", [-10.0, -10.0, -10.0], _p("Workspace box lower corner (m, base frame)."))
        d("workspace_max", [10.0, 10.0, 10.0], _p("Workspace box upper corner (m, base frame)."))
        d("max_linear_speed", 100.0, _p("m/s; the position part of commands is scaled down to this."))
        d("max_angular_speed", 1000.0, _p("rad/s; the rotation part of commands is scaled down to this."))
        d("pos_scale", OSC_POS_SCALE, _p("Metres per unit command per step (OSC_POSE scaling)."))
        d("rot_scale", OSC_ROT_SCALE, _p("Radians per unit command per step (OSC_POSE scaling)."))
        d("publish_plan", True, _p("Publish each chunk on 'plan' when it starts executing."))
        d("diagnostics_period", 1.0, _p("Seconds (wall clock) between /diagnostics messages."))

        g = lambda name: self.get_parameter(name).value  # noqa: E731
        self.arm = g("arm")
        if self.arm not in ARMS:
            raise ValueError(f"parameter arm must be one of {ARMS}, got {self.arm!r}")
        clip, latch = g("clip_sigma"), g("gripper_latch")
        self.recipe = RecipeConfig(execute_steps=g("chunk_length"), num_samples=g("num_samples"),
                                   clip_sigma=clip if clip > 0 else None,
                                   clip_beyond_demonstrated=bool(g("clip_beyond_demonstrated")),
                                   gripper_latch=latch if latch >= 0 else None)
        self.rate = float(g("control_rate"))
        self.dt = 1.0 / self.rate
        self.limits = SafetyLimits(tuple(g("workspace_min")), tuple(g("workspace_max")), g("max_linear_speed"),
                                   g("max_angular_speed"), g("pos_scale"), g("rot_scale"), self.rate)
        self.max_image_age, self.max_state_age = g("max_image_age"), g("max_state_age")
        self.partner_timeout = g("partner_message_timeout")
        self.replan_margin = int(g("replan_margin"))
        self.resize_images, self.base_frame = g("resize_images"), g("base_frame")
        self.command_frame = self.base_frame or topics.base_frame(self.arm)  # frame_id of commands
        self.publish_plan = g("publish_plan")

        # ---- the policy (loaded before any publisher exists: a command publisher means "ready")
        t0 = time.perf_counter()
        factory = load_factory(g("policy_factory"))
        extra = {"threads": g("inference_threads")} if g("inference_threads") > 0 else {}
        self.policy_server = g("policy_server").strip()
        self.server_timeout = float(g("policy_server_timeout"))
        if self.policy_server:
            if not self.server_timeout > 0:
                raise ValueError(f"policy_server_timeout must be positive, got {self.server_timeout}")
            extra.update(policy_server=self.policy_server, server_timeout=self.server_timeout,
                         server_wait=float(g("policy_server_wait")))
        self.policy = factory(g("policy_path") or None, arm=self.arm, recipe=self.recipe, backend=g("backend"),
                              **extra)
        missing = [a for a in REQUIRED_POLICY_ATTRS if not hasattr(self.policy, a)]
        if missing:
            raise TypeError(f"{g('policy_factory')} returned {type(self.policy).__name__} without {missing}")
        expected_arch, actual_arch = g("architecture"), getattr(self.policy, "architecture", None)
        if expected_arch and actual_arch is not None and expected_arch != actual_arch:
            raise ValueError(f"architecture {expected_arch!r} requested, the checkpoint is {actual_arch!r}")
        self.image_size = int(self.policy.image_size)
        if self.policy_server:
            source = f"the policy server {self.policy_server}"
        elif g("policy_path"):
            source = g("policy_path")
        else:  # say which file a robot is about to be driven by, also when nothing was configured
            from coop_transport.pi0_policy import default_policy_dir

            source = f"the shipped default {default_policy_dir()}"
        self.get_logger().info(
            f"{self.arm}: loaded {type(self.policy).__name__} from {source} via {g('policy_factory')} in "
            f"{time.perf_counter() - t0:.1f} s (image {self.image_size}px, agentview={self.policy.uses_agentview}, "
            f"message in={self.policy.accepts_message}, recipe C={self.recipe.execute_steps} "
            f"N={self.recipe.num_samples} clip={self.recipe.clip_sigma} gripper latch={self.recipe.gripper_latch})")

        # ---- latest observation (written and read on the executor thread only)
        self._wrist: tuple[float, np.ndarray] | None = None  # (stamp s, image)
        self._agentview: tuple[float, np.ndarray] | None = None
        self._joints: tuple[float, np.ndarray, np.ndarray] | None = None  # (stamp, joints (7), fingers (2))
        self._eef: tuple[float, np.ndarray, np.ndarray] | None = None  # (stamp, pos (3), quat xyzw (4))
        self._partner: tuple[float, np.ndarray] | None = None
        self._episode: str | None = None
        self._episode_stamp = -1.0  # stamp of the current episode's start: older frames/messages belong to the last
        # The arm's proprioception at each control tick with fresh inputs, newest first: the policy's earlier states
        # (adapters.StateHistory) are counted in ticks, as the simulation counts them in control steps. Cleared at
        # an episode reset and a watchdog trip (the missing steps are then the current state: no motion).
        self._proprio_recent: deque[np.ndarray] = deque(maxlen=PROPRIO_HISTORY_STEPS)

        # ---- chunk double buffer
        self._chunk: deque[np.ndarray] = deque()
        self._lock = threading.Lock()
        self._ready: tuple[int, float, np.ndarray] | None = None  # (epoch, source stamp, (C, 7)) from the worker
        self._pending = False  # a plan is in flight
        self._plan_requested = 0.0  # monotonic time of the latest plan request
        self._server_fault: str | None = None  # set when plan() raised ConnectionError; cleared by a good plan
        self._tick_walls: deque[float] = deque(maxlen=20)  # wall time of recent ticks (tick period on sim time)
        self._epoch = 0  # bumped on episode reset and watchdog drops: stale plans are discarded
        self._had_chunk = False
        self._last_gripper = float(g("initial_gripper"))
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()

        # ---- counters for diagnostics
        self.counts = {"images": 0, "commands": 0, "holds": 0, "watchdog_trips": 0, "overruns": 0,
                       "plans": 0, "plan_errors": 0, "partner_messages": 0, "messages_sent": 0,
                       "speed_scaled": 0, "workspace_zeroed": 0, "episodes": 0, "server_errors": 0,
                       "server_recoveries": 0}
        self.dropped: dict[str, int] = {}
        self._last_reject_log: dict[str, float] = {}
        self.latencies: deque[float] = deque(maxlen=200)
        self._state = (DiagnosticStatus.WARN, "starting: no chunk yet")
        self._holding_reason: str | None = None

        # ---- interfaces
        sensor = qos_profile_sensor_data
        self.create_subscription(Image, topics.WRIST_IMAGE, self._on_wrist, sensor)
        if self.policy.uses_agentview:
            self.create_subscription(Image, topics.AGENTVIEW_IMAGE, self._on_agentview, sensor)
        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joints, sensor)
        self.create_subscription(PoseStamped, topics.EEF_POSE, self._on_eef, sensor)
        if self.policy.accepts_message:
            self.create_subscription(JointTrajectory, topics.PARTNER_MESSAGE, self._on_partner, QoSProfile(depth=5))
        self.create_subscription(DiagnosticArray, topics.EPISODE, self._on_episode, QoSProfile(depth=20))
        self.pub_message = self.create_publisher(JointTrajectory, topics.MESSAGE, QoSProfile(depth=5))
        self.pub_plan = self.create_publisher(JointTrajectory, topics.PLAN, QoSProfile(depth=5))
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS_TOPIC, QoSProfile(depth=10))
        self.pub_command = self.create_publisher(JointState, topics.COMMAND, QoSProfile(depth=10))
        self._worker = threading.Thread(target=self._work, name=f"{self.arm}-planner", daemon=True)
        self._worker.start()
        self.create_timer(self.dt, self._on_tick)  # node clock: /clock when use_sim_time
        self.create_timer(g("diagnostics_period"), self._publish_diagnostics,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ------------------------------------------------------------------------------------------ callbacks
    def _reject(self, what: str, err: codec.Rejected) -> None:
        """Count a rejected message and log why, at most once per LOG_THROTTLE_S for each kind of rejection."""
        key = f"{what}/{err.reason}"
        self.dropped[key] = self.dropped.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last_reject_log.get(key, -math.inf) >= LOG_THROTTLE_S:
            self._last_reject_log[key] = now
            self.get_logger().warning(f"rejected {what} ({self.dropped[key]} so far): {err}")

    def _on_wrist(self, msg: Image) -> None:
        image = self._decode_image(msg, "wrist_image")
        if image is not None:
            self._wrist = (codec.to_sec(msg.header.stamp), image)
            self.counts["images"] += 1

    def _on_agentview(self, msg: Image) -> None:
        image = self._decode_image(msg, "agentview_image")
        if image is not None:
            self._agentview = (codec.to_sec(msg.header.stamp), image)

    def _decode_image(self, msg: Image, what: str) -> np.ndarray | None:
        try:
            image = codec.image_array(msg, None if self.resize_images else self.image_size)
            if image.shape[:2] != (self.image_size, self.image_size):
                image = codec.center_crop_resize(image, self.image_size)
            return image
        except codec.Rejected as err:
            self._reject(what, err)
            return None

    def _on_joints(self, msg: JointState) -> None:
        try:
            joints, fingers = codec.split_joint_state(msg)
        except codec.Rejected as err:
            self._reject("joint_states", err)
            return
        self._joints = (codec.to_sec(msg.header.stamp), joints, fingers)

    def _on_eef(self, msg: PoseStamped) -> None:
        try:
            if self.base_frame and msg.header.frame_id != self.base_frame:
                raise codec.Rejected("frame", f"eef_pose in {msg.header.frame_id!r}, expected {self.base_frame!r}")
            pos, quat = codec.pose_arrays(msg)
        except codec.Rejected as err:
            self._reject("eef_pose", err)
            return
        self._eef = (codec.to_sec(msg.header.stamp), pos, quat)

    def _on_partner(self, msg: JointTrajectory) -> None:
        try:
            self._partner = (codec.to_sec(msg.header.stamp), codec.trajectory_array(msg))
            self.counts["partner_messages"] += 1
        except codec.Rejected as err:
            self._reject("partner_message", err)

    def _on_episode(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name != topics.EPISODE_STATUS_NAME:
                continue
            values = {kv.key: kv.value for kv in status.values}
            episode = values.get("episode")
            if episode is not None and episode != self._episode:
                if self._episode is not None:
                    self._new_episode(codec.to_sec(msg.header.stamp))
                self._episode = episode

    def _new_episode(self, stamp: float) -> None:
        """The simulation was reset: forget the chunk, plans in flight and the last gripper command."""
        with self._lock:
            self._epoch += 1
            self._ready = None
        self._chunk.clear()
        self._had_chunk = False
        self._last_gripper = float(self.get_parameter("initial_gripper").value)
        self._episode_stamp = stamp  # frames and messages of the previous episode must not start the next one
        self._proprio_recent.clear()
        self._jobs.put(("reset", None))
        self.counts["episodes"] += 1

    # ---------------------------------------------------------------------------------------------- tick
    def _on_tick(self) -> None:
        now_msg = self.get_clock().now().to_msg()
        now = codec.to_sec(now_msg)
        stale, trip = self._watchdog(now)
        if stale:
            if trip:
                self._trip(stale)
            self._hold(now_msg, f"watchdog: {stale}" if trip else stale,
                       DiagnosticStatus.ERROR if trip else DiagnosticStatus.WARN)
            return
        fault = self._policy_fault()
        if fault:  # a lost or silent policy server: hold, and keep asking (each plan request reconnects)
            self._trip(fault)
            if not self._pending:
                self._request_plan(now)
            self._hold(now_msg, f"watchdog: {fault}", DiagnosticStatus.ERROR)
            return

        self._tick_walls.append(time.monotonic())
        self._proprio_recent.appendleft(self._proprio())
        if not self._chunk:
            with self._lock:
                ready, self._ready = self._ready, None
            if ready is not None:
                _, source_stamp, actions = ready
                self._chunk.extend(actions)
                if self.publish_plan:
                    self.pub_plan.publish(codec.trajectory_msg(actions, codec.to_stamp(source_stamp), dt=self.dt,
                                                               first_offset=now - source_stamp))
        if not self._chunk:
            if not self._pending:
                self._request_plan(now)
            if self._had_chunk:
                reason = "inference overrun: chunk used up before the next was ready"
                self.counts["overruns"] += int(self._holding_reason != reason)  # events; holds counts ticks
                self._hold(now_msg, reason, DiagnosticStatus.WARN)
            else:
                self._hold(now_msg, "waiting for the first chunk", DiagnosticStatus.WARN)
            return

        action = self._chunk.popleft()
        self._had_chunk = True
        if len(self._chunk) <= self._margin() and not self._pending:
            with self._lock:
                have_next = self._ready is not None
            if not have_next:
                self._request_plan(now)
        command, report = apply_limits(action, self._eef[1], self.limits)
        self.counts["speed_scaled"] += int(report.speed_scaled)
        self.counts["workspace_zeroed"] += int(bool(report.workspace_zeroed))
        self._last_gripper = float(command[GRIPPER_INDEX])
        self._holding_reason = None
        partner = "" if not self.policy.accepts_message else f", partner message {self._partner_state(now)}"
        self._state = (DiagnosticStatus.OK if not partner.endswith(("missing", "stale")) else DiagnosticStatus.WARN,
                       f"running{partner}")
        self.pub_command.publish(codec.command_msg(command, now_msg, self.command_frame))
        self.counts["commands"] += 1

    def _trip(self, reason: str) -> None:
        """A watchdog trip (counted once per holding spell): drop the chunk and any plan in flight."""
        if (self._holding_reason or "").startswith("watchdog"):
            return
        self.counts["watchdog_trips"] += 1
        self.get_logger().warning(f"watchdog: {reason}; holding", throttle_duration_sec=LOG_THROTTLE_S)
        with self._lock:  # the chunk was planned from what is now old data
            self._epoch += 1
            self._ready = None
        self._chunk.clear()
        self._had_chunk = False
        self._proprio_recent.clear()

    def _policy_fault(self) -> str | None:
        """Why the policy cannot be trusted to deliver: the server was lost, or (remote mode) a plan has waited
        longer than policy_server_timeout (wall clock); None when fine."""
        if self._server_fault is not None:
            return self._server_fault
        if self.policy_server and self._pending:
            waited = time.monotonic() - self._plan_requested
            if waited > self.server_timeout:
                return f"policy server has not answered for {waited:.1f} s (limit {self.server_timeout} s)"
        return None

    def _watchdog(self, now: float) -> tuple[str | None, bool]:
        """(reason to hold, whether it is a watchdog trip) for stale inputs; (None, False) when all is fresh.
        Inputs not received yet at start-up hold without counting as a trip. After a reset the first frame of the
        new episode is awaited for at most max_image_age from the episode's start: a camera that stays silent
        across a reset is a trip like any other, not a start-up wait."""
        if self._wrist is None:
            return "waiting for the first wrist image", False
        for name, latest in (("joint state", self._joints), ("eef pose", self._eef)):
            if latest is None:
                return f"waiting for the first {name}", False
        if now - self._wrist[0] > self.max_image_age:
            if self._wrist[0] < self._episode_stamp and now - self._episode_stamp <= self.max_image_age:
                return "waiting for the first wrist image of the episode", False
            if self._wrist[0] < self._episode_stamp:
                return (f"no wrist image since the episode began {now - self._episode_stamp:.2f} s ago "
                        f"(limit {self.max_image_age})"), True
            return f"wrist image is {now - self._wrist[0]:.2f} s old (limit {self.max_image_age})", True
        if self._wrist[0] < self._episode_stamp:
            return "waiting for the first wrist image of the episode", False
        for name, latest in (("joint state", self._joints), ("eef pose", self._eef)):
            if now - latest[0] > self.max_state_age:
                return f"{name} is {now - latest[0]:.2f} s old (limit {self.max_state_age})", True
        if self.policy.uses_agentview:
            if self._agentview is None:
                return "waiting for the first agentview image", False
            if now - self._agentview[0] > self.max_image_age:
                return f"agentview image is {now - self._agentview[0]:.2f} s old", True
        return None, False

    def _hold(self, stamp, reason: str, level: int) -> None:
        if reason != self._holding_reason:
            self.get_logger().info(f"hold: {reason}", throttle_duration_sec=LOG_THROTTLE_S)
        self._holding_reason = reason
        self._state = (level, f"hold: {reason}")
        self.pub_command.publish(codec.command_msg(hold_command(self._last_gripper), stamp, self.command_frame))
        self.counts["holds"] += 1
        self.counts["commands"] += 1

    def _margin(self) -> int:
        """Actions left in the chunk when the next plan starts. Adaptive (-1): a plan started right after a tick
        has (m + 1) tick periods P to finish before the chunk runs out; keep half a period of slack:
        m = ceil(L / P - 0.5) with L the slowest of the last plans, clamped to [0, C - 1]; 1 before any data."""
        if self.replan_margin >= 0:
            return self.replan_margin
        walls = list(self._tick_walls)
        if not self.latencies or len(walls) < 3:
            return min(1, self.recipe.execute_steps - 1)
        period = statistics.median(b - a for a, b in zip(walls, walls[1:]))
        slowest = max(list(self.latencies)[-10:])
        needed = math.ceil(slowest / max(period, 1e-6) - 0.5)
        return max(0, min(needed, self.recipe.execute_steps - 1))

    def _partner_state(self, now: float) -> str:
        if self._partner is None or self._partner[0] < self._episode_stamp:
            return "missing"
        return "stale" if now - self._partner[0] > self.partner_timeout else "fresh"

    def _proprio(self) -> np.ndarray:
        _, joints, fingers = self._joints
        _, pos, quat = self._eef
        return codec.proprio(pos, quat, fingers, joints)

    def arm_observation(self, now: float) -> dict:
        """The latest observation in ``coop_transport.sim.env.arm_observation``'s format, with the states of the
        latest ticks (``proprio_history``, newest first) for policies that see earlier states."""
        proprio = self._proprio()
        recent = list(self._proprio_recent)
        if not recent or not np.array_equal(recent[0], proprio):  # inputs newer than this tick's record
            recent.insert(0, proprio)
        obs = {"proprio": proprio, "proprio_history": np.stack(recent), "wrist_image": self._wrist[1]}
        if self.policy.uses_agentview and self._agentview is not None:
            obs["agentview_image"] = self._agentview[1]
        if self.policy.accepts_message and self._partner_state(now) == "fresh":
            obs["partner_message"] = self._partner[1]  # absent when missing or stale: the no-message input
        return obs

    def _request_plan(self, now: float) -> None:
        self._pending = True
        self._plan_requested = time.monotonic()
        with self._lock:
            epoch = self._epoch
        self._jobs.put(("plan", (epoch, self._wrist[0], self.arm_observation(now))))

    # -------------------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                kind, job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "reset":
                self.policy.reset()
                continue
            epoch, source_stamp, obs = job
            t0 = time.perf_counter()
            try:
                actions = np.asarray(self.policy.plan(obs), dtype=np.float64)
                if actions.ndim != 2 or actions.shape[1] != ARM_ACTION_DIM or len(actions) < 1:
                    raise ValueError(f"plan() returned shape {actions.shape}, expected (C, {ARM_ACTION_DIM})")
                if not np.all(np.isfinite(actions)):
                    raise ValueError("plan() returned NaN or inf")
                message = self.policy.message(obs)
            except ConnectionError as err:  # the policy server is gone or silent: the tick's watchdog holds
                self.counts["server_errors"] += 1
                if self._server_fault is None:
                    self.get_logger().error(f"policy server lost: {err}")
                    self._server_fault = f"policy server unavailable ({err})"
                self._pending = False
                continue
            except Exception as err:  # a failing plan holds the arm; it must not kill the node
                self.counts["plan_errors"] += 1
                self.get_logger().error(f"planning failed: {err!r}", throttle_duration_sec=LOG_THROTTLE_S)
                self._pending = False
                continue
            if self._server_fault is not None:
                self.counts["server_recoveries"] += 1
                self.get_logger().info("policy server answers again; resuming")
                self._server_fault = None
            self.latencies.append(time.perf_counter() - t0)
            self.counts["plans"] += 1
            with self._lock:
                current = epoch == self._epoch
                if current:
                    self._ready = (epoch, source_stamp, actions)
            self._pending = False
            if current and message is not None:
                with quiet_on_shutdown(self):  # the planner's thread, not the executor's
                    self.pub_message.publish(codec.trajectory_msg(np.asarray(message), codec.to_stamp(source_stamp),
                                                                  dt=self.dt))
                    self.counts["messages_sent"] += 1
                if not self.context.ok():
                    return

    # --------------------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        level, message = self._state
        lat = list(self.latencies)
        values = {
            "state": topics.level_name(level),
            "arm": self.arm,
            "inference_ms_last": f"{lat[-1] * 1e3:.2f}" if lat else "nan",
            "inference_ms_median": f"{statistics.median(lat) * 1e3:.2f}" if lat else "nan",
            "replan_margin": str(self._margin()),
            "dropped_frames": str(sum(v for k, v in self.dropped.items() if "image" in k)),
            "partner_message": self._partner_state(codec.to_sec(self.get_clock().now().to_msg()))
            if self.policy.accepts_message else "n/a",
            "policy_server": self.policy_server or "local",
            **{k: str(v) for k, v in self.counts.items()},
            **{f"dropped/{k}": str(v) for k, v in sorted(self.dropped.items())},
        }
        try:
            values.update({f"policy/{k}": str(v) for k, v in self.policy.stats().items()})
        except Exception as err:  # stats are informative only
            values["policy/error"] = repr(err)
        status = DiagnosticStatus(level=level, name=f"coop_transport/policy/{self.get_namespace().strip('/')}",
                                  message=message, hardware_id=self.arm,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=2.0)


def main(args=None) -> None:
    rclpy.init(args=args)
    node = None
    try:
        node = PolicyNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
