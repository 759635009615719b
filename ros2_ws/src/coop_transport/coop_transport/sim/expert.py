"""Scripted expert for TwoArmTransport from privileged state: demonstrations for imitation, a reference for RL.

Each arm runs its own state machine over named stages; the two meet in one coordination rule at the hand-over.
Every target comes from the observed scene (object poses, bin positions, robosuite's object sizes), nothing from
a particular seed.

robot0 (start-bin side)                         robot1 (target-bin side)
  lid_reach → lid_descend → lid_close             trash_reach → trash_descend → trash_close
  → lid_lift → lid_aside → lid_release            → trash_lift → trash_carry → trash_release
  → payload_reach → payload_descend               → await_payload: waits behind its hand-over grip point,
  → payload_close → payload_lift → carry            moves in above it as the payload arrives
  → present: holds the payload still ⇢ ⇢ ⇢ ⇢ ⇢ ⇢   → handover_reach → handover_descend → handover_close
    until robot1 holds the handle ⇠ ⇠ ⇠ ⇠ ⇠ ⇠ ⇠   → handover_hold: until robot0's fingers are off and above it
  → release → retreat (up, then back) → done      → place_carry → place_lower → place_release → retreat → done

The coordination rule reads only what the scene shows (``ExpertConfig.handover``, "observed"): robot1 moves in
once robot0 holds the lifted payload near the hand-over point, goes down onto the handle once it is still, and
robot0 lets go once robot1 has held it for a few steps. An imitating policy can follow such a rule from its
observations; the first demonstrations' rule ("planned": a narrow window around the planned point, and the
partner's internal stage) deadlocked closed loop when a policy presented the payload a few centimetres off.

A missed grasp goes back to its ``*_reach`` stage; an arm that makes no progress in a stage for
``ExpertConfig.stage_timeout`` steps backs off to its starting pose (``recover``) and resumes the stage.

Geometry of the hand-over. The two bases stand 1.62 m apart, so a hand-over midway leaves each Panda near full
stretch. robot0 grasps the hammer's handle from above a few centimetres from its centre on its own (-y) side,
carries it to the midpoint between the start bin and the target bin and turns it to point along world y (from one
robot to the other); robot1 grasps the other half of the handle, so the hands sit side by side and never cross.
Close to its own base and low down (the payload in the start bin, the trash in the target bin) a Panda with a
vertical hand folds its elbow and wrist to their limits: there the hand leans, fingertips towards the base; at the
hand-over robot1 leans the other way, which shortens its reach. robot1 lets the payload go just inside the target
bin's rim rather than lowering it to the floor, for the same reason.

Control: each arm tracks its stage's target pose with a saturated proportional law in the world frame, aiming from
where the hand will coast to, converted to the arm's base frame (robosuite 1.5 OSC_POSE, ``input_ref_frame="base"``;
one action unit moves the OSC target 0.05 m or 0.5 rad, ``constants.OSC_POS_SCALE`` / ``OSC_ROT_SCALE``).
Gripper commands are crisp ±1.

Variation for imitation learning comes from two seeded sources: Gaussian noise on every position/rotation action
component (``ExpertConfig.noise``) and a per-episode random offset of every grasp, hand-over and placement waypoint
(``ExpertConfig.waypoint_jitter``). A (reset seed, expert seed) pair reproduces a demonstration exactly.

The action noise is exploration, not part of the demonstrated behaviour: ``act`` returns the noisy action that runs,
and ``intended_action`` keeps the noise-free one for the same state. Demonstration files store both (``actions``
and ``expert_actions``), so imitation can learn from the noise-free labels on the states the noise visited (DART,
Laskey et al. 2017: the learner sees how the expert corrects small deviations, without learning the noise itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from coop_transport.constants import ARM_ACTION_DIM, ARMS, GRIPPER_INDEX, OSC_POS_SCALE, OSC_ROT_SCALE
from coop_transport.sim.env import TransportSim, join_actions
from coop_transport.sim.frames import BASE_POS, BASE_ROT, mat_to_axis_angle, quat_xyzw_to_mat

OPEN, CLOSE = -1.0, 1.0
UP = np.array([0.0, 0.0, 1.0])
DOWN = -UP
WORLD_Y = np.array([0.0, 1.0, 0.0])
FINGERTIP_REACH = 0.015  # m: the Panda's fingertips reach 0.011 m below its grip site, plus a margin
WAITING_STAGES = ("await_payload", "present", "handover_hold", "done", "failed")  # no timeout while waiting
HANDOVER_PROTOCOLS = ("observed", "planned")  # see ExpertConfig.handover


@dataclass(frozen=True)
class ExpertConfig:
    """Gains, speeds, tolerances and waypoint geometry of the scripted expert (SI units unless stated)."""

    noise: float = 0.05
    """Std of the Gaussian noise added to every position/rotation action component, in action units (0.05 moves
    the OSC target by 2.5 mm or 0.025 rad): demonstrations differ step by step, grasps still hold."""
    waypoint_jitter: float = 0.006
    """Std (m) of the per-episode random offset of every grasp, hand-over and placement waypoint (vertical grasp
    offsets are a quarter of that and only ever upwards, away from bin floors and lid plates)."""

    pos_gain: float = 1.5
    """Position action per OSC_POS_SCALE (0.05 m) of position error."""
    rot_gain: float = 1.0
    """Rotation action per OSC_ROT_SCALE (0.5 rad) of orientation error."""
    velocity_lookahead: float = 2.0
    """Control steps of the hand's current velocity added to its position before taking the error: the OSC target
    is re-anchored at the current pose every step, so a moving hand coasts (this is the damping term)."""
    max_pos_action: float = 1.0
    """Cap on each position action component (1.0: about 0.26 m/s along each axis)."""
    max_rot_action: float = 1.0
    """Cap on the norm of the rotation action."""
    carry_rot_action: float = 0.4
    """Cap on the norm of the rotation action while an arm carries the payload (a sudden turn can jerk it out of
    the fingers)."""

    reach_tolerance: float = 0.015
    """Position error (m) at which a free-space waypoint counts as reached."""
    fine_tolerance: float = 0.006
    """Position error (m) at which a grasp pose counts as reached."""
    rot_tolerance: float = 0.10
    """Orientation error (rad) at which a waypoint's orientation counts as reached."""
    align_radius: float = 0.012
    """Horizontal error (m) above a grasp point at which the hand starts its final descent."""
    wrist_roll_limit: float = 2.3
    """Largest |joint 7| (rad) a chosen grasp may need (the joint stops at 2.9; the margin covers the turns of the
    arm's other joints)."""
    settle_speed: float = 0.004
    """Payload speed (m per step) below which the presented payload counts as still."""

    approach_height: float = 0.05
    """Height (m) above a grasp point from which the hand descends onto it (half of it at the hand-over, where
    nothing surrounds the handle)."""
    close_lead: float = 0.01
    """Height (m) above the grasp point at which the descending hand starts closing its fingers."""
    rim_clearance: float = 0.05
    """Height (m) of a carried object's lowest point above the bin rims while moving between bins (an empty hand
    keeps half of it)."""
    transit_radius: float = 0.03
    """Horizontal distance (m) to a waypoint within which the hand may go below the safe transit height."""
    rise_creep: float = 0.03
    """Horizontal offset (m) towards the waypoint while the hand first rises to the safe transit height."""

    lid_grip_height: float = 0.005
    """Grip site height (m) above the lid handle's centre when closing (keeps fingertips off the lid plate)."""
    payload_grip_height: float = 0.003
    """Grip site height (m) above the hammer handle's axis when closing in the start bin."""
    trash_grip_height: float = 0.003
    """Grip site height (m) above the trash cube's centre when closing."""
    handover_grip_offset: float = 0.06
    """Distance (m) along the handle from its centre to each arm's grip point (robot0 on the -y half, robot1 on
    the +y half)."""
    low_grasp_lean: float = 0.2
    """Tilt (rad) of the hand about its finger axis, fingertips towards the arm's base, when grasping in a bin
    (the payload for robot0, the trash for robot1): a vertical hand that low and that close to the base folds the
    Panda's elbow and wrist to their limits."""
    handover_lean: float = 0.25
    """Tilt (rad) of robot1's hand at the hand-over, fingertips towards robot0 (the grip lies near the edge of the
    Panda's reach; a tilted hand needs less of it)."""
    handover_height: float = 0.10
    """Height (m) of the handle above the bin rims at the hand-over (wrists at about shoulder height, where a
    Panda reaches furthest)."""
    await_height: float = 0.06
    """Height (m) above its hand-over grip point at which robot1 waits for the payload."""
    handover: str = "observed"
    """How the two arms coordinate the hand-over.
    observed: from what the scene shows, so that an imitating policy can follow the rule from its observations.
    robot1 moves in once robot0 holds the lifted payload within ``handover_capture_radius`` of the hand-over point,
    goes down onto the handle once it is still (wherever it is within that radius), and robot0 lets go once robot1
    has held it for ``handover_hold_steps`` steps; robot1 carries it off once robot0's fingers are off it. A partner
    that presents the payload a few centimetres off the planned point still has it taken over.
    planned: the protocol of the first demonstrations (the shipped default policy's): robot1 waits for the payload
    within ``handover_ready_radius`` of the planned point and for robot0's internal stage, and goes down only within
    2 * ``reach_tolerance`` of it. Closed loop, an imitating robot0 presents 4-8 cm off and both arms then wait."""
    handover_ready_radius: float = 0.05
    """planned protocol: distance (m) of the payload from the hand-over point at which robot1 moves in above its
    grip point."""
    handover_capture_radius: float = 0.12
    """observed protocol: distance (m) of the held payload from the hand-over point within which robot1 takes it."""
    handover_hold_steps: int = 3
    """observed protocol: control steps robot1 must hold the payload before robot0 lets go. An imitating robot0
    times its release from what its cameras show of robot1's hand: with a few steps of margin, a release a little
    early drops the payload (closed-loop logs of the shipped default, README)."""
    handover_close_dwell: int = 0
    """Control steps robot1's hand stays at its hand-over grip point with the fingers open before it closes them
    (0: it starts closing ``close_lead`` above the grip point, as at every other grasp). A pause at the bottom
    ties an imitating robot1's closing to a hand that has arrived, which its state history shows."""
    present_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """World-frame offset (m) of where robot0 presents the payload from the planned hand-over point, which robot1
    still plans around: a robustness check of the hand-over rule (an imitating robot0 presents 4-8 cm off); zero
    in demonstrations."""
    handover_spread: float = 0.0
    """Std (m) of a per-episode offset of where robot0 presents the payload across the line between the robots
    (world x); along that line, where both arms are near full stretch, a third of it, and a third of it upwards
    only (a lower payload hangs its head towards the rims). robot1 waits at the nominal point (which the bins
    show) and takes the handle wherever it is presented. Meant to teach an imitating robot1 to go where it sees
    the handle rather than to one memorized place (with ``waypoint_jitter`` alone the presentations differ by
    millimetres); measured at 0.03, it did not raise the image policy's success (README). Observed rule only."""
    await_back: float = 0.08
    """Distance (m) behind its hand-over grip point (towards its base) at which robot1 waits, clear of robot0's
    forearm as it brings the payload in."""

    lid_lift_height: float = 0.04
    """Height (m) of the lid plate above the bin rim while robot0 carries the lid aside."""
    lid_aside_gap: float = 0.05
    """Gap (m) between the start bin and the lid put down beside it (on the table's free half)."""
    lid_aside_outward: float = 0.05
    """Offset (m) of the put-down lid towards the middle of the workspace; the lid may overhang the table's front
    edge by this much, and robot0's elbow stays clear of its limit."""
    lid_drop_height: float = 0.10
    """Height (m) of the lid plate above the table when robot0 lets go of it."""
    place_release_height: float = -0.02
    """Height (m) of the payload's lowest point relative to the target bin's rim when robot1 lets go (negative:
    inside the walls)."""
    retreat_distance: float = 0.15
    """How far (m) an arm backs off towards its base after letting go of the payload."""
    retreat_lift: float = 0.06
    """How far (m) an arm rises after letting go of the payload, before it backs off."""

    grasp_min_steps: int = 4
    """Control steps the gripper closes for at least before an object can count as grasped."""
    grasp_max_steps: int = 20
    """Control steps after which a closing gripper that does not hold its object counts as a miss (the fingers
    cross their full 8 cm opening in about 11 steps)."""
    finger_still_speed: float = 0.02
    """Finger speed (m/s) below which closed fingers count as settled on the object."""
    grip_loss_steps: int = 3
    """Consecutive control steps without a grasp after which a carried object counts as dropped."""
    release_steps: int = 5
    """Control steps with the gripper opening before the arm moves away."""
    stage_timeout: int = 90
    """Control steps without finishing a stage (other than a waiting one) after which the arm backs off to its
    starting pose and tries the stage again."""
    labelling: bool = False
    """The expert labels states a policy reached (DAgger) rather than driving itself. Its grasp stages then follow
    what the scene shows instead of the order it would have gone through: an object already held in still fingers
    moves the stage on to the lift at the hand's pose, and a hand already within ``labelling_capture_radius`` of
    the grip point (horizontally, at most the approach height above it, turned within ``labelling_capture_turn``
    of the grasp) goes on down to it rather than back up to the approach height. Without this, a policy that
    grasps its own way is labelled "open, go back above it" all through its approach and lift."""
    labelling_capture_radius: float = 0.025
    """m; see ``labelling``."""
    labelling_capture_turn: float = 0.8
    """rad; see ``labelling``. A policy's hand arrives turned up to 0.7 rad from the expert's choice of grasp and
    still grasps (a CPU rollout of the shipped default, reset seed 21000); the label turns it the rest of the
    way down."""

    def __post_init__(self):
        if self.noise < 0 or self.waypoint_jitter < 0:
            raise ValueError(f"noise and waypoint_jitter must be >= 0, got {self.noise}, {self.waypoint_jitter}")
        caps = {"max_pos_action": self.max_pos_action, "max_rot_action": self.max_rot_action,
                "carry_rot_action": self.carry_rot_action}
        if not all(0 < v <= 1 for v in caps.values()):
            raise ValueError(f"action caps must lie in (0, 1], got {caps}")
        if not 1 <= self.grasp_min_steps <= self.grasp_max_steps:
            raise ValueError(f"need 1 <= grasp_min_steps <= grasp_max_steps, got {self.grasp_min_steps}, "
                             f"{self.grasp_max_steps}")
        steps = {"release_steps": self.release_steps, "grip_loss_steps": self.grip_loss_steps,
                 "stage_timeout": self.stage_timeout}
        if min(steps.values()) < 1:
            raise ValueError(f"step counts must be >= 1, got {steps}")
        if self.handover not in HANDOVER_PROTOCOLS:
            raise ValueError(f"handover must be one of {HANDOVER_PROTOCOLS}, got {self.handover!r}")
        if len(self.present_offset) != 3 or not np.all(np.isfinite(self.present_offset)):
            raise ValueError(f"present_offset must be 3 finite numbers (m), got {self.present_offset}")
        if not 0.0 <= self.handover_spread < self.handover_capture_radius / 3:
            raise ValueError(f"handover_spread must lie in [0, handover_capture_radius / 3), got "
                             f"{self.handover_spread}")
        if self.handover_spread > 0 and self.handover != "observed":
            raise ValueError("handover_spread needs the observed hand-over rule (the planned one waits at the "
                             "planned point)")
        if self.handover_close_dwell < 0:
            raise ValueError(f"handover_close_dwell must be >= 0, got {self.handover_close_dwell}")
        if self.handover_hold_steps < 1 or self.handover_capture_radius <= 0:
            raise ValueError(f"need handover_hold_steps >= 1 and handover_capture_radius > 0, got "
                             f"{self.handover_hold_steps}, {self.handover_capture_radius}")
        tolerances = {"reach_tolerance": self.reach_tolerance, "fine_tolerance": self.fine_tolerance,
                      "rot_tolerance": self.rot_tolerance, "align_radius": self.align_radius}
        if min(tolerances.values()) <= 0:
            raise ValueError(f"tolerances must be positive, got {tolerances}")


# ------------------------------------------------------------------------------------------------- geometry helpers
WORLD_X = np.array([1.0, 0.0, 0.0])
DEGENERATE = 1e-6  # norm below which a direction is undefined (a vertical bar has no horizontal part)


def _unit(v: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    norm = np.linalg.norm(v)
    if norm < DEGENERATE:
        if fallback is None:
            raise ValueError(f"cannot normalize the zero vector {v}")
        return fallback
    return v / norm


def _flat(v: np.ndarray) -> np.ndarray:
    """Unit horizontal part of a vector; world x for a vertical one (the hand pointing sideways, a bar on end)."""
    return _unit(np.array([v[0], v[1], 0.0]), fallback=WORLD_X)


def _cap_norm(v: np.ndarray, cap: float) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v * (cap / norm) if norm > cap else v


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(3,) world-frame axis-angle taking rotation matrix ``current`` to ``target``."""
    return mat_to_axis_angle(target @ current.T)


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by ``angle`` rad about ``axis`` (Rodrigues' formula)."""
    k = _unit(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def top_grasp(along: np.ndarray) -> np.ndarray:
    """Hand orientation for a top grasp of a bar whose long axis is ``along`` (world frame).

    The Panda hand's z axis is its approach direction and its fingers slide along its y axis, so the grasp has
    x = along, z = as straight down as a tilted bar allows (perpendicular to it), y = z × x. ``-along`` gives the
    mirror-image grasp (the hand turned half a turn about the vertical).

    A vertical bar (a bar stood on its end, a cube tipped onto its side: states a policy reaches and the
    demonstrations do not) has no grasp across it from above: the hand comes straight down onto its end, x along
    the bar's horizontal part, or world x when it has none."""
    x = _unit(along)
    z = DOWN - (DOWN @ x) * x
    if np.linalg.norm(z) < 1e-3:  # within ~0.06 deg of vertical
        x, z = _flat(along), DOWN
    z = _unit(z)
    return np.column_stack([x, np.cross(z, x), z])


def grasp_rotation(along: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Of the two mirror-image top grasps of a bar along ``along``, the one nearer to the ``current`` hand
    orientation (for turning a bar already held: the turn stays under 90°)."""
    return top_grasp(along if along @ current[:, 0] >= 0 else -along)


def lean_towards(rot: np.ndarray, direction: np.ndarray, angle: float) -> np.ndarray:
    """Tilt a grasp orientation about its finger axis (y) so that the fingertips point ``angle`` rad towards
    ``direction``; the fingers still close across the same bar. Turning about y by phi takes z to
    z cos(phi) + x sin(phi), so phi takes the sign of x · direction."""
    sign = 1.0 if rot[:, 0] @ direction >= 0 else -1.0
    return axis_angle_matrix(rot[:, 1], sign * angle) @ rot


# ------------------------------------------------------------------------------------------------------ scene view
@dataclass
class _Scene:
    """What the expert reads from the simulator at one step (world frame, metres)."""

    eef_pos: dict[str, np.ndarray]
    eef_rot: dict[str, np.ndarray]
    eef_vel: dict[str, np.ndarray]  # displacement since the previous step (m per step)
    wrist_roll: dict[str, float]  # joint 7 (rad)
    finger_speed: dict[str, float]  # fastest finger joint speed (m/s)
    payload_pos: np.ndarray  # centre of the hammer's handle
    payload_axis: np.ndarray  # unit handle axis, oriented towards +y (from robot0's side to robot1's)
    payload_head_dir: np.ndarray  # unit handle axis pointing from the handle towards the head
    payload_low_z: float  # lowest point of the hammer
    payload_speed: float  # displacement since the previous step (m per step)
    lid_handle_pos: np.ndarray
    lid_handle_rot: np.ndarray
    trash_pos: np.ndarray
    trash_rot: np.ndarray
    holds_payload: dict[str, bool]
    touches_payload: dict[str, bool]
    holds_lid: bool
    holds_trash: bool
    trash_in_trash_bin: bool
    payload_in_target_bin: bool


class _Command(NamedTuple):
    pos: np.ndarray  # target grip-site position, world frame
    rot: np.ndarray  # target hand orientation, world frame
    gripper: float  # OPEN or CLOSE
    max_rot: float | None = None  # cap on the rotation action's norm, if lower than ExpertConfig.max_rot_action


@dataclass
class _ArmState:
    stage: str
    entered: int = 0  # expert step at which the stage began
    memory: dict = field(default_factory=dict)  # poses latched when the stage began
    grip_lost: int = 0  # consecutive steps without a grasp of the object the stage carries


class ScriptedExpert:
    """Privileged-state state machine solving TwoArmTransport with both arms; see the module docstring.

    ``seed`` is the expert seed (None means 0, so demonstrations are reproducible by default); the episode's noise
    and waypoint offsets are drawn from a generator seeded with (expert seed, the simulator's reset seed).
    """

    def __init__(self, config: ExpertConfig = ExpertConfig(), seed: int | None = None):
        self.config = config
        self.seed = 0 if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._arms: dict[str, _ArmState] = {}
        self._t = 0
        self._last_pos: dict[str, np.ndarray] = {}
        self._robot1_hold_steps = 0
        self.intended_action: np.ndarray | None = None
        """(14,) noise-free action of the last ``act`` call (what the expert meant; the returned action adds the
        exploration noise)."""

    # ------------------------------------------------------------------------------------------------ interface
    def reset(self, sim: TransportSim, seed: int | None = None) -> None:
        """Start a new episode on the scene ``sim`` was just reset to; ``seed`` overrides the expert seed."""
        if sim.seed is None:
            raise RuntimeError("reset the simulation before the expert")
        expert_seed = self.seed if seed is None else int(seed)
        self._rng = np.random.default_rng([expert_seed, sim.seed])
        self._t = 0
        self._last_pos = {}
        self._arms = {"robot0": _ArmState("lid_reach"), "robot1": _ArmState("trash_reach")}
        self._robot1_hold_steps = 0
        self._read_geometry(sim)
        self._plan_waypoints(sim)

    def act(self, sim: TransportSim) -> np.ndarray:
        """(14,) float32 joint action in [-1, 1] for the simulator's current state."""
        if not self._arms:
            raise RuntimeError("call reset(sim) before act(sim)")
        scene = self._read_scene(sim)
        self._robot1_hold_steps = self._robot1_hold_steps + 1 if scene.holds_payload["robot1"] else 0
        commands = {}
        for arm, policy in (("robot0", self._robot0), ("robot1", self._robot1)):
            self._check_timeout(arm, scene)
            commands[arm] = self._recover(arm, scene) if self._arms[arm].stage == "recover" else policy(scene)
        tracked = {arm: self._track(arm, scene, commands[arm]) for arm in ARMS}
        self._t += 1
        self.intended_action = join_actions({arm: clean for arm, (clean, _) in tracked.items()}).astype(np.float32)
        return join_actions({arm: noisy for arm, (_, noisy) in tracked.items()}).astype(np.float32)

    def phase(self, arm: str) -> str:
        """Name of ``arm``'s current stage (see the module docstring)."""
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
        return self._arms[arm].stage if self._arms else "idle"

    # ----------------------------------------------------------------------------------------- episode set-up
    def _read_geometry(self, sim: TransportSim) -> None:
        """Sizes of robosuite's objects, fixed for the episode."""
        transport = sim.rs_env.transport
        hammer = transport.payload
        self._handle_half_length = hammer.handle_length / 2.0
        self._hammer_half_thickness = max(hammer.handle_radius, hammer.head_halfsize)
        self._hammer_head_length = hammer.head_halfsize * 2.0  # how far the head reaches beyond the handle's end
        self._trash_half_size = float(np.max(transport.trash.size))
        self._bin_half_size = np.asarray(transport.bin_size[:2]) / 2.0
        self._lid_size = np.asarray(transport.lid.lid_size)  # (length, width, plate thickness)
        self._lid_handle_height = float(transport.lid.handle_size[2])
        self._grippers = [robot.gripper["right"] for robot in sim.rs_env.robots]
        obs = sim.lowdim_observation
        floor_half_thickness = transport.target_bin.wall_thickness / 2.0
        bin_base_z = float(obs["target_bin_pos"][2])  # centre of a bin's floor plate
        self._table_z = bin_base_z - floor_half_thickness
        self._rim_z = self._table_z + float(transport.bin_size[2])
        self._home = {arm: np.asarray(obs[f"{arm}_eef_pos"]).copy() for arm in ARMS}

    def _jitter(self) -> np.ndarray:
        return self._rng.normal(0.0, self.config.waypoint_jitter, 3)

    def _plan_waypoints(self, sim: TransportSim) -> None:
        """Episode-wide waypoints from the initial scene, each with its own random offset."""
        cfg = self.config
        obs = sim.lowdim_observation
        target_bin = np.asarray(obs["target_bin_pos"])
        trash_bin = np.asarray(obs["trash_bin_pos"])
        start = np.asarray(obs["payload_pos"])
        lid = np.asarray(obs["lid_handle_pos"])
        self._start_bin_xy = lid[:2].copy()  # the lid starts centred on the start bin
        # Hand-over midway between where the payload starts and where it must end, above the rims.
        handover = np.array([*(start[:2] + target_bin[:2]) / 2, self._rim_z + cfg.handover_height])
        self._to_base = {arm: _flat(BASE_POS[arm] - handover) for arm in ARMS}
        self._handover = handover + self._jitter()
        # The lid goes down beside the start bin on the table's free half (towards robot0's base in x).
        side = np.sign(BASE_POS["robot0"][0] - lid[0]) or -1.0
        aside = (lid + side * (self._lid_size[0] + cfg.lid_aside_gap) * np.array([1.0, 0.0, 0.0])
                 - cfg.lid_aside_outward * self._to_base["robot0"] + self._jitter())
        aside[2] = self._table_z + cfg.lid_drop_height + self._lid_size[2] + self._lid_handle_height / 2
        self._lid_aside = aside
        self._trash_drop = np.array([*trash_bin[:2], self._rim_z + cfg.rim_clearance + self._trash_half_size])
        self._trash_drop[:2] += self._jitter()[:2]
        self._place_xy = target_bin[:2] + self._jitter()[:2]
        self._grasp_offset = {}
        for name in ("lid", "payload", "trash", "handover"):
            offset = self._jitter()
            offset[2] = abs(offset[2]) / 4  # never down into a floor or plate; much higher misses the pads
            self._grasp_offset[name] = offset
        # Drawn last and only when asked for, so that the other offsets of a (reset seed, expert seed) pair stay
        # those of earlier demonstrations.
        spread = np.zeros(3)
        if cfg.handover_spread > 0:
            spread = self._rng.normal(0.0, cfg.handover_spread, 3) * np.array([1.0, 1.0 / 3.0, 1.0 / 3.0])
            spread[2] = abs(spread[2])  # never lower: the hammer's head would hang towards the rims
        self._present = self._handover + spread + np.asarray(cfg.present_offset)

    # ------------------------------------------------------------------------------------------------ sensing
    def _read_scene(self, sim: TransportSim) -> _Scene:
        obs = sim.lowdim_observation
        env = sim.rs_env
        transport = env.transport
        payload_pos = np.asarray(obs["payload_pos"])
        eef_pos = {a: np.asarray(obs[f"{a}_eef_pos"]) for a in ARMS}
        last = self._last_pos or {**eef_pos, "payload": payload_pos}
        self._last_pos = {**eef_pos, "payload": payload_pos}
        head_dir = quat_xyzw_to_mat(obs["payload_quat"])[:, 2]  # the handle runs along the hammer's z, head at +z
        # Lowest point: the lower of the hammer's two ends (handle end, head end), less its half thickness.
        ends_z = payload_pos[2] + head_dir[2] * np.array(
            [-self._handle_half_length, self._handle_half_length + self._hammer_head_length])
        return _Scene(
            eef_pos=eef_pos,
            eef_rot={a: quat_xyzw_to_mat(obs[f"{a}_eef_quat"]) for a in ARMS},
            eef_vel={a: eef_pos[a] - last[a] for a in ARMS},
            wrist_roll={a: float(obs[f"{a}_joint_pos"][6]) for a in ARMS},
            finger_speed={a: float(np.max(np.abs(obs[f"{a}_gripper_qvel"]))) for a in ARMS},
            payload_pos=payload_pos,
            payload_axis=head_dir if head_dir[1] >= 0 else -head_dir,
            payload_head_dir=head_dir,
            payload_low_z=float(ends_z.min() - self._hammer_half_thickness),
            payload_speed=float(np.linalg.norm(payload_pos - last["payload"])),
            lid_handle_pos=np.asarray(obs["lid_handle_pos"]),
            lid_handle_rot=quat_xyzw_to_mat(obs["lid_handle_quat"]),
            trash_pos=np.asarray(obs["trash_pos"]),
            trash_rot=quat_xyzw_to_mat(obs["trash_quat"]),
            holds_payload={a: bool(env._check_grasp(g, transport.payload)) for a, g in zip(ARMS, self._grippers)},
            touches_payload={a: bool(env.check_contact(g, transport.payload)) for a, g in zip(ARMS, self._grippers)},
            holds_lid=bool(env._check_grasp(self._grippers[0], transport.lid.handle_geoms)),
            holds_trash=bool(env._check_grasp(self._grippers[1], transport.trash)),
            trash_in_trash_bin=bool(transport.trash_in_trash_bin),
            payload_in_target_bin=bool(transport.payload_in_target_bin),
        )

    # ----------------------------------------------------------------------------------------- stage plumbing
    def _enter(self, arm: str, stage: str, **memory) -> None:
        self._arms[arm] = _ArmState(stage, self._t, memory)

    def _dropped(self, arm: str, holding: bool) -> bool:
        """The carried object has left the fingers: no grasp for ``grip_loss_steps`` steps in a row (a jerk of the
        hand can break one pad's contact for a step without dropping anything)."""
        state = self._arms[arm]
        state.grip_lost = 0 if holding else state.grip_lost + 1
        return state.grip_lost >= self.config.grip_loss_steps

    def _steps_in_stage(self, arm: str) -> int:
        return self._t - self._arms[arm].entered

    def _check_timeout(self, arm: str, s: _Scene) -> None:
        """A stage that takes far too long (a jammed arm, an unreachable pose) is retried from the home pose."""
        state = self._arms[arm]
        if state.stage in WAITING_STAGES or state.stage == "recover":
            return
        if self._steps_in_stage(arm) > self.config.stage_timeout:
            # Let go first, unless the arm holds something it must not drop.
            holding = {"robot0": ("lid_lift", "lid_aside", "payload_lift", "carry"),
                       "robot1": ("trash_lift", "trash_carry", "place_carry", "place_lower")}[arm]
            resume = state.stage if state.stage in holding else self._restart_stage(state.stage)
            self._enter(arm, "recover", resume=resume, grip=CLOSE if state.stage in holding else OPEN,
                        rot=s.eef_rot[arm])

    @staticmethod
    def _restart_stage(stage: str) -> str:
        """Where a stage starts over: a grasp from its reach, anything else from itself."""
        for prefix in ("lid", "payload", "trash", "handover"):
            if stage in (f"{prefix}_reach", f"{prefix}_descend", f"{prefix}_close"):
                return f"{prefix}_reach"
        return stage

    def _recover(self, arm: str, s: _Scene) -> _Command:
        """Back off to the starting pose (upright, unfolded), then resume the interrupted stage."""
        memory = self._arms[arm].memory
        target = self._home[arm]
        rot = grasp_rotation(_flat(memory["rot"][:, 0]), memory["rot"])
        home = self._reached(arm, s, target, rot, 2 * self.config.reach_tolerance)
        if home or self._steps_in_stage(arm) > self.config.stage_timeout:
            self._enter(arm, memory["resume"], rot=s.eef_rot[arm], pos=s.eef_pos[arm])
        return _Command(target, rot, memory["grip"])

    def _reached(self, arm: str, s: _Scene, pos: np.ndarray, rot: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(pos - s.eef_pos[arm]) < tol
                    and np.linalg.norm(rotation_error(rot, s.eef_rot[arm])) < self.config.rot_tolerance)

    def _transit(self, pos: np.ndarray, target: np.ndarray, reach_below: float = FINGERTIP_REACH) -> np.ndarray:
        """Waypoint towards ``target`` that never sweeps across a bin wall: up to a safe height first, across at
        or above it, down only once over the target. ``reach_below`` is how far the hand (or what it carries)
        extends below the grip site."""
        tol = self.config.reach_tolerance
        safe_z = self._rim_z + self.config.rim_clearance / 2 + reach_below
        if np.linalg.norm(target[:2] - pos[:2]) < self.config.transit_radius:
            return target
        # Travel a tolerance above the safe height, so that tracking errors do not drop the hand back into the
        # rising mode; while rising, creep towards the target (which also stops the hand drifting).
        if pos[2] < safe_z - tol:
            creep = _cap_norm(target[:2] - pos[:2], self.config.rise_creep)
            return np.array([*(pos[:2] + creep), safe_z + tol])
        return np.array([target[0], target[1], max(target[2], safe_z + tol)])

    def _grasp(self, arm: str, s: _Scene, name: str, grip: np.ndarray, grip_rot: np.ndarray, holding: bool,
               then: str, approach_height: float | None = None, may_descend: bool = True,
               dwell_steps: int = 0) -> _Command:
        """The three stages of a top grasp, ``{name}_reach`` → ``{name}_descend`` → ``{name}_close``: hover above
        ``grip``, go straight down onto it (once ``may_descend``), close until the fingers settle; then enter stage
        ``then`` (with the grasp pose latched), or reach again after a miss. With ``dwell_steps`` the hand goes
        all the way down and stays there, fingers open, for that many steps before it closes."""
        cfg, state = self.config, self._arms[arm]
        pos = s.eef_pos[arm]
        approach_height = cfg.approach_height if approach_height is None else approach_height
        if cfg.labelling and state.stage != f"{name}_close":
            if holding and s.finger_speed[arm] < cfg.finger_still_speed:  # the policy's own grasp: lift it
                self._enter(arm, then, pos=pos.copy(), rot=s.eef_rot[arm].copy())
                return _Command(pos, s.eef_rot[arm], CLOSE)
            near = (np.linalg.norm(grip[:2] - pos[:2]) < cfg.labelling_capture_radius
                    and pos[2] < grip[2] + approach_height + 0.01  # (a policy need not stop exactly there)
                    and np.linalg.norm(rotation_error(grip_rot, s.eef_rot[arm])) < cfg.labelling_capture_turn)
            if state.stage == f"{name}_reach" and near and may_descend:
                self._enter(arm, f"{name}_descend")
            elif state.stage == f"{name}_descend" and not near:
                self._enter(arm, f"{name}_reach")
        if state.stage == f"{name}_reach":
            above = grip + approach_height * UP
            aligned = (np.linalg.norm(grip[:2] - pos[:2]) < cfg.align_radius and pos[2] < above[2] + 0.03
                       and np.linalg.norm(rotation_error(grip_rot, s.eef_rot[arm])) < cfg.rot_tolerance)
            if aligned and may_descend:
                self._enter(arm, f"{name}_descend")
            return _Command(self._transit(pos, above), grip_rot, OPEN)
        if state.stage == f"{name}_descend":
            # Start closing just before arriving: the fingers take several steps to meet the object.
            above_grip = pos[2] - grip[2]
            at_grip = (np.linalg.norm(grip[:2] - pos[:2]) < cfg.fine_tolerance
                       and above_grip < (cfg.close_lead if dwell_steps == 0 else cfg.fine_tolerance)
                       and np.linalg.norm(rotation_error(grip_rot, s.eef_rot[arm])) < cfg.rot_tolerance)
            # Steps in a row at the grip point (a dwell restarts if the hand drifts off it).
            state.memory["at_grip"] = state.memory.get("at_grip", 0) + 1 if at_grip else 0
            if at_grip and state.memory["at_grip"] > dwell_steps:
                self._enter(arm, f"{name}_close", pos=grip, rot=grip_rot)
            return _Command(grip, grip_rot, OPEN)
        # {name}_close: hold the grasp pose while the fingers close
        steps = self._steps_in_stage(arm)
        settled = holding and s.finger_speed[arm] < cfg.finger_still_speed
        if steps >= cfg.grasp_min_steps and (settled or steps >= cfg.grasp_max_steps):
            self._enter(arm, then if holding else f"{name}_reach", **state.memory)
        return _Command(state.memory["pos"], state.memory["rot"], CLOSE)

    def _release(self, arm: str, then: str, **memory) -> _Command:
        """Open in place for ``release_steps``, then enter stage ``then``."""
        state = self._arms[arm]
        if self._steps_in_stage(arm) >= self.config.release_steps:
            self._enter(arm, then, **memory)
        return _Command(state.memory["pos"], state.memory["rot"], OPEN)

    # ------------------------------------------------------------------------------------------------- robot0
    def _robot0(self, s: _Scene) -> _Command:
        """robot0: lid off, payload out of the start bin, presented for the hand-over."""
        cfg, arm = self.config, "robot0"
        state = self._arms[arm]
        stage, memory = state.stage, state.memory
        pos, rot = s.eef_pos[arm], s.eef_rot[arm]

        if stage in ("lid_reach", "lid_descend", "lid_close"):
            grip = s.lid_handle_pos + cfg.lid_grip_height * UP + self._grasp_offset["lid"]
            grip_rot = self._choose_grasp(arm, s, [s.lid_handle_rot[:, 1]])  # the handle runs along the lid's y
            return self._grasp(arm, s, "lid", grip, grip_rot, s.holds_lid, then="lid_lift")

        if stage in ("lid_lift", "lid_aside"):
            if self._dropped(arm, s.holds_lid):  # grasp it again if it still covers the bin, else carry on without it
                covering = np.all(np.abs(s.lid_handle_pos[:2] - self._start_bin_xy) < self._bin_half_size / 2)
                self._enter(arm, "lid_reach" if covering else "payload_reach")
                return _Command(pos + 0.02 * UP, rot, OPEN)
            hand_above_handle = pos[2] - s.lid_handle_pos[2]
            lifted_z = self._rim_z + cfg.lid_lift_height + self._lid_size[2] + self._lid_handle_height / 2
            lifted_z += hand_above_handle
            if stage == "lid_lift":
                if pos[2] > lifted_z - cfg.reach_tolerance:
                    self._enter(arm, "lid_aside", rot=memory["rot"])
                return _Command(np.array([*memory["pos"][:2], lifted_z]), memory["rot"], CLOSE)
            target = self._lid_aside + hand_above_handle * UP
            beside_bin = np.abs(s.lid_handle_pos[0] - self._start_bin_xy[0]) > (
                self._bin_half_size[0] + self._lid_size[0] / 2 + cfg.lid_aside_gap / 2)
            if not beside_bin:  # stay up until the lid has cleared the bin's walls
                target[2] = max(target[2], lifted_z)
            if self._reached(arm, s, target, memory["rot"], 2 * cfg.reach_tolerance):  # (no need to be exact)
                self._enter(arm, "lid_release", pos=pos, rot=rot)
            return _Command(target, memory["rot"], CLOSE)

        if stage == "lid_release":
            return self._release(arm, then="payload_reach")

        if stage in ("payload_reach", "payload_descend", "payload_close"):
            grip = (s.payload_pos - cfg.handover_grip_offset * s.payload_axis + self._grasp_offset["payload"]
                    + cfg.payload_grip_height * UP)
            return self._grasp(arm, s, "payload", grip, self._payload_grip_rotation(s),
                               s.holds_payload[arm], then="payload_lift")

        if stage in ("payload_lift", "carry", "present"):
            if self._dropped(arm, s.holds_payload[arm]):  # grasp again if it fell back into the start bin
                in_bin = np.all(np.abs(s.payload_pos[:2] - self._start_bin_xy) < self._bin_half_size)
                self._enter(arm, "payload_reach" if in_bin else "failed", pos=pos, rot=rot)
                return _Command(pos + 0.02 * UP, rot, OPEN)
            if stage == "payload_lift":
                # The hammer nearly spans the bin: centre it on the way up so that its head does not drag along a
                # wall (which twists it in the grip).
                clear_z = self._rim_z + cfg.rim_clearance
                centring = self._start_bin_xy - self._hammer_centre(s)[:2]
                if s.payload_low_z > self._rim_z + cfg.rim_clearance / 2:  # clear of the walls: carry on rising
                    self._enter(arm, "carry", rot=memory["rot"])
                return _Command(np.array([*(pos[:2] + centring), pos[2] + clear_z - s.payload_low_z]),
                                memory["rot"], CLOSE)
            # Bring the handle's centre to the hand-over point, turned to run along world y.
            target = pos + (self._present - s.payload_pos)
            carry_rot = self._payload_carry_rotation(rot)
            if stage == "carry":
                if self._reached(arm, s, target, carry_rot, cfg.reach_tolerance):
                    self._enter(arm, "present")
                return _Command(target, carry_rot, CLOSE, cfg.carry_rot_action)
            if self._partner_took_payload():  # present: robot1 holds the handle now
                self._enter(arm, "release", pos=pos, rot=rot)
            return _Command(target, carry_rot, CLOSE)

        if stage == "release":
            return self._release(arm, then="retreat", pos=pos, rot=rot)

        if stage == "retreat":
            # Straight up first: the open fingers straddle the handle, and the hammer's head is wider than they are.
            target = memory["pos"] + cfg.retreat_distance * self._to_base[arm] + cfg.retreat_lift * UP
            if pos[2] < memory["pos"][2] + cfg.retreat_lift - cfg.reach_tolerance:
                target[:2] = memory["pos"][:2]
            if self._reached(arm, s, target, memory["rot"], cfg.reach_tolerance):
                self._enter(arm, "done", pos=target, rot=memory["rot"])
            return _Command(target, memory["rot"], OPEN)

        if stage in ("done", "failed"):
            return _Command(memory.get("pos", pos), memory.get("rot", rot), OPEN)
        raise AssertionError(f"robot0 has no stage {stage!r}")

    # ------------------------------------------------------------------------------------------------- robot1
    def _robot1(self, s: _Scene) -> _Command:
        """robot1: trash into the trash bin, payload taken over and put into the target bin."""
        cfg, arm = self.config, "robot1"
        state = self._arms[arm]
        stage, memory = state.stage, state.memory
        pos, rot = s.eef_pos[arm], s.eef_rot[arm]

        if stage in ("trash_reach", "trash_descend", "trash_close"):
            if s.trash_in_trash_bin:  # (a trash cube dropped on the way may have landed there already)
                self._enter(arm, "await_payload")
                return _Command(pos, rot, OPEN)
            grip = s.trash_pos + cfg.trash_grip_height * UP + self._grasp_offset["trash"]
            # A cube can be gripped across either pair of faces: take whichever needs the smaller wrist turn.
            grip_rot = self._choose_grasp(arm, s, [s.trash_rot[:, 0], s.trash_rot[:, 1]],
                                          (self._to_base[arm], cfg.low_grasp_lean))
            return self._grasp(arm, s, "trash", grip, grip_rot, s.holds_trash, then="trash_lift")

        if stage in ("trash_lift", "trash_carry"):
            if self._dropped(arm, s.holds_trash):
                self._enter(arm, "trash_reach")
                return _Command(pos + 0.02 * UP, rot, OPEN)
            trash_low_z = s.trash_pos[2] - self._trash_half_size
            clear_z = self._rim_z + cfg.rim_clearance
            if stage == "trash_lift":
                if trash_low_z > self._rim_z + cfg.rim_clearance / 2:  # clear of the walls: carry on rising
                    self._enter(arm, "trash_carry", rot=memory["rot"])
                return _Command(np.array([*memory["pos"][:2], pos[2] + clear_z - trash_low_z]), memory["rot"], CLOSE)
            target = pos + (self._trash_drop - s.trash_pos)
            if self._reached(arm, s, target, memory["rot"], cfg.reach_tolerance):
                self._enter(arm, "trash_release", pos=pos, rot=rot)
            return _Command(target, memory["rot"], CLOSE)

        if stage == "trash_release":
            return self._release(arm, then="await_payload")

        if stage == "await_payload":
            # Wait above and behind the grip point, out of the way of robot0's forearm as it brings the payload in.
            hover = (self._handover + cfg.handover_grip_offset * WORLD_Y + cfg.await_back * self._to_base[arm]
                     + cfg.await_height * UP)
            # Move in above the grip point while robot0 brings the payload the last few centimetres ...
            if self._payload_arriving(s):
                self._enter(arm, "handover_reach")
            return _Command(hover, self._handover_grip_rotation(s, WORLD_Y), OPEN)

        if stage in ("handover_reach", "handover_descend", "handover_close"):
            # ... but go down onto the handle only once robot0 holds it still at the hand-over point.
            presented = self._payload_offered_still(s)
            grip = s.payload_pos + cfg.handover_grip_offset * s.payload_axis + self._grasp_offset["handover"]
            return self._grasp(arm, s, "handover", grip, self._handover_grip_rotation(s, s.payload_axis),
                               s.holds_payload[arm], then="handover_hold", approach_height=cfg.approach_height / 2,
                               may_descend=presented, dwell_steps=cfg.handover_close_dwell)

        if stage == "handover_hold":
            # robot0 lets go now; wait until its fingers have left the handle before pulling the payload away.
            payload_top = s.payload_pos[2] + self._hammer_half_thickness
            robot0_clear = s.eef_pos["robot0"][2] - FINGERTIP_REACH > payload_top + cfg.reach_tolerance
            if self._partner_let_go(s) and robot0_clear and not s.touches_payload["robot0"]:
                self._enter(arm, "place_carry", rot=memory["rot"])
            return _Command(memory["pos"], memory["rot"], CLOSE)

        if stage in ("place_carry", "place_lower"):
            if self._dropped(arm, s.holds_payload[arm]):
                self._enter(arm, "retreat" if s.payload_in_target_bin else "failed", pos=pos, rot=rot)
                return _Command(pos, rot, OPEN)
            # Bring the hammer's middle over the bin's centre, the hand as it took the payload over: turning the hand
            # about its finger axis would only swivel the hammer in the fingers.
            place_rot = memory["rot"]
            centre = self._hammer_centre(s)
            if stage == "place_carry":
                low_z = self._rim_z + cfg.rim_clearance
                target = pos + np.array([*(self._place_xy - centre[:2]), low_z - s.payload_low_z])
                if np.linalg.norm(self._place_xy - centre[:2]) < cfg.transit_radius:  # over the bin: lower it
                    self._enter(arm, "place_lower", rot=memory["rot"])
                return _Command(target, place_rot, CLOSE, cfg.carry_rot_action)
            low_z = self._rim_z + cfg.place_release_height
            target = pos + np.array([*(self._place_xy - centre[:2]), low_z - s.payload_low_z])
            if s.payload_low_z < low_z + cfg.fine_tolerance:
                self._enter(arm, "place_release", pos=pos, rot=rot)
            return _Command(target, place_rot, CLOSE, cfg.carry_rot_action)

        if stage == "place_release":
            return self._release(arm, then="retreat", pos=pos, rot=rot)

        if stage == "retreat":
            target = memory["pos"] + cfg.retreat_lift * UP
            if self._reached(arm, s, target, memory["rot"], cfg.reach_tolerance):
                self._enter(arm, "done", pos=target, rot=memory["rot"])
            return _Command(target, memory["rot"], OPEN)

        if stage in ("done", "failed"):
            return _Command(memory.get("pos", pos), memory.get("rot", rot), OPEN)
        raise AssertionError(f"robot1 has no stage {stage!r}")

    # ------------------------------------------------------------------------------------------ task geometry
    def _hammer_centre(self, s: _Scene) -> np.ndarray:
        """Middle of the hammer's length (handle plus head), half a head length from the handle's centre."""
        return s.payload_pos + s.payload_head_dir * self._hammer_head_length / 2

    def _choose_grasp(self, arm: str, s: _Scene, bar_axes: list[np.ndarray],
                      lean: tuple[np.ndarray, float] | None = None) -> np.ndarray:
        """The top grasp, over bars along any of ``bar_axes`` and both mirror images of each, that needs the least
        turn of the hand among those keeping the wrist's last joint (joint 7, ±2.9 rad) within
        ``ExpertConfig.wrist_roll_limit``; ``lean`` = (direction, angle) tilts every option (``lean_towards``).

        With the hand pointing down, joint 7 turns against the hand's turn about the vertical, so its value after a
        turn is predicted from the turn's vertical component. Choosing by the smallest turn alone lets successive
        grasps wind the wrist up to its stop."""
        options = [top_grasp(sign * axis) for axis in bar_axes for sign in (1.0, -1.0)]
        if lean is not None:
            options = [lean_towards(r, *lean) for r in options]
        turns = [rotation_error(r, s.eef_rot[arm]) for r in options]
        joint7 = [s.wrist_roll[arm] - turn[2] for turn in turns]
        safe = [i for i in range(len(options)) if abs(joint7[i]) < self.config.wrist_roll_limit]
        best = min(safe, key=lambda i: np.linalg.norm(turns[i])) if safe else int(np.argmin(np.abs(joint7)))
        return options[best]

    def _payload_grip_rotation(self, s: _Scene) -> np.ndarray:
        """robot0's grasp of the handle, leaning back towards its base (see ``ExpertConfig.low_grasp_lean``)."""
        return self._choose_grasp("robot0", s, [s.payload_axis],
                                  (self._to_base["robot0"], self.config.low_grasp_lean))

    def _payload_carry_rotation(self, rot: np.ndarray) -> np.ndarray:
        """robot0's grasp turned so that the handle runs along world y (the turn stays under 90°)."""
        return lean_towards(grasp_rotation(WORLD_Y, rot), self._to_base["robot0"], self.config.low_grasp_lean)

    def _handover_grip_rotation(self, s: _Scene, handle_axis: np.ndarray) -> np.ndarray:
        """robot1's grasp of the presented handle, leaning towards robot0 (see ``ExpertConfig.handover_lean``)."""
        return self._choose_grasp("robot1", s, [handle_axis], (-self._to_base["robot1"], self.config.handover_lean))

    # ----------------------------------------------------------------------------------- hand-over protocol
    def _payload_held_up(self, s: _Scene) -> bool:
        """robot0 holds the payload clear of the start bin's walls."""
        return s.holds_payload["robot0"] and s.payload_low_z > self._rim_z + self.config.rim_clearance / 2

    def _payload_arriving(self, s: _Scene) -> bool:
        """robot1 moves in above its grip point (ExpertConfig.handover)."""
        cfg = self.config
        distance = np.linalg.norm(s.payload_pos - self._handover)
        if cfg.handover == "planned":
            return self._arms["robot0"].stage in ("carry", "present") and distance < cfg.handover_ready_radius
        return self._payload_held_up(s) and distance < cfg.handover_capture_radius

    def _payload_offered_still(self, s: _Scene) -> bool:
        """robot1 may go down onto the handle."""
        cfg = self.config
        if cfg.handover == "planned":
            return self._arms["robot0"].stage == "present" and self._payload_presented(s)
        return (self._payload_held_up(s) and s.payload_speed < cfg.settle_speed
                and np.linalg.norm(s.payload_pos - self._handover) < cfg.handover_capture_radius)

    def _partner_took_payload(self) -> bool:
        """robot0 lets go of the presented payload."""
        if self.config.handover == "planned":
            return self._arms["robot1"].stage == "handover_hold"
        return self._robot1_hold_steps >= self.config.handover_hold_steps

    def _partner_let_go(self, s: _Scene) -> bool:
        """robot1 may carry the payload off (once robot0's fingers are also clear of it)."""
        if self.config.handover == "planned":
            return self._arms["robot0"].stage in ("retreat", "done")
        return not s.holds_payload["robot0"]

    def _payload_presented(self, s: _Scene) -> bool:
        """The payload is at the hand-over point and has stopped moving."""
        return bool(s.payload_speed < self.config.settle_speed
                    and np.linalg.norm(s.payload_pos - self._handover) < 2 * self.config.reach_tolerance)

    # -------------------------------------------------------------------------------------------------- control
    def _track(self, arm: str, s: _Scene, command: _Command) -> tuple[np.ndarray, np.ndarray]:
        """Saturated proportional step towards a world-frame pose, as the arm's base-frame (7,) action: (noise-free,
        with exploration noise)."""
        cfg = self.config
        coasting = cfg.velocity_lookahead * s.eef_vel[arm]
        pos_action = cfg.pos_gain * (command.pos - s.eef_pos[arm] - coasting) / OSC_POS_SCALE
        rot_action = cfg.rot_gain * rotation_error(command.rot, s.eef_rot[arm]) / OSC_ROT_SCALE
        action = np.zeros(ARM_ACTION_DIM)
        # Each position component saturates on its own (the action space is a box), so that a long move along one
        # axis does not starve the corrections along the others.
        action[0:3] = np.clip(BASE_ROT[arm].T @ pos_action, -cfg.max_pos_action, cfg.max_pos_action)
        max_rot = cfg.max_rot_action if command.max_rot is None else min(command.max_rot, cfg.max_rot_action)
        action[3:6] = BASE_ROT[arm].T @ _cap_norm(rot_action, max_rot)
        action[GRIPPER_INDEX] = command.gripper
        noisy = action.copy()
        noisy[0:6] += self._rng.normal(0.0, cfg.noise, 6)
        return np.clip(action, -1.0, 1.0), np.clip(noisy, -1.0, 1.0)


def run_expert_episode(sim: TransportSim, seed: int, expert: ScriptedExpert | None = None, on_step=None) -> dict:
    """Reset sim to `seed`, run the expert until done; returns {"success": bool, "length": int, "seed": int}.

    `on_step(obs, action, reward, done, info)` is called after each step (used by the demo writer and video
    recorder); ``info["expert_action"]`` is the expert's noise-free action for that step. The episode ends where the
    simulator says so: at the first success (``SimConfig.terminate_on_success``) or at the horizon.
    """
    return _run_labelled_episode(sim, seed, expert, None, on_step)


def run_learner_episode(sim: TransportSim, seed: int, learner, expert: ScriptedExpert | None = None,
                        on_step=None) -> dict:
    """DAgger's episode: ``learner`` (an ``evaluation.Controller``, e.g. the per-arm π0 policy under its recipe)
    drives the arms while ``expert`` labels every state the learner reaches with its own noise-free action.

    The expert runs beside the learner on the same scene. Most of its stages advance on what it observes (the lid
    is off, the payload is held or dropped, ...); its grasp stages also wait for its own approach and closing,
    which a learner grasping its own way never makes, unless ``ExpertConfig.labelling`` lets them follow the
    scene (``training/demos.py --learner`` turns it on). ``on_step`` as ``run_expert_episode``'s: ``action`` is
    what the learner did, ``info["expert_action"]`` the label."""
    return _run_labelled_episode(sim, seed, expert, learner, on_step)


def _run_labelled_episode(sim: TransportSim, seed: int, expert: ScriptedExpert | None, learner, on_step) -> dict:
    """One episode in which the expert acts at every state (which advances its stages) and its noise-free action
    is the label; the executed action is the expert's own (noisy) one, or the ``learner``'s where there is one."""
    expert = expert if expert is not None else ScriptedExpert()
    sim.reset(seed)
    if learner is not None:
        learner.reset(sim, seed)
    expert.reset(sim)
    done, success = False, False
    while not done:
        action = expert.act(sim)
        label = expert.intended_action
        if learner is not None:
            action = np.asarray(learner.act(sim), dtype=np.float32)
        obs, reward, done, info = sim.step(action)
        info = {**info, "expert_action": label}
        success = success or bool(info["success"])
        if on_step is not None:
            on_step(obs, action, reward, done, info)
    return {"success": success, "length": sim.t, "seed": int(seed)}
