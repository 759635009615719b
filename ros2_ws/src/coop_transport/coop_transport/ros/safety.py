"""Safety filters on the 7-D command, plain numpy (no ROS): hold, velocity limit, workspace box.

Units: a command's position part times ``pos_scale`` is metres per control step, its rotation part times
``rot_scale`` radians per control step (robosuite's OSC_POSE scaling, ``constants.OSC_POS_SCALE`` /
``OSC_ROT_SCALE``); all in the arm's base frame. Limits come from the nodes' YAML parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coop_transport.constants import ARM_ACTION_DIM, CONTROL_FREQ, GRIPPER_INDEX, OSC_POS_SCALE, OSC_ROT_SCALE


@dataclass(frozen=True)
class SafetyLimits:
    """Per-arm limits applied to every command before it is published."""

    workspace_min: tuple[float, float, float] = (-np.inf, -np.inf, -np.inf)
    """Lower corner (m) of the allowed eef box in the arm's base frame."""
    workspace_max: tuple[float, float, float] = (np.inf, np.inf, np.inf)
    """Upper corner (m) of the allowed eef box in the arm's base frame."""
    max_linear_speed: float = np.inf
    """m/s; the position part is scaled down (direction kept) to stay under it."""
    max_angular_speed: float = np.inf
    """rad/s; the rotation part is scaled down (axis kept) to stay under it."""
    pos_scale: float = OSC_POS_SCALE
    """Metres per unit command per control step."""
    rot_scale: float = OSC_ROT_SCALE
    """Radians per unit command per control step."""
    control_rate: float = float(CONTROL_FREQ)
    """Hz."""

    def __post_init__(self):
        lo, hi = np.asarray(self.workspace_min, float), np.asarray(self.workspace_max, float)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(lo >= hi):
            raise ValueError(f"workspace box needs min < max per axis, got {self.workspace_min}, {self.workspace_max}")
        if not (self.max_linear_speed > 0 and self.max_angular_speed > 0 and self.control_rate > 0):
            raise ValueError("speed limits and control rate must be positive")
        if not (self.pos_scale > 0 and self.rot_scale > 0):
            raise ValueError("pos_scale and rot_scale must be positive")


@dataclass
class SafetyReport:
    """What the filters changed in one command."""

    speed_scaled: bool = False
    workspace_zeroed: tuple[int, ...] = ()


def hold_command(gripper: float) -> np.ndarray:
    """Zero eef delta, gripper unchanged."""
    out = np.zeros(ARM_ACTION_DIM)
    out[GRIPPER_INDEX] = gripper
    return out


def apply_limits(command: np.ndarray, eef_pos: np.ndarray | None, limits: SafetyLimits
                 ) -> tuple[np.ndarray, SafetyReport]:
    """Clip to [-1, 1], scale position/rotation parts to the speed limits, then zero every position component that
    would move the eef (``eef_pos``, base frame) further outside the workspace box. Returns (command, report)."""
    cmd = np.clip(np.asarray(command, dtype=np.float64), -1.0, 1.0)
    report = SafetyReport()
    dt = 1.0 / limits.control_rate
    for part, scale, vmax in ((slice(0, 3), limits.pos_scale, limits.max_linear_speed),
                              (slice(3, 6), limits.rot_scale, limits.max_angular_speed)):
        speed = np.linalg.norm(cmd[part]) * scale / dt
        if speed > vmax:
            cmd[part] *= vmax / speed
            report.speed_scaled = True
    if eef_pos is not None:
        lo, hi = np.asarray(limits.workspace_min), np.asarray(limits.workspace_max)
        nxt = np.asarray(eef_pos) + cmd[0:3] * limits.pos_scale
        zeroed = []
        for i in range(3):
            if (nxt[i] > hi[i] and cmd[i] > 0) or (nxt[i] < lo[i] and cmd[i] < 0):
                cmd[i] = 0.0
                zeroed.append(i)
        report.workspace_zeroed = tuple(zeroed)
    return cmd, report
