"""Replay node: publishes recorded camera frames and arm states at 20 Hz (wall clock), as cameras and robots would.

Usage: ``ros2 run coop_transport replay_node --ros-args -p frames_path:=frames.npz [-p steps:=500]``.
For latency benchmarks of the policy nodes without a simulator in the loop (``bench/ros_latency.py``): software
rendering cannot produce frames at 20 Hz on a CPU machine, replaying recorded ones can.

The frames file (``save_frames`` writes it, ``record_frames`` renders it from the simulation) holds, per arm
(robot0, robot1), T steps of: ``{arm}_wrist`` (T, S, S, 3) uint8, ``{arm}_joints`` (T, 9) arm + finger joint
positions, ``{arm}_eef_pos`` (T, 3) and ``{arm}_eef_quat`` (T, 4, xyzw), both in the arm's base frame; and
optionally ``agentview`` (T, S, S, 3). Every message of one step carries the same stamp (the publish time).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.task import Future
from sensor_msgs.msg import Image, JointState

from coop_transport.constants import ARMS, CONTROL_FREQ
from coop_transport.ros import codec, topics


def save_frames(path: str | Path, frames: dict[str, np.ndarray]) -> None:
    missing = [f"{a}_{k}" for a in ARMS for k in ("wrist", "joints", "eef_pos", "eef_quat")
               if f"{a}_{k}" not in frames]
    if missing:
        raise ValueError(f"frames lack {missing}")
    np.savez(path, **frames)


def record_frames(steps: int, image_size: int, agentview: bool = False, seed: int = 1) -> dict[str, np.ndarray]:
    """Render ``steps`` control steps of the scripted expert (resetting with the next seed after each episode)."""
    from coop_transport.sim import SimConfig, TransportSim
    from coop_transport.sim.expert import ScriptedExpert
    from coop_transport.sim.frames import quat_xyzw_to_mat, world_to_base_pos, world_to_base_rot
    from coop_transport.constants import AGENTVIEW_CAMERA, WRIST_CAMERA, image_key

    out: dict[str, list] = {}
    add = lambda key, value: out.setdefault(key, []).append(np.asarray(value))  # noqa: E731
    with TransportSim(SimConfig(wrist_cameras=True, agentview=agentview, image_size=image_size)) as sim:
        expert = ScriptedExpert(seed=seed)
        obs = sim.reset(seed)
        expert.reset(sim, seed)
        for _ in range(steps):
            for arm in ARMS:
                add(f"{arm}_wrist", obs[image_key(WRIST_CAMERA[arm])])
                add(f"{arm}_joints", np.r_[obs[f"{arm}_joint_pos"], obs[f"{arm}_gripper_qpos"]])
                add(f"{arm}_eef_pos", world_to_base_pos(arm, obs[f"{arm}_eef_pos"]))
                rot = world_to_base_rot(arm, quat_xyzw_to_mat(obs[f"{arm}_eef_quat"]))
                add(f"{arm}_eef_quat", codec.mat_to_quat_xyzw(rot))
            if agentview:
                add("agentview", obs[image_key(AGENTVIEW_CAMERA)])
            obs, _, done, _ = sim.step(expert.act(sim))
            if done:
                seed += 1
                obs = sim.reset(seed)
                expert.reset(sim, seed)
    return {k: np.stack(v) for k, v in out.items()}


class ReplayNode(Node):
    def __init__(self, **kwargs):
        super().__init__("replay", **kwargs)
        d = self.declare_parameter
        d("frames_path", "", ParameterDescriptor(description="npz file of recorded frames (see module doc)."))
        d("rate", float(CONTROL_FREQ), ParameterDescriptor(description="Hz (wall clock)."))
        d("steps", 0, ParameterDescriptor(description="Steps to publish (0 = the file's length); loops the file."))
        d("arm_namespaces", [topics.DEFAULT_NAMESPACES[a] for a in ARMS],
          ParameterDescriptor(description=f"Namespaces of {ARMS}."))
        d("wait_for_subscribers", 60.0, ParameterDescriptor(
            description="Wall seconds to wait for min_subscribers on every wrist topic before starting."))
        d("min_subscribers", 1, ParameterDescriptor(description="Subscribers per wrist topic to wait for."))
        g = lambda name: self.get_parameter(name).value  # noqa: E731
        data = np.load(g("frames_path"))
        self.frames = {k: data[k] for k in data.files}
        self.length = len(self.frames[f"{ARMS[0]}_wrist"])
        self.steps = g("steps") or self.length
        self.ns = dict(zip(ARMS, g("arm_namespaces")))
        sensor, reliable = qos_profile_sensor_data, QoSProfile(depth=10)
        self.pub = {a: (self.create_publisher(Image, topics.in_namespace(self.ns[a], topics.WRIST_IMAGE), sensor),
                        self.create_publisher(JointState, topics.in_namespace(self.ns[a], topics.JOINT_STATES),
                                              reliable),
                        self.create_publisher(PoseStamped, topics.in_namespace(self.ns[a], topics.EEF_POSE), reliable))
                    for a in ARMS}
        self.pub_agentview = (self.create_publisher(Image, topics.AGENTVIEW_TOPIC, sensor)
                              if "agentview" in self.frames else None)
        self.k = 0
        self.started = None
        self.finished = Future()
        self.wait_until = time.monotonic() + g("wait_for_subscribers")
        self.create_timer(1.0 / g("rate"), self._on_timer)  # wall clock (use_sim_time stays false)

    def _on_timer(self) -> None:
        if self.started is None:
            needed = self.get_parameter("min_subscribers").value
            ready = all(self.pub[a][0].get_subscription_count() >= needed for a in ARMS)
            if not ready and time.monotonic() < self.wait_until:
                return
            self.started = time.monotonic()
            self.get_logger().info(f"replaying {self.steps} steps of {self.length} recorded")
        if self.k >= self.steps:
            if not self.finished.done():
                self.finished.set_result(self.k)
            return
        i = self.k % self.length
        stamp = self.get_clock().now().to_msg()
        for arm in ARMS:
            pub_image, pub_joints, pub_eef = self.pub[arm]
            pub_image.publish(codec.image_msg(self.frames[f"{arm}_wrist"][i], stamp, f"{arm}_wrist_camera"))
            pub_joints.publish(codec.joint_state_msg(codec.arm_joint_names(arm), self.frames[f"{arm}_joints"][i],
                                                     None, stamp))
            pub_eef.publish(codec.pose_msg(self.frames[f"{arm}_eef_pos"][i], self.frames[f"{arm}_eef_quat"][i],
                                           stamp, topics.base_frame(arm)))
        if self.pub_agentview is not None:
            self.pub_agentview.publish(codec.image_msg(self.frames["agentview"][i], stamp, "agentview"))
        self.k += 1


def main(args=None) -> None:
    rclpy.init(args=args)
    node = None
    try:
        node = ReplayNode()
        rclpy.spin_until_future_complete(node, node.finished)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
