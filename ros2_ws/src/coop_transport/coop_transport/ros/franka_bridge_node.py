"""Franka bridge, one per arm: the policy's 7-D commands onto the robot, the robot's state back onto policy topics.

Two backends (parameter ``backend``), the same topics and safety on the policy side:
- ``franka_ros2`` (default): the arm's franka_ros2 controller manager, described below;
- ``libfranka``: the arm's control unit directly, through franky-control (``libfranka_arm``), at ``robot_ip``; no
  ROS install or franka_ros2 needed. The robot-side trajectory generator also gets velocity, acceleration and
  jerk limits (``max_linear_*``, ``max_angular_*``); a reflex, control error or lost connection disables the arm
  and is reported with its reason on diagnostics (ERROR) until an enable call recovers it; on shutdown (SIGINT,
  SIGTERM) the arm is brought to rest and its motion ended.

Usage: ``ros2 run coop_transport franka_bridge_node --ros-args -r __ns:=/left -p arm:=robot0
-p franka_namespace:=franka_left`` (or ``-p backend:=libfranka -p robot_ip:=172.16.0.2``) then, when the cell is clear, ``ros2 service call /left/enable
std_srvs/srv/SetBool "{data: true}"``.

franka_ros2 side (in ``franka_namespace``; names from franka_ros2 v3, Jazzy):
- ``joint_states`` (sensor_msgs/JointState, arm + finger joints merged by joint_state_publisher; best-effort QoS);
- ``franka_robot_state_broadcaster/current_pose`` (geometry_msgs/PoseStamped, base frame; best effort), or, with
  ``pose_source:=fk`` (mock hardware has no state broadcaster), the pose from the joint angles (Franka's DH table);
- ``<controller>/equilibrium_pose`` (geometry_msgs/PoseStamped): the target pose of the Cartesian impedance
  controller, which this bridge publishes;
- ``franka_gripper/move`` and ``franka_gripper/grasp`` actions (franka_msgs, imported lazily).

Policy side (in the arm's namespace): subscribes ``command``; publishes ``joint_states`` and ``eef_pose``.

Commands integrate into the target pose exactly like robosuite's OSC_POSE (position += d * pos_scale, orientation
= R(dr * rot_scale) @ orientation, base frame), after the safety filters: speed limits, workspace box, and a leash
(the target never leads the measured pose by more than ``max_target_offset`` m / ``max_target_rotation`` rad).
Until ``enable`` is called with true, or when commands go stale, the target stays where it is (hold).
A target outside the workspace box is never pulled into it (that would move the arm unasked): components that would
leave the box further are dropped.
"""

from __future__ import annotations

import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from std_srvs.srv import SetBool

from coop_transport.constants import ARMS, CONTROL_FREQ, GRIPPER_INDEX, OSC_POS_SCALE, OSC_ROT_SCALE
from coop_transport.ros import codec, topics
from coop_transport.ros.franka_gripper import FrankaGripperClient, GripperHysteresis, NoGripper
from coop_transport.ros.franka_kinematics import tcp_pose
from coop_transport.ros.libfranka_arm import ArmFault, ArmState, LibfrankaArm, LibfrankaConfig, MotionLimits
from coop_transport.ros.safety import SafetyLimits, apply_limits
from coop_transport.ros.threads import quiet_on_shutdown
from coop_transport.sim.frames import mat_to_axis_angle, quat_xyzw_to_mat


def _p(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=description)


BACKENDS = ("franka_ros2", "libfranka")


class FrankaBridgeNode(Node):
    def __init__(self, franky_module=None, **kwargs):
        super().__init__("franka_bridge", **kwargs)
        d = self.declare_parameter
        d("arm", "", _p(f"Which arm: one of {ARMS}."))
        d("backend", "franka_ros2", _p("franka_ros2: the arm's franka_ros2 controllers; libfranka: the arm's "
                                       "control unit through franky-control (robot_ip)."))
        d("robot_ip", "", _p("libfranka: hostname or IP of the arm's control unit."))
        d("realtime", True, _p("libfranka: require a realtime kernel (false only for simulators)."))
        d("state_rate", 50.0, _p("libfranka: Hz of joint_states and eef_pose."))
        d("max_linear_acceleration", 0.5, _p("libfranka: m/s^2 of the robot's trajectory generator."))
        d("max_linear_jerk", 50.0, _p("libfranka: m/s^3."))
        d("max_angular_acceleration", 2.0, _p("libfranka: rad/s^2."))
        d("max_angular_jerk", 200.0, _p("libfranka: rad/s^3."))
        d("franka_namespace", "franka", _p("franka_ros2 namespace of this arm (its controller manager)."))
        d("robot_type", "fr3", _p("franka_ros2 robot type (prefix of the joint names)."))
        d("pose_source", "topic", _p("topic: franka_robot_state_broadcaster/current_pose; fk: from joint angles."))
        d("pose_topic", "franka_robot_state_broadcaster/current_pose", _p("Measured pose, in franka_namespace."))
        d("joint_states_topic", "joint_states", _p("franka_ros2 joint states, in franka_namespace."))
        d("equilibrium_pose_topic", "cartesian_impedance_example_controller/equilibrium_pose",
          _p("Target pose input of the Cartesian impedance controller, in franka_namespace."))
        d("base_frame", "", _p("frame_id of published poses; empty = the measured pose's (fr3_link0 for fk)."))
        d("control_rate", float(CONTROL_FREQ), _p("Hz of policy commands (one command = one step of delta)."))
        d("command_timeout", 0.25, _p("s: commands older than this are not integrated (hold)."))
        d("state_timeout", 0.5, _p("s: no enable and no motion while the measured pose is older than this."))
        d("pos_scale", OSC_POS_SCALE, _p("m per unit command per step (OSC_POSE scaling)."))
        d("rot_scale", OSC_ROT_SCALE, _p("rad per unit command per step (OSC_POSE scaling)."))
        d("max_linear_speed", 0.10, _p("m/s of the target (conservative default)."))
        d("max_angular_speed", 0.5, _p("rad/s of the target (conservative default)."))
        d("workspace_min", [0.30, -0.30, 0.05], _p("Target box lower corner (m, base frame)."))
        d("workspace_max", [0.70, 0.30, 0.50], _p("Target box upper corner (m, base frame)."))
        d("max_target_offset", 0.05, _p("m: the target never leads the measured position by more."))
        d("max_target_rotation", 0.3, _p("rad: no rotation is integrated while the target leads by more."))
        d("enable_on_start", False, _p("Accept commands without an enable call (never on a real cell)."))
        d("gripper", "franka", _p("franka: the Franka Hand (franka_ros2: franka_gripper actions, needs "
                                  "franka_msgs; libfranka: directly); none: ignore."))
        d("gripper_open_width", 0.08, _p("m."))
        d("gripper_grasp_force", 20.0, _p("N."))
        d("gripper_speed", 0.05, _p("m/s."))

        g = lambda name: self.get_parameter(name).value  # noqa: E731
        self.arm = g("arm")
        if self.arm not in ARMS:
            raise ValueError(f"parameter arm must be one of {ARMS}, got {self.arm!r}")
        fns = "/" + g("franka_namespace").strip("/")
        self.joint_prefix = g("robot_type")
        self.rate = float(g("control_rate"))
        self.limits = SafetyLimits(tuple(g("workspace_min")), tuple(g("workspace_max")), g("max_linear_speed"),
                                   g("max_angular_speed"), g("pos_scale"), g("rot_scale"), self.rate)
        self.backend = g("backend")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.pose_source = g("pose_source")
        if self.pose_source not in ("topic", "fk"):
            raise ValueError(f"pose_source must be topic or fk, got {self.pose_source!r}")
        if g("gripper") not in ("franka", "none"):
            raise ValueError(f"gripper must be franka or none, got {g('gripper')!r}")

        self.enabled = bool(g("enable_on_start"))
        self.measured: tuple[float, np.ndarray, np.ndarray, str] | None = None  # (wall s, pos, rot (3,3), frame)
        self.target: tuple[np.ndarray, np.ndarray] | None = None  # (pos, rot)
        self.last_command_wall: float | None = None
        self.counts = {"commands": 0, "ignored_disabled": 0, "ignored_no_state": 0, "integrated": 0,
                       "rejected": 0, "leash": 0, "workspace_zeroed": 0, "speed_scaled": 0, "gripper_goals": 0,
                       "late_commands": 0, "faults": 0}
        self.hysteresis = GripperHysteresis()
        self.fault: ArmFault | None = None  # libfranka: the arm's last fault, until an enable recovers it

        reliable = QoSProfile(depth=10)
        self.pub_joints = self.create_publisher(JointState, topics.JOINT_STATES, reliable)
        self.pub_eef = self.create_publisher(PoseStamped, topics.EEF_POSE, reliable)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS_TOPIC, reliable)
        if self.backend == "franka_ros2":
            self._init_franka_ros2(fns)
        else:
            self._init_libfranka(franky_module)
        self.create_subscription(JointState, topics.COMMAND, self._on_command, reliable)
        self.create_service(SetBool, topics.ENABLE_SERVICE, self._on_enable)
        self.create_timer(1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        where = f"franka_ros2 in {fns}, pose from {self.pose_source}" if self.backend == "franka_ros2" else \
            f"libfranka at {g('robot_ip')}"
        self.get_logger().info(f"{self.arm}: {where}, {'ENABLED' if self.enabled else 'disabled until enable'}")

    def _init_franka_ros2(self, fns: str) -> None:
        g = lambda name: self.get_parameter(name).value  # noqa: E731
        if g("gripper") == "franka":
            self.gripper = FrankaGripperClient(self, f"{fns}/franka_gripper", g("gripper_open_width"),
                                               g("gripper_speed"), g("gripper_grasp_force"))
        else:
            self.gripper = NoGripper()
        if not self.gripper.available:
            self.get_logger().error(f"gripper unavailable: {self.gripper.reason}")
        sensor = qos_profile_sensor_data
        self.create_subscription(JointState, f"{fns}/{g('joint_states_topic')}", self._on_joints, sensor)
        if self.pose_source == "topic":
            self.create_subscription(PoseStamped, f"{fns}/{g('pose_topic')}", self._on_pose, sensor)
        self.pub_equilibrium = self.create_publisher(PoseStamped, f"{fns}/{g('equilibrium_pose_topic')}",
                                                     QoSProfile(depth=10))

    def _init_libfranka(self, franky_module) -> None:
        g = lambda name: self.get_parameter(name).value  # noqa: E731
        self.gripper = None
        config = LibfrankaConfig(
            hostname=g("robot_ip"), realtime=g("realtime"), state_rate=g("state_rate"),
            limits=MotionLimits(g("max_linear_speed"), g("max_linear_acceleration"), g("max_linear_jerk"),
                                g("max_angular_speed"), g("max_angular_acceleration"), g("max_angular_jerk")),
            gripper=g("gripper") == "franka", gripper_open_width=g("gripper_open_width"),
            gripper_speed=g("gripper_speed"), gripper_force=g("gripper_grasp_force"))
        self.joint_names = codec.arm_joint_names(self.joint_prefix)
        self.arm_driver = LibfrankaArm(config, self._on_arm_state, self._on_arm_fault, franky_module)
        try:
            self.arm_driver.connect()
        except ConnectionError as err:  # reported on diagnostics; enable tries again
            self.fault = ArmFault("connection", str(err))
            self.get_logger().error(str(err))

    # ------------------------------------------------------------------------------------------- robot state
    def _frame(self, measured_frame: str) -> str:
        return self.get_parameter("base_frame").value or measured_frame

    def _on_joints(self, msg: JointState) -> None:
        try:
            joints, _ = codec.split_joint_state(msg, require_fingers=False)
        except codec.Rejected as err:
            self.counts["rejected"] += 1
            self.get_logger().warning(f"rejected franka joint state: {err}", throttle_duration_sec=2.0)
            return
        self.pub_joints.publish(msg)
        if self.pose_source == "fk":
            t = tcp_pose(joints)
            self._set_measured(t[:3, 3], t[:3, :3], f"{self.joint_prefix}_link0", msg.header.stamp)

    def _on_pose(self, msg: PoseStamped) -> None:
        try:
            pos, quat = codec.pose_arrays(msg)
        except codec.Rejected as err:
            self.counts["rejected"] += 1
            self.get_logger().warning(f"rejected franka pose: {err}", throttle_duration_sec=2.0)
            return
        self._set_measured(pos, quat_xyzw_to_mat(quat), msg.header.frame_id, msg.header.stamp)

    def _set_measured(self, pos: np.ndarray, rot: np.ndarray, frame: str, stamp) -> None:
        self.measured = (time.monotonic(), pos, rot, frame)
        self.pub_eef.publish(codec.pose_msg(pos, codec.mat_to_quat_xyzw(rot), stamp, self._frame(frame)))

    def _state_fresh(self) -> bool:
        return (self.measured is not None
                and time.monotonic() - self.measured[0] <= self.get_parameter("state_timeout").value)

    def _on_arm_state(self, state: ArmState) -> None:
        """libfranka (the arm's I/O thread): joint states (fingers: half the hand's width each) and O_T_EE."""
        if not self.context.ok():  # shutting down (a signal): the arm is being stopped, nothing to publish
            return
        stamp = codec.to_stamp(state.wall_time)
        half_width = state.gripper_width / 2 if np.isfinite(state.gripper_width) else 0.0
        with quiet_on_shutdown(self):  # the arm's thread: a signal may end ROS between the check above and here
            self.pub_joints.publish(codec.joint_state_msg(self.joint_names, [*state.q, half_width, half_width],
                                                          [*state.dq, 0.0, 0.0], stamp))
            self._set_measured(state.pose[:3, 3], state.pose[:3, :3], f"{self.joint_prefix}_link0", stamp)

    def _on_arm_fault(self, fault: ArmFault) -> None:
        """libfranka (the arm's I/O or gripper thread): gripper faults and restarted planner failures are reported
        (log; counters on diagnostics); any other fault disables the arm until an enable call recovers it."""
        if not self.context.ok():
            return
        with quiet_on_shutdown(self):
            self._report_arm_fault(fault)

    def _report_arm_fault(self, fault: ArmFault) -> None:
        if fault.kind == "gripper":
            self.get_logger().error(f"{self.arm} gripper: {fault.reason}", throttle_duration_sec=5.0)
            return
        if not fault.disables_arm:
            self.get_logger().warning(f"{self.arm} {fault.kind}: {fault.reason}")
            return
        self.enabled, self.target, self.fault = False, None, fault
        self.counts["faults"] += 1
        self.get_logger().error(f"{self.arm} {fault.kind}: {fault.reason}; the arm is DISABLED until enable")
        self._publish_diagnostics()

    # ------------------------------------------------------------------------------------------- enable
    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if self.backend == "libfranka":
            return self._on_enable_libfranka(request, response)
        if request.data and not self._state_fresh():
            response.success, response.message = False, "no fresh robot pose: is franka_ros2 running?"
            return response
        self.enabled = bool(request.data)
        if self.measured is not None:  # start from (or stop at) where the arm is
            self.target = (self.measured[1].copy(), self.measured[2].copy())
            self._publish_target()
        self.get_logger().warning(f"{self.arm} {'ENABLED' if self.enabled else 'disabled'}")
        response.success, response.message = True, "enabled" if self.enabled else "disabled"
        return response

    def _on_enable_libfranka(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        """Enable: (reconnect and) recover from a reflex if there was one, then follow commands from where the arm
        is. Disable: stop where the arm is and ignore commands."""
        if not request.data:
            self.enabled = False
            if self.measured is not None and self.arm_driver.following:
                self.arm_driver.disengage(_pose_matrix(self.measured[1], self.measured[2]))
            self.get_logger().warning(f"{self.arm} disabled")
            response.success, response.message = True, "disabled"
            return response
        previous = self.fault
        try:
            pose = self.arm_driver.engage()
        except (ConnectionError, RuntimeError) as err:
            if isinstance(err, ConnectionError):
                self.fault = ArmFault("connection", str(err))
            response.success, response.message = False, f"not enabled: {err}"
            self.get_logger().error(f"{self.arm} {response.message}")
            self._publish_diagnostics()
            return response
        self.fault = None
        self.target = (pose[:3, 3].copy(), pose[:3, :3].copy())
        self.enabled = True
        note = f" (recovered from {previous.kind}: {previous.reason})" if previous is not None else ""
        self.get_logger().warning(f"{self.arm} ENABLED{note}")
        response.success, response.message = True, "enabled" + note
        self._publish_diagnostics()
        return response

    # ------------------------------------------------------------------------------------------- commands
    def _on_command(self, msg: JointState) -> None:
        self.counts["commands"] += 1
        now = time.monotonic()
        if self.last_command_wall is not None and 1.5 / self.rate < now - self.last_command_wall \
                <= self.get_parameter("command_timeout").value:
            self.counts["late_commands"] += 1  # a control tick without a command (fresh, but a tick was missed)
        try:
            command = codec.command_array(msg)
        except codec.Rejected as err:
            self.counts["rejected"] += 1
            self.get_logger().warning(f"rejected command: {err}", throttle_duration_sec=2.0)
            return
        if not self.enabled:
            self.counts["ignored_disabled"] += 1
            return
        if not self._state_fresh():
            self.counts["ignored_no_state"] += 1
            self.get_logger().warning("no fresh robot pose: holding", throttle_duration_sec=2.0)
            return
        self.last_command_wall = time.monotonic()
        self.integrate(command)
        self._publish_target()
        self._gripper(command[GRIPPER_INDEX])

    def integrate(self, command: np.ndarray) -> None:
        """One step of the OSC_POSE-like integration of ``command`` into the target, with all limits."""
        _, m_pos, m_rot, _ = self.measured
        if self.target is None:
            self.target = (m_pos.copy(), m_rot.copy())
        pos, rot = self.target
        cmd, report = apply_limits(command, pos, self.limits)
        self.counts["speed_scaled"] += int(report.speed_scaled)
        self.counts["workspace_zeroed"] += int(bool(report.workspace_zeroed))
        # Into the box, never pulled into it: a target already outside stays where it is on that axis.
        lo = np.minimum(self.limits.workspace_min, pos)
        hi = np.maximum(self.limits.workspace_max, pos)
        new_pos = np.clip(pos + cmd[0:3] * self.limits.pos_scale, lo, hi)
        lead = new_pos - m_pos
        max_offset = self.get_parameter("max_target_offset").value
        if np.linalg.norm(lead) > max_offset:  # leash: the target stays close to the measured pose
            new_pos = m_pos + lead * (max_offset / np.linalg.norm(lead))
            self.counts["leash"] += 1
        new_rot = rot
        if np.any(cmd[3:6]):
            candidate = codec.axis_angle_to_mat(cmd[3:6] * self.limits.rot_scale) @ rot
            lead_angle = np.linalg.norm(mat_to_axis_angle(m_rot.T @ candidate))
            if lead_angle <= self.get_parameter("max_target_rotation").value:
                new_rot = candidate
            else:
                self.counts["leash"] += 1
        self.target = (new_pos, new_rot)
        self.counts["integrated"] += 1

    def _publish_target(self) -> None:
        if self.target is None or self.measured is None:
            return
        pos, rot = self.target
        if self.backend == "libfranka":
            self.arm_driver.set_target(_pose_matrix(pos, rot))
            return
        self.pub_equilibrium.publish(codec.pose_msg(pos, codec.mat_to_quat_xyzw(rot),
                                                    self.get_clock().now().to_msg(), self.measured[3]))

    def _gripper(self, value: float) -> None:
        state = self.hysteresis.update(float(value))
        if state is None:
            return
        if self.backend == "libfranka":
            if self.get_parameter("gripper").value == "franka":
                self.arm_driver.request_gripper(state)
                self.counts["gripper_goals"] += 1
            return
        if self.gripper.send(state):
            self.counts["gripper_goals"] += 1
        else:
            self.hysteresis.state = None  # not sent: try again with the next command
            self.get_logger().warning(f"gripper {state} not sent: {self.gripper.reason}", throttle_duration_sec=5.0)

    # --------------------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        age = now - self.last_command_wall if self.last_command_wall is not None else float("inf")
        stale = age > self.get_parameter("command_timeout").value
        if self.fault is not None:
            action = "enable reconnects" if self.fault.kind == "connection" else "enable recovers"
            level, message = DiagnosticStatus.ERROR, f"{self.fault.kind}: {self.fault.reason} ({action})"
        elif not self._state_fresh():
            level, message = DiagnosticStatus.ERROR, "no fresh robot pose"
        elif not self.enabled:
            level, message = DiagnosticStatus.WARN, "disabled: commands are ignored (call enable)"
        elif stale:
            level, message = DiagnosticStatus.WARN, "holding: no fresh command"
        else:
            level, message = DiagnosticStatus.OK, "following commands"
        values = {"state": topics.level_name(level), "backend": self.backend, "enabled": str(self.enabled).lower(),
                  "command_age_s": f"{age:.3f}", "gripper": self._gripper_status(),
                  "gripper_state": self.hysteresis.state or "unknown"}
        if self.target is not None and self.measured is not None:
            values["target_offset_m"] = f"{np.linalg.norm(self.target[0] - self.measured[1]):.4f}"
        values.update({k: str(v) for k, v in self.counts.items()})
        if self.backend == "libfranka":
            driver = self.arm_driver
            values.update({"robot_ip": driver.config.hostname, "connected": str(driver.connected).lower(),
                           "fault": f"{self.fault.kind}: {self.fault.reason}" if self.fault else "none"})
            if driver.ee_check is not None:
                values["ee_frame_error_m"] = f"{driver.ee_check[0]:.4f}"
            values.update({k: str(v) for k, v in driver.counts.items()})
        status = DiagnosticStatus(level=level, name=f"coop_transport/franka_bridge/{self.get_namespace().strip('/')}",
                                  message=message, hardware_id=self.arm,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def _gripper_status(self) -> str:
        if self.backend == "franka_ros2":
            return "available" if self.gripper.available else f"unavailable: {self.gripper.reason}"
        worker = self.arm_driver.gripper
        if worker is None:
            return "unavailable: disabled by the gripper parameter"
        return f"error: {worker.error}" if worker.error else f"available, width {worker.width:.4f} m"

    # ------------------------------------------------------------------------------------------- shutdown
    def stop_robot(self) -> None:
        """libfranka: bring the arm to rest and end its motion (SIGINT, SIGTERM, normal exit)."""
        if self.backend == "libfranka":
            self.enabled = False
            outcome = self.arm_driver.shutdown()
            print(f"[franka_bridge {self.arm}] libfranka shutdown: {outcome}", flush=True)  # rclpy may be down


def _pose_matrix(pos: np.ndarray, rot: np.ndarray) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, pos
    return pose


def main(args=None) -> None:
    rclpy.init(args=args)
    node = None
    try:
        node = FrankaBridgeNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop_robot()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
