"""Simulation speed of TransportSim: env steps/s by camera set and image size, as a markdown table.

Usage:
    python bench/sim_speed.py [--steps 100] [--warmup 10] [--sizes 96,224] [--json out.json]
    MUJOCO_GL=osmesa python bench/sim_speed.py      # CPU rendering through OSMesa (default: egl)

Rows: physics only (no cameras); the two wrist cameras; the two wrist cameras plus agentview; each camera row at the
small default size and at 224x224 (pi0), with MuJoCo's fast render flags (no shadows, reflections, skybox); plus
the two wrist cameras at the small size with the flags off, to show their effect; plus the two wrist cameras and
agentview rendered only every ``--chunk`` steps, as chunked policies read them (``step(render=False)``, then
``observation`` at the chunk's last step: the residual-RL workers and the π0 evaluation do this). Every row builds a fresh env,
runs ``--warmup`` untimed steps (numba compiles robosuite's helpers on the first steps of a process; the first
render creates the GL context), then times ``--steps`` steps of random actions. The machine may be shared:
the table records the 1-minute load average after each row, the process's CPU time over wall time and steps per
CPU-second (load-independent for the single-threaded physics row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from coop_transport.constants import PI0_IMAGE_SIZE, SMALL_IMAGE_SIZE
from coop_transport.sim import SimConfig, TransportSim


def time_config(config: SimConfig, steps: int, warmup: int, seed: int = 0, render_every: int = 1) -> dict:
    """Steps/s of ``TransportSim(config)`` over ``steps`` timed steps after ``warmup`` untimed ones; the cameras are
    rendered at every ``render_every``-th step only."""
    rng = np.random.default_rng(seed)
    with TransportSim(config) as sim:
        sim.reset(seed)
        for a in rng.uniform(-1, 1, (warmup, 14)):
            sim.step(a)
        actions = rng.uniform(-1, 1, (steps, 14))
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i, a in enumerate(actions, start=1):
            sim.step(a, render=render_every == 1)
            if render_every > 1 and i % render_every == 0:
                sim.observation  # noqa: B018 - the read renders the cameras, as a re-planning policy's does
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        renderer = _gl_renderer(sim) if config.cameras else None
    return {"steps_per_s": steps / wall, "ms_per_step": 1e3 * wall / steps, "cpu_over_wall": cpu / wall,
            "steps_per_cpu_s": steps / cpu if cpu > 0 else float("nan"), "load1": os.getloadavg()[0],
            "gl_renderer": renderer}


def _gl_renderer(sim: TransportSim) -> str | None:
    """GL_RENDERER of the context the cameras render with (llvmpipe = Mesa software, else the GPU)."""
    try:
        from OpenGL import GL

        sim._renderer._renderer._gl_context.make_current()
        name = GL.glGetString(GL.GL_RENDERER)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - informational only
        return None


def configurations(small: int, large: int, chunk: int) -> list[tuple[str, SimConfig, int]]:
    rows = [("physics only (no cameras)", SimConfig())]
    for size in (small, large):
        rows.append((f"2 wrist cameras, {size}x{size}", SimConfig(wrist_cameras=True, image_size=size)))
    rows.append((f"2 wrist cameras, {small}x{small}, fast render OFF",
                 SimConfig(wrist_cameras=True, image_size=small, fast_render=False)))
    for size in (small, large):
        rows.append((f"2 wrist + agentview, {size}x{size}",
                     SimConfig(wrist_cameras=True, agentview=True, image_size=size)))
    rows = [(name, config, 1) for name, config in rows]
    rows.append((f"2 wrist + agentview, {small}x{small}, rendered every {chunk} steps",
                 SimConfig(wrist_cameras=True, agentview=True, image_size=small), chunk))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="timed env steps per row (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed env steps per row first (default 10)")
    ap.add_argument("--sizes", default=f"{SMALL_IMAGE_SIZE},{PI0_IMAGE_SIZE}",
                    help="small,large square image sizes (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=10,
                    help="the last row renders the cameras every CHUNK steps (default 10, the paper's C)")
    ap.add_argument("--physics-only", action="store_true", help="only the row without cameras")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    small, large = (int(s) for s in args.sizes.split(","))
    if args.steps <= 0 or args.warmup < 0 or args.chunk < 1:
        ap.error("--steps and --chunk must be positive and --warmup non-negative")

    import mujoco

    from coop_transport.bundle import _importable

    header = {
        "MUJOCO_GL": os.environ.get("MUJOCO_GL"), "mujoco": mujoco.__version__,
        "numba": _importable("numba"), "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "steps": args.steps, "warmup": args.warmup,
    }
    results = []
    rows = configurations(small, large, args.chunk)[:1 if args.physics_only else None]
    for name, config, render_every in rows:
        r = time_config(config, args.steps, args.warmup, args.seed, render_every)
        r.update(name=name, cameras=len(config.cameras), image_size=config.image_size if config.cameras else None,
                 fast_render=config.fast_render if config.cameras else None)
        results.append(r)
        print(f"  {name}: {r['steps_per_s']:.1f} steps/s", file=sys.stderr, flush=True)
    header["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    header["gl_renderer"] = next((r["gl_renderer"] for r in results if r["gl_renderer"]), None)

    print(f"MUJOCO_GL={header['MUJOCO_GL']} (GL_RENDERER: {header['gl_renderer']}), mujoco {header['mujoco']}, "
          f"numba {'on' if header['numba'] else 'off (not installed)'}, {header['cpus']} CPUs, "
          f"Python {header['python']}; {args.steps} timed steps after {args.warmup} warm-up steps per row")
    print(f"load average (1, 5, 15 min): start {header['loadavg_start']}, end {header['loadavg_end']}")
    print()
    print("| configuration | cameras | size | fast render | env steps/s | ms/step | steps per CPU-s | CPU/wall "
          "| load 1m |")
    print("|---|---:|---:|:---:|---:|---:|---:|---:|---:|")
    for r in results:
        size = f"{r['image_size']}" if r["image_size"] else "-"
        fast = "-" if r["fast_render"] is None else ("on" if r["fast_render"] else "off")
        print(f"| {r['name']} | {r['cameras']} | {size} | {fast} | {r['steps_per_s']:.1f} | "
              f"{r['ms_per_step']:.1f} | {r['steps_per_cpu_s']:.1f} | {r['cpu_over_wall']:.2f} | {r['load1']:.2f} |")
    print()
    print("steps per CPU-s: steps over this process's CPU time, a load-independent figure for the single-threaded "
          "physics row (Mesa's llvmpipe renders on several threads, so camera rows count those too). "
          "CPU/wall below 1 on the physics row means other jobs took the CPU.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
