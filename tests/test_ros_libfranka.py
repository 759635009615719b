"""Robot in the loop: the Franka bridge's libfranka backend against two simulated FR3 arms that speak the real Franka
protocol (franky-sim, one process each on 127.0.0.1 and 127.0.0.2, in their own environment), over real DDS.

The bridges (one process per arm) get their commands from this process or from a scripted command source process
(``command_source.py``, standing in for a policy node: policy nodes need camera images, which these simulators do
not render). Stated tolerances: a commanded delta is reached within 2 mm; the speed limit holds within 15 %.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ros_helpers import TESTS_DIR, franky_sim_arms, start_node, stop_process, use_isolated_ros_env, wait_until


ADDRESSES = {"left": "127.0.0.1", "right": "127.0.0.2"}
ARMS = {"left": "robot0", "right": "robot1"}
DT = 0.05  # s, the 20 Hz control tick
POS_SCALE = 0.05  # m per unit command per tick (OSC_POSE scaling, the bridge's default)
MAX_SPEED = 0.10  # m/s, config/franka.yaml
DELTA_TOLERANCE = 0.002  # m


def bridge_args(ns: str) -> list[str]:
    from coop_transport.ros.paths import share_dir

    return ["-r", "__node:=franka_bridge", "-r", f"__ns:=/{ns}",
            "--params-file", str(share_dir() / "config" / "franka.yaml"),
            "-p", f"arm:={ARMS[ns]}", "-p", "backend:=libfranka", "-p", f"robot_ip:={ADDRESSES[ns]}",
            "-p", "realtime:=false",  # no realtime kernel on CI machines; the simulators do not need one
            # franky-sim's home pose (0.554, 0, 0.521) lies above the default box: a box around it
            "-p", "workspace_min:=[0.30, -0.30, 0.10]", "-p", "workspace_max:=[0.75, 0.30, 0.65]"]


# --------------------------------------------------------------------- the arm driver against a fake franky
class _Limit:
    def __init__(self):
        self.value = None

    def set(self, value):
        self.value = value


class _FakeRobot:
    """franky.Robot's surface as LibfrankaArm uses it; ``reflex`` makes the running motion end with a
    ControlException (franky-sim has no reflexes to provoke)."""

    def __init__(self, franky, hostname, realtime_config=None):
        from coop_transport.ros.franka_kinematics import tcp_pose

        self.franky, self.q = franky, np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8])
        self.pose = tcp_pose(self.q)
        self.pose[:3, 3] += franky.ee_offset
        self.in_control, self.has_errors, self.reflex, self.planner_failure, self.t = False, False, None, None, 0.0
        self.targets, self.recoveries = [], 0
        self.relative_dynamics_factor = None
        for name in ("translation", "rotation"):
            for kind in ("velocity", "acceleration", "jerk"):
                setattr(self, f"{name}_{kind}_limit", _Limit())
        franky.robots.append(self)

    @property
    def state(self):
        import types

        self.t += 0.001
        return types.SimpleNamespace(q=self.q, dq=np.zeros(7), O_T_EE=types.SimpleNamespace(matrix=self.pose),
                                     time=types.SimpleNamespace(to_sec=lambda t=self.t: t), robot_mode="Move")

    @property
    def is_in_control(self):
        return self.in_control

    def move(self, motion, asynchronous=False):
        self.targets.append(motion.target)
        self.in_control = not motion.finish

    def poll_motion(self):
        if self.reflex:
            self.in_control, self.has_errors, reason, self.reflex = False, True, self.reflex, None
            raise self.franky.ControlException(reason)
        if self.planner_failure:
            self.in_control, reason, self.planner_failure = False, self.planner_failure, None
            raise RuntimeError(reason)
        return True

    def join_motion(self, timeout=None):
        return True

    def recover_from_errors(self):
        self.recoveries += 1
        self.has_errors = False
        return True

    def stop(self):
        self.in_control = False


def _fake_franky(ee_offset=(0.0, 0.0, 0.0)):
    import types

    franky = types.SimpleNamespace(robots=[], ee_offset=np.array(ee_offset),
                                   ControlException=type("ControlException", (Exception,), {}),
                                   NetworkException=type("NetworkException", (Exception,), {}),
                                   RealtimeConfig=types.SimpleNamespace(Enforce=0, Ignore=1),
                                   ReferenceType=types.SimpleNamespace(Absolute=0),
                                   Affine=lambda m: np.array(m))
    franky.Robot = lambda hostname, realtime_config=None: _FakeRobot(franky, hostname, realtime_config)
    franky.CartesianMotion = lambda target, ref, return_when_finished=True: types.SimpleNamespace(
        target=target, finish=return_when_finished)
    return franky


def test_libfranka_arm_reports_a_reflex_and_recovers_only_on_enable():
    from coop_transport.ros.libfranka_arm import LibfrankaArm, LibfrankaConfig, MotionLimits

    franky, states, faults = _fake_franky(), [], []
    arm = LibfrankaArm(LibfrankaConfig("fake-arm", limits=MotionLimits(linear_velocity=0.05), gripper=False,
                                       state_rate=200.0), states.append, faults.append, franky)
    arm.connect()
    robot = franky.robots[0]
    assert robot.translation_velocity_limit.value == 0.05 and robot.translation_jerk_limit.value == 50.0
    assert robot.relative_dynamics_factor == 1.0 and not robot.targets  # nothing moves before engage
    pose = arm.engage()
    assert arm.following and not robot.targets  # no zero-length motion: the first target starts one
    arm.set_target(pose)
    target = pose.copy()
    target[0, 3] += 0.01
    arm.set_target(target)
    wait_until(lambda: robot.targets and np.allclose(robot.targets[-1], target), 2, message="the target sent")
    arm.set_target(target)  # the same target again: not re-sent
    time.sleep(0.05)
    assert len(robot.targets) == 1 and states

    # a planner failure (no robot error) restarts the motion towards the latest target and is reported
    robot.planner_failure = "Motion planner failed with error code -111"
    wait_until(lambda: len(robot.targets) == 2, 2, message="the motion restarted")
    assert np.allclose(robot.targets[-1], target) and arm.following and arm.counts["planner_restarts"] == 1
    assert [f.kind for f in faults] == ["planner"] and not faults[0].disables_arm
    faults.clear()

    robot.reflex = "libfranka: Move command aborted: motion aborted by reflex! [\"cartesian_reflex\"]"
    wait_until(lambda: faults, 2, message="the reflex reported")
    assert faults[0].kind == "reflex" and "cartesian_reflex" in faults[0].reason
    assert not arm.following and robot.recoveries == 0  # never recovered silently
    arm.set_target(pose)
    time.sleep(0.05)
    assert len(robot.targets) == 2, "no targets while faulted"

    arm.engage()  # the operator's enable: recover, then follow from where the arm is
    assert robot.recoveries == 1 and arm.following and arm.counts["recoveries"] == 1
    arm.set_target(target)  # (the arm is at ``pose`` in this fake)
    wait_until(lambda: len(robot.targets) == 3, 2, message="following again")
    assert arm.shutdown() == "stopped at rest" and not robot.in_control


def test_libfranka_arm_refuses_a_foreign_end_effector_and_bad_limits():
    from coop_transport.ros.libfranka_arm import LibfrankaArm, LibfrankaConfig, MotionLimits

    franky = _fake_franky(ee_offset=(0.0, 0.0, 0.02))  # O_T_EE 2 cm from the Franka Hand TCP (another EE in Desk)
    arm = LibfrankaArm(LibfrankaConfig("fake-arm", gripper=False), lambda s: None, lambda f: None, franky)
    arm.connect()
    with pytest.raises(RuntimeError, match="Desk"):
        arm.engage()
    assert not franky.robots[0].targets
    arm.shutdown()
    with pytest.raises(ValueError, match="linear_jerk"):
        MotionLimits(linear_jerk=0.0)
    with pytest.raises(ValueError, match="angular_velocity"):
        MotionLimits(angular_velocity=3.0)  # above the robot's 2.5 rad/s
    with pytest.raises(ValueError, match="raise the jerk limit"):
        MotionLimits(linear_jerk=5.0)  # 0.1 s to build up 0.5 m/s^2: per-tick targets would be overshot
    with pytest.raises(ValueError, match="hostname"):
        LibfrankaConfig("")


# ------------------------------------------------------------------------ two simulated arms, real protocol
def test_a_shutdown_racing_the_arm_thread_stops_quietly():
    """A signal shuts ROS down on the main thread while the arm's I/O thread is between its context check and a
    publish (seen in CI as a traceback on SIGTERM). That is a normal stop; a publish failing while ROS is up is not."""
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from coop_transport.ros.franka_bridge_node import FrankaBridgeNode
    from coop_transport.ros.libfranka_arm import ArmState

    context = Context()
    use_isolated_ros_env()
    rclpy.init(context=context)
    node = FrankaBridgeNode(franky_module=_fake_franky(), context=context, parameter_overrides=[
        Parameter("arm", value="robot0"), Parameter("backend", value="libfranka"),
        Parameter("robot_ip", value="fake-arm"), Parameter("realtime", value=False),
        Parameter("gripper", value="none")])
    try:
        node.stop_robot()  # the I/O thread ends: this test plays it, one state at a time
        robot = node.arm_driver.robot
        state = ArmState(time.time(), 1.0, robot.q, np.zeros(7), robot.pose, float("nan"), "Move")
        node._on_arm_state(state)  # ROS up: published

        real_publish = node.pub_joints.publish

        def failing_publish(msg):
            raise RuntimeError("a publish that fails while ROS is up")

        node.pub_joints.publish = failing_publish
        with pytest.raises(RuntimeError, match="while ROS is up"):
            node._on_arm_state(state)  # a real failure is not swallowed

        def shutdown_then_publish(msg):
            rclpy.shutdown(context=context)  # the signal handler, between the check and the publish
            real_publish(msg)

        node.pub_joints.publish = shutdown_then_publish
        node._on_arm_state(state)  # rclpy raises "publisher's context is invalid": a quiet stop
        assert not context.ok()
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    logs = tmp_path_factory.mktemp("libfranka")
    env = use_isolated_ros_env()
    bridges = {}
    with franky_sim_arms(ADDRESSES, logs, "libfranka_test") as (sims, listener):
        try:
            for ns in ADDRESSES:
                bridges[ns] = start_node("franka_bridge_node", bridge_args(ns), env, logs / f"bridge_{ns}.log")
            yield listener, sims, bridges, logs, env
        finally:
            if "left" in bridges and bridges["left"].poll() is None:  # SIGTERM for one bridge, SIGINT for the other
                os.killpg(bridges["left"].pid, signal.SIGTERM)
                try:
                    bridges["left"].wait(10)
                except subprocess.TimeoutExpired:
                    pass
            codes = {ns: stop_process(b, timeout=10) for ns, b in bridges.items()}
    for ns, code in codes.items():
        log = (logs / f"bridge_{ns}.log").read_text()
        assert code == 0 and "Traceback" not in log, log[-3000:]
    # a clean stop on SIGTERM: the arm whose simulator still ran was brought to rest and its motion ended
    assert "libfranka shutdown: stopped at rest" in (logs / "bridge_left.log").read_text()


@pytest.mark.ros
@pytest.mark.slow
def test_two_simulated_fr3_arms_through_the_libfranka_bridge(cell):
    from sensor_msgs.msg import JointState
    from std_srvs.srv import SetBool

    from coop_transport.ros import codec
    from coop_transport.ros.franka_kinematics import tcp_pose

    listener, sims, bridges, logs, env = cell
    node = listener.node
    diag = lambda ns: listener.diag(f"coop_transport/franka_bridge/{ns}")  # noqa: E731

    def position(ns) -> np.ndarray:
        p = listener.get(f"/{ns}/eef_pose")[-1][1].pose.position
        return np.array([p.x, p.y, p.z])

    def finger_width(ns) -> float:
        return sum(listener.get(f"/{ns}/joint_states")[-1][1].position[7:9])

    # -- state arrives, at (at least) the 20 Hz control rate, in the FR3's TCP frame
    wait_until(lambda: all(listener.get(f"/{ns}/eef_pose") for ns in ADDRESSES), 30,
               message="eef_pose of both arms (bridge logs: " + str(logs) + ")")
    t0 = time.time()
    time.sleep(2.0)
    for ns in ADDRESSES:
        for topic in ("joint_states", "eef_pose"):
            n = sum(1 for t, _ in listener.get(f"/{ns}/{topic}") if t >= t0)
            assert n / 2.0 >= 20, f"/{ns}/{topic} at {n / 2.0:.1f} Hz"
        js, pose = listener.get(f"/{ns}/joint_states")[-1][1], listener.get(f"/{ns}/eef_pose")[-1][1]
        assert list(js.name)[:2] == ["fr3_joint1", "fr3_joint2"] and pose.header.frame_id == "fr3_link0"
        fk = tcp_pose(np.array(js.position[:7]))[:3, 3]
        assert np.linalg.norm(fk - position(ns)) < 0.002, "eef_pose is the Franka Hand TCP of the FR3 kinematics"
        assert diag(ns)["message"].startswith("disabled") and diag(ns)["ee_frame_error_m"]

    pubs = {ns: node.create_publisher(JointState, f"/{ns}/command", 10) for ns in ADDRESSES}
    wait_until(lambda: all(p.get_subscription_count() for p in pubs.values()), 10)

    def send(commands: dict, ticks: int) -> None:
        for _ in range(ticks):
            for ns, values in commands.items():
                pubs[ns].publish(codec.command_msg(np.asarray(values, float), node.get_clock().now().to_msg()))
            time.sleep(DT)

    # -- disabled: commands move nothing
    start = {ns: position(ns) for ns in ADDRESSES}
    send({ns: [0.5, 0, 0, 0, 0, 0, -1] for ns in ADDRESSES}, 5)
    time.sleep(0.5)
    for ns in ADDRESSES:
        assert np.linalg.norm(position(ns) - start[ns]) < 5e-4
        wait_until(lambda: int(diag(ns).get("ignored_disabled", 0)) >= 5, 5, message="ignored commands counted")

    for ns in ADDRESSES:
        response = listener.call(SetBool, f"/{ns}/enable", SetBool.Request(data=True))
        assert response.success, response.message

    # -- a commanded end-effector delta moves the end effector by that amount (both arms at once); open the hands
    start = {ns: position(ns) for ns in ADDRESSES}
    commands = {"left": [0.08, 0, 0, 0, 0, 0, -1], "right": [0, -0.08, 0, 0, 0, 0, -1]}
    send(commands, 10)
    send({ns: [0, 0, 0, 0, 0, 0, -1] for ns in ADDRESSES}, 30)  # settle (zero deltas, fresh commands)
    for ns, values in commands.items():
        expected = np.array(values[:3]) * POS_SCALE * 10  # 4 cm
        moved = position(ns) - start[ns]
        assert np.linalg.norm(moved - expected) < DELTA_TOLERANCE, f"{ns}: moved {moved}, commanded {expected}"
        wait_until(lambda: diag(ns)["message"] == "following commands", 3, message=f"{ns} following")
    wait_until(lambda: all(finger_width(ns) > 0.075 for ns in ADDRESSES), 5, message="both hands open")

    # -- the gripper closes once the command crosses the hysteresis, and opens again
    send({ns: [0, 0, 0, 0, 0, 0, 1] for ns in ADDRESSES}, 40)
    assert all(finger_width(ns) < 0.01 for ns in ADDRESSES), [finger_width(ns) for ns in ADDRESSES]
    send({ns: [0, 0, 0, 0, 0, 0, -1] for ns in ADDRESSES}, 40)
    assert all(finger_width(ns) > 0.075 for ns in ADDRESSES), [finger_width(ns) for ns in ADDRESSES]
    # open, close, open: each change once, not every tick
    wait_until(lambda: int(diag("left")["gripper_goals"]) == 3, 3, message="3 gripper goals")

    # -- an oversized command is clipped to the speed limit: 10 ticks of 0.1 m/s, not of 0.5 m/s
    start, t0 = position("left"), time.time()
    send({"left": [-1, 0, 0, 0, 0, 0, -1]}, 10)
    send({"left": [0, 0, 0, 0, 0, 0, -1]}, 30)
    moved = position("left") - start
    # 10 ticks at the limit: 5 cm (unclipped, 25 cm). Never more; less where the simulated arm lags and the leash
    # (the target at most 5 cm ahead of the measured pose) holds the target back: on the 2-core CI machine, with two
    # simulated arms, two bridges and this test sharing the cores, 3.1 cm was seen once. The upper bound is the
    # check; the lower one only says the command moved the arm.
    limit = MAX_SPEED * DT * 10
    assert limit / 2 < -moved[0] < limit + DELTA_TOLERANCE, f"moved {moved} (limit: 5 cm), {diag('left')}"
    samples = [(t, m.pose.position.x) for t, m in listener.get("/left/eef_pose") if t >= t0]
    speeds = [abs(x1 - x0) / (t1 - t0_) for (t0_, x0), (t1, x1) in zip(samples[:-5], samples[5:])]
    assert max(speeds) <= MAX_SPEED * 1.15, f"peak speed {max(speeds):.3f} m/s"
    wait_until(lambda: int(diag("left")["speed_scaled"]) >= 10, 3, message="speed limit counted")

    # -- killing the command source (a policy node's stand-in) makes its arm hold
    source = subprocess.Popen([sys.executable, str(TESTS_DIR / "command_source.py"), "/left",
                               "0,0.05,0,0,0,0,-1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        before = position("left")
        wait_until(lambda: np.linalg.norm(position("left") - before) > 0.01, 10, message="the source moves the arm")
    finally:
        source.kill()
        source.wait(5)
    wait_until(lambda: diag("left")["message"] == "holding: no fresh command", 5)
    time.sleep(1.0)
    held = position("left")
    time.sleep(1.5)
    assert np.linalg.norm(position("left") - held) < 5e-4, "the arm holds its last target"

    # -- stopping one simulator: a clear error for that arm, the other arm and every node go on
    sims["right"].stop()
    wait_until(lambda: diag("right").get("fault", "none").startswith("connection"), 15,
               message="a connection fault on the right bridge's diagnostics")
    assert diag("right")["level"] == 2 and "enable reconnects" in diag("right")["message"]
    response = listener.call(SetBool, "/right/enable", SetBool.Request(data=True))
    assert not response.success and "cannot connect" in response.message
    start = position("left")
    send({"left": [0.06, 0, 0, 0, 0, 0, -1]}, 10)
    send({"left": [0, 0, 0, 0, 0, 0, -1]}, 30)
    assert np.linalg.norm(position("left") - start - [0.03, 0, 0]) < DELTA_TOLERANCE
    assert diag("left")["level"] == 0
    assert all(b.poll() is None for b in bridges.values()), "no bridge crashed"
