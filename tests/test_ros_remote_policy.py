"""Remote inference in the simulated stack: the bringup starts the sim bridge and both policy nodes with
``policy_server:=host:port`` (the same graph as sim.launch.py), a policy server serves the shipped default, and the
arms move under it in lockstep on simulated time. Killing the server mid-episode trips both nodes' watchdogs (the
arms hold: zero deltas, gripper kept) while the simulation goes on; restarting it on the same port resumes them."""

import time

import numpy as np
import pytest

from ros_helpers import Listener, spin_with_feeder, use_isolated_ros_env, wait_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def _is_hold(cmd) -> bool:
    return not np.any(np.asarray(cmd.position[:6]))


def test_nodes_hold_when_the_policy_server_dies_and_resume_when_it_returns(tmp_path):
    from sensor_msgs.msg import JointState

    from coop_transport.bringup import Bringup
    from coop_transport.ros import graph
    from coop_transport.serving.server import ServerProcess

    env = use_isolated_ros_env()
    server = ServerProcess(("--threads", "1"), log_path=tmp_path / "server.log", env=env).start()
    restarted = None
    listener = Listener()
    for ns in ("left", "right"):
        listener.record(JointState, f"/{ns}/command")
    listener.record_diagnostics()
    listener.start()
    bringup = Bringup(graph.build_graph("sim", {"policy_server": server.address, "horizon": "400",
                                                "use_sim_time": "true", "policy_server_timeout": "1.0"}),
                      env=env, log_dir=tmp_path / "logs")
    bringup.start()
    diag = lambda ns: listener.diag(f"coop_transport/policy/{ns}")  # noqa: E731
    commands = lambda ns, since=0.0: [m for t, m in listener.get(f"/{ns}/command") if t > since]  # noqa: E731
    moving = lambda ns, since=0.0: sum(not _is_hold(m) for m in commands(ns, since))  # noqa: E731
    try:
        wait_until(lambda: moving("left") >= 10 and moving("right") >= 10, 240, interval=0.2,
                   message="both arms to move under the served policy")
        assert diag("left").get("policy_server") == server.address

        server.kill()  # a crash: no close handshake
        for ns in ("left", "right"):
            wait_until(lambda: int(diag(ns).get("watchdog_trips", 0)) >= 1, 60, interval=0.2,
                       message=f"the {ns} node's watchdog to trip")
        tick = int(listener.diag("coop_transport/sim_bridge").get("tick", 0))
        n = len(commands("left"))
        wait_until(lambda: len(commands("left")) >= n + 20, 60, interval=0.2, message="20 more left commands")
        held = commands("left")[n:]
        assert all(_is_hold(m) for m in held), "zero deltas while the server is gone"
        assert len({m.position[6] for m in held}) == 1, "the gripper command is kept"
        d = diag("left")
        assert d["state"] == "ERROR" and "policy server" in d["message"], d
        assert int(d["server_errors"]) >= 1
        assert int(listener.diag("coop_transport/sim_bridge")["tick"]) > tick, "the simulation goes on, held"

        restarted_at = time.time()
        restarted = ServerProcess(("--threads", "1"), port=server.port, log_path=tmp_path / "server2.log",
                                  env=env).start()
        wait_until(lambda: moving("left", restarted_at) >= 5 and moving("right", restarted_at) >= 5, 120,
                   interval=0.2, message="both arms to resume once the server is back")
        for ns in ("left", "right"):
            wait_until(lambda: int(diag(ns).get("server_recoveries", 0)) >= 1, 10, interval=0.2)
        for name, proc in bringup.processes.items():
            assert proc.poll() is None, f"{name} exited"
    finally:
        bringup.stop(grace_s=5.0)
        listener.close()
        server.stop()
        if restarted is not None:
            restarted.stop()
    for ns in ("left", "right"):
        log = (tmp_path / "logs" / f"{ns}__policy_node.log").read_text()
        assert "Traceback" not in log and "policy server lost" in log and "answers again" in log, log[-3000:]


class SteadyChunkRunner:
    """Development stand-in for a served model (tests only): the per-arm request schema at 32 px, answered after
    ``delay`` s with a constant chunk (dx = 0.2), so a slow server can be made on demand."""

    def __init__(self):
        from coop_transport.serving.protocol import ObservationSchema

        self.schema = ObservationSchema("per-arm", ("wrist", "agentview"), 32, 18, 16, 7, 8, ("robot0", "robot1"))
        self.description = "steady stand-in"
        self.delay = 0.0

    def metadata(self) -> dict:
        return {"variant": "per-arm", "image_size": 32, "horizon": 16, "action_dim": 7, "action_pad_dim": 8,
                "arms": ["robot0", "robot1"], "action_mean": [0.0] * 7, "action_std": [1.0] * 7,
                **self.schema.describe()}

    def run(self, requests):
        time.sleep(self.delay)
        out = []
        for r in requests:
            chunk = np.zeros((r.num_samples, 16, 7), np.float32)
            chunk[..., 0] = 0.2
            out.append(chunk)
        return out


def test_a_slow_server_trips_the_watchdog_and_the_node_resumes_when_it_answers_again():
    """In-process policy node on wall time in remote mode, fed 32 px frames at 20 Hz; the server's model becomes
    slower than policy_server_timeout, then fast again."""
    use_isolated_ros_env()
    import rclpy
    from rclpy.parameter import Parameter

    from coop_transport.ros.policy_node import PolicyNode
    from coop_transport.serving.server import PolicyServer, ServerConfig

    runner = SteadyChunkRunner()
    server = PolicyServer(runner, ServerConfig(port=0)).start()
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter("arm", value="robot0"), Parameter("policy_server", value=f"127.0.0.1:{server.port}"),
            Parameter("policy_server_timeout", value=0.5), Parameter("chunk_length", value=4),
            Parameter("num_samples", value=2)])
        stop, commands = spin_with_feeder(context, node, agentview=True)
        moves_since = lambda t0: sum(not _is_hold(m) for t, m in commands if t > t0)  # noqa: E731
        wait_until(lambda: moves_since(0) >= 10, 30, message="commands from the served chunks")

        trips = node.counts["watchdog_trips"]  # a loaded machine may already have tripped on a late first frame
        runner.delay = 1.5  # slower than policy_server_timeout
        wait_until(lambda: node.counts["watchdog_trips"] > trips, 20, message="a watchdog trip")
        tripped = time.monotonic()
        time.sleep(1.0)
        assert moves_since(tripped) == 0, "the arm holds while the server is too slow"
        assert "policy server" in node._state[1] and node.counts["server_errors"] >= 1

        runner.delay = 0.0
        back = time.monotonic()
        wait_until(lambda: moves_since(back) >= 5, 30, message="commands once the server is fast again")
        assert node.policy.policy.counters["timeouts"] >= 1 and node.policy.policy.counters["connects"] >= 2
        stop()
    finally:
        context.try_shutdown()
        server.stop()
