"""The libfranka backend's control loop for two arms: command and state rates, command-to-motion latency, tracking
error after settling and missed 20 Hz ticks, against two simulated FR3 arms speaking the real Franka protocol.

Usage: ``python bench/franka_loop.py [--trials 10] [--follow-s 20]`` (needs ``.venv-franky-sim``, see setup.sh).

What runs: two franky-sim servers (127.0.0.1, 127.0.0.2; separate processes in their own environment), the two
Franka bridges of ``franka.launch.py backend:=libfranka`` (the graph's own node specs, with the simulators'
addresses, ``realtime:=false`` and a workspace box around franky-sim's home pose), and this process, which plays
the policies: it publishes each arm's command at 20 Hz and listens to joint_states, eef_pose and diagnostics.

Phases and figures (per arm):
1. following (``--follow-s``): a sinusoidal x command on both arms at 20 Hz. Command rate = commands the bridge
   integrated per second (its diagnostics); state rate = joint_states received here per second; missed ticks = the
   bridge's ``late_commands`` (gaps of more than 1.5 ticks between commands it received) plus ticks this
   publisher itself fell more than half a tick behind on.
2. steps (``--trials``): from rest, ``--step-ticks`` ticks of ``--step-command`` along x (alternating sign), then
   zero commands for ``--settle-s``. Latency = from publishing the first step command to the first eef_pose (stamped
   when the bridge read the robot state, at ``state_rate`` = 50 Hz) more than ``--onset-m`` from the rest pose; it
   includes DDS, the bridge, the generator's jerk-limited start (with the default 50 m/s^3 a start from rest needs
   (6 x onset / jerk)^(1/3) = 29 ms to cover 0.2 mm) and the state sampling. Tracking error = distance between the
   commanded displacement and the measured one after settling.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
ADDRESSES = {"left": "127.0.0.1", "right": "127.0.0.2"}
POS_SCALE = 0.05  # m per unit command per tick (the bridges' default pos_scale)
DT = 0.05  # s, the 20 Hz tick


@dataclass(frozen=True)
class Args:
    trials: int = 10
    """Step trials per arm (both arms step at the same time)."""
    step_ticks: int = 10
    """Ticks of each step command."""
    step_command: float = 0.08
    """Command along x during a step (0.08 = 4 mm per tick = 0.08 m/s, under the 0.1 m/s limit)."""
    settle_s: float = 1.5
    """Zero commands after each step before the tracking error is read."""
    onset_m: float = 0.0002
    """Displacement (m) that counts as motion for the latency."""
    follow_s: float = 20.0
    """Duration of the following phase."""
    log_dir: Path | None = None
    """Where node and simulator logs go (default: a temporary directory)."""


class CommandPublisher:
    """Publishes each arm's current command at 20 Hz on an absolute schedule (a thread of its own)."""

    def __init__(self, node, namespaces):
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import JointState

        self.node = node
        self.pubs = {ns: node.create_publisher(JointState, f"/{ns}/command", QoSProfile(depth=10)) for ns in namespaces}
        self.command = {ns: np.array([0, 0, 0, 0, 0, 0, -1.0]) for ns in namespaces}
        self.published: dict[str, list[tuple[float, np.ndarray]]] = {ns: [] for ns in namespaces}
        self.late_ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        from coop_transport.ros import codec

        next_tick = time.monotonic()
        while not self._stop.is_set():
            for ns, pub in self.pubs.items():
                command = self.command[ns].copy()
                pub.publish(codec.command_msg(command, self.node.get_clock().now().to_msg()))
                self.published[ns].append((time.time(), command))
            next_tick += DT
            delay = next_tick - time.monotonic()
            if delay < -DT / 2:
                self.late_ticks += int(-delay // DT) + 1
                next_tick = time.monotonic() + DT
            else:
                time.sleep(max(0.0, delay))

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2.0)


def bridge_graph(log_dir: Path):
    """The libfranka franka graph's two bridges, pointed at the simulators."""
    from coop_transport.ros import graph as graph_mod

    full = graph_mod.build_graph("franka", {"backend": "libfranka", "cameras": "none",
                                            "left_robot_ip": ADDRESSES["left"], "right_robot_ip": ADDRESSES["right"]})
    bridges = []
    for spec in full.nodes:
        if spec.name != "franka_bridge":
            continue
        params = dict(spec.parameters, realtime=False, workspace_min=[0.30, -0.30, 0.10],
                      workspace_max=[0.75, 0.30, 0.65])
        bridges.append(replace(spec, parameters=params))
    return replace(full, nodes=tuple(bridges), includes=())


def main(args: Args) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from ros_helpers import franky_sim_arms, use_isolated_ros_env, wait_until
    from std_srvs.srv import SetBool

    from coop_transport.bringup import Bringup
    from coop_transport.ros import codec

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="franka_loop_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = use_isolated_ros_env()
    with franky_sim_arms(ADDRESSES, log_dir, "franka_loop_bench", diagnostics_history=True) as (sims, listener):
        bringup, publisher = None, None
        try:
            bringup = Bringup(bridge_graph(log_dir), env=env, log_dir=log_dir)
            bringup.start()
            wait_until(lambda: all(listener.get(f"/{ns}/eef_pose") for ns in ADDRESSES), 60, message="robot state")
            for ns in ADDRESSES:
                response = listener.call(SetBool, f"/{ns}/enable", SetBool.Request(data=True))
                if not response.success:
                    raise RuntimeError(f"{ns}: {response.message}")

            def position(ns, msg=None):
                p = (msg or listener.get(f"/{ns}/eef_pose")[-1][1]).pose.position
                return np.array([p.x, p.y, p.z])

            publisher = CommandPublisher(listener.node, list(ADDRESSES)).start()
            results = {ns: {} for ns in ADDRESSES}

            # ---- 1. following: rates and missed ticks
            time.sleep(1.5)  # the first diagnostics with fresh commands
            t0 = time.time()
            late0 = publisher.late_ticks
            while time.time() - t0 < args.follow_s:
                phase = 2 * np.pi * (time.time() - t0) / 4.0
                for ns in ADDRESSES:
                    publisher.command[ns] = np.array([0.06 * np.sin(phase), 0, 0, 0, 0, 0, -1.0])
                time.sleep(0.01)
            t1 = time.time()
            for ns in ADDRESSES:
                publisher.command[ns] = np.array([0, 0, 0, 0, 0, 0, -1.0])
            for ns in ADDRESSES:
                # the bridge's counters between its first diagnostics after t0 and its last before t1 (1 Hz, stamped)
                name = f"coop_transport/franka_bridge/{ns}"
                snapshots = [(codec.to_sec(m.header.stamp), {kv.key: kv.value for kv in st.values})
                             for _, m in listener.get("/diagnostics") for st in m.status
                             if st.name == name and t0 <= codec.to_sec(m.header.stamp) <= t1]
                (s0, first), (s1, last) = snapshots[0], snapshots[-1]
                states = [t for t, _ in listener.get(f"/{ns}/joint_states") if t0 <= t <= t1]
                results[ns].update({
                    "command_hz": (int(last["integrated"]) - int(first["integrated"])) / (s1 - s0),
                    "state_hz": len(states) / (t1 - t0),
                    "missed_ticks": (int(last["late_commands"]) - int(first["late_commands"])
                                     + publisher.late_ticks - late0),
                    "ticks": int(round((s1 - s0) / DT))})

            # ---- 2. steps: latency and tracking error after settling
            time.sleep(args.settle_s)  # the arms come to rest after following
            latencies = {ns: [] for ns in ADDRESSES}
            errors = {ns: [] for ns in ADDRESSES}
            for trial in range(args.trials):
                sign = 1.0 if trial % 2 == 0 else -1.0
                rest = {ns: position(ns) for ns in ADDRESSES}
                t_start = time.time()
                for ns in ADDRESSES:
                    publisher.command[ns] = np.array([sign * args.step_command, 0, 0, 0, 0, 0, -1.0])
                time.sleep(args.step_ticks * DT - DT / 2)
                for ns in ADDRESSES:
                    publisher.command[ns] = np.array([0, 0, 0, 0, 0, 0, -1.0])
                time.sleep(args.settle_s)
                for ns in ADDRESSES:
                    sent = [t for t, c in publisher.published[ns] if t >= t_start and c[0] != 0.0]
                    expected = np.array([sign * args.step_command * POS_SCALE * len(sent), 0, 0])
                    errors[ns].append(float(np.linalg.norm(position(ns) - rest[ns] - expected)))
                    moved = [codec.to_sec(m.header.stamp) for _, m in listener.get(f"/{ns}/eef_pose")
                             if codec.to_sec(m.header.stamp) >= sent[0]
                             and np.linalg.norm(position(ns, m) - rest[ns]) > args.onset_m]
                    latencies[ns].append(moved[0] - sent[0])
            print("tracking errors after settling (mm):",
                  {ns: [round(e * 1000, 2) for e in errs] for ns, errs in errors.items()}, flush=True)
            for ns in ADDRESSES:
                lat = np.array(latencies[ns]) * 1000
                results[ns].update({"latency_ms_median": float(np.median(lat)),
                                    "latency_ms_p99": float(np.percentile(lat, 99)),
                                    "tracking_mm_median": float(np.median(errors[ns]) * 1000),
                                    "tracking_mm_max": float(np.max(errors[ns]) * 1000)})
        finally:
            if publisher is not None:
                publisher.stop()
            if bringup is not None:
                bringup.stop()

    print(f"\nTwo simulated FR3 arms (franky-sim, MuJoCo) through the libfranka bridge; {args.follow_s:.0f} s "
          "following, "
          f"{args.trials} steps of {args.step_ticks} x {args.step_command * POS_SCALE * 1000:.0f} mm per arm; "
          f"logs in {log_dir}\n")
    print("| arm | command rate (Hz) | state rate (Hz) | latency median (ms) | latency p99 (ms) "
          "| tracking after settling, median / max (mm) | missed 20 Hz ticks |")
    print("|---|---|---|---|---|---|---|")
    for ns, r in results.items():
        print(f"| {ns} | {r['command_hz']:.1f} | {r['state_hz']:.1f} | {r['latency_ms_median']:.0f} | "
              f"{r['latency_ms_p99']:.0f} | {r['tracking_mm_median']:.2f} / {r['tracking_mm_max']:.2f} | "
              f"{r['missed_ticks']} of {r['ticks']} |")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
