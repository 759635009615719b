"""MuJoCo sim bridge: runs TwoArmTransport and speaks the policy nodes' topics (layouts: TOPICS.md).

Usage: ``ros2 run coop_transport sim_bridge_node --ros-args -p time_mode:=lockstep -p image_size:=96``
(or ``python -m coop_transport.ros.sim_bridge_node --ros-args ...``).

Per control step it publishes, for each arm (robot0 in ``/left``, robot1 in ``/right`` by default), the wrist
camera, the joint states and the eef pose in the arm's base frame, plus ``/agentview/image_raw`` (optional) and
``/sim/episode``; it applies each arm's latest ``command`` (hold = zero delta with the last gripper value when a
command is missing, stale or malformed), resets on success, on the horizon and on ``/sim/reset`` with seeds
``first_seed``, ``first_seed + 1``, ...

Time modes:
- ``lockstep`` (simulated time; CPU machines, where software rendering gives only ~8 steps/s): the bridge owns
  ``/clock``; for each tick it publishes the observation, then the clock, then waits (up to ``lockstep_timeout``
  wall seconds) for both arms' commands stamped with this tick before stepping. Policy nodes run with
  ``use_sim_time`` and tick when ``/clock`` advances. An arm whose command topic has no publisher is not waited for.
- ``wall``: steps on a 20 Hz wall-clock schedule with whatever commands are fresh (GPU machines).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.task import Future
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from coop_transport.constants import (
    AGENTVIEW_CAMERA, ARMS, CONTROL_FREQ, GRIPPER_INDEX, HORIZON, SMALL_IMAGE_SIZE, WRIST_CAMERA, image_key,
)
from coop_transport.ros import codec, topics
from coop_transport.ros.safety import hold_command

TIME_MODES = ("lockstep", "wall")


def _p(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=description)


class SimBridgeNode(Node):
    """TransportSim behind ROS topics."""

    def __init__(self, **kwargs):
        super().__init__("sim_bridge", **kwargs)
        d = self.declare_parameter
        d("time_mode", "lockstep", _p(f"One of {TIME_MODES}: lockstep publishes /clock and waits for commands."))
        d("horizon", HORIZON, _p("Control steps per episode."))
        d("first_seed", 1, _p("Reset seed of the first episode; episode i uses first_seed + i - 1."))
        d("image_size", SMALL_IMAGE_SIZE, _p("Square camera resolution (must match the policies')."))
        d("agentview", False, _p("Render and publish /agentview/image_raw."))
        d("arm_namespaces", [topics.DEFAULT_NAMESPACES[a] for a in ARMS], _p(f"Namespaces of {ARMS}, in order."))
        d("lockstep_timeout", 0.5, _p("Lockstep: wall seconds to wait for both arms' commands per tick."))
        d("command_timeout", 0.2, _p("Wall mode: a command older than this (s) is stale (hold)."))
        d("max_episodes", 0, _p("Exit after this many episodes (0 = run forever)."))
        d("results_path", "", _p("Append one JSON line per finished episode to this file."))
        d("wait_for_policies", 120.0, _p("Wall seconds to wait for both arms' command publishers before the "
                                         "first episode (policies may load slowly)."))
        d("drop_cameras", "", _p("Comma-separated arm namespaces whose wrist camera is not published "
                                 "(fault injection; may be changed at run time)."))
        d("terminate_on_success", True, _p("End an episode at its first successful step."))

        g = lambda name: self.get_parameter(name).value  # noqa: E731
        self.time_mode = g("time_mode")
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {self.time_mode!r}")
        namespaces = [ns.strip("/") for ns in g("arm_namespaces")]
        if len(namespaces) != len(ARMS) or len(set(namespaces)) != len(ARMS):
            raise ValueError(f"arm_namespaces needs {len(ARMS)} distinct names, got {namespaces}")
        self.ns = dict(zip(ARMS, namespaces))
        self.dt = 1.0 / CONTROL_FREQ
        self.lockstep = self.time_mode == "lockstep"

        from coop_transport.sim import SimConfig, TransportSim  # MuJoCo and robosuite load here, not on import

        self.sim_config = SimConfig(horizon=g("horizon"), wrist_cameras=True, agentview=g("agentview"),
                                    image_size=g("image_size"), terminate_on_success=g("terminate_on_success"))
        t0 = time.perf_counter()
        self.sim = TransportSim(self.sim_config)
        self.get_logger().info(f"TransportSim ready in {time.perf_counter() - t0:.1f} s ({self.time_mode}, "
                               f"{self.sim_config.image_size}px, horizon {self.sim_config.horizon}, arms {self.ns})")

        sensor, reliable = qos_profile_sensor_data, QoSProfile(depth=10)
        self.pub_wrist, self.pub_joints, self.pub_eef = {}, {}, {}
        self._cmd: dict[str, tuple[float, np.ndarray] | None] = {a: None for a in ARMS}
        self._cv = threading.Condition()
        for arm in ARMS:
            ns = self.ns[arm]
            self.pub_wrist[arm] = self.create_publisher(Image, topics.in_namespace(ns, topics.WRIST_IMAGE), sensor)
            self.pub_joints[arm] = self.create_publisher(JointState, topics.in_namespace(ns, topics.JOINT_STATES),
                                                         reliable)
            self.pub_eef[arm] = self.create_publisher(PoseStamped, topics.in_namespace(ns, topics.EEF_POSE), reliable)
            self.create_subscription(JointState, topics.in_namespace(ns, topics.COMMAND),
                                     lambda msg, arm=arm: self._on_command(arm, msg), reliable)
        self.pub_agentview = self.create_publisher(Image, topics.AGENTVIEW_TOPIC, sensor)
        self.pub_episode = self.create_publisher(DiagnosticArray, topics.EPISODE_TOPIC, QoSProfile(depth=20))
        self.pub_clock = self.create_publisher(ClockMsg, topics.CLOCK_TOPIC, reliable) if self.lockstep else None
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS_TOPIC, reliable)
        self.create_service(Trigger, topics.RESET_SERVICE, self._on_reset)
        self.create_timer(1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))

        self.counts = {a: {"commands": 0, "holds": 0, "rejected": 0} for a in ARMS}
        self.episode, self.seed, self.tick = 0, int(g("first_seed")), 0
        self.outcomes: list[dict] = []
        self.steps_per_s = 0.0
        self._gripper = {a: -1.0 for a in ARMS}
        self._holding = {a: "no command yet" for a in ARMS}
        self._reset_requested = False
        self._success = False
        self._stop = threading.Event()
        self.finished = Future()
        self._thread = threading.Thread(target=self._run_guarded, name="sim-steps", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------- inputs
    def _on_command(self, arm: str, msg: JointState) -> None:
        try:
            values = codec.command_array(msg)
        except codec.Rejected as err:
            self.counts[arm]["rejected"] += 1
            self.get_logger().warning(f"{self.ns[arm]}: rejected command: {err}", throttle_duration_sec=2.0)
            return
        with self._cv:
            self._cmd[arm] = (codec.to_sec(msg.header.stamp), values)
            self._cv.notify_all()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._reset_requested = True
        response.success = True
        response.message = f"episode {self.episode} (seed {self.seed}) ends at the next step"
        return response

    # ----------------------------------------------------------------------------------------------- time
    def _stamp(self) -> float:
        """Time of the current tick: simulated (tick * dt) in lockstep, the wall clock otherwise."""
        return self.tick * self.dt if self.lockstep else time.time()

    def _fresh(self, arm: str, now: float) -> bool:
        latest = self._cmd[arm]
        if latest is None:
            return False
        if self.lockstep:
            return latest[0] >= now - 1e-6
        return now - latest[0] <= self.get_parameter("command_timeout").value

    def _collect_commands(self, now: float) -> dict[str, np.ndarray]:
        """Each arm's command for the tick at ``now``, or hold."""
        if self.lockstep:
            wait_for = [a for a in ARMS if self.count_publishers(topics.in_namespace(self.ns[a], topics.COMMAND))]
            with self._cv:
                self._cv.wait_for(lambda: self._stop.is_set() or all(self._fresh(a, now) for a in wait_for),
                                  timeout=self.get_parameter("lockstep_timeout").value)
        out = {}
        with self._cv:
            for arm in ARMS:
                if self._fresh(arm, now):
                    out[arm] = self._cmd[arm][1]
                    self._gripper[arm] = float(out[arm][GRIPPER_INDEX])
                    self._holding[arm] = ""
                    self.counts[arm]["commands"] += 1
                else:
                    out[arm] = hold_command(self._gripper[arm])
                    self._holding[arm] = "no command" if self._cmd[arm] is None else "command stale"
                    self.counts[arm]["holds"] += 1
        return out

    # -------------------------------------------------------------------------------------------- outputs
    def _publish_observation(self, obs: dict, now: float, done: bool = False, outcome: str = "running") -> None:
        from coop_transport.sim.frames import quat_xyzw_to_mat, world_to_base_pos, world_to_base_rot

        stamp = codec.to_stamp(now)
        dropped = {s.strip().strip("/") for s in self.get_parameter("drop_cameras").value.split(",") if s.strip()}
        for arm in ARMS:
            ns = self.ns[arm]
            if ns not in dropped:
                self.pub_wrist[arm].publish(codec.image_msg(obs[image_key(WRIST_CAMERA[arm])], stamp,
                                                            f"{arm}_wrist_camera"))
            names = codec.arm_joint_names(arm)
            position = np.concatenate([obs[f"{arm}_joint_pos"], obs[f"{arm}_gripper_qpos"]])
            velocity = None
            if f"{arm}_joint_vel" in obs and f"{arm}_gripper_qvel" in obs:
                velocity = np.concatenate([obs[f"{arm}_joint_vel"], obs[f"{arm}_gripper_qvel"]])
            self.pub_joints[arm].publish(codec.joint_state_msg(names, position, velocity, stamp))
            pos = world_to_base_pos(arm, obs[f"{arm}_eef_pos"])
            rot = world_to_base_rot(arm, quat_xyzw_to_mat(obs[f"{arm}_eef_quat"]))
            self.pub_eef[arm].publish(codec.pose_msg(pos, codec.mat_to_quat_xyzw(rot), stamp, topics.base_frame(arm)))
        if self.sim_config.agentview:
            self.pub_agentview.publish(codec.image_msg(obs[image_key(AGENTVIEW_CAMERA)], stamp, "agentview"))
        self._publish_episode(now, done, outcome)
        if self.pub_clock is not None:  # last: policy nodes tick on the clock, with this observation in hand
            self.pub_clock.publish(ClockMsg(clock=stamp))

    def _publish_episode(self, now: float, done: bool, outcome: str) -> None:
        values = {"episode": self.episode, "seed": self.seed, "step": self.sim.t,
                  "success": str(self._success).lower(), "done": str(done).lower(), "outcome": outcome,
                  "horizon": self.sim_config.horizon}
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name=topics.EPISODE_STATUS_NAME,
                                  message=outcome, hardware_id="sim",
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        self.pub_episode.publish(DiagnosticArray(header=Header(stamp=codec.to_stamp(now)), status=[status]))

    def _publish_diagnostics(self) -> None:
        values = {"episode": self.episode, "seed": self.seed, "step": self.sim.t, "tick": self.tick,
                  "time_mode": self.time_mode, "steps_per_s": f"{self.steps_per_s:.2f}"}
        level = DiagnosticStatus.OK
        for arm in ARMS:
            ns = self.ns[arm]
            values[f"{ns}/holding"] = self._holding[arm] or "no"
            values.update({f"{ns}/{k}": v for k, v in self.counts[arm].items()})
            if self._holding[arm]:
                level = DiagnosticStatus.WARN
        status = DiagnosticStatus(level=level, name="coop_transport/sim_bridge", hardware_id="sim",
                                  message="holding " + ", ".join(self.ns[a] for a in ARMS if self._holding[a])
                                  if level != DiagnosticStatus.OK else "running",
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    # ----------------------------------------------------------------------------------------- step loop
    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as err:  # surface the failure and exit non-zero (the bridge is a required node)
            if not self.context.ok():  # a signal shut ROS down under a publish of this thread: a normal stop
                if not self.finished.done():
                    self.finished.set_result(True)
                return
            self.get_logger().fatal(f"simulation loop failed: {err!r}")
            self.finished.set_exception(err)
            return
        if not self.finished.done():
            self.finished.set_result(True)

    def _wait_for_policies(self) -> None:
        deadline = time.monotonic() + self.get_parameter("wait_for_policies").value
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready = [self.count_publishers(topics.in_namespace(self.ns[a], topics.COMMAND)) > 0
                     and self.pub_wrist[a].get_subscription_count() > 0 for a in ARMS]
            if all(ready):
                self.get_logger().info("both policy nodes are up")
                return
            time.sleep(0.1)
        if not self._stop.is_set():
            self.get_logger().warning("starting without both policy nodes (their arms hold)")

    def _start_episode(self) -> dict:
        self.episode += 1
        self._success = False
        self._gripper = {a: -1.0 for a in ARMS}  # robosuite resets with open grippers
        self._episode_start = time.perf_counter()
        self._episode_counts = {a: dict(self.counts[a]) for a in ARMS}
        return self.sim.reset(self.seed)

    def _end_episode(self, outcome: str) -> bool:
        """Record the outcome, publish it; returns False when max_episodes is reached."""
        result = {"episode": self.episode, "seed": self.seed, "success": self._success, "length": self.sim.t,
                  "outcome": outcome, "wall_s": round(time.perf_counter() - self._episode_start, 3),
                  "holds": {self.ns[a]: self.counts[a]["holds"] - self._episode_counts[a]["holds"] for a in ARMS}}
        self.outcomes.append(result)
        self.get_logger().info(f"episode {self.episode} (seed {self.seed}): {outcome} after {self.sim.t} steps")
        self._publish_episode(self._stamp(), True, outcome)
        path = self.get_parameter("results_path").value
        if path:
            with Path(path).open("a") as f:
                f.write(json.dumps(result) + "\n")
        limit = self.get_parameter("max_episodes").value
        return not (limit and self.episode >= limit)

    def _run(self) -> None:
        from coop_transport.sim.env import join_actions

        self._wait_for_policies()
        self.tick = 1
        obs = self._start_episode()
        wall_next = time.monotonic()
        recent: list[float] = []
        while not self._stop.is_set():
            now = self._stamp()
            self._publish_observation(obs, now)
            if not self.lockstep:  # wall mode: the next step happens on the 20 Hz schedule
                wall_next += self.dt
                delay = wall_next - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    wall_next = time.monotonic()  # fell behind: do not try to catch up
                now = self._stamp()
            commands = self._collect_commands(now)
            if self._stop.is_set():
                break
            t0 = time.perf_counter()
            obs, _, done, info = self.sim.step(join_actions(commands))
            recent = (recent + [time.perf_counter() - t0])[-20:]
            self.steps_per_s = len(recent) / max(sum(recent), 1e-9)
            self._success = self._success or info["success"]
            self.tick += 1
            outcome = "success" if self._success and done else "timeout" if done else None
            if self._reset_requested and outcome is None:
                outcome = "reset"
            if outcome is not None:
                self._reset_requested = False
                if not self._end_episode(outcome):
                    break
                self.seed += 1
                obs = self._start_episode()

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=5.0)
        self.sim.close()


def main(args=None) -> None:
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = SimBridgeNode()
        # One executor thread is enough (stepping and rendering run in the bridge's own thread), and rclpy's
        # MultiThreadedExecutor was seen to fire timers and callbacks at a fraction of their rate on 2-core machines.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin_until_future_complete(node.finished)
        if node.finished.done() and node.finished.exception() is not None:
            code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
