"""The TwoArmTransport simulation: real MuJoCo, seeded determinism, per-arm views, labels, shaping."""

import numpy as np
import pytest

from coop_transport.constants import ARMS, PROPRIO_DIM
from coop_transport.sim import SimConfig, arm_observation, join_actions, split_action
from coop_transport.sim import frames
from coop_transport.sim.labels import step_labels, task_potential


def _rollout(sim, seed, steps=8):
    sim.reset(seed)
    states = [sim.get_state()]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        sim.step(rng.uniform(-1, 1, 14))
        states.append(sim.get_state())
    return np.stack(states)


def test_same_seed_same_scene_bit_for_bit(sim):
    a = _rollout(sim, 7)
    _rollout(sim, 8)  # something else in between must not leak into the next episode
    b = _rollout(sim, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], _rollout(sim, 9, steps=0)[0])


def test_robomimic_configuration(sim):
    kw = sim.env_kwargs
    assert kw["robots"] == ["Panda", "Panda"] and kw["env_configuration"] == "opposed"
    assert kw["control_freq"] == 20 and sim.config.horizon == 500
    arm_cfg = sim.controller_config["body_parts"]["right"]
    assert arm_cfg["type"] == "OSC_POSE" and arm_cfg["input_type"] == "delta" and arm_cfg["input_ref_frame"] == "base"
    assert sim.rs_env.action_dim == 14
    for robot, arm in zip(sim.rs_env.robots, ARMS):  # the frames module's constants match the live scene
        np.testing.assert_allclose(robot.base_pos, frames.BASE_POS[arm], atol=1e-9)
        np.testing.assert_allclose(robot.base_ori, frames.BASE_ROT[arm], atol=1e-9)


def test_horizon_ends_episode():
    from coop_transport.sim import TransportSim

    with TransportSim(SimConfig(horizon=3)) as short:
        short.reset(1)
        dones = [short.step(np.zeros(14))[2] for _ in range(3)]
    assert dones == [False, False, True]


def test_bad_actions_are_refused(sim):
    sim.reset(1)
    with pytest.raises(ValueError, match="shape"):
        sim.step(np.zeros(7))
    bad = np.zeros(14)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sim.step(bad)
    with pytest.raises(ValueError, match="seed"):
        sim.reset(-1)


def test_action_split_join_roundtrip():
    a = np.arange(14.0)
    parts = split_action(a)
    assert parts["robot0"].tolist() == list(range(7)) and parts["robot1"].tolist() == list(range(7, 14))
    assert np.array_equal(join_actions(parts), a)
    batch = np.random.default_rng(0).normal(size=(5, 3, 14))
    assert np.array_equal(join_actions(split_action(batch)), batch)
    with pytest.raises(ValueError):
        join_actions({"robot0": np.zeros(7)})


def test_per_arm_proprio_is_in_the_base_frame(sim):
    obs = sim.reset(3)
    for arm in ARMS:
        view = arm_observation(obs, arm)
        assert view["proprio"].shape == (PROPRIO_DIM,) and view["proprio"].dtype == np.float32
        # Both arms start in the same joint configuration, so in their own base frames they see the same
        # eef position (up to the initial joint noise): the frames make the arms mirror images.
    p0, p1 = (arm_observation(obs, a)["proprio"][:3] for a in ARMS)
    np.testing.assert_allclose(p0, p1, atol=0.05)
    # A +x action in robot0's base frame moves its eef along world +y (its base is rotated +90 degrees).
    before = obs["robot0_eef_pos"].copy()
    a = np.zeros(14)
    a[0] = 1.0
    for _ in range(5):
        obs, *_ = sim.step(a)
    moved = obs["robot0_eef_pos"] - before
    assert moved[1] > 0.03 and abs(moved[0]) < 0.01


def test_each_arms_state_is_recorded_every_control_step(sim):
    """The states a policy with a state history sees: one per control step of this episode, newest first, at most
    PROPRIO_HISTORY_STEPS, forgotten at a reset."""
    from coop_transport.constants import PROPRIO_HISTORY_STEPS

    sim.reset(3)
    first = sim.arm_observation("robot1")
    np.testing.assert_array_equal(first["proprio_history"], first["proprio"][None])
    seen = [first["proprio"]]
    action = np.zeros(14)
    action[7:10] = 0.5  # robot1 moves: its states differ step to step
    for _ in range(PROPRIO_HISTORY_STEPS + 3):
        sim.step(action)
        seen.insert(0, sim.arm_observation("robot1")["proprio"])
    history = sim.arm_observation("robot1")["proprio_history"]
    np.testing.assert_array_equal(history, np.stack(seen[:PROPRIO_HISTORY_STEPS]))
    assert not np.allclose(history[0], history[5])
    sim.reset(3)
    np.testing.assert_array_equal(sim.proprio_history("robot1"), first["proprio"][None])


def test_world_to_base_action_conversion():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (4, 7))
    for arm in ARMS:
        b = frames.world_to_base_action(arm, a)
        np.testing.assert_allclose(frames.base_to_world_delta(arm, b[:, :3]), a[:, :3], atol=1e-6)
        assert np.array_equal(b[:, 6], a[:, 6].astype(np.float32))


def test_axis_angle_roundtrip():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(50, 4))
    m = frames.quat_xyzw_to_mat(q)
    aa = frames.mat_to_axis_angle(m)
    angle = np.linalg.norm(aa, axis=-1)
    assert np.all(angle <= np.pi + 1e-9)
    # Rebuild with Rodrigues' formula and compare.
    k = aa / np.maximum(angle[:, None], 1e-12)
    K = np.zeros((50, 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K = K - K.transpose(0, 2, 1)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    R = np.eye(3) + s * K + (1 - c) * K @ K
    np.testing.assert_allclose(R, m, atol=1e-6)


def test_cameras_render_upright_and_deterministic(camera_sim):
    obs = camera_sim.reset(5)
    for key in ("robot0_eye_in_hand_image", "robot1_eye_in_hand_image", "agentview_image"):
        assert obs[key].shape == (64, 64, 3) and obs[key].dtype == np.uint8
        assert obs[key].std() > 5  # not a blank frame
    again = camera_sim.reset(5)
    assert np.array_equal(obs["agentview_image"], again["agentview_image"])
    view = arm_observation(obs, "robot0")
    assert view["wrist_image"].shape == (64, 64, 3) and "agentview_image" in view


def test_skipped_cameras_change_nothing_but_when_they_are_rendered(camera_sim):
    """step(render=False) leaves the images out and ``observation`` renders them on demand, at the same state: the
    trajectory and the images read at the end are those of rendering at every step."""
    actions = np.random.default_rng(3).uniform(-1, 1, (4, 14))
    images = ("robot0_eye_in_hand_image", "agentview_image")
    camera_sim.reset(5)
    for a in actions:
        every, _, _, _ = camera_sim.step(a)
    state_every = camera_sim.get_state()
    camera_sim.reset(5)
    for a in actions:
        lazy, _, _, _ = camera_sim.step(a, render=False)
        assert not any(k in lazy for k in images)  # nothing rendered at these steps
    assert np.array_equal(camera_sim.get_state(), state_every)
    view = camera_sim.arm_observation("robot0")  # reads the observation: renders now
    assert np.array_equal(view["wrist_image"], every["robot0_eye_in_hand_image"])
    assert np.array_equal(camera_sim.observation["agentview_image"], every["agentview_image"])
    camera_sim.reset(6)  # a reset renders, and clears what the last step left pending
    assert all(k in camera_sim.observation for k in images)


def test_labels_and_potential_at_reset(sim):
    sim.reset(2)
    labels = step_labels(sim)
    for arm in ARMS:
        assert labels[f"{arm}_phase"] == 0
        assert labels[f"{arm}_ready"] == 0
        assert labels[f"{arm}_pose"].shape == (6,)
    assert task_potential(sim) == 0.0
    # Commanded gripper state follows the action.
    a = np.zeros(14)
    a[6], a[13] = 1.0, -1.0
    sim.step(a)
    labels = step_labels(sim)
    assert labels["robot0_gripper_closed"] == 1 and labels["robot1_gripper_closed"] == 0
    assert step_labels(sim, {"robot0": -1.0, "robot1": 1.0})["robot0_gripper_closed"] == 0


def test_shaped_reward_is_off_by_default_and_potential_based():
    from coop_transport.sim import TransportSim

    assert SimConfig().shaped_reward is False
    with TransportSim(SimConfig(shaped_reward=True, shaping_gamma=1.0)) as shaped:
        shaped.reset(4)
        total = sum(shaped.step(np.zeros(14))[1] for _ in range(3))
        # With gamma = 1 the shaping terms telescope to Phi(s_T) - Phi(s_0).
        assert total == pytest.approx(task_potential(shaped) - 0.0)


def test_image_orientation_is_natural_and_matches_robosuite_flipped():
    """Our images are upright (row 0 at the top): robosuite's own renderer gives the same picture upside down
    (its default "opengl" convention), which is why robomimic files are flipped on read."""
    from coop_transport.sim import TransportSim
    from robosuite.utils.binding_utils import MjRenderContextOffscreen

    with TransportSim(SimConfig(fast_render=False)) as exact:  # robosuite renders with shadows and reflections
        exact.reset(1)
        ours = exact.render("agentview", 48, 48).astype(int)
        MjRenderContextOffscreen(exact.rs_env.sim, device_id=-1)
        theirs = exact.rs_env.sim.render(camera_name="agentview", width=48, height=48).astype(int)
    assert np.abs(ours - theirs[::-1]).mean() < 1.0
    assert np.abs(ours - theirs).mean() > 10.0
