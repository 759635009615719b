"""Where the package's share/ directory (config/, launch/, package.xml) is, and the ament environment for it.

A ROS 2 install (colcon, Docker) registers the package in the ament index: ``share_dir()`` asks the index
(``AMENT_PREFIX_PATH``). Pip-only installs: a regular ``pip install`` puts ``share/coop_transport`` and the index
marker under the environment's prefix (``sys.prefix``), which must then be on ``AMENT_PREFIX_PATH``; an editable
install (``pip install -e``) installs no data files, so the bringup registers the source tree through a small
overlay prefix (``ament_environment``). Without either, ``share_dir()`` falls back to the source tree.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PACKAGE = "coop_transport"
SOURCE_DIR = Path(__file__).resolve().parents[2]  # ros2_ws/src/coop_transport in a source checkout
INDEX = Path("share") / "ament_index" / "resource_index" / "packages"


def _registered_prefix(prefixes: list[str]) -> Path | None:
    for prefix in prefixes:
        if prefix and (Path(prefix) / INDEX / PACKAGE).exists():
            return Path(prefix)
    return None


def share_dir() -> Path:
    """share/coop_transport of the install this code runs from (ament index first, then the source tree)."""
    prefix = _registered_prefix(os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep))
    if prefix is not None and (prefix / "share" / PACKAGE / "config").is_dir():
        return prefix / "share" / PACKAGE
    if (SOURCE_DIR / "package.xml").exists() and (SOURCE_DIR / "config").is_dir():
        return SOURCE_DIR
    raise FileNotFoundError(f"{PACKAGE}'s share directory is neither in the ament index (AMENT_PREFIX_PATH="
                            f"{os.environ.get('AMENT_PREFIX_PATH', '')!r}) nor at {SOURCE_DIR}")


def ament_environment(env: dict) -> tuple[dict, Path | None]:
    """A copy of ``env`` whose ``AMENT_PREFIX_PATH`` resolves this package and the ROS wheels' packages.

    Adds ``sys.prefix`` when the wheels installed an ament index there. If no prefix registers coop_transport
    (editable install), creates an overlay prefix in a temporary directory with the index marker and
    ``share/coop_transport`` linked to the source tree; returns it so that the caller can remove it (else None).
    """
    env = dict(env)
    prefixes = [p for p in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if (Path(sys.prefix) / "share" / "ament_index").is_dir() and sys.prefix not in prefixes:
        prefixes.append(sys.prefix)
    overlay = None
    registered = _registered_prefix(prefixes)
    if registered is None or not (registered / "share" / PACKAGE / "config").is_dir():
        overlay = Path(tempfile.mkdtemp(prefix="coop_transport_ament_"))
        (overlay / INDEX).mkdir(parents=True)
        (overlay / INDEX / PACKAGE).touch()
        (overlay / "share" / PACKAGE).symlink_to(share_dir())
        prefixes.insert(0, str(overlay))
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(prefixes)
    return env, overlay
