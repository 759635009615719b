"""End-to-end latency and missed control ticks of the two policy nodes over real DDS between processes.

Usage: ``python bench/ros_latency.py [--steps 500] [--image-size 96] [--left-policy CKPT] [--right-policy CKPT]``
(development stand-in policy: ``PYTHONPATH=tests python bench/ros_latency.py --policy-factory
ros_helpers:constant_chunk_policy --left-policy image_size=96 --right-policy image_size=96 --no-agentview``).

What runs: a replay node (``coop_transport.ros.replay_node``) publishes recorded wrist (and agentview) frames, joint
states and eef poses of both arms at 20 Hz of wall clock, stamped when published; both policy nodes run exactly as
``sim.launch.py use_sim_time:=false`` configures them (the same graph, with the replay node in the bridge's place);
this process listens. The frames are rendered once from the scripted expert and cached (``--frames``).

Figures (per arm):
- end-to-end latency: from a camera image's stamp to the arrival here of the first command computed from it. Each
  chunk is published on ``plan`` with the image stamp in its header and its first command's tick as
  ``points[0].time_from_start``; the command with that stamp is the one matched. Includes inference, waiting for the
  next 20 Hz tick (up to 50 ms) and two DDS hops;
- inference latency (the policy node's own median, from /diagnostics);
- missed ticks: 50 ms slots without a command, from the command stamps while frames were replayed; overruns (chunk
  used up before the next was ready) and watchdog trips from the nodes' diagnostics.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Args:
    steps: int = 500
    """Control steps (20 Hz frames) to replay: 500 = one full-horizon episode."""
    image_size: int = 96
    """Camera resolution of the recorded frames (the policies' image size)."""
    agentview: bool = True
    """Record and replay the agentview camera too (policies that use it)."""
    frames: Path | None = None
    """Recorded frames (npz); rendered from the scripted expert when missing. Default: runs/ros_latency/."""
    policy_factory: str = "coop_transport.deploy:load_arm_policy"
    """'module:function' that loads each arm's policy."""
    left_policy: str = ""
    """Checkpoint of robot0's policy (empty = the shipped default)."""
    right_policy: str = ""
    """Checkpoint of robot1's policy (empty = the shipped default)."""
    chunk_length: str = ""
    """Recipe C (empty = config default)."""
    num_samples: str = ""
    """Recipe N (empty = config default)."""
    clip_sigma: str = ""
    """Recipe k (empty = config default)."""
    backend: str = ""
    """Inference backend of both policy nodes (empty = config: torch; onnx needs an export next to the checkpoint,
    or one named by the node's export_dir: python export/export.py --out <checkpoint>/export)."""
    out: Path | None = None
    """Write the figures as JSON here."""
    log_dir: Path | None = None
    """Keep the nodes' logs here (default: a temporary directory)."""


def frames_file(args: Args) -> Path:
    if args.frames is not None:
        return args.frames
    return REPO / "runs" / "ros_latency" / f"frames_{args.image_size}{'_agentview' if args.agentview else ''}.npz"


def ensure_frames(args: Args) -> Path:
    path = frames_file(args)
    if path.exists():
        return path
    from coop_transport.ros.replay_node import record_frames, save_frames

    steps = min(args.steps, 500)
    print(f"rendering {steps} frames at {args.image_size}px into {path} (software rendering: minutes) ...", flush=True)
    t0 = time.perf_counter()
    frames = record_frames(steps, args.image_size, args.agentview)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_frames(path, frames)
    print(f"rendered in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


class Probe:
    """Listens to commands, plans and diagnostics of both arms; keeps stamps and receive times only."""

    def __init__(self, namespaces: list[str]):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image, JointState
        from trajectory_msgs.msg import JointTrajectory

        from coop_transport.ros import codec

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("latency_probe", context=self.context)
        self.commands = {ns: [] for ns in namespaces}  # (receive time, stamp)
        self.plans = {ns: [] for ns in namespaces}  # (image stamp, first command stamp)
        self.images = {ns: [] for ns in namespaces}  # image stamps (the replay window)
        self.namespaces = namespaces
        self.diagnostics: list[tuple[float, str, dict]] = []  # (receive time, status name, values)
        qos = QoSProfile(depth=100)
        for ns in namespaces:
            self.node.create_subscription(
                JointState, f"/{ns}/command",
                lambda m, ns=ns: self.commands[ns].append((time.time(), codec.to_sec(m.header.stamp))), qos)
            self.node.create_subscription(
                JointTrajectory, f"/{ns}/plan",
                lambda m, ns=ns: self.plans[ns].append(
                    (codec.to_sec(m.header.stamp),
                     codec.to_sec(m.header.stamp) + codec.duration_sec(m.points[0].time_from_start))), qos)

        def on_diag(msg):
            for s in msg.status:
                self.diagnostics.append((time.time(), s.name, {kv.key: kv.value for kv in s.values}))

        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, QoSProfile(depth=50))
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def watch_images(self, timeout: float = 180.0) -> None:
        """Once both policy nodes' commands reach this node, subscribe to the cameras: the replay node waits for
        these subscriptions, so no command of the replay window is published before this node listens."""
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from coop_transport.ros import codec

        deadline = time.monotonic() + timeout
        while not all(self.commands[ns] for ns in self.namespaces):
            if time.monotonic() > deadline:
                raise TimeoutError("no commands from the policy nodes")
            time.sleep(0.05)
        for ns in self.namespaces:
            self.node.create_subscription(
                Image, f"/{ns}/wrist_camera/image_raw",
                lambda m, ns=ns: self.images[ns].append(codec.to_sec(m.header.stamp)), qos_profile_sensor_data)

    def _spin(self):
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


def analyse(probe: Probe, ns: str, dt: float) -> dict:
    """Figures of one arm over the replay window (first to last replayed image, plus one tick)."""
    start, end = min(probe.images[ns]), max(probe.images[ns]) + dt
    commands = sorted((c for c in probe.commands[ns] if start <= c[1] <= end), key=lambda c: c[1])
    by_stamp = {round(stamp, 6): recv for recv, stamp in commands}
    e2e = [by_stamp[round(first, 6)] - image for image, first in probe.plans[ns] if round(first, 6) in by_stamp]
    stamps = np.array([start] + [s for _, s in commands] + [end])
    gaps = np.diff(stamps)
    missed = int(sum(round(g / dt) - 1 for g in gaps if g > 1.5 * dt))
    # the node's counters as of the end of the replay (before its watchdog trips on the silence after it)
    snapshots = [d for t, name, d in probe.diagnostics if name.endswith(f"/policy/{ns}") and t <= end + 0.2]
    diag = snapshots[-1] if snapshots else {}
    pct = lambda a, q: float(np.percentile(a, q) * 1e3) if len(a) else float("nan")  # noqa: E731
    return {"frames": len(probe.images[ns]), "commands": len(commands), "chunks_matched": len(e2e),
            "e2e_ms_median": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99), "e2e_ms_max": pct(e2e, 100),
            "tick_interval_ms_p99": pct(gaps, 99), "missed_ticks": missed,
            "long_gaps": [[round(float(t - start), 3), round(float(g) * 1e3, 1)]
                          for t, g in zip(stamps[1:], gaps) if g > 1.5 * dt],  # (s into the replay, gap ms)
            "inference_ms_median": float(diag.get("inference_ms_median", "nan")),
            "overruns": int(diag.get("overruns", -1)), "watchdog_trips": int(diag.get("watchdog_trips", -1)),
            "holds": int(diag.get("holds", -1))}


def main(args: Args) -> dict:
    sys.path.insert(0, str(REPO / "tests"))  # so that a development factory from tests/ resolves here too
    from coop_transport.bringup import Bringup
    from coop_transport.constants import ARMS, CONTROL_FREQ
    from coop_transport.ros import graph
    from coop_transport.ros.graph import Graph, NodeSpec

    frames = ensure_frames(args)
    overrides = {"use_sim_time": "false", "policy_factory": args.policy_factory, "left_policy": args.left_policy,
                 "right_policy": args.right_policy, "chunk_length": args.chunk_length,
                 "num_samples": args.num_samples, "clip_sigma": args.clip_sigma,
                 "inference_backend": args.backend}
    sim_graph = graph.build_graph("sim", overrides)
    namespaces = sim_graph.nodes[0].parameters["arm_namespaces"]
    replay = NodeSpec(name="replay", executable="replay_node", module="coop_transport.ros.replay_node",
                      parameters={"frames_path": str(frames), "steps": args.steps, "arm_namespaces": namespaces,
                                  "min_subscribers": 2},  # each arm's policy node and this process
                      required=True)
    policies = tuple(replace(n, required=False, parameters={**n.parameters, "diagnostics_period": 0.2})
                     for n in sim_graph.nodes if n.executable == "policy_node")
    bench_graph = Graph("bench", (replay,) + policies, arguments=sim_graph.arguments)

    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH", "")) if p)
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")})
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="ros_latency_"))
    probe = Probe(namespaces)
    bringup = Bringup(bench_graph, env=env, log_dir=log_dir)
    t0 = time.perf_counter()
    bringup.start()
    try:
        probe.watch_images()
        code = bringup.wait()
        time.sleep(0.3)  # the last commands
    finally:
        bringup.stop()
        probe.close()
    if code != 0:
        raise SystemExit(f"the replay node exited with {code}; logs in {log_dir}")
    dt = 1.0 / CONTROL_FREQ
    results = {"steps": args.steps, "image_size": args.image_size, "policy_factory": args.policy_factory,
               "wall_s": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(),
               "arms": {ns: analyse(probe, ns, dt) for ns in namespaces}}
    print(f"{'arm':<6} {'frames':>6} {'cmds':>5} {'e2e median':>11} {'e2e p99':>8} {'inference':>10} {'missed':>7} "
          f"{'overruns':>9} {'watchdog':>9}")
    for ns, r in results["arms"].items():
        print(f"{ns:<6} {r['frames']:>6} {r['commands']:>5} {r['e2e_ms_median']:>8.1f} ms {r['e2e_ms_p99']:>5.1f} ms "
              f"{r['inference_ms_median']:>7.1f} ms {r['missed_ticks']:>7} {r['overruns']:>9} {r['watchdog_trips']:>9}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    assert len(ARMS) == len(namespaces)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
