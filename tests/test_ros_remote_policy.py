"""Remote inference in the simulated stack: the bringup starts the sim bridge and both policy nodes with
``policy_server:=host:port`` (the same graph as sim.launch.py), a policy server serves the shipped default, and the
arms move under it in lockstep on simulated time. Killing the server mid-episode trips both nodes' watchdogs (the
arms hold: zero deltas, gripper kept) while the simulation goes on; restarting it on the same port resumes them."""

import time

import numpy as np
import pytest

from ros_helpers import Listener, use_isolated_ros_env, wait_until

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
