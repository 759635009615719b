"""Forward kinematics of the Franka arm (Panda / FR3) to the hand's TCP, from Franka's published modified-DH table.

Used by the Franka bridge when no measured pose topic exists (franka_ros2's mock hardware starts no
franka_robot_state_broadcaster). Plain numpy. Frame: the arm's base (``link0``); TCP: 0.1034 m beyond the flange
along its z axis, rotated -45 deg about it (the Franka Hand).
"""

from __future__ import annotations

import numpy as np

# (a, d, alpha) per joint, Craig's modified convention; theta = q_i. Then the flange: d = 0.107.
DH = ((0.0, 0.333, 0.0), (0.0, 0.0, -np.pi / 2), (0.0, 0.316, np.pi / 2), (0.0825, 0.0, np.pi / 2),
      (-0.0825, 0.384, -np.pi / 2), (0.0, 0.0, np.pi / 2), (0.088, 0.0, np.pi / 2))
FLANGE_D = 0.107
HAND_TCP_D = 0.1034
HAND_ROT_Z = -np.pi / 4


def _modified_dh(a: float, d: float, alpha: float, theta: float) -> np.ndarray:
    ca, sa, ct, st = np.cos(alpha), np.sin(alpha), np.cos(theta), np.sin(theta)
    return np.array([[ct, -st, 0.0, a],
                     [st * ca, ct * ca, -sa, -d * sa],
                     [st * sa, ct * sa, ca, d * ca],
                     [0.0, 0.0, 0.0, 1.0]])


def tcp_pose(q: np.ndarray) -> np.ndarray:
    """(7,) joint angles (rad) -> (4, 4) pose of the hand TCP in the base frame."""
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (7,):
        raise ValueError(f"expected 7 joint angles, got {q.shape}")
    t = np.eye(4)
    for (a, d, alpha), theta in zip(DH, q):
        t = t @ _modified_dh(a, d, alpha, theta)
    t = t @ _modified_dh(0.0, FLANGE_D, 0.0, 0.0)
    return t @ _modified_dh(0.0, HAND_TCP_D, 0.0, HAND_ROT_Z)
