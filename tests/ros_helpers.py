"""Helpers for the ROS 2 tests and the latency bench: a development stand-in policy, an isolated DDS environment,
process handling and a listener node that records topics.

``ConstantChunkPolicy`` is a *development* implementation of ``coop_transport.deploy``'s ``ArmPolicy`` interface,
for tests only: node processes load it with ``-p policy_factory:=ros_helpers:constant_chunk_policy`` and ``tests/``
on ``PYTHONPATH``. The shipped node's default path calls ``coop_transport.deploy.load_arm_policy``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from coop_transport.constants import ARM_ACTION_DIM, ARMS, PROPRIO_DIM, PROPRIO_HISTORY_STEPS

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
TEST_POLICY_FACTORY = "ros_helpers:constant_chunk_policy"


# ------------------------------------------------------------------------------------------ stand-in policy
class ConstantChunkPolicy:
    """Plans a fixed, slowly oscillating chunk; sends a 16-D message (arm index, plan count, whether the partner's
    message was present, proprio[:13]); checks that every observation has ``arm_observation``'s format."""

    architecture = "V5"
    message_dim = 16

    def __init__(self, arm: str, recipe, image_size: int = 64, sleep_s: float = 0.0, agentview: bool = False,
                 messages: bool = True):
        self.arm, self.recipe, self.image_size, self.sleep_s = arm, recipe, image_size, sleep_s
        self.uses_agentview, self.accepts_message = agentview, messages
        self.plans = 0
        self.plan_intervals: list[tuple[float, float]] = []  # (start, end) monotonic seconds of each plan() call
        self.partner_seen = 0
        self.resets = 0
        self.history_rows = 0  # the most earlier states (proprio_history rows) a plan was given

    def _check(self, obs: dict) -> None:
        assert obs["proprio"].shape == (PROPRIO_DIM,) and obs["proprio"].dtype == np.float32, obs["proprio"].shape
        history = obs["proprio_history"]  # the node's record of the latest ticks, newest (the current) first
        assert history.ndim == 2 and history.shape[1] == PROPRIO_DIM and 1 <= len(history) <= PROPRIO_HISTORY_STEPS
        assert np.array_equal(history[0], obs["proprio"])
        self.history_rows = max(self.history_rows, len(history))
        assert obs["wrist_image"].shape == (self.image_size, self.image_size, 3), obs["wrist_image"].shape
        assert obs["wrist_image"].dtype == np.uint8
        if self.uses_agentview:
            assert obs["agentview_image"].shape == (self.image_size, self.image_size, 3)

    def plan(self, obs: dict) -> np.ndarray:
        start = time.monotonic()
        self._check(obs)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.plan_intervals.append((start, time.monotonic()))
        self.plans += 1
        self.partner_seen += int("partner_message" in obs)
        c = self.recipe.execute_steps
        chunk = np.zeros((c, ARM_ACTION_DIM))
        chunk[:, 0] = 0.3 * np.sin(2 * np.pi * self.plans / 8)  # back and forth along the base x axis
        chunk[:, 6] = 1.0 if self.plans % 4 >= 2 else -1.0  # gripper closes and opens every other chunk
        return chunk

    def message(self, obs: dict) -> np.ndarray | None:
        if not self.accepts_message:
            return None
        out = np.zeros(self.message_dim)
        out[0], out[1], out[2] = ARMS.index(self.arm), self.plans, float("partner_message" in obs)
        out[3:] = obs["proprio"][:13]
        return out

    def reset(self) -> None:
        self.resets += 1

    def stats(self) -> dict:
        return {"plans": self.plans, "partner_seen": self.partner_seen, "resets": self.resets,
                "history_rows": self.history_rows}


def constant_chunk_policy(path: str | None, arm: str, recipe, backend: str = "torch") -> ConstantChunkPolicy:
    """Factory with ``load_arm_policy``'s signature; ``path`` carries options as ``key=value;...``
    (image_size, sleep_s, agentview, messages)."""
    options = dict(kv.split("=", 1) for kv in (path or "").split(";") if kv)
    return ConstantChunkPolicy(arm, recipe, image_size=int(options.get("image_size", 64)),
                               sleep_s=float(options.get("sleep_s", 0.0)),
                               agentview=options.get("agentview", "0") in ("1", "true"),
                               messages=options.get("messages", "1") in ("1", "true"))


# ------------------------------------------------------------------------------------- isolated DDS setup
def isolated_ros_env(base: dict | None = None) -> dict:
    """Environment for this test run's ROS 2 processes: a domain of its own (from the pid), loopback only,
    ``tests/`` importable (for the stand-in policy)."""
    env = dict(os.environ if base is None else base)
    env["ROS_DOMAIN_ID"] = str(os.environ.get("COOP_TEST_DOMAIN_ID") or 1 + os.getpid() % 100)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated since Jazzy in favour of the range above
    env["ROS_STATIC_PEERS"] = ""
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def use_isolated_ros_env() -> dict:
    """Apply ``isolated_ros_env`` to this process (before rclpy.init) and return it."""
    env = isolated_ros_env()
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_STATIC_PEERS",
                                           "RMW_IMPLEMENTATION", "PYTHONPATH")})
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    return env


def start_node(module: str, ros_args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``python -m coop_transport.ros.<module> --ros-args ...`` in its own process group, output to ``log``."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", f"coop_transport.ros.{module}", "--ros-args", *ros_args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """SIGINT, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def franky_sim_arms(addresses: dict[str, str], log_dir: Path, listener_name: str, diagnostics_history: bool = False):
    """Simulated FR3 arms (franky-sim, one server per namespace on its loopback address, started together) and a
    started Listener on each arm's ``joint_states`` and ``eef_pose`` and on ``/diagnostics`` (the latest status per
    name, or with ``diagnostics_history`` every stamped message). Yields (sims, listener); closes both on exit,
    after whatever the caller stopped inside the block."""
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import JointState

    from coop_transport.franky_sim import FrankySimServer

    sims = {ns: FrankySimServer(addr, log_dir / f"sim_{ns}.log") for ns, addr in addresses.items()}
    listener = None
    try:
        for sim in sims.values():
            sim.launch()
        for sim in sims.values():
            sim.wait_ready()
        listener = Listener(listener_name)
        for ns in addresses:
            listener.record(JointState, f"/{ns}/joint_states")
            listener.record(PoseStamped, f"/{ns}/eef_pose")
        if diagnostics_history:
            from diagnostic_msgs.msg import DiagnosticArray

            listener.record(DiagnosticArray, "/diagnostics")
        else:
            listener.record_diagnostics()
        listener.start()
        yield sims, listener
    finally:
        if listener is not None:
            listener.close()
        for sim in sims.values():
            sim.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {message}")


# ------------------------------------------------------------------------------ in-process policy node
def spin_with_feeder(context, node, arm: str = "robot0", image_size: int = 32, agentview: bool = False):
    """Spin an in-process policy ``node`` with a feeder node that publishes black frames (wrist, and agentview when
    asked), zero joint states and a fixed eef pose at 20 Hz of wall clock, and records the node's commands.

    Returns (stop, commands): ``commands`` fills with (monotonic time, JointState); ``stop()`` shuts the executor
    down and closes ``node``."""
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    from coop_transport.ros import codec

    feeder = rclpy.create_node("feeder", context=context)
    cameras = ["wrist_camera/image_raw"] + (["agentview/image_raw"] if agentview else [])
    image_pubs = [feeder.create_publisher(Image, topic, qos_profile_sensor_data) for topic in cameras]
    joints_pub = feeder.create_publisher(JointState, "joint_states", 10)
    pose_pub = feeder.create_publisher(PoseStamped, "eef_pose", 10)
    commands = []
    feeder.create_subscription(JointState, "command", lambda m: commands.append((time.monotonic(), m)), 50)
    image = np.zeros((image_size, image_size, 3), np.uint8)
    names = codec.arm_joint_names(arm)

    def feed():
        stamp = feeder.get_clock().now().to_msg()
        for pub in image_pubs:
            pub.publish(codec.image_msg(image, stamp))
        joints_pub.publish(codec.joint_state_msg(names, np.zeros(9), None, stamp))
        pose_pub.publish(codec.pose_msg(np.array([0.5, 0.0, 0.2]), np.array([1.0, 0, 0, 0]), stamp, ""))

    feeder.create_timer(0.05, feed)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(feeder)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()

    def stop():
        executor.shutdown(timeout_sec=2.0)
        thread.join(timeout=2.0)
        node.close()

    return stop, commands


# ------------------------------------------------------------------------------------------ listener node
class Listener:
    """An rclpy node in this process that records messages of the given topics (with receive times) and the
    latest diagnostics status per name; spun in a background thread."""

    def __init__(self, name: str = "test_listener"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.messages: dict[str, list] = defaultdict(list)
        self.diagnostics: dict[str, dict] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def start(self) -> "Listener":
        """Start spinning (create the subscriptions first)."""
        self._thread.start()
        return self

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def record(self, msg_type, topic: str, qos=None) -> None:
        from rclpy.qos import QoSProfile

        def cb(msg, topic=topic):
            with self.lock:
                self.messages[topic].append((time.time(), msg))

        self.node.create_subscription(msg_type, topic, cb, qos or QoSProfile(depth=100))

    def record_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile

        def cb(msg):
            with self.lock:
                for status in msg.status:
                    self.diagnostics[status.name] = {"level": status.level[0], "message": status.message,
                                                     **{kv.key: kv.value for kv in status.values}}

        self.node.create_subscription(DiagnosticArray, "/diagnostics", cb, QoSProfile(depth=50))

    def call(self, srv_type, name: str, request, timeout: float = 10.0):
        """Call a service from this node (the spin thread completes the future)."""
        client = self.node.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {name} not available")
        future = client.call_async(request)
        wait_until(future.done, timeout, message=f"{name} response")
        return future.result()

    def get(self, topic: str) -> list:
        with self.lock:
            return list(self.messages[topic])

    def diag(self, name: str) -> dict:
        with self.lock:
            return dict(self.diagnostics.get(name, {}))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


# ---------------------------------------------------------------------------------- fake franka_ros2 arm
class FakeFranka:
    """What franka_ros2 shows a client of one arm, on real topics in ``namespace``: best-effort ``joint_states``
    (7 arm + 2 finger joints, ``fr3_`` names) and ``franka_robot_state_broadcaster/current_pose`` at 50 Hz; the
    Cartesian impedance controller's ``equilibrium_pose`` input, which the fake pose follows (first order, like a
    stiff impedance controller)."""

    def __init__(self, node, namespace: str, start_pos=(0.5, 0.0, 0.3), follow: float = 0.5,
                 controller: str = "cartesian_impedance_example_controller"):
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState

        best_effort = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.node, self.ns, self.follow = node, namespace.strip("/"), follow
        self.pos = np.array(start_pos, dtype=float)
        self.quat = np.array([1.0, 0.0, 0.0, 0.0])  # xyzw: hand pointing down (x-axis rotation by pi)
        self.q = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
        self.equilibrium: list = []  # received PoseStamped
        self.pub_joints = node.create_publisher(JointState, f"/{self.ns}/joint_states", best_effort)
        self.pub_pose = node.create_publisher(PoseStamped, f"/{self.ns}/franka_robot_state_broadcaster/current_pose",
                                              best_effort)
        node.create_subscription(PoseStamped, f"/{self.ns}/{controller}/equilibrium_pose", self._on_equilibrium,
                                 QoSProfile(depth=50))
        self._JointState, self._PoseStamped = JointState, PoseStamped
        self.timer = node.create_timer(0.02, self._publish)

    def _on_equilibrium(self, msg) -> None:
        self.equilibrium.append(msg)

    def _publish(self) -> None:
        if self.equilibrium:  # follow the latest target
            p = self.equilibrium[-1].pose.position
            self.pos += self.follow * (np.array([p.x, p.y, p.z]) - self.pos)
        stamp = self.node.get_clock().now().to_msg()
        js = self._JointState(name=[f"fr3_joint{i}" for i in range(1, 8)] + ["fr3_finger_joint1", "fr3_finger_joint2"],
                              position=[*map(float, self.q), 0.04, 0.04])
        js.header.stamp = stamp
        self.pub_joints.publish(js)
        pose = self._PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, "fr3_link0"
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = map(float, self.pos)
        o = pose.pose.orientation
        o.x, o.y, o.z, o.w = map(float, self.quat)
        self.pub_pose.publish(pose)
