"""The Franka bridge against a fake of franka_ros2's interfaces on real ROS 2 topics (the bridge is its own process),
and its gripper and kinematics parts."""

import time

import numpy as np
import pytest

from ros_helpers import FakeFranka, Listener, start_node, stop_process, use_isolated_ros_env, wait_until

pytestmark = pytest.mark.ros

DT = 0.05


def test_gripper_hysteresis_sends_each_change_once():
    from coop_transport.ros.franka_gripper import GripperHysteresis

    h = GripperHysteresis()
    events = [h.update(v) for v in (-1, -1, 0.2, 0.6, 0.9, 0.0, -0.4, -0.7, -1, 1)]
    assert events == ["open", None, None, "close", None, None, None, "open", None, "close"]


def test_gripper_client_degrades_without_franka_msgs():
    from coop_transport.ros.franka_gripper import FrankaGripperClient

    try:
        import franka_msgs  # noqa: F401
        pytest.skip("franka_msgs is installed here")
    except ImportError:
        pass
    client = FrankaGripperClient(node=None, action_namespace="/franka_left/franka_gripper")
    assert not client.available and "franka_msgs" in client.reason
    assert client.send("close") is False and not client.ready()


def test_franka_kinematics_match_the_simulated_panda(sim):
    """Franka's DH table (the bridge's pose source on mock hardware) against robosuite's Panda: same orientation,
    positions within robosuite's 7 mm shorter grip site."""
    from coop_transport.ros.franka_kinematics import tcp_pose
    from coop_transport.sim.frames import quat_xyzw_to_mat, world_to_base_pos, world_to_base_rot

    rng = np.random.default_rng(0)
    sim.reset(3)
    for _ in range(3):
        for _ in range(10):
            obs, *_ = sim.step(rng.uniform(-1, 1, 14))
        for arm in ("robot0", "robot1"):
            t = tcp_pose(obs[f"{arm}_joint_pos"])
            pos = world_to_base_pos(arm, obs[f"{arm}_eef_pos"])
            rot = world_to_base_rot(arm, quat_xyzw_to_mat(obs[f"{arm}_eef_quat"]))
            assert np.linalg.norm(t[:3, :3] - rot) < 0.01
            assert np.linalg.norm(pos - t[:3, 3]) < 0.01


@pytest.fixture()
def franka(tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray  # noqa: F401
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import JointState

    from coop_transport.ros.paths import share_dir

    env = use_isolated_ros_env()
    listener = Listener("fake_franka")
    fake = FakeFranka(listener.node, "franka_left", start_pos=(0.62, 0.0, 0.30))
    listener.record(JointState, "/left/joint_states")
    listener.record(PoseStamped, "/left/eef_pose")
    listener.record_diagnostics()
    listener.start()
    bridge = start_node("franka_bridge_node", [
        "-r", "__node:=franka_bridge", "-r", "__ns:=/left", "--params-file", str(share_dir() / "config" / "franka.yaml"),
        "-p", "arm:=robot0", "-p", "franka_namespace:=franka_left"], env, tmp_path / "bridge.log")
    try:
        yield listener, fake, bridge
    finally:
        assert stop_process(bridge) == 0, (tmp_path / "bridge.log").read_text()
        listener.close()


def test_franka_bridge_against_fake_franka_ros2(franka):
    from sensor_msgs.msg import JointState
    from std_srvs.srv import SetBool

    from coop_transport.ros import codec

    listener, fake, bridge = franka
    node = listener.node
    # robot state comes back onto the policy topics
    wait_until(lambda: listener.get("/left/eef_pose") and listener.get("/left/joint_states"), 20,
               message="joint_states and eef_pose on the policy side")
    eef = listener.get("/left/eef_pose")[-1][1]
    assert eef.header.frame_id == "fr3_link0" and abs(eef.pose.position.x - 0.62) < 1e-9
    assert list(listener.get("/left/joint_states")[-1][1].name)[:2] == ["fr3_joint1", "fr3_joint2"]

    pub = node.create_publisher(JointState, "/left/command", 10)
    wait_until(lambda: pub.get_subscription_count() > 0, 10)

    def send(values, n):
        for _ in range(n):
            pub.publish(codec.command_msg(np.asarray(values, float), node.get_clock().now().to_msg()))
            time.sleep(DT)

    # disabled: commands are ignored, nothing reaches the controller
    send([1, 0, 0, 0, 0, 0, 1], 5)
    diag = lambda: listener.diag("coop_transport/franka_bridge/left")  # noqa: E731
    wait_until(lambda: int(diag().get("ignored_disabled", 0)) >= 5, 10)
    assert not fake.equilibrium and diag()["enabled"] == "false"
    assert diag()["gripper"].startswith("unavailable")  # no franka_msgs here: the arm still works

    assert listener.call(SetBool, "/left/enable", SetBool.Request(data=True)).success
    wait_until(lambda: fake.equilibrium, 10, message="the first equilibrium pose (the measured pose)")
    first = fake.equilibrium[-1].pose.position
    assert abs(first.x - 0.62) < 0.01 and fake.equilibrium[-1].header.frame_id == "fr3_link0"

    # +x at full command: the target moves at most max_linear_speed (0.1 m/s) and stops at the box (x <= 0.70)
    send([1, 0, 0, 0, 0, 0, -1], 30)
    xs = [m.pose.position.x for m in fake.equilibrium]
    assert np.diff(xs).max() <= 0.1 * DT + 1e-9, "speed limit"
    assert 0.69 < xs[-1] and max(xs) <= 0.70 + 1e-9, "stopped at the workspace box"
    offsets = [m.pose.position.x - 0.62 for m in fake.equilibrium]
    assert min(offsets) > -0.01

    # rotation integrates about the base frame's axes, within the leash
    quat_before = np.array([fake.equilibrium[-1].pose.orientation.x, fake.equilibrium[-1].pose.orientation.w])
    send([0, 0, 0, 0, 0, 0.2, -1], 5)
    o = fake.equilibrium[-1].pose.orientation
    assert not np.allclose([o.x, o.w], quat_before)

    # malformed command: rejected, bridge alive; stale: hold (no new targets)
    bad = codec.command_msg(np.zeros(7), node.get_clock().now().to_msg())
    bad.position[0] = float("nan")
    pub.publish(bad)
    wait_until(lambda: int(diag().get("rejected", 0)) >= 1, 10)
    n = len(fake.equilibrium)
    wait_until(lambda: diag().get("message") == "holding: no fresh command", 10)
    assert len(fake.equilibrium) == n and bridge.poll() is None

    # disable: stop where the arm is, ignore commands again
    assert listener.call(SetBool, "/left/enable", SetBool.Request(data=False)).success
    n = len(fake.equilibrium)
    send([-1, 0, 0, 0, 0, 0, -1], 5)
    assert len(fake.equilibrium) == n
