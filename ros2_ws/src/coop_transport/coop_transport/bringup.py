"""Start a profile's node graph as separate processes, where ``ros2 launch`` is unavailable (pip-only installs, CI).

Usage: ``python -m coop_transport.bringup sim [--episodes N] [--log-dir DIR] [name:=value ...]``
(``python -m coop_transport.bringup sim --list`` prints the launch arguments; ``--dry-run`` the commands).

It reads the same declarative graph as ``launch/sim.launch.py`` (``coop_transport.ros.graph``) and starts each node
of this package as ``python -m coop_transport.ros.<node> --ros-args -r __node:=NAME -r __ns:=/NS --params-file
config/<profile>.yaml --params-file <overrides> -r from:=to ...``, where the overrides file holds the graph's typed
parameters under the node's full name (as launch_ros writes dict parameters). Nodes of other packages (franka_ros2,
camera drivers) are listed, not started. SIGINT/SIGTERM are forwarded to every node; when a required node exits
(the sim bridge after ``--episodes N``), the others are stopped (SIGINT, then SIGTERM, then SIGKILL).

The ament index: ``AMENT_PREFIX_PATH`` is extended so that the nodes resolve this package's share/ directory even
from an editable install (see ``coop_transport.ros.paths``). This module does not import rclpy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coop_transport.ros import graph as graph_mod
from coop_transport.ros.graph import Graph, NodeSpec

STOP_GRACE_S = 10.0


def node_command(spec: NodeSpec, overrides_file: str | None) -> list[str]:
    """The command line that starts ``spec`` (a node of this package) as its own process."""
    if spec.module is None:
        raise ValueError(f"{spec.package}/{spec.executable} is not a node of this package")
    cmd = [sys.executable, "-m", spec.module, *spec.arguments, "--ros-args", "-r", f"__node:={spec.name}"]
    if spec.namespace:
        cmd += ["-r", f"__ns:=/{spec.namespace.strip('/')}"]
    for path in spec.params_files:
        cmd += ["--params-file", path]
    if overrides_file:
        cmd += ["--params-file", overrides_file]
    for src, dst in spec.remappings:
        cmd += ["-r", f"{src}:={dst}"]
    cmd += list(spec.ros_arguments)
    return cmd


def overrides_yaml(spec: NodeSpec) -> str:
    """The graph's parameters of ``spec`` as a ROS parameter file (JSON is valid YAML), keyed by full name."""
    return json.dumps({spec.full_name: {"ros__parameters": spec.parameters}}, indent=1)


class Bringup:
    """The processes of one graph: start, watch, stop."""

    def __init__(self, graph: Graph, env: dict | None = None, log_dir: Path | None = None):
        self.graph = graph
        self.env, self._overlay = _ament_env(env)
        self.log_dir = Path(log_dir) if log_dir else None
        self._tmp = Path(tempfile.mkdtemp(prefix="coop_transport_bringup_"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, NodeSpec] = {}
        self.commands: dict[str, list[str]] = {}
        for spec in graph.own_nodes:
            overrides = None
            if spec.parameters:
                path = self._tmp / (spec.full_name.strip("/").replace("/", "__") + ".yaml")
                path.write_text(overrides_yaml(spec))
                overrides = str(path)
            self.specs[spec.full_name] = spec
            self.commands[spec.full_name] = node_command(spec, overrides)
        self._stopping = False

    @property
    def external_nodes(self) -> list[NodeSpec]:
        return [n for n in self.graph.nodes if n.module is None]

    def start(self) -> None:
        for name, cmd in self.commands.items():
            out = None
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / (name.strip("/").replace("/", "__") + ".log"), "w")
            # Own process group: a terminal's Ctrl-C reaches the bringup only, which forwards it once.
            self.processes[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT
                                                    if out else None, start_new_session=True)

    def wait(self, poll_s: float = 0.1) -> int:
        """Block until a required node exits or ``stop()`` is called; returns the first required exit code."""
        reported: set[str] = set()
        while not self._stopping:
            for name, proc in self.processes.items():
                code = proc.poll()
                if code is None or name in reported:
                    continue
                reported.add(name)
                if self.specs[name].required:
                    print(f"[bringup] required node {name} exited with {code}: shutting down", flush=True)
                    return code
                print(f"[bringup] node {name} exited with {code}; the rest keeps running", flush=True)
            time.sleep(poll_s)
        return 0

    def signal_all(self, sig: int) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGINT every node, then SIGTERM and SIGKILL what is still running after ``grace_s`` each."""
        self._stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self.signal_all(sig)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in self.processes.values()):
                time.sleep(0.05)
            if all(p.poll() is not None for p in self.processes.values()):
                break
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._overlay is not None:
            shutil.rmtree(self._overlay, ignore_errors=True)


def _ament_env(env: dict | None) -> tuple[dict, Path | None]:
    from coop_transport.ros.paths import ament_environment

    return ament_environment(dict(os.environ if env is None else env))


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            raise SystemExit(f"arguments look like name:=value, got {item!r}")
        out[name] = value
    return out


def print_outcomes(path: Path) -> list[dict]:
    outcomes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for o in outcomes:
        print(f"episode {o['episode']:>3}  seed {o['seed']:>4}  {o['outcome']:<8} success={o['success']!s:<5}  "
              f"steps {o['length']:>3}  holds {o['holds']}  wall {o['wall_s']:.1f} s")
    if outcomes:
        from coop_transport.utils.stats import wilson_interval

        k = sum(o["success"] for o in outcomes)
        lo, hi = wilson_interval(k, len(outcomes))
        print(f"success {k}/{len(outcomes)} (Wilson 95% CI {lo:.2f}-{hi:.2f})")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coop_transport.bringup", description=__doc__.split("\n")[0])
    parser.add_argument("profile", choices=graph_mod.PROFILES)
    parser.add_argument("arguments", nargs="*", help="launch arguments as name:=value")
    parser.add_argument("--episodes", type=int, default=0, help="stop after N episodes and print their outcomes")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each node's output to DIR/<node>.log")
    parser.add_argument("--list", action="store_true", help="print the launch arguments and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the node commands and exit")
    args = parser.parse_intermixed_args(argv)

    if args.list:
        for a in graph_mod.launch_arguments(args.profile):
            print(f"{a.name}:={a.default!r}\n    {a.description}")
        return 0
    overrides = parse_overrides(args.arguments)
    results, own_results = None, False
    if args.episodes:
        if args.profile != "sim":
            raise SystemExit("--episodes applies to the sim profile")
        overrides["max_episodes"] = str(args.episodes)
        if not overrides.get("results_path"):
            results = Path(tempfile.mkdtemp(prefix="coop_transport_episodes_")) / "episodes.jsonl"
            overrides["results_path"] = str(results)
            own_results = True
        else:
            results = Path(overrides["results_path"])
    graph = graph_mod.build_graph(args.profile, overrides)
    bringup = Bringup(graph, log_dir=args.log_dir)
    for spec in bringup.external_nodes:
        print(f"[bringup] not started (another package, needs a ROS 2 install): {spec.package}/{spec.executable} "
              f"in /{spec.namespace}", flush=True)
    for inc in graph.includes:
        print(f"[bringup] not started (needs a ROS 2 install): {inc.package}/{inc.launch_file} {inc.arguments}",
              flush=True)
    if args.dry_run:
        for cmd in bringup.commands.values():
            print(" ".join(cmd))
        bringup.stop(0)
        return 0

    def forward(signum, _frame):
        print(f"[bringup] {signal.Signals(signum).name}: stopping all nodes", flush=True)
        bringup._stopping = True

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    bringup.start()
    print(f"[bringup] started {len(bringup.processes)} nodes: {', '.join(bringup.processes)}", flush=True)
    code = bringup.wait()
    bringup.stop()
    if results is not None:
        outcomes = print_outcomes(results)
        if own_results:
            shutil.rmtree(results.parent, ignore_errors=True)
        if len(outcomes) < args.episodes:
            print(f"[bringup] only {len(outcomes)} of {args.episodes} episodes finished", flush=True)
            code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
