"""Every topic, service, frame and diagnostic key name of the ROS 2 layer, defined once (layouts: TOPICS.md).

Per-arm names are relative: each arm's nodes run in the arm's namespace (``/left`` for robot0, ``/right`` for
robot1 by default; see ``DEFAULT_NAMESPACES``). Shared names are absolute.
"""

from __future__ import annotations

from coop_transport.constants import ARMS

# Arm <-> namespace (robosuite's robot0 stands on the start-bin side). A parameter of the sim bridge and of the graph.
DEFAULT_NAMESPACES = {"robot0": "left", "robot1": "right"}

# ---------------------------------------------------------------------------------------------- per-arm topics
WRIST_IMAGE = "wrist_camera/image_raw"  # sensor_msgs/Image, rgb8 (bgr8 accepted), S x S, sensor-data QoS
JOINT_STATES = "joint_states"  # sensor_msgs/JointState, 7 arm joints + 2 finger joints
EEF_POSE = "eef_pose"  # geometry_msgs/PoseStamped, end effector in the arm's base frame
COMMAND = "command"  # sensor_msgs/JointState, names COMMAND_NAMES, position = the 7-D command in [-1, 1]
MESSAGE = "message"  # trajectory_msgs/JointTrajectory, the arm's outgoing message (T x D), stamped
PLAN = "plan"  # trajectory_msgs/JointTrajectory, the chunk being executed (C x 7), stamped with its observation
PARTNER_MESSAGE = "partner_message"  # what the policy node subscribes; remapped to the partner's MESSAGE
AGENTVIEW_IMAGE = "agentview/image_raw"  # relative in the policy node, remapped to AGENTVIEW_TOPIC
EPISODE = "episode"  # relative in the policy node, remapped to EPISODE_TOPIC in the sim graph

# ---------------------------------------------------------------------------------------------- shared topics
AGENTVIEW_TOPIC = "/agentview/image_raw"
EPISODE_TOPIC = "/sim/episode"  # diagnostic_msgs/DiagnosticArray, one status with EPISODE_KEYS
RESET_SERVICE = "/sim/reset"  # std_srvs/Trigger
CLOCK_TOPIC = "/clock"  # rosgraph_msgs/Clock (lockstep mode only)
DIAGNOSTICS_TOPIC = "/diagnostics"  # diagnostic_msgs/DiagnosticArray

# Franka bridge (per arm, in the arm's namespace)
ENABLE_SERVICE = "enable"  # std_srvs/SetBool: commands are ignored (hold) until enabled

# ----------------------------------------------------------------------------------------------- layouts
COMMAND_NAMES = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")  # eef delta in the base frame, gripper -1 open
MESSAGE_NAME_PREFIX = "m"  # column names m0 .. m{D-1} of a message that is not a command chunk
EPISODE_STATUS_NAME = "sim/episode"
EPISODE_KEYS = ("episode", "seed", "step", "success", "done", "outcome", "horizon")
ARM_JOINT_SUFFIXES = tuple(f"joint{i}" for i in range(1, 8))
FINGER_JOINT_SUFFIXES = ("finger_joint1", "finger_joint2")

# Diagnostic status levels as names (diagnostic_msgs/DiagnosticStatus: OK 0, WARN 1, ERROR 2, STALE 3)
LEVEL_NAMES = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}


def level_name(level: bytes | int) -> str:
    """Name of a DiagnosticStatus level (rclpy gives levels as one byte)."""
    return LEVEL_NAMES[level[0] if isinstance(level, (bytes, bytearray)) else int(level)]


def arm_namespace(arm: str, namespaces: dict[str, str] | None = None) -> str:
    """The namespace (without slashes) of ``arm``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    return (namespaces or DEFAULT_NAMESPACES)[arm].strip("/")


def in_namespace(namespace: str, name: str) -> str:
    """Absolute topic name of a relative ``name`` in ``namespace``."""
    return "/" + "/".join(p for p in (namespace.strip("/"), name.strip("/")) if p)


def base_frame(arm: str) -> str:
    """frame_id of the arm's base frame in the simulation (eef_pose, command)."""
    return f"{arm}_base"
