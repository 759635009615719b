"""Franka bridge, one per arm: the policy's 7-D commands onto franka_ros2, the robot's state back onto policy topics.

Usage: ``ros2 run coop_transport franka_bridge_node --ros-args -r __ns:=/left -p arm:=robot0
-p franka_namespace:=franka_left`` then, when the cell is clear, ``ros2 service call /left/enable
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
from coop_transport.ros.safety import SafetyLimits, apply_limits
from coop_transport.sim.frames import mat_to_axis_angle, quat_xyzw_to_mat


def _p(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=description)


class FrankaBridgeNode(Node):
    def __init__(self, **kwargs):
        super().__init__("franka_bridge", **kwargs)
        d = self.declare_parameter
        d("arm", "", _p(f"Which arm: one of {ARMS}."))
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
        d("gripper", "franka", _p("franka: franka_gripper actions (needs franka_msgs); none: ignore."))
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
        self.pose_source = g("pose_source")
        if self.pose_source not in ("topic", "fk"):
            raise ValueError(f"pose_source must be topic or fk, got {self.pose_source!r}")

        self.enabled = bool(g("enable_on_start"))
        self.measured: tuple[float, np.ndarray, np.ndarray, str] | None = None  # (wall s, pos, rot (3,3), frame)
        self.target: tuple[np.ndarray, np.ndarray] | None = None  # (pos, rot)
        self.last_command_wall: float | None = None
        self.counts = {"commands": 0, "ignored_disabled": 0, "ignored_no_state": 0, "integrated": 0,
                       "rejected": 0, "leash": 0, "workspace_zeroed": 0, "speed_scaled": 0, "gripper_goals": 0}
        self.hysteresis = GripperHysteresis()
        if g("gripper") == "franka":
            self.gripper = FrankaGripperClient(self, f"{fns}/franka_gripper", g("gripper_open_width"),
                                               g("gripper_speed"), g("gripper_grasp_force"))
        elif g("gripper") == "none":
            self.gripper = NoGripper()
        else:
            raise ValueError(f"gripper must be franka or none, got {g('gripper')!r}")
        if not self.gripper.available:
            self.get_logger().error(f"gripper unavailable: {self.gripper.reason}")

        sensor, reliable = qos_profile_sensor_data, QoSProfile(depth=10)
        self.create_subscription(JointState, f"{fns}/{g('joint_states_topic')}", self._on_joints, sensor)
        if self.pose_source == "topic":
            self.create_subscription(PoseStamped, f"{fns}/{g('pose_topic')}", self._on_pose, sensor)
        self.pub_equilibrium = self.create_publisher(PoseStamped, f"{fns}/{g('equilibrium_pose_topic')}", reliable)
        self.pub_joints = self.create_publisher(JointState, topics.JOINT_STATES, reliable)
        self.pub_eef = self.create_publisher(PoseStamped, topics.EEF_POSE, reliable)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS_TOPIC, reliable)
        self.create_subscription(JointState, topics.COMMAND, self._on_command, reliable)
        self.create_service(SetBool, topics.ENABLE_SERVICE, self._on_enable)
        self.create_timer(1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(f"{self.arm}: franka_ros2 in {fns}, pose from {self.pose_source}, "
                               f"{'ENABLED' if self.enabled else 'disabled until enable'}")

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

    # ------------------------------------------------------------------------------------------- enable
    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
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

    # ------------------------------------------------------------------------------------------- commands
    def _on_command(self, msg: JointState) -> None:
        self.counts["commands"] += 1
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
        new_pos = np.clip(pos + cmd[0:3] * self.limits.pos_scale, self.limits.workspace_min, self.limits.workspace_max)
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
        self.pub_equilibrium.publish(codec.pose_msg(pos, codec.mat_to_quat_xyzw(rot),
                                                    self.get_clock().now().to_msg(), self.measured[3]))

    def _gripper(self, value: float) -> None:
        state = self.hysteresis.update(float(value))
        if state is None:
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
        if not self._state_fresh():
            level, message = DiagnosticStatus.ERROR, "no fresh robot pose"
        elif not self.enabled:
            level, message = DiagnosticStatus.WARN, "disabled: commands are ignored (call enable)"
        elif stale:
            level, message = DiagnosticStatus.WARN, "holding: no fresh command"
        else:
            level, message = DiagnosticStatus.OK, "following commands"
        values = {"state": topics.level_name(level), "enabled": str(self.enabled).lower(),
                  "command_age_s": f"{age:.3f}", "gripper": "available" if self.gripper.available else
                  f"unavailable: {self.gripper.reason}", "gripper_state": self.hysteresis.state or "unknown"}
        if self.target is not None and self.measured is not None:
            values["target_offset_m"] = f"{np.linalg.norm(self.target[0] - self.measured[1]):.4f}"
        values.update({k: str(v) for k, v in self.counts.items()})
        status = DiagnosticStatus(level=level, name=f"coop_transport/franka_bridge/{self.get_namespace().strip('/')}",
                                  message=message, hardware_id=self.arm,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))


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
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
