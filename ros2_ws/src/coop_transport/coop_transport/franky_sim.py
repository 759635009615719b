"""Simulated FR3 arms that speak the real Franka protocol (``franky-sim``), for the libfranka backend's tests and bench.

Usage: ``python -m coop_transport.franky_sim --hostname 127.0.0.2`` (Ctrl+C stops it).

franky-sim (PyPI) serves one FR3 with the Franka Hand on a loopback address (TCP 1337 arm, 1338 gripper, plus UDP),
simulated in MuJoCo 4. It needs mujoco 4 and Pinocchio, which conflict with robosuite's mujoco 3.3.7, so it lives
in a virtual environment of its own (``.venv-franky-sim`` at the repository root, created by ``setup.sh`` from
``requirements-franky-sim.txt``; ``COOP_FRANKY_SIM_VENV`` points elsewhere) and runs as its own process, one per arm.
``-s mujoco`` is required: franky-sim 1.0.4's automatic simulator choice crashes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]  # the repository root (editable install / source tree)
ARM_PORT, GRIPPER_PORT = 1337, 1338
READY_LINE = "Connect to the server using"  # franky-sim prints it once both servers listen


def franky_sim_executable() -> Path:
    """The ``franky-sim`` command of its own environment; FileNotFoundError says how to create it."""
    venv = Path(os.environ.get("COOP_FRANKY_SIM_VENV") or REPO / ".venv-franky-sim")
    exe = venv / "bin" / "franky-sim"
    if not exe.exists():
        raise FileNotFoundError(
            f"franky-sim is not installed in {venv}: run ./setup.sh, or python3 -m venv {venv} && "
            f"{venv}/bin/pip install -r {REPO / 'requirements-franky-sim.txt'}")
    return exe


def port_in_use(hostname: str, port: int) -> bool:
    """Whether something already listens on (hostname, port): binding fails then. SO_REUSEADDR: connections of a
    server that just stopped (TIME_WAIT) do not count, as they do not stop a new server from listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((hostname, port))
        except OSError:
            return True
    return False


class FrankySimServer:
    """One simulated arm on ``hostname`` (a loopback address), as a child process in its own process group."""

    def __init__(self, hostname: str, log_path: str | Path, start_timeout: float = 90.0):
        if not hostname.startswith("127."):
            raise ValueError(f"franky-sim servers here listen on loopback addresses only, got {hostname!r}")
        self.hostname, self.log_path, self.start_timeout = hostname, Path(log_path), start_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> "FrankySimServer":
        return self.launch().wait_ready()

    def launch(self) -> "FrankySimServer":
        """Start the process without waiting (start several, then ``wait_ready`` each)."""
        for port in (ARM_PORT, GRIPPER_PORT):
            if port_in_use(self.hostname, port):
                raise RuntimeError(f"{self.hostname}:{port} is already in use (another franky-sim or robot server?)")
        exe = franky_sim_executable()
        log = open(self.log_path, "w")
        self.process = subprocess.Popen([str(exe), "-s", "mujoco", "--hostname", self.hostname], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def wait_ready(self) -> "FrankySimServer":
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"franky-sim on {self.hostname} exited ({self.process.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            if READY_LINE in self.log_path.read_text():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"franky-sim on {self.hostname} not ready after {self.start_timeout} s; "
                           f"log: {self.log_path.read_text()[-2000:]}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        return proc.returncode

    def __enter__(self) -> "FrankySimServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostname", default="127.0.0.1", help="loopback address to serve the arm on")
    parser.add_argument("--log", default=None, help="log file (default: franky-sim-<hostname>.log here)")
    args = parser.parse_args()
    server = FrankySimServer(args.hostname, args.log or f"franky-sim-{args.hostname}.log").start()
    print(f"franky-sim serving an FR3 on {args.hostname} (log {server.log_path}); Ctrl+C stops it", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
