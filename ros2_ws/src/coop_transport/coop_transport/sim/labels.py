"""Per-step labels of each arm's task phase, gripper, readiness and pose, and the shaping potential.

Everything here is a function of the simulator state alone (object poses, contacts, gripper fingers), never of
an expert's internal state, so the same labels come out of our scripted demonstrations, of robomimic's human
demonstrations replayed from their saved states, and of online RL rollouts. They supervise the 16-D message of
architecture V5 (the decoder predicts the *sender's* phase, gripper, readiness and pose) and feed the linear probes.

Phases (``constants.PHASES``):
  robot0  0 open_lid       the lid still covers the start bin
          1 grasp_payload  lid off, robot0 does not hold the payload yet
          2 carry_payload  robot0 holds the payload alone
          3 hand_over      both grippers hold the payload
          4 retreat        robot0 has let go after the hand-over (payload held by robot1 or in the target bin)
  robot1  0 grasp_trash    the trash is in the target bin (or anywhere outside the trash bin) and not held
          1 dispose_trash  robot1 holds the trash
          2 await_payload  trash disposed, robot1 does not hold the payload yet
          3 hand_over      both grippers hold the payload
          4 place_payload  robot1 holds the payload alone, or it is already in the target bin
Readiness: robot0 is ready when it presents the lifted payload for the hand-over; robot1 is ready when the trash is
disposed and its gripper is open and empty, waiting for the payload.
"""

from __future__ import annotations

import numpy as np

from coop_transport.constants import ARMS, GRIPPER_INDEX
from coop_transport.sim.frames import mat_to_axis_angle, quat_xyzw_to_mat, world_to_base_pos, world_to_base_rot

TABLE_TOP_Z = 0.8  # metres, both tables (TwoArmTransport's table_offsets z)
LIFTED_HEIGHT = 0.10  # payload counts as lifted this far above the table top (robosuite's height_threshold)
PRESENT_HEIGHT = 0.15  # robot0 presents the payload for the hand-over above this height
LID_OFF_DISTANCE = 0.08  # lid handle moved this far (m) from its place above the start bin's centre
GRIPPER_OPEN_CTRL_WIDTH = 0.04  # Panda hand: action -1 drives the finger targets to +-0.04 m (width 0.08), +1 to 0;
# a target width under half of fully open counts as closed (action > 0).


class TaskPredicates:
    """Boolean facts about the scene that phases, readiness and shaping are built from."""

    def __init__(self, sim, gripper_commands: dict[str, float] | None = None):
        env = sim.rs_env
        transport = env.transport
        obs = sim.lowdim_observation
        grippers = [robot.gripper["right"] if isinstance(robot.gripper, dict) else robot.gripper
                    for robot in env.robots]
        start_bin_pos = env.sim.data.body_xpos[env.sim.model.body_name2id(transport.start_bin.root_body)]
        lid_handle = np.asarray(obs["lid_handle_pos"])
        self.lid_off = bool(np.linalg.norm(lid_handle[:2] - start_bin_pos[:2]) > LID_OFF_DISTANCE
                            or lid_handle[2] > start_bin_pos[2] + transport.bin_size[2] + 0.10)
        self.payload_held = [bool(env._check_grasp(g, transport.payload)) for g in grippers]
        self.trash_held = bool(env._check_grasp(grippers[1], transport.trash))
        self.trash_in_trash_bin = bool(transport.trash_in_trash_bin)
        self.payload_in_target_bin = bool(transport.payload_in_target_bin)
        self.payload_pos = np.asarray(obs["payload_pos"])
        self.payload_lifted = bool(self.payload_pos[2] > TABLE_TOP_Z + LIFTED_HEIGHT)
        self.payload_presented = bool(self.payload_pos[2] > TABLE_TOP_Z + PRESENT_HEIGHT)
        # "Closed" is the gripper's commanded state, not its finger width: a hand closed on the 4 cm trash cube is
        # as wide as a half-open empty one. The command is the last gripper action when given (replaying saved
        # states, where actuator targets are not part of the state), else the actuators' current targets.
        if gripper_commands is not None:
            self.gripper_closed = [bool(gripper_commands[arm] > 0.0) for arm in ARMS]
        else:
            ctrl = env.sim.data.ctrl
            ids = [[env.sim.model.actuator_name2id(a) for a in g.actuators] for g in grippers]
            self.gripper_closed = [bool(ctrl[i[0]] - ctrl[i[1]] < GRIPPER_OPEN_CTRL_WIDTH) for i in ids]
        self.target_bin_pos = np.asarray(obs["target_bin_pos"])
        self.start_bin_pos = np.asarray(start_bin_pos)


def arm_phases(p: TaskPredicates) -> tuple[int, int]:
    """(robot0 phase, robot1 phase) as indices into ``constants.PHASES``."""
    held0, held1 = p.payload_held
    if held0 and held1:
        return 3, 3
    if not p.lid_off and not held0:
        phase0 = 0
    elif held0:
        phase0 = 2
    elif held1 or p.payload_in_target_bin:
        phase0 = 4
    else:
        phase0 = 1
    if held1 or p.payload_in_target_bin:
        phase1 = 4
    elif p.trash_held:
        phase1 = 1
    elif p.trash_in_trash_bin:
        phase1 = 2
    else:
        phase1 = 0
    return phase0, phase1


def arm_readiness(p: TaskPredicates) -> tuple[bool, bool]:
    ready0 = p.payload_held[0] and not p.payload_held[1] and p.payload_presented
    ready1 = p.trash_in_trash_bin and not p.trash_held and not p.payload_held[1] and not p.gripper_closed[1]
    return bool(ready0), bool(ready1)


def arm_pose(obs: dict, arm: str) -> np.ndarray:
    """(6,) float32: eef position (m) and axis-angle orientation (rad), both in the arm's base frame."""
    pos = world_to_base_pos(arm, obs[f"{arm}_eef_pos"])
    rot = world_to_base_rot(arm, quat_xyzw_to_mat(obs[f"{arm}_eef_quat"]))
    return np.concatenate([pos, mat_to_axis_angle(rot)]).astype(np.float32)


def step_labels(sim, gripper_commands: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Labels of the current state: ``{arm}_phase`` (int64), ``{arm}_gripper_closed``, ``{arm}_ready`` (uint8),
    ``{arm}_pose`` (6,) float32, for both arms. ``gripper_commands`` ({arm: last gripper action}) is needed when
    the state was restored with ``set_state`` rather than reached by stepping."""
    p = TaskPredicates(sim, gripper_commands)
    phases, ready = arm_phases(p), arm_readiness(p)
    out = {}
    for i, arm in enumerate(ARMS):
        out[f"{arm}_phase"] = np.int64(phases[i])
        out[f"{arm}_gripper_closed"] = np.uint8(p.gripper_closed[i])
        out[f"{arm}_ready"] = np.uint8(ready[i])
        out[f"{arm}_pose"] = arm_pose(sim.lowdim_observation, arm)
    return out


# Weights of the staged shaping potential; they sum to 1, so Phi lies in [0, 1] and a fully solved scene scores 1.
POTENTIAL_WEIGHTS = {
    "lid_off": 0.10,
    "payload_held": 0.10,
    "payload_lifted": 0.10,
    "payload_progress": 0.10,  # fraction of the way from the start bin towards the target bin (while lifted)
    "trash_held_or_disposed": 0.05,
    "trash_disposed": 0.15,
    "payload_received": 0.15,  # robot1 holds the payload
    "payload_over_target": 0.10,  # robot1 holds the payload within 8 cm (xy) of the target bin's centre
    "payload_in_target_bin": 0.15,
}


def task_potential(sim) -> float:
    """Staged progress Phi(s) in [0, 1] for potential-based shaping, r' = r + gamma*Phi(s') - Phi(s).

    Potential-based shaping (Ng et al., 1999) leaves the optimal policy unchanged while rewarding progress through
    the task's stages; stages that the sparse success check needs (trash disposed, payload in the target bin) carry
    the most weight. Used for RL training only; evaluation reports the sparse success alone.
    """
    p = TaskPredicates(sim)
    w = POTENTIAL_WEIGHTS
    held_any = p.payload_held[0] or p.payload_held[1]
    span = p.target_bin_pos[:2] - p.start_bin_pos[:2]
    progress = float(np.clip(np.dot(p.payload_pos[:2] - p.start_bin_pos[:2], span) / max(np.dot(span, span), 1e-9),
                             0.0, 1.0))
    done_payload = p.payload_in_target_bin
    phi = 0.0
    phi += w["lid_off"] * (p.lid_off or held_any or done_payload)
    phi += w["payload_held"] * (held_any or done_payload)
    phi += w["payload_lifted"] * ((held_any and p.payload_lifted) or done_payload)
    phi += w["payload_progress"] * (1.0 if done_payload else progress if (held_any and p.payload_lifted) else 0.0)
    phi += w["trash_held_or_disposed"] * (p.trash_held or p.trash_in_trash_bin)
    phi += w["trash_disposed"] * p.trash_in_trash_bin
    phi += w["payload_received"] * (p.payload_held[1] or done_payload)
    over = np.linalg.norm(p.payload_pos[:2] - p.target_bin_pos[:2]) < 0.08
    phi += w["payload_over_target"] * ((p.payload_held[1] and over) or done_payload)
    phi += w["payload_in_target_bin"] * done_payload
    return float(phi)


# The task's milestones in the order a successful episode reaches them, for evaluation's stage funnel: where a
# failing policy stops tells more than its success rate (a missed grasp, a stalled hand-over, a dropped payload).
MILESTONES = ("lid_off", "payload_grasped", "payload_lifted", "trash_grasped", "trash_disposed", "hand_over",
              "payload_received", "payload_in_target_bin")


def in_task_order(milestones) -> list[str]:
    """The given milestone names as a list in task order (the order of ``MILESTONES``)."""
    return [m for m in MILESTONES if m in milestones]


def reached_milestones(sim, predicates: TaskPredicates | None = None) -> set[str]:
    """The milestones of ``MILESTONES`` that hold in the current state (evaluation keeps the union over steps);
    ``predicates``: the state's ``TaskPredicates`` when the caller has them already."""
    p = TaskPredicates(sim) if predicates is None else predicates
    facts = {
        "lid_off": p.lid_off,
        "payload_grasped": p.payload_held[0],
        "payload_lifted": p.payload_held[0] and p.payload_lifted,
        "trash_grasped": p.trash_held,
        "trash_disposed": p.trash_in_trash_bin,
        "hand_over": p.payload_held[0] and p.payload_held[1],
        "payload_received": p.payload_held[1] and not p.payload_held[0],
        "payload_in_target_bin": p.payload_in_target_bin,
    }
    return {name for name, holds in facts.items() if holds}


# ------------------------------------------------------------------------------------------------ the hand-over
HANDOVER_OUTCOMES = {
    "not_lifted": "robot0 never held the payload lifted",
    "handed_over": "robot1 held the payload when robot0's grasp ended",
    "slipped": "robot0's grasp ended while it commanded its gripper closed (a drop)",
    "opened_partner_away": "robot0 opened its gripper while robot1's hand was away from the handle",
    "opened_partner_open": "robot0 opened its gripper while robot1's open hand was at the handle",
    "opened_partner_missed": "robot0 opened its gripper after robot1 had closed its hand at the handle without a grasp",
    "held_to_end": "robot0 still held the lifted payload when the episode ended",
}
"""How robot0's first hold of the lifted payload ended (``HandoverMonitor``), in the order a failure analysis reads
them. The closed-loop logs that motivated it: the shipped default's robot0 lets go before robot1 holds (README)."""

HANDLE_NEAR = 0.05
"""m: robot1's grip site this close to the hammer handle's axis counts as at the handle (the handle is ~3 cm thick,
the open fingers span 8 cm)."""
OPENED_WITHIN = 5
"""Control steps: a gripper opened this recently explains a lost grasp (the fingers take several steps to part)."""
GRASP_LOSS_STEPS = 3
"""Consecutive steps without a grasp after which robot0's hold counts as ended (a jerk can break one pad's contact
for a step without dropping anything; the scripted expert uses the same rule)."""


def hand_to_handle(sim, arm: str) -> float:
    """Distance (m) from ``arm``'s grip site to the nearest point of the hammer handle's axis."""
    obs = sim.lowdim_observation
    half_length = sim.rs_env.transport.payload.handle_length / 2.0
    axis = quat_xyzw_to_mat(obs["payload_quat"])[:, 2]  # the handle runs along the hammer's z
    offset = np.asarray(obs[f"{arm}_eef_pos"]) - np.asarray(obs["payload_pos"])
    along = float(np.clip(offset @ axis, -half_length, half_length))
    return float(np.linalg.norm(offset - along * axis))


class HandoverMonitor:
    """Follows one closed-loop episode step by step and says how robot0's first hold of the lifted payload ended
    (one of ``HANDOVER_OUTCOMES``), with the partner's state at the last step robot0 held it.

    The stage funnel says *whether* an episode reached the hand-over; this says *why* it did not: whether robot0
    let go too early (robot1 away, or at the handle with its hand open, or closed beside it) or dropped the payload.
    Everything is read from the simulator and the executed actions, so it applies to any controller."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self._lifted = False
        self._lost = 0
        self._last_open = None  # step of robot0's latest "open" gripper command
        self._held: dict | None = None  # the partner's state at robot0's last step holding the lifted payload
        self._result: dict | None = None

    def update(self, sim, predicates: TaskPredicates, robot0_gripper_command: float) -> None:
        """Call after every executed step with the state's predicates and robot0's executed gripper command."""
        self._step += 1
        if robot0_gripper_command < 0.0:
            self._last_open = self._step
        if self._result is not None:
            return
        p = predicates
        if p.payload_held[0] and p.payload_lifted:
            self._lifted = True
        if not self._lifted:
            return
        if p.payload_held[0]:
            self._lost = 0
            self._held = {"step": self._step, "robot1_holds": p.payload_held[1],
                          "robot1_closed": p.gripper_closed[1], "robot1_hand_to_handle": hand_to_handle(sim, "robot1")}
            return
        self._lost += 1
        if self._lost < GRASP_LOSS_STEPS:
            return
        held = self._held
        opened = self._last_open is not None and self._last_open > held["step"] - OPENED_WITHIN
        if held["robot1_holds"]:
            outcome = "handed_over"
        elif not opened:
            outcome = "slipped"
        elif held["robot1_hand_to_handle"] > HANDLE_NEAR:
            outcome = "opened_partner_away"
        elif held["robot1_closed"]:
            outcome = "opened_partner_missed"
        else:
            outcome = "opened_partner_open"
        self._result = {"outcome": outcome, **held}

    def result(self) -> dict:
        """{outcome, and the partner's state at robot0's last step holding the lifted payload: step, robot1_holds,
        robot1_closed, robot1_hand_to_handle (m)}; only the outcome for ``not_lifted``."""
        if self._result is not None:
            return dict(self._result)
        if not self._lifted:
            return {"outcome": "not_lifted"}
        return {"outcome": "held_to_end", **(self._held or {})}


class EpisodeRecord:
    """What an evaluation keeps of one closed-loop episode, step by step: the milestones reached at any step (the
    stage funnel) and how robot0's hold of the lifted payload ended (``HandoverMonitor``). One place for both
    evaluations (``evaluation.run_episode`` and the residual one), so they record the same things."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._reached: set[str] = set()
        self._handover = HandoverMonitor()

    def update(self, sim, action) -> None:
        """Call after every executed step with the (14,) joint action that ran."""
        predicates = TaskPredicates(sim)
        self._reached |= reached_milestones(sim, predicates)
        self._handover.update(sim, predicates, float(action[GRIPPER_INDEX]))

    def milestones(self) -> list[str]:
        """The milestones reached so far, in task order."""
        return in_task_order(self._reached)

    def handover(self) -> dict:
        """``HandoverMonitor.result()`` so far."""
        return self._handover.result()
