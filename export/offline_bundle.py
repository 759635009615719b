"""Build an offline wheel bundle of the coop_transport stack (library: ``coop_transport.bundle``).

Usage:
    python export/offline_bundle.py --out dist/bundle --python 3.12 --platform manylinux_2_28_x86_64 \
        [--with-torch] [--only sim|sim-jit|train|all] [--cache DIR] [--sim-provided numpy,pillow,...]

``--only sim`` is what the GPU machine needs (pruned robosuite, mujoco and their run-time imports, the project
wheel; torch, numpy, pillow, opencv and typing_extensions are expected there). On the target:
``sh install.sh`` (offline; ``PYTHON=python3.12 sh install.sh --check`` also runs a TransportSim smoke check).
``--only sim-jit`` is an optional second upload (numba + llvmlite) that about doubles physics steps/s there.
A manylinux platform admits every older manylinux tag; mujoco 3.3.7 needs manylinux_2_27 or newer (glibc >= 2.27),
so ``manylinux2014_x86_64`` (glibc 2.17) cannot carry the simulation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import coop_transport.bundle  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "coop_transport"))

from coop_transport.bundle import (  # noqa: E402
    DEFAULT_PLATFORM, DEFAULT_TORCH_INDEX_URL, PROFILES, SIM_SIZE_LIMIT_BYTES, SIM_TARGET_PROVIDED, BundleError,
    build_bundle,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True,
                    help="bundle directory: new, empty or an earlier bundle (replaced)")
    ap.add_argument("--python", default="3.12", help="target CPython version, e.g. 3.12 (default)")
    ap.add_argument("--platform", default=DEFAULT_PLATFORM,
                    help=f"target platform tag (default {DEFAULT_PLATFORM}); older manylinux tags are admitted")
    ap.add_argument("--only", choices=PROFILES, default="all", help="profile (default all)")
    ap.add_argument("--with-torch", action="store_true", help="include the pinned CPU torch (train/all)")
    ap.add_argument("--cache", type=Path, help="wheel download cache (default: <out>/../wheel-cache)")
    ap.add_argument("--sim-provided", default=",".join(SIM_TARGET_PROVIDED),
                    help="--only sim: packages the target already has (default %(default)s); "
                         "those left out are bundled")
    ap.add_argument("--torch-index-url", default=DEFAULT_TORCH_INDEX_URL,
                    help="extra index for the CPU torch wheel (default %(default)s)")
    ap.add_argument("--no-check", action="store_true", help="skip the check of the pruned robosuite")
    args = ap.parse_args(argv)
    try:
        result = build_bundle(args.out, python=args.python, platform=args.platform, only=args.only,
                              with_torch=args.with_torch, cache=args.cache,
                              sim_provided=tuple(p for p in args.sim_provided.split(",") if p),
                              torch_index_url=args.torch_index_url, check_pruned=not args.no_check)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bundle: {result.out}  profile {result.profile}, CPython {args.python}, {args.platform}")
    for w in result.manifest["wheels"]:
        print(f"  {w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
    print(f"  {result.manifest['total_wheel_bytes'] / 2**20:8.2f} MiB  wheels in all "
          f"({result.total_bytes / 2**20:.2f} MiB with install files)")
    if result.profile == "sim" and result.total_bytes > SIM_SIZE_LIMIT_BYTES:
        print(f"warning: over the {SIM_SIZE_LIMIT_BYTES / 2**20:.0f} MiB upload limit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
