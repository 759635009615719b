"""libfranka backend of the Franka bridge: one arm (and its hand) through franky-control, without ROS.

franky (PyPI ``franky-control``) runs libfranka's 1 kHz loop and a jerk-limited trajectory generator (Ruckig) in
native code. The bridge sets an absolute Cartesian target (``CartesianMotion`` with ``return_when_finished=False``,
started asynchronously): each new target takes over the running motion seamlessly and the arm then holds it, so a
command that stops arriving means the arm holds its last target. The robot's own velocity, acceleration and jerk
limits are set from ``MotionLimits`` before any motion starts.

All robot I/O runs in one thread per arm (``LibfrankaArm``): it sends the newest target as soon as the bridge sets
it, reads the robot state at ``state_rate`` and reports it through ``on_state``, and turns libfranka's exceptions
into an ``ArmFault`` (a reflex or control error, a lost connection) through ``on_fault``. After a fault the arm is
no longer following targets; only ``engage()`` (the bridge's explicit enable call) recovers it. The gripper has a
thread of its own because libfranka's gripper calls block until the fingers stop and accept one command at a time.

Frames: ``O_T_EE`` (the robot's end-effector pose in its base frame ``link0``) is what franky's Cartesian targets
refer to and what the bridge publishes; ``connect()`` checks it against the Franka Hand TCP of the arm's kinematics
(``franka_kinematics.tcp_pose``), because the end effector configured in Desk (or a simulator) decides O_T_EE.

Plain Python: no rclpy here (the ROS side is ``franka_bridge_node``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from coop_transport.ros.franka_kinematics import tcp_pose
from coop_transport.sim.frames import mat_to_axis_angle

# franky's maxima (its ``Robot.*_limit`` defaults for Panda / FR3): a configured limit above one is refused.
# The time to build up full acceleration (acceleration / jerk) must stay well inside one 20 Hz tick: each tick's
# target starts a motion that takes over the running one, and with franky-sim a 4 cm sinusoid at 0.06 m/s tracked
# within 6 mm at acceleration / jerk = 0.01 s but overshot its targets by 6 cm at 0.1 s (measured 2026-11-25).
MAX_RAMP_S = 0.02
FRANKY_MAX = {"translation_velocity": 1.7, "translation_acceleration": 13.0, "translation_jerk": 6500.0,
              "rotation_velocity": 2.5, "rotation_acceleration": 25.0, "rotation_jerk": 12500.0}


@dataclass(frozen=True)
class MotionLimits:
    """Limits of the robot-side trajectory generator (Cartesian, end effector). Low by default on purpose."""

    linear_velocity: float = 0.10
    """m/s."""
    linear_acceleration: float = 0.5
    """m/s^2."""
    linear_jerk: float = 50.0
    """m/s^3."""
    angular_velocity: float = 0.5
    """rad/s."""
    angular_acceleration: float = 2.0
    """rad/s^2."""
    angular_jerk: float = 200.0
    """rad/s^3."""

    def __post_init__(self):
        pairs = {"linear_velocity": "translation_velocity", "linear_acceleration": "translation_acceleration",
                 "linear_jerk": "translation_jerk", "angular_velocity": "rotation_velocity",
                 "angular_acceleration": "rotation_acceleration", "angular_jerk": "rotation_jerk"}
        for ours, franky_name in pairs.items():
            value = getattr(self, ours)
            if not 0 < value <= FRANKY_MAX[franky_name]:
                raise ValueError(f"{ours} must be in (0, {FRANKY_MAX[franky_name]}], got {value}")
        for kind in ("linear", "angular"):
            ramp = getattr(self, f"{kind}_acceleration") / getattr(self, f"{kind}_jerk")
            if ramp > MAX_RAMP_S:
                raise ValueError(f"{kind}_acceleration / {kind}_jerk = {ramp:.3f} s: keep it <= {MAX_RAMP_S} s (raise "
                                 f"the jerk limit), or targets that change every tick are overshot")


@dataclass(frozen=True)
class LibfrankaConfig:
    hostname: str
    """Hostname or IP of the arm's control unit (FCI)."""
    limits: MotionLimits = MotionLimits()
    realtime: bool = True
    """libfranka refuses to run without a realtime kernel unless this is false (simulators, development)."""
    state_rate: float = 50.0
    """Hz at which the robot state is read and reported."""
    gripper: bool = True
    """Drive the Franka Hand (false: no gripper connection)."""
    gripper_open_width: float = 0.08
    """m."""
    gripper_speed: float = 0.05
    """m/s."""
    gripper_force: float = 20.0
    """N, grasping force."""
    ee_position_tolerance: float = 0.005
    """m: O_T_EE must match the Franka Hand TCP of the kinematics within this, or the arm is not engaged."""
    ee_rotation_tolerance: float = 0.05
    """rad: the same for the orientation."""
    stop_timeout: float = 3.0
    """s: how long ``shutdown`` waits for the arm to come to rest before ending the motion."""

    def __post_init__(self):
        if not self.hostname:
            raise ValueError("the arm's hostname (robot_ip) is empty")
        if not (self.state_rate > 0 and self.gripper_open_width > 0 and self.gripper_speed > 0
                and self.gripper_force > 0 and self.stop_timeout > 0):
            raise ValueError("state_rate, gripper width/speed/force and stop_timeout must be positive")


@dataclass(frozen=True)
class ArmState:
    """One reading of the robot. Frames: base (link0); units: m, rad."""

    wall_time: float  # time.time() when read
    robot_time: float  # s, the robot's own clock (advances only while the robot sends state)
    q: np.ndarray  # (7,) joint positions
    dq: np.ndarray  # (7,) joint velocities
    pose: np.ndarray  # (4, 4) O_T_EE
    gripper_width: float  # m between the fingers; nan when unknown
    mode: str  # libfranka's RobotMode name


@dataclass(frozen=True)
class ArmFault:
    kind: str  # "reflex" (a control error the robot stopped on), "connection", "error", "gripper", "planner"
    reason: str

    @property
    def disables_arm(self) -> bool:
        """Whether the arm stopped following targets (until the next engage). A gripper fault leaves the arm
        alone; a planner fault was restarted (see ``LibfrankaArm._on_exception``) and is only reported."""
        return self.kind not in ("gripper", "planner")


def _pose_matches_kinematics(q: np.ndarray, pose: np.ndarray) -> tuple[float, float]:
    """(position m, rotation rad) between O_T_EE and the Franka Hand TCP computed from ``q``."""
    fk = tcp_pose(q)
    return (float(np.linalg.norm(fk[:3, 3] - pose[:3, 3])),
            float(np.linalg.norm(mat_to_axis_angle(fk[:3, :3].T @ pose[:3, :3]))))


class LibfrankaArm:
    """One arm through franky. ``on_state(ArmState)`` and ``on_fault(ArmFault)`` are called from its threads."""

    def __init__(self, config: LibfrankaConfig, on_state: Callable[[ArmState], None],
                 on_fault: Callable[[ArmFault], None], franky_module=None):
        if franky_module is None:
            try:  # franky-control; imported here so that the franka_ros2 path needs none
                import franky as franky_module
            except ImportError as err:
                raise ImportError(f"the libfranka backend needs franky-control (pinned in requirements.txt): "
                                  f"{err}") from err
        self.franky, self.config = franky_module, config
        self.on_state, self.on_fault = on_state, on_fault
        self.robot = None
        self.connected = False
        self.following = False  # engaged: targets are sent to the robot
        self.fault: ArmFault | None = None
        self.counts = {"targets_sent": 0, "states": 0, "recoveries": 0, "gripper_commands": 0,
                       "planner_restarts": 0}
        self.ee_check: tuple[float, float] | None = None  # (m, rad) of the last frame check
        self._lock = threading.Lock()  # every call on self.robot
        self._pending_target: np.ndarray | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._io_thread: threading.Thread | None = None
        self._last_robot_time = -1.0
        self._last_sent: np.ndarray | None = None  # the last target sent to the robot
        self._latest_target: np.ndarray | None = None  # the last target the bridge asked for
        self._motion_running = False  # a motion we started has not been seen ending yet
        self._last_move = 0.0  # time.monotonic() of the last move call
        self._planner_restart_times: list[float] = []
        self._callback_failed = False
        self.gripper = _GripperWorker(self) if config.gripper else None

    # ---------------------------------------------------------------------------------------------- connection
    def connect(self) -> None:
        """Connect (or reconnect), set the motion limits, check the end-effector frame, start the I/O thread.
        Raises ConnectionError with the reason."""
        self._stop_io()
        f, c = self.franky, self.config
        try:
            realtime = f.RealtimeConfig.Enforce if c.realtime else f.RealtimeConfig.Ignore
            robot = f.Robot(c.hostname, realtime_config=realtime)
            robot.relative_dynamics_factor = 1.0  # the limits below are the limits, not scaled again
            lim = c.limits
            for name, value in (("translation_velocity", lim.linear_velocity),
                                ("translation_acceleration", lim.linear_acceleration),
                                ("translation_jerk", lim.linear_jerk), ("rotation_velocity", lim.angular_velocity),
                                ("rotation_acceleration", lim.angular_acceleration),
                                ("rotation_jerk", lim.angular_jerk)):
                getattr(robot, f"{name}_limit").set(value)
            state = robot.state
        except Exception as err:  # franky's NetworkException, IncompatibleVersionException, RealtimeException, ...
            raise ConnectionError(f"cannot connect to the arm at {c.hostname}: {type(err).__name__}: {err}") from err
        q, pose = np.asarray(state.q, float), np.asarray(state.O_T_EE.matrix, float)
        self.ee_check = _pose_matches_kinematics(q, pose)
        with self._lock:
            self.robot, self.connected, self.following, self.fault = robot, True, False, None
            self._motion_running, self._last_sent, self._pending_target = False, None, None
        self._last_robot_time = -1.0
        self._stop.clear()
        self._io_thread = threading.Thread(target=self._io_loop, name=f"libfranka-{c.hostname}", daemon=True)
        self._io_thread.start()
        if self.gripper is not None:
            self.gripper.start()

    def _stop_io(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._io_thread is not None and self._io_thread is not threading.current_thread():
            self._io_thread.join(timeout=5.0)
        self._io_thread = None

    # ---------------------------------------------------------------------------------------------- engage
    def engage(self) -> np.ndarray:
        """Start following targets from where the arm is; returns that pose (4, 4). Recovers from a reflex
        (libfranka's automatic error recovery) and reconnects after a lost connection: both only here, on the
        operator's explicit enable. Raises RuntimeError with the reason when the arm cannot be engaged."""
        if not self.connected:
            self.connect()
        pos_err, rot_err = self.ee_check
        if pos_err > self.config.ee_position_tolerance or rot_err > self.config.ee_rotation_tolerance:
            raise RuntimeError(
                f"the robot's end effector O_T_EE is {pos_err * 1000:.1f} mm / {rot_err:.3f} rad from the Franka "
                f"Hand TCP of the kinematics: set the Franka Hand as end effector in Desk (the policy commands "
                f"that frame)")
        with self._lock:
            try:
                if self.robot.has_errors:
                    if not self.robot.recover_from_errors():
                        raise RuntimeError("libfranka's automatic error recovery failed")
                    self.counts["recoveries"] += 1
                pose = np.asarray(self.robot.state.O_T_EE.matrix, float)
                # No motion yet: the arm stands (held by the robot) until the first target that differs from here.
                # A zero-length motion is avoided on purpose: Ruckig's synchronization can fail on it (franky-sim
                # reported "Motion planner failed with error code -111" right after such a start).
                self._pending_target, self._last_sent, self._latest_target = None, pose, pose
            except RuntimeError:
                raise
            except Exception as err:
                raise RuntimeError(f"cannot engage the arm: {type(err).__name__}: {err}") from err
            self.following, self.fault = True, None
        return pose

    def _move(self, pose: np.ndarray, finish: bool = False) -> None:
        """Make ``pose`` the target of the running motion (or start one); ``finish``: end the motion there."""
        f = self.franky
        motion = f.CartesianMotion(f.Affine(np.ascontiguousarray(pose)), f.ReferenceType.Absolute,
                                   return_when_finished=finish)
        self.robot.move(motion, asynchronous=True)
        self._last_sent, self._motion_running, self._last_move = pose, not finish, time.monotonic()
        self.counts["targets_sent"] += 1

    def disengage(self, hold_pose: np.ndarray | None = None) -> None:
        """Stop following targets; the running motion holds ``hold_pose`` (4, 4) if given, else the last target."""
        self.following = False
        self._pending_target = None
        if hold_pose is not None:
            try:
                with self._lock:
                    if self.robot is not None and self.robot.is_in_control:
                        self._move(hold_pose)
            except Exception as err:
                self._on_exception(err)

    def set_target(self, pose: np.ndarray) -> None:
        """The new absolute target (4, 4, base frame) of the end effector; sent by the I/O thread at once.
        A target equal to the last one sent is not sent again: the running motion already holds it, and a motion
        that takes over re-plans from the robot's state, which let the arm drift past a repeated target (measured
        with franky-sim: 2 cm beyond a 4 cm step when the same target came every 50 ms)."""
        pose = np.array(pose, dtype=float)
        self._latest_target = pose
        if self.following and not (self._last_sent is not None and np.allclose(pose, self._last_sent, atol=1e-9)):
            self._pending_target = pose
            self._wake.set()

    def request_gripper(self, state: str) -> None:
        if self.gripper is not None:
            self.gripper.request(state)

    # ---------------------------------------------------------------------------------------------- I/O loop
    def _io_loop(self) -> None:
        period = 1.0 / self.config.state_rate
        next_read = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_read - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                target, self._pending_target = self._pending_target, None
                if target is not None and self.following:
                    with self._lock:
                        self._move(target)
                if time.monotonic() >= next_read:
                    next_read += period
                    if next_read < time.monotonic():  # fell behind (a blocking read): do not burst
                        next_read = time.monotonic() + period
                    self._read_state()
            except Exception as err:
                self._on_exception(err)
                if not self.connected:
                    break

    def _read_state(self) -> None:
        with self._lock:
            if self.robot.is_in_control:
                self.robot.poll_motion()  # raises the exception that ended the motion (reflex, network)
            elif self._motion_running and time.monotonic() - self._last_move > 0.1:  # not just starting
                self._motion_running = False
                self.robot.join_motion(0.0)  # the motion ended: join raises its reason
                if self.following:
                    raise RuntimeError("the motion ended without an error report")
            state = self.robot.state
        robot_time = float(state.time.to_sec())
        if robot_time == self._last_robot_time:
            return  # no new data from the robot (its state stalls when the connection is lost)
        self._last_robot_time = robot_time
        width = self.gripper.width if self.gripper is not None else float("nan")
        self.counts["states"] += 1
        self._notify(self.on_state, ArmState(
            time.time(), robot_time, np.asarray(state.q, float).copy(), np.asarray(state.dq, float).copy(),
            np.asarray(state.O_T_EE.matrix, float).copy(), width, str(state.robot_mode).split(".")[-1]))

    def _notify(self, callback, value) -> None:
        """Call the owner's callback; its exceptions (e.g. publishing while ROS shuts down) are not robot faults:
        logged once, the loop goes on."""
        try:
            callback(value)
        except Exception:
            if not self._callback_failed:
                self._callback_failed = True
                logging.getLogger(__name__).exception("libfranka arm %s: callback failed", self.config.hostname)

    def _on_exception(self, err: Exception) -> None:
        f = self.franky
        name = type(err).__name__
        self._motion_running = False
        if self._restart_after_planner_failure(err):
            return
        if isinstance(err, f.ControlException):
            kind = "reflex"
        elif isinstance(err, f.NetworkException) or "Net" in str(err):
            kind = "connection"  # franky reports a lost UDP stream as NetworkException or RuntimeError("Net ...")
        else:
            kind = "error"
        self.following = False
        if kind == "connection":
            self.connected = False
        self.fault = ArmFault(kind, f"{name}: {err}")
        self._notify(self.on_fault, self.fault)

    def _restart_after_planner_failure(self, err: Exception) -> bool:
        """A failure of franky's trajectory planner (Ruckig) ends the motion before any command reaches the robot
        and leaves the robot without errors: the motion is restarted towards the latest target, at most 3 times in
        10 s, and reported. Anything else, or a robot with errors, is a fault that disables the arm."""
        if not (self.following and "Motion planner failed" in str(err)):
            return False
        now = time.monotonic()
        self._planner_restart_times = [t for t in self._planner_restart_times if now - t < 10.0]
        try:
            robot_ok = not self.robot.has_errors
        except Exception:
            robot_ok = False
        if len(self._planner_restart_times) >= 3 or not robot_ok:
            return False
        self._planner_restart_times.append(now)
        self.counts["planner_restarts"] += 1
        self._last_sent = None  # resend even an unchanged target
        if self._latest_target is not None:
            self._pending_target = self._latest_target
            self._wake.set()
        self._notify(self.on_fault, ArmFault("planner", f"{type(err).__name__}: {err}; motion restarted"))
        return True

    # ---------------------------------------------------------------------------------------------- shutdown
    def shutdown(self) -> str:
        """Bring the arm to rest at its current pose (jerk-limited), end the motion, close the connection.
        Returns what happened (for the log); never raises."""
        self.following = False
        self._stop_io()
        if self.gripper is not None:
            self.gripper.close()
        if self.robot is None or not self.connected:
            return "not connected: nothing to stop"
        try:
            with self._lock:
                if not self.robot.is_in_control:
                    return "idle: no motion to stop"
                # The target becomes "here": the generator decelerates within its limits, then the motion ends.
                self._move(np.asarray(self.robot.state.O_T_EE.matrix, float), finish=True)
                if self.robot.join_motion(self.config.stop_timeout):
                    return "stopped at rest"
                self.robot.stop()  # not at rest in time: end the motion now (libfranka stops the arm)
                return f"not at rest after {self.config.stop_timeout} s: motion stopped"
        except Exception as err:
            return f"stop raised {type(err).__name__}: {err}"


class _GripperWorker:
    """The Franka Hand of one arm: the newest open/close request wins, one libfranka command at a time, the finger
    width read between commands and while one runs (libfranka blocks a second command until the first ends)."""

    def __init__(self, arm: LibfrankaArm):
        self.arm = arm
        self.width = float("nan")
        self.error: str | None = None
        self.current: str | None = None  # the state last commanded
        self._desired: str | None = None
        self._gripper = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.close()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="libfranka-gripper", daemon=True)
        self._thread.start()

    def request(self, state: str) -> None:
        if state not in ("open", "close"):
            raise ValueError(f"gripper state must be open or close, got {state!r}")
        self._desired = state

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._thread = None

    def _loop(self) -> None:
        c, f = self.arm.config, self.arm.franky
        try:
            self._gripper = f.Gripper(c.hostname)
        except Exception as err:
            self.error = f"cannot connect to the gripper: {type(err).__name__}: {err}"
            self.arm._notify(self.arm.on_fault, ArmFault("gripper", self.error))
            return
        running = None  # the future of the command in flight
        while not self._stop.is_set():
            try:
                self.width = float(self._gripper.width)  # blocks until the next gripper state (about 1 ms)
                if running is not None and running.wait(0.0):
                    running = None
                desired = self._desired
                if running is None and desired is not None and desired != self.current:
                    if desired == "open":
                        running = self._gripper.move_async(c.gripper_open_width, c.gripper_speed)
                    else:  # grasp whatever is between the fingers (any width counts as success)
                        running = self._gripper.grasp_async(0.0, c.gripper_speed, c.gripper_force,
                                                            c.gripper_open_width, c.gripper_open_width)
                    self.current = desired
                    self.arm.counts["gripper_commands"] += 1
                self.error = None
            except Exception as err:
                self.error = f"{type(err).__name__}: {err}"
                self.arm._notify(self.arm.on_fault, ArmFault("gripper", self.error))
                self._stop.wait(1.0)
            self._stop.wait(0.02)
