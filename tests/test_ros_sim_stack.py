"""The simulated stack as real processes over Fast DDS: the sim bridge and both policy nodes, started by the bringup
from the same graph as sim.launch.py, running in lockstep on simulated time (40-step episodes, 64 px cameras).

The tests run in order against one running graph: a full episode (20 Hz of sim time, messages between the arms),
bad inputs, the camera watchdog, then a killed policy node. A last test runs the bringup's command line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ros_helpers import TEST_POLICY_FACTORY, Listener, isolated_ros_env, use_isolated_ros_env, wait_until

pytestmark = pytest.mark.ros

HORIZON = 40
IMAGE = 64
DT = 0.05
STACK_ARGS = {"policy_factory": TEST_POLICY_FACTORY, "left_policy": f"image_size={IMAGE}",
              "right_policy": f"image_size={IMAGE}", "image_size": str(IMAGE), "horizon": str(HORIZON),
              "use_sim_time": "true", "agentview": "false"}


def _sec(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _is_hold(cmd) -> bool:
    return not np.any(np.asarray(cmd.position[:6]))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory

    from coop_transport.bringup import Bringup
    from coop_transport.ros import graph

    env = use_isolated_ros_env()
    tmp = tmp_path_factory.mktemp("stack")
    results = tmp / "episodes.jsonl"
    listener = Listener()
    for ns in ("left", "right"):
        listener.record(JointState, f"/{ns}/command")
        listener.record(JointTrajectory, f"/{ns}/message")
    listener.record(DiagnosticArray, "/sim/episode")
    listener.record_diagnostics()
    listener.start()
    bringup = Bringup(graph.build_graph("sim", {**STACK_ARGS, "results_path": str(results)}), env=env,
                      log_dir=tmp / "logs")
    bringup.start()
    try:
        # every test starts from a running graph, whichever runs first (or alone)
        for ns in ("left", "right"):
            wait_until(lambda: any(not _is_hold(m) for _, m in listener.get(f"/{ns}/command")), 90,
                       message=f"the {ns} policy's first command")
        yield {"listener": listener, "bringup": bringup, "results": results, "logs": tmp / "logs"}
    finally:
        bringup.stop(grace_s=5.0)
        listener.close()
        for name, proc in bringup.processes.items():
            assert proc.poll() is not None, f"{name} still running"


def _episode_status(listener) -> list[dict]:
    out = []
    for _, msg in listener.get("/sim/episode"):
        for status in msg.status:
            out.append({"stamp": _sec(msg.header.stamp), **{kv.key: kv.value for kv in status.values}})
    return out


def test_episode_runs_to_its_end_at_20hz_with_messages_between_arms(stack):
    listener, bringup = stack["listener"], stack["bringup"]
    wait_until(lambda: any(s["episode"] == "1" and s["done"] == "true" for s in _episode_status(listener)), 120,
               interval=0.2, message="the end of episode 1")
    end = next(s for s in _episode_status(listener) if s["episode"] == "1" and s["done"] == "true")
    assert end["outcome"] in ("timeout", "success") and int(end["step"]) <= HORIZON
    start = min(s["stamp"] for s in _episode_status(listener) if s["episode"] == "1")
    outcome = json.loads(stack["results"].read_text().splitlines()[0])
    assert outcome["episode"] == 1 and outcome["seed"] == 1 and outcome["length"] == int(end["step"])
    assert outcome["holds"] == {"left": 0, "right": 0}, "the bridge got a command from both arms every step"

    for ns in ("left", "right"):
        stamps = [_sec(m.header.stamp) for _, m in listener.get(f"/{ns}/command")]
        episode = [t for t in stamps if start - 1e-6 <= t < end["stamp"] - 1e-6]
        # The bridge's zero holds (above) prove a command arrived for every step. This listener may join the DDS
        # graph a moment late on a loaded machine and miss the first one (volatile topics are not replayed), so it
        # checks that, from the first command it saw, none is missing and each came one 20 Hz tick after the last.
        assert int(end["step"]) - 2 <= len(episode) <= int(end["step"]), f"{ns}: one command per control tick"
        assert np.allclose(np.diff(episode), DT), f"{ns}: commands at 20 Hz of simulated time, no gap"
        assert abs(episode[-1] - (end["stamp"] - DT)) < 1e-6, f"{ns}: a command for the episode's last step"
        commands = [m for _, m in listener.get(f"/{ns}/command")]
        assert sum(not _is_hold(c) for c in commands) > len(commands) // 2, "commands come from the policy"

        messages = [m for _, m in listener.get(f"/{ns}/message")]
        assert len(messages) >= 3 and all(len(m.joint_names) == 16 and len(m.points) == 1 for m in messages)
        assert any(m.points[0].positions[2] == 1.0 for m in messages), f"{ns}'s policy saw its partner's message"
        diag = listener.diag(f"coop_transport/policy/{ns}")
        assert int(diag["partner_messages"]) >= 3 and int(diag["policy/partner_seen"]) >= 1
        # The node records the arm's state every tick: plans late in the episode see the earlier states too.
        assert int(diag["policy/history_rows"]) > 10
        # The graph has gone on to episode 2 by now, and at each reset a node holds (WARN) until its first chunk
        # of the new episode: so wait for a running state rather than read whichever one came last.
        wait_until(lambda: (d := listener.diag(f"coop_transport/policy/{ns}"))["state"] == "OK"
                   and d["partner_message"] == "fresh", 30, interval=0.1,
                   message=f"{ns}: running with a fresh partner message")
        assert float(diag["inference_ms_median"]) < 50
    assert all(p.poll() is None for p in bringup.processes.values())


def test_bad_images_and_states_are_rejected_without_a_crash(stack):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    listener, bringup = stack["listener"], stack["bringup"]
    node = listener.node
    pub_image = node.create_publisher(Image, "/left/wrist_camera/image_raw", qos_profile_sensor_data)
    pub_joints = node.create_publisher(JointState, "/left/joint_states", qos_profile_sensor_data)
    wait_until(lambda: pub_image.get_subscription_count() > 0 and pub_joints.get_subscription_count() > 0, 10)
    small = Image(height=32, width=32, encoding="rgb8", step=96, data=bytes(32 * 96))
    mono = Image(height=IMAGE, width=IMAGE, encoding="mono8", step=IMAGE, data=bytes(IMAGE * IMAGE))
    nan_state = JointState(name=[f"robot0_joint{i}" for i in range(1, 8)] + ["robot0_finger_joint1",
                                                                               "robot0_finger_joint2"],
                           position=[float("nan")] * 9)

    def rejected():
        for msg in (small, mono):
            msg.header.stamp = node.get_clock().now().to_msg()
            pub_image.publish(msg)
        pub_joints.publish(nan_state)
        d = listener.diag("coop_transport/policy/left")
        return (int(d.get("dropped/wrist_image/size", 0)) >= 1 and int(d.get("dropped/wrist_image/encoding", 0)) >= 1
                and int(d.get("dropped/joint_states/nonfinite", 0)) >= 1)

    wait_until(rejected, 20, interval=0.3, message="the left policy to count the rejected inputs")
    assert bringup.processes["/left/policy_node"].poll() is None
    before = len(listener.get("/left/command"))
    wait_until(lambda: len(listener.get("/left/command")) > before + 5, 20, message="commands after bad inputs")
    log = (stack["logs"] / "left__policy_node.log").read_text()
    assert "rejected wrist_image" in log and "encoding 'mono8'" in log


def _set_dropped_cameras(listener, value: str) -> None:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    request = SetParameters.Request(parameters=[Parameter(name="drop_cameras", value=ParameterValue(
        type=ParameterType.PARAMETER_STRING, string_value=value))])
    assert listener.call(SetParameters, "/sim_bridge/set_parameters", request).results[0].successful


def test_watchdog_holds_the_arm_when_its_camera_stops(stack):
    listener = stack["listener"]
    _set_dropped_cameras(listener, "left")
    trips = wait_until(lambda: int(listener.diag("coop_transport/policy/left").get("watchdog_trips", 0)) >= 1, 30,
                       message="a watchdog trip on the left arm")
    assert trips
    n = len(listener.get("/left/command"))
    wait_until(lambda: len(listener.get("/left/command")) >= n + 10, 30, message="ten more left commands")
    commands = [m for _, m in listener.get("/left/command")]
    held = commands[n:]
    assert all(_is_hold(m) for m in held), "zero delta while the camera is silent"
    last_gripper = next(m.position[6] for m in reversed(commands[:n]) if not _is_hold(m))
    assert {m.position[6] for m in held} <= {last_gripper, -1.0}, "gripper held (or reset open by a new episode)"
    # /diagnostics comes at 1 Hz of wall clock: the newest report may predate the trip by up to a second
    wait_until(lambda: (listener.diag("coop_transport/policy/left").get("state") == "ERROR"
                        and "wrist image" in listener.diag("coop_transport/policy/left").get("message", "")), 10,
               interval=0.2, message="diagnostics: ERROR naming the stale wrist image")
    r = len(listener.get("/right/command"))
    wait_until(lambda: len(listener.get("/right/command")) >= r + 10, 30)
    assert any(not _is_hold(m) for _, m in listener.get("/right/command")[r:]), "the right arm carries on"

    # a reset while the camera is still silent: the new episode's missing first frame is still a fault (ERROR),
    # not a start-up wait (WARN) -- CI once caught an episode ending during this test
    from std_srvs.srv import Trigger

    episode = int(_episode_status(listener)[-1]["episode"])
    assert listener.call(Trigger, "/sim/reset", Trigger.Request()).success
    wait_until(lambda: int(_episode_status(listener)[-1]["episode"]) > episode, 30, message="the next episode")
    wait_until(lambda: (listener.diag("coop_transport/policy/left").get("state") == "ERROR"
                        and "since the episode began" in listener.diag("coop_transport/policy/left").get("message", "")),
               10, interval=0.2, message="diagnostics: ERROR, no wrist image in the new episode")
    n = len(listener.get("/left/command"))
    wait_until(lambda: len(listener.get("/left/command")) >= n + 5, 30, message="left commands in the new episode")
    assert all(_is_hold(m) for _, m in listener.get("/left/command")[n:]), "still holding after the reset"

    _set_dropped_cameras(listener, "")
    n = len(listener.get("/left/command"))
    wait_until(lambda: any(not _is_hold(m) for _, m in listener.get("/left/command")[n:]), 30,
               message="the left arm to resume once its camera is back")


def test_reset_service_ends_the_episode_and_moves_to_the_next_seed(stack):
    from std_srvs.srv import Trigger

    listener = stack["listener"]
    current = _episode_status(listener)[-1]
    response = listener.call(Trigger, "/sim/reset", Trigger.Request())
    assert response.success and f"seed {current['seed']}" in response.message
    def this_reset():  # not the one the watchdog test made
        return [s for s in _episode_status(listener)
                if s["outcome"] == "reset" and int(s["episode"]) >= int(current["episode"])]

    wait_until(this_reset, 30, message="a reset")
    ended = this_reset()[0]
    wait_until(lambda: any(int(s["episode"]) == int(ended["episode"]) + 1 for s in _episode_status(listener)), 30)
    nxt = next(s for s in _episode_status(listener) if int(s["episode"]) == int(ended["episode"]) + 1)
    assert int(nxt["seed"]) == int(ended["seed"]) + 1 and int(nxt["step"]) == 0
    lines = [json.loads(x) for x in stack["results"].read_text().splitlines()]
    assert any(o["outcome"] == "reset" and o["seed"] == int(ended["seed"]) for o in lines)


def test_killing_a_policy_node_leaves_the_bridge_holding_that_arm(stack):
    listener, bringup = stack["listener"], stack["bringup"]
    os.killpg(bringup.processes["/left/policy_node"].pid, signal.SIGKILL)
    bringup.processes["/left/policy_node"].wait(5)
    bridge = lambda: listener.diag("coop_transport/sim_bridge")  # noqa: E731
    wait_until(lambda: bridge().get("left/holding", "no") != "no", 30, message="the bridge to hold the left arm")
    holds, tick = int(bridge()["left/holds"]), int(bridge()["tick"])
    wait_until(lambda: int(bridge()["tick"]) >= tick + 3, 60, interval=0.2, message="the simulation to go on")
    assert int(bridge()["left/holds"]) >= holds + 2 and bridge()["right/holding"] == "no"
    assert bringup.processes["/sim_bridge"].poll() is None and bringup.processes["/right/policy_node"].poll() is None


def test_bringup_command_line_runs_episodes_and_stops(tmp_path):
    env = isolated_ros_env()
    env["ROS_DOMAIN_ID"] = str((int(env["ROS_DOMAIN_ID"]) + 50) % 100 + 1)  # apart from the module's stack
    args = [f"{k}:={v}" for k, v in {**STACK_ARGS, "horizon": "12"}.items()]
    proc = subprocess.run([sys.executable, "-m", "coop_transport.bringup", "sim", "--episodes", "2",
                           "--log-dir", str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("episode   1  seed    1  timeout") for line in lines), proc.stdout
    assert any(line.startswith("episode   2  seed    2") for line in lines), proc.stdout
    assert "success 0/2" in proc.stdout and "required node /sim_bridge exited with 0" in proc.stdout
    for log in tmp_path.glob("*policy_node.log"):
        assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.slow
def test_bringup_runs_the_shipped_default_policy(tmp_path):
    """The launch defaults as a user runs them (no policy arguments: the shipped per-arm π0 on both arms, 96 px
    wrist and agentview cameras), for a short episode."""
    env = isolated_ros_env()
    env["ROS_DOMAIN_ID"] = str((int(env["ROS_DOMAIN_ID"]) + 25) % 100 + 1)
    proc = subprocess.run([sys.executable, "-m", "coop_transport.bringup", "sim", "--episodes", "1",
                           "--log-dir", str(tmp_path), "horizon:=15", "first_seed:=74"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith("episode   1  seed   74") for line in proc.stdout.splitlines()), proc.stdout
    for log in tmp_path.glob("*policy_node.log"):
        text = log.read_text()
        assert "Traceback" not in text and "per_arm_small" in text, text
