"""Message conversions and safety filters of the ROS 2 layer (in-process, no DDS traffic)."""

import numpy as np
import pytest

pytestmark = pytest.mark.ros

codec = pytest.importorskip("coop_transport.ros.codec")


def _stamp():
    return codec.to_stamp(12.35)


def test_image_roundtrip_encodings_and_row_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    msg = codec.image_msg(img, _stamp())
    assert msg.encoding == "rgb8" and msg.step == 15 and codec.to_sec(msg.header.stamp) == pytest.approx(12.35)
    assert np.array_equal(codec.image_array(msg), img)
    bgr = codec.image_msg(img[..., ::-1], _stamp())
    bgr.encoding = "bgr8"
    assert np.array_equal(codec.image_array(bgr), img)
    padded = codec.image_msg(img, _stamp())
    padded.step = 16  # one padding byte per row, as some drivers send
    padded.data = np.concatenate([img.reshape(6, 15), np.full((6, 1), 255, np.uint8)], 1).tobytes()
    assert np.array_equal(codec.image_array(padded), img)


@pytest.mark.parametrize("change,reason", [
    (dict(encoding="mono8"), "encoding"), (dict(encoding="rgba8"), "encoding"), (dict(height=7), "size"),
    (dict(step=10), "layout"), (dict(data=bytes(10)), "layout")])
def test_bad_images_are_rejected_with_a_reason(change, reason):
    msg = codec.image_msg(np.zeros((6, 6, 3), np.uint8), _stamp())
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(codec.Rejected) as err:
        codec.image_array(msg, size=6 if reason != "size" else 6)
    assert err.value.reason == reason


def test_center_crop_resize():
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, 8:56] = 200  # the centre square
    out = codec.center_crop_resize(img, 24)
    assert out.shape == (24, 24, 3) and out.min() == 200


def test_joint_states_by_name_and_rejections():
    names = [f"fr3_joint{i}" for i in range(7, 0, -1)] + ["fr3_finger_joint2", "fr3_finger_joint1"]
    msg = codec.joint_state_msg(names, np.r_[np.arange(7, 0, -1) * 0.1, 0.02, 0.01], None, _stamp())
    joints, fingers = codec.split_joint_state(msg)
    assert np.allclose(joints, np.arange(1, 8) * 0.1) and np.allclose(fingers, [0.01, 0.02])
    msg.position[0] = float("nan")
    with pytest.raises(codec.Rejected, match="NaN"):
        codec.split_joint_state(msg)
    arm_only = codec.joint_state_msg(names[:7], np.zeros(7), None, _stamp())
    with pytest.raises(codec.Rejected, match="finger"):
        codec.split_joint_state(arm_only)
    assert codec.split_joint_state(arm_only, require_fingers=False)[1] is None


def test_proprio_from_topics_equals_arm_observation(sim):
    """What the bridge publishes (eef pose in the base frame, joint states) rebuilds the policies' proprio."""
    from coop_transport.sim import arm_observation
    from coop_transport.sim.frames import quat_xyzw_to_mat, world_to_base_pos, world_to_base_rot

    rng = np.random.default_rng(1)
    sim.reset(2)
    for _ in range(5):
        obs, *_ = sim.step(rng.uniform(-1, 1, 14))
    for arm in ("robot0", "robot1"):
        rot = world_to_base_rot(arm, quat_xyzw_to_mat(obs[f"{arm}_eef_quat"]))
        pose = codec.pose_msg(world_to_base_pos(arm, obs[f"{arm}_eef_pos"]), codec.mat_to_quat_xyzw(rot), _stamp(),
                              f"{arm}_base")
        names = codec.arm_joint_names(arm)
        js = codec.joint_state_msg(names, np.r_[obs[f"{arm}_joint_pos"], obs[f"{arm}_gripper_qpos"]], None, _stamp())
        pos, quat = codec.pose_arrays(pose)
        joints, fingers = codec.split_joint_state(js)
        np.testing.assert_allclose(codec.proprio(pos, quat, fingers, joints), arm_observation(obs, arm)["proprio"],
                                   atol=1e-6)


def test_command_and_stamped_arrays_roundtrip():
    cmd = np.array([0.1, -0.2, 0.3, 0.0, 0.5, -1.0, 1.0])
    msg = codec.command_msg(cmd, _stamp())
    assert list(msg.name) == ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"]
    assert np.array_equal(codec.command_array(msg), cmd)
    msg.position[3] = float("inf")
    with pytest.raises(codec.Rejected):
        codec.command_array(msg)
    v5 = np.arange(16.0)
    m = codec.trajectory_msg(v5, _stamp())
    assert m.joint_names[0] == "m0" and np.array_equal(codec.trajectory_array(m), v5)
    v6 = np.arange(70.0).reshape(10, 7)
    m = codec.trajectory_msg(v6, _stamp(), dt=0.05, first_offset=0.1)
    assert list(m.joint_names) == list(codec.COMMAND_NAMES)
    assert codec.duration_sec(m.points[2].time_from_start) == pytest.approx(0.2)
    assert np.array_equal(codec.trajectory_array(m), v6)


def test_safety_filters():
    from coop_transport.ros.safety import SafetyLimits, apply_limits, hold_command

    limits = SafetyLimits(workspace_min=(0.3, -0.3, 0.0), workspace_max=(0.7, 0.3, 0.5), max_linear_speed=0.1,
                          max_angular_speed=0.5)
    cmd, report = apply_limits(np.array([1.0, 1.0, 0, 0, 0, 2.0, 1.0]), np.array([0.5, 0.0, 0.2]), limits)
    assert report.speed_scaled
    assert np.linalg.norm(cmd[:3]) * 0.05 / 0.05 == pytest.approx(0.1)  # m/s after scaling
    assert np.linalg.norm(cmd[3:6]) * 0.5 / 0.05 == pytest.approx(0.5) and cmd[6] == 1.0
    assert cmd[0] == pytest.approx(cmd[1])  # direction kept
    # at the +x face: +x is zeroed, -x and the other axes pass
    cmd, report = apply_limits(np.array([0.5, 0.1, -0.1, 0, 0, 0, -1]), np.array([0.7, 0.0, 0.2]),
                               SafetyLimits((0.3, -0.3, 0.0), (0.7, 0.3, 0.5)))
    assert cmd[0] == 0 and cmd[1] == pytest.approx(0.1) and report.workspace_zeroed == (0,)
    cmd, _ = apply_limits(np.array([-0.5, 0, 0, 0, 0, 0, -1]), np.array([0.75, 0.0, 0.2]),
                          SafetyLimits((0.3, -0.3, 0.0), (0.7, 0.3, 0.5)))
    assert cmd[0] == -0.5, "moving back into the box is allowed"
    assert np.array_equal(hold_command(0.7), [0, 0, 0, 0, 0, 0, 0.7])
    with pytest.raises(ValueError):
        SafetyLimits((0.7, 0, 0), (0.3, 1, 1))


def test_policy_factory_spec():
    from coop_transport.ros.policy_node import DEFAULT_POLICY_FACTORY, load_factory

    assert DEFAULT_POLICY_FACTORY == "coop_transport.deploy:load_arm_policy"
    assert load_factory("ros_helpers:constant_chunk_policy").__name__ == "constant_chunk_policy"
    with pytest.raises(ValueError, match="module:function"):
        load_factory("coop_transport.deploy.load_arm_policy")
