"""Coordinate frames of the two arms and the per-arm proprioceptive state.

Actions of robosuite 1.5's OSC_POSE controller (``input_ref_frame="base"``) are deltas in each arm's *base* frame,
and per-arm policies see their proprioception in that frame too: in the opposed configuration the two arms are
mirror images, so "forward" means the same thing to both. robomimic's published Transport files were recorded with
robosuite 1.2, whose OSC deltas were in the *world* frame: ``world_to_base_action`` converts them.

Base poses of the opposed configuration (checked against the live simulation in tests):
robot0 at (0, -0.81, 0.912) m rotated +90° about z, robot1 at (0, +0.81, 0.912) m rotated -90° about z.
"""

from __future__ import annotations

import numpy as np

from coop_transport.constants import ARMS, PROPRIO_DIM


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


BASE_POS = {"robot0": np.array([0.0, -0.81, 0.912]), "robot1": np.array([0.0, 0.81, 0.912])}
BASE_ROT = {"robot0": _rot_z(np.pi / 2), "robot1": _rot_z(-np.pi / 2)}  # base-to-world rotation matrices


def quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    """(..., 4) xyzw quaternions to (..., 3, 3) rotation matrices."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def mat_to_axis_angle(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices to (..., 3) axis-angle vectors (angle in [0, pi])."""
    m = np.asarray(m, dtype=np.float64)
    cos = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = np.sin(angle)[..., None]
    small = sin[..., 0] < 1e-6
    out = np.where(small[..., None], axis / 2.0, axis / np.where(small[..., None], 1.0, 2.0 * sin) * angle[..., None])
    # Near pi the antisymmetric part vanishes: recover the axis from the symmetric part instead.
    near_pi = angle > np.pi - 1e-4
    if np.any(near_pi):
        sym = (m[near_pi] + np.eye(3)) / 2.0
        idx = np.argmax(np.diagonal(sym, axis1=-2, axis2=-1), axis=-1)
        ax = sym[np.arange(len(idx)), :, idx]
        ax = ax / np.linalg.norm(ax, axis=-1, keepdims=True)
        out[near_pi] = ax * angle[near_pi][..., None]
    return out


def world_to_base_pos(arm: str, pos_world: np.ndarray) -> np.ndarray:
    """(..., 3) world-frame positions to the arm's base frame."""
    return (np.asarray(pos_world) - BASE_POS[arm]) @ BASE_ROT[arm]


def world_to_base_rot(arm: str, rot_world: np.ndarray) -> np.ndarray:
    """(..., 3, 3) world-frame orientations to the arm's base frame."""
    return BASE_ROT[arm].T @ rot_world


def arm_proprio(arm: str, eef_pos: np.ndarray, eef_quat: np.ndarray, gripper_qpos: np.ndarray,
                joint_pos: np.ndarray) -> np.ndarray:
    """Per-arm proprioceptive state, (..., PROPRIO_DIM) float32, from robosuite's world-frame observations.

    Layout: eef position in the base frame (3, m) | first two columns of the eef rotation matrix in the base
    frame (6) | gripper finger positions (2, m) | joint positions (7, rad).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    pos = world_to_base_pos(arm, eef_pos)
    rot = world_to_base_rot(arm, quat_xyzw_to_mat(eef_quat))
    rot6 = np.concatenate([rot[..., :, 0], rot[..., :, 1]], -1)
    out = np.concatenate([pos, rot6, np.asarray(gripper_qpos), np.asarray(joint_pos)], -1).astype(np.float32)
    assert out.shape[-1] == PROPRIO_DIM
    return out


def world_to_base_action(arm: str, action_world: np.ndarray) -> np.ndarray:
    """(..., 7) OSC_POSE delta action in the world frame (robosuite <= 1.4) to the arm's base frame (1.5)."""
    a = np.array(action_world, dtype=np.float64, copy=True)
    a[..., 0:3] = a[..., 0:3] @ BASE_ROT[arm]
    a[..., 3:6] = a[..., 3:6] @ BASE_ROT[arm]
    return a.astype(np.float32)


def base_to_world_delta(arm: str, delta_base: np.ndarray) -> np.ndarray:
    """(..., 3) vector in the arm's base frame to the world frame."""
    return np.asarray(delta_base) @ BASE_ROT[arm].T
