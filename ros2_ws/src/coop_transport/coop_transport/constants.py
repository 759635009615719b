"""Names and sizes defined once: observation keys, arms, action layout.

robosuite's ``robot0_`` / ``robot1_`` prefixes are kept everywhere. In TwoArmTransport's "opposed"
configuration robot0 stands at y = -0.81 m (the start-bin side: it removes the lid and lifts the payload)
and robot1 at y = +0.81 m (the target-bin side: it clears the trash and places the payload).
"""

ARMS = ("robot0", "robot1")
ARM_ROLES = {"robot0": "payload arm (lid, payload, hand-over)", "robot1": "receiver arm (trash, catch, place)"}

ARM_ACTION_DIM = 7  # 3 eef position delta + 3 eef axis-angle delta (arm's base frame, scaled to [-1, 1]) + gripper
JOINT_ACTION_DIM = 2 * ARM_ACTION_DIM
GRIPPER_INDEX = 6  # within one arm's action: -1 open, +1 close

# OSC_POSE scaling of a unit action (robosuite's BASIC composite controller defaults).
OSC_POS_SCALE = 0.05  # metres per unit action per control step
OSC_ROT_SCALE = 0.5  # radians per unit action per control step

CONTROL_FREQ = 20  # Hz
# Control steps of each arm's proprioception kept for policies that see earlier states (adapters.StateHistory):
# the simulation and the policy node record one state per control step (3.2 s at 20 Hz).
PROPRIO_HISTORY_STEPS = 64
HORIZON = 500  # control steps per episode

# Cameras (MuJoCo camera names in the TwoArmTransport scene).
WRIST_CAMERA = {"robot0": "robot0_eye_in_hand", "robot1": "robot1_eye_in_hand"}
AGENTVIEW_CAMERA = "agentview"
SMALL_IMAGE_SIZE = 96  # the small default policy's camera resolution (square)
PI0_IMAGE_SIZE = 224  # π0 / PaliGemma input resolution


def image_key(camera: str) -> str:
    """robomimic's observation key of a camera image."""
    return f"{camera}_image"


# Low-dimensional per-arm observation keys as robosuite/robomimic name them (world frame).
EEF_POS = "eef_pos"  # (3,) metres, world frame
EEF_QUAT = "eef_quat"  # (4,) xyzw, world frame
GRIPPER_QPOS = "gripper_qpos"  # (2,) finger joint positions, metres
JOINT_POS = "joint_pos"  # (7,) radians
ARM_LOWDIM_KEYS = (EEF_POS, EEF_QUAT, GRIPPER_QPOS, JOINT_POS)

# Per-arm proprioceptive state fed to policies: eef position (3, base frame), eef orientation as the first two
# columns of its rotation matrix (6, base frame; continuous, unlike quaternions or axis-angle),
# gripper finger positions (2), joint positions (7).
PROPRIO_DIM = 3 + 6 + 2 + 7

# Privileged object keys (robosuite names), used by the scripted expert, labels and shaping only.
OBJECT_KEYS = (
    "payload_pos", "payload_quat", "trash_pos", "trash_quat", "lid_handle_pos", "lid_handle_quat",
    "target_bin_pos", "trash_bin_pos",
)

# Task phases per arm (labels for message supervision; see coop_transport.sim.labels).
PHASES = {
    "robot0": ("open_lid", "grasp_payload", "carry_payload", "hand_over", "retreat"),
    "robot1": ("grasp_trash", "dispose_trash", "await_payload", "hand_over", "place_payload"),
}
NUM_PHASES = 5

DEFAULT_PROMPT = "transport the hammer from the start bin into the target bin and the trash into the trash bin"
