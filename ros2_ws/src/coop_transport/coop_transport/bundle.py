"""Offline wheel bundles of the coop_transport stack, for machines with no network.

``build_bundle`` downloads binary wheels for a chosen Python version and platform with pip, replaces robosuite's
157 MB wheel by a pruned one that carries only what TwoArmTransport with two Panda arms loads, adds the project's
own wheel and writes ``install.sh``, ``requirements-bundle.txt``, ``bundle.json`` and ``README.md`` next to the
wheels. The command-line entry is ``export/offline_bundle.py``.

Profiles (``--only``):

- ``sim``: what the project's GPU machine lacks to simulate and render TwoArmTransport: pruned robosuite, mujoco
  and the modules they import at run time (glfw, PyOpenGL, scipy, termcolor), plus the project wheel. Installed
  with ``--no-deps``. The target must already have numpy, pillow, opencv (cv2) and typing_extensions
  (``SIM_TARGET_PROVIDED``; drop a name from ``sim_provided`` to bundle it). robosuite's other declared
  dependencies are not needed to build, step and render the env (``SIM_NOT_NEEDED`` says why each is left out);
  numba and llvmlite (about 61 MiB of wheels) are the ones that matter for size.
- ``sim-jit``: numba and llvmlite alone, a second upload for a target that has the sim bundle: robosuite then
  JIT-compiles its controller helpers again, which about doubles physics steps/s. Installed with ``--no-deps``.
- ``train``: every pin of requirements.txt but robosuite, mujoco and ROS 2, with its full dependency closure.
- ``all`` (default): both, robosuite with its declared run-time dependencies except pynput (teleoperation devices
  only; its Linux dependency evdev has no wheels), plus the ROS 2 Kilted pins where the target is CPython 3.11 (the
  only Python PyPI's ROS 2 wheels are built for). Source-only pure-Python dependencies (empy) are built into wheels.

torch is left out unless ``with_torch``: GPU machines have their own CUDA build, and an unpinned PyPI torch is a
multi-GB CUDA build. With ``with_torch`` the CPU build ``torch==<pin>+cpu`` is bundled (found through pip's
configured indexes and find-links, or ``torch_index_url``).

The pruned robosuite wheel (version ``<version>+coop.pruned``, e.g. ``1.5.2+coop.pruned``) keeps every Python
module and config file, and under ``robosuite/models/assets`` only the files that building, resetting and
stepping ``TransportSim`` opens. They are found empirically: the env is built in a subprocess against the
unpacked wheel while an audit hook records every file Python opens, strace (where present and permitted) every
file the process opens, and the compiled model's XML is parsed for ``file=`` attributes (MuJoCo loads meshes and
textures by path). The pruned tree is then checked the same way with the packages that ``sim`` leaves out made
unimportable. One module is patched: ``robosuite/utils/numba.py`` imports numba unconditionally although
robosuite runs without JIT (its own ``macros.ENABLE_NUMBA = False``); the patch falls back to no JIT when numba
is not installed and changes nothing when it is.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROFILES = ("sim", "sim-jit", "train", "all")
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
PRUNED_LOCAL_TAG = "coop.pruned"
TORCH_STUB_LOCAL_TAG = "coop.resolution.stub"
DEFAULT_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
SIM_PINNED = ("robosuite", "mujoco")
ASSETS_PREFIX = "robosuite/models/assets/"
SIM_SIZE_LIMIT_BYTES = 64 * 2**20  # the GPU machine's upload limit

# What the sim profile bundles besides robosuite and the project, and why (found by importing robosuite and mujoco
# and building, stepping and rendering TransportSim in an empty venv; tests/test_bundle.py checks it).
SIM_RUNTIME = {
    "mujoco": "physics and rendering (pinned in requirements.txt)",
    "glfw": "imported by mujoco at import time",
    "pyopengl": "OpenGL bindings of mujoco's EGL and OSMesa contexts",
    "scipy": "robosuite's OSC arm controller imports scipy.spatial.transform at module import",
    "termcolor": "robosuite's logger",
}
# Imported at run time but expected on the target (the GPU machine's torch/transformers/timm stack has them).
SIM_TARGET_PROVIDED = {
    "numpy": "everything",
    "pillow": "robosuite.utils.mjcf_utils imports PIL at import",
    "opencv-python-headless": "robosuite imports cv2 at import (its OpenCV viewer)",
    "typing-extensions": "mujoco imports it at import",
}
SIM_PROVIDED_IMPORTS = {"numpy": "numpy", "pillow": "PIL", "opencv-python-headless": "cv2", "opencv-python": "cv2",
                        "typing-extensions": "typing_extensions"}
# Declared by robosuite or mujoco, not bundled by the sim profile.
SIM_NOT_NEEDED = {
    "numba": "JIT of robosuite's controller and rotation helpers; the pruned robosuite runs them as NumPy code "
             "without numba (robosuite's own ENABLE_NUMBA=False path), which halves physics steps/s; numba + "
             "llvmlite are ~61 MiB of wheels: bring them as a second upload built with --only sim-jit",
    "llvmlite": "only numba needs it",
    "mink": "whole-body IK of humanoids (GR1); robosuite catches its ImportError",
    "qpsolvers": "only mink needs it",
    "quadprog": "only qpsolvers needs it",
    "pynput": "keyboard / SpaceMouse teleoperation devices, imported only when such a device is created",
    "opencv-python": "the target's opencv-python-headless provides the same cv2 module",
    "absl-py": "mujoco imports it only in `python -m mujoco.viewer`",
    "etils": "mujoco imports it only in `python -m mujoco.viewer`",
    "pytest": "robosuite's test suite only",
    "tqdm": "robosuite's scripts only",
}
# The sim-jit add-on: robosuite's JIT, about 2x faster physics steps (a second upload next to the sim bundle).
SIM_JIT = {"numba": "JIT of robosuite's controller helpers", "llvmlite": "numba's compiler backend"}
# Import names of the packages above, made unimportable while checking the pruned robosuite.
SIM_BLOCKED_IMPORTS = ("numba", "llvmlite", "mink", "qpsolvers", "quadprog", "pynput", "absl", "etils")
# Dropped from robosuite's declared dependencies in the full profile.
ALL_SKIPPED_ROBOSUITE_DEPS = {
    "pynput": "keyboard / SpaceMouse teleoperation devices only; its Linux dependency evdev ships no wheels",
}
TORCH_BUILD_ONLY_PREFIXES = ("nvidia-", "triton", "cuda-")
# ROS 2 for pip-only installs: deployment, so in the full profile only, and only for the Python PyPI's ROS 2 Kilted
# wheels are built for (their native wheels are cp311; resolving them for 3.12 runs pip into resolution-too-deep).
ROS_PREFIX = "ros-"
ROS_PYTHONS = ("3.11",)

_NUMBA_IMPORT = "import numba\n"
_NUMBA_IMPORT_PATCHED = (
    "try:  # coop_transport pruned build: numba is optional; without it these helpers run as NumPy code\n"
    "    import numba\n"
    "except ImportError:\n"
    "    numba = None\n"
)
_NUMBA_CONDITION = "    if macros.ENABLE_NUMBA:\n"
_NUMBA_CONDITION_PATCHED = "    if macros.ENABLE_NUMBA and numba is not None:\n"


class BundleError(RuntimeError):
    """A bundle could not be built as asked (message says why and what to do)."""


# ------------------------------------------------------------------------------------------------ small helpers
def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _log(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).strip().splitlines()
                 if "is neither a file nor a directory" not in line and "Retrying (Retry(" not in line]
        tail = "\n".join(lines[-25:])
        raise BundleError(f"command failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return proc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _markers():
    try:
        from packaging.markers import Marker
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.markers import Marker  # type: ignore
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
    return Marker, Requirement


def parse_requirements(path: Path) -> dict[str, str]:
    """``{canonical name: exact version}`` of a requirements file whose every line pins with ``==``."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise BundleError(f"{path}:{lineno}: expected an exact pin 'name==version', got {raw!r}")
        pins[canonical(m.group(1))] = m.group(3)
    return pins


def requirement_lines(path: Path) -> dict[str, str]:
    """``{canonical name: "name[extras]==version"}`` of the pinned requirements file (extras kept)."""
    lines = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
            lines[canonical(name)] = re.sub(r"\s+", "", line)
    return lines


def expand_platforms(platform: str) -> list[str]:
    """pip ``--platform`` values for a target platform tag: a manylinux tag also admits every older manylinux tag.

    pip itself only expands ``manylinux2014`` to ``manylinux2010``/``manylinux1``, so a ``manylinux_2_28`` target
    would not see ``manylinux_2_17`` wheels (numpy 1.26's) without this, nor ``manylinux2014`` targets the
    ``manylinux_2_27`` ones (mujoco 3.3.7's, which need glibc 2.27).
    """
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    m_legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
    if m:
        major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
    elif m_legacy:
        (major, minor), arch = legacy[m_legacy.group(1)], m_legacy.group(2)
    else:
        return [platform]
    if major != 2:
        return [platform]
    out = []
    for y in range(minor, 4, -1):
        out.append(f"manylinux_2_{y}_{arch}")
        for name, glibc in legacy.items():
            if glibc == (2, y):
                out.append(f"{name}_{arch}")
    return out


def target_marker_env(python: str) -> dict[str, str]:
    """Environment-marker values of the target (Linux x86_64 assumed for platform markers, as pip does)."""
    full = python if python.count(".") >= 2 else python + ".0"
    return {"python_version": ".".join(python.split(".")[:2]), "python_full_version": full,
            "implementation_version": full, "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


# --------------------------------------------------------------------------------------------------- wheel I/O
def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta_name).decode("utf-8")
    head = text.split("\n\n", 1)[0]
    fields = re.findall(r"^([A-Za-z-]+): (.*)$", head, flags=re.M)
    name = next(v for k, v in fields if k == "Name")
    version = next(v for k, v in fields if k == "Version")
    return name, version, [v for k, v in fields if k == "Requires-Dist"]


def write_wheel(path: Path, files: dict[str, bytes], dist_info: str) -> None:
    """Write a wheel with a fresh RECORD (sha256 and size of every file), reproducibly (sorted, fixed times)."""
    record_name = f"{dist_info}/RECORD"
    names = sorted((n for n in files if n != record_name), key=lambda n: (n.startswith(dist_info + "/"), n))
    lines = [f"{_csv_path(n)},{_record_hash(files[n])},{len(files[n])}" for n in names]
    lines.append(f"{_csv_path(record_name)},,")
    record = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for n in names + [record_name]:
            info = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, record if n == record_name else files[n])


def _csv_path(path: str) -> str:
    # RECORD is CSV; a path with a comma or quote must be quoted (none in robosuite, kept correct anyway).
    if any(c in path for c in ',"\n'):
        return '"' + path.replace('"', '""') + '"'
    return path


def verify_wheel_record(wheel: Path) -> None:
    """Raise BundleError unless every file of the wheel is in RECORD with the right hash and size."""
    import csv

    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        record_name = next(n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record_name).decode())) if r}
        if set(rows) != set(names):
            raise BundleError(f"{wheel.name}: RECORD lists {len(rows)} files, the wheel has {len(names)}")
        for n in names:
            if n == record_name:
                continue
            data = z.read(n)
            _, digest, size = rows[n]
            if digest != _record_hash(data) or int(size) != len(data):
                raise BundleError(f"{wheel.name}: RECORD entry of {n} does not match its content")


def make_stub_wheel(directory: Path, name: str, version: str) -> Path:
    """An empty wheel with no dependencies; stands in for torch while resolving a torch-free bundle."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: coop_transport.bundle\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n",
    }
    path = Path(directory) / f"{name}-{version}-py3-none-any.whl"
    write_wheel(path, files, dist_info)
    return path


# ------------------------------------------------------------------------------------------ robosuite pruning
def _probe_env(roots: list[Path], numba_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(r) for r in roots] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["NUMBA_CACHE_DIR"] = str(numba_cache)
    env.setdefault("MUJOCO_GL", "egl")
    return env


def _project_package_parent() -> Path:
    return Path(__file__).resolve().parents[1]


def trace_robosuite_files(root: Path, python: str = sys.executable, use_strace: bool | None = None) -> dict:
    """Build, reset and step TransportSim against the robosuite unpacked in ``root``; return what it opened.

    Returns ``{"files": [paths relative to root], "methods": [...], "robosuite_file": ...}``.
    """
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="rs-trace-") as td:
        td = Path(td)
        out = td / "probe.json"
        cmd = [python, "-m", "coop_transport.bundle", "--probe", str(root), "--out", str(out)]
        env = _probe_env([root, _project_package_parent()], td / "numba")
        methods = ["audit-hook", "model-xml"]
        strace_log = td / "strace.log"
        if use_strace is None:
            use_strace = shutil.which("strace") is not None
        proc = None
        if use_strace:
            proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-e",
                                   "status=successful", "-o", str(strace_log), *cmd],
                                  cwd=td, env=env, text=True, capture_output=True)
            if proc.returncode == 0 and strace_log.exists():
                methods.append("strace")
            else:  # ptrace not permitted (some containers): trace without it
                _log("strace unavailable here; tracing with the audit hook and the model XML only")
                proc = None
        if proc is None:
            proc = subprocess.run(cmd, cwd=td, env=env, text=True, capture_output=True)
        if proc.returncode != 0 or not out.exists():
            raise BundleError("tracing robosuite's files failed (this needs the project's dev environment: "
                              f"mujoco, numpy, numba, scipy...):\n{(proc.stdout + proc.stderr)[-4000:]}")
        probe = json.loads(out.read_text())
        paths = set(probe["opened"]) | set(probe["xml_files"])
        if "strace" in methods:
            for line in strace_log.read_text(errors="replace").splitlines():
                m = re.search(r'open(?:at2?)?\((?:[^,"]+, )?"((?:[^"\\]|\\.)*)"', line)
                if m:
                    paths.add(os.path.normpath(os.path.join(td, m.group(1))))
    rel = set()
    for p in paths:
        p = os.path.normpath(p)
        if p.startswith(str(root) + os.sep) and os.path.isfile(p):
            rel.add(os.path.relpath(p, root).replace(os.sep, "/"))
    if probe.get("unresolved"):
        raise BundleError(f"model XML references files that were not found: {probe['unresolved'][:5]}")
    return {"files": sorted(rel), "methods": methods, "robosuite_file": probe["robosuite_file"]}


def check_robosuite_tree(root: Path, python: str = sys.executable, blocked: tuple[str, ...] = ()) -> dict:
    """Build, reset (twice, same seed) and step TransportSim against the robosuite in ``root``, with ``blocked``
    top-level modules made unimportable; raise BundleError on failure."""
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="rs-check-") as td:
        out = Path(td) / "probe.json"
        cmd = [python, "-m", "coop_transport.bundle", "--probe", str(root), "--out", str(out)]
        for b in blocked:
            cmd += ["--block", b]
        proc = subprocess.run(cmd, cwd=td, env=_probe_env([root, _project_package_parent()], Path(td) / "numba"),
                              text=True, capture_output=True)
        if proc.returncode != 0 or not out.exists():
            raise BundleError("the pruned robosuite does not build TwoArmTransport:\n"
                              + (proc.stdout + proc.stderr)[-4000:])
        probe = json.loads(out.read_text())
    if not probe["deterministic"]:
        raise BundleError("the pruned robosuite is not deterministic for a fixed seed")
    return probe


def _probe_main(root: str, out: str, blocked: list[str]) -> None:
    """Subprocess body of trace/check: runs TransportSim against the robosuite in ``root``, writes JSON."""
    import importlib.abc

    opened: set[str] = set()

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.add(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(hook)

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the bundle check)", name=name)
            return None

    if blocked:
        sys.meta_path.insert(0, _Block())
    import xml.etree.ElementTree as ET

    import numpy as np

    from coop_transport.sim import SimConfig, TransportSim

    import robosuite

    if not os.path.abspath(robosuite.__file__).startswith(os.path.abspath(root) + os.sep):
        raise SystemExit(f"robosuite came from {robosuite.__file__}, not from {root}")
    sim = TransportSim(SimConfig())
    actions = np.random.default_rng(0).uniform(-1, 1, (4, 14))
    runs = []
    for _ in range(2):
        sim.reset(3)
        states = [sim.get_state()]
        for a in actions:
            sim.step(a)
            states.append(sim.get_state())
        runs.append(np.stack(states))
    sim.reset(4)
    sim.rs_env.hard_reset = True  # a full reload reads the model files again
    sim.rs_env.reset()
    xml_files, unresolved = set(), []
    for xml in (sim.rs_env.model.get_xml(), sim.model_xml()):
        tree = ET.fromstring(xml)
        dirs = {}
        for comp in tree.iter("compiler"):
            dirs.update({k: v for k, v in comp.attrib.items() if k in ("meshdir", "texturedir", "assetdir")})
        for el in tree.iter():
            f = el.attrib.get("file")
            if f is None:
                continue
            base = dirs.get("meshdir" if el.tag in ("mesh", "skin") else "texturedir" if el.tag == "texture"
                            else "assetdir", dirs.get("assetdir", ""))
            p = os.path.normpath(f if os.path.isabs(f) else os.path.join(base, f))
            if os.path.isfile(p):
                xml_files.add(p)
            elif not os.path.isabs(p):
                continue  # relative name inside mj_saveLastXML output; its absolute twin is in robosuite's XML
            else:
                unresolved.append(p)
    sim.close()
    Path(out).write_text(json.dumps({
        "robosuite_file": robosuite.__file__, "opened": sorted(opened), "xml_files": sorted(xml_files),
        "unresolved": unresolved, "deterministic": bool(np.array_equal(runs[0], runs[1])),
        "blocked": blocked, "numba_loaded": "numba" in sys.modules,
    }))


def patch_numba_module(source: str) -> str:
    """robosuite/utils/numba.py with numba optional (unchanged behaviour where numba is installed)."""
    if _NUMBA_IMPORT not in source or _NUMBA_CONDITION not in source:
        raise BundleError("robosuite/utils/numba.py is not the one this patch was written for (robosuite 1.5.2)")
    patched = source.replace(_NUMBA_IMPORT, _NUMBA_IMPORT_PATCHED, 1)
    return patched.replace(_NUMBA_CONDITION, _NUMBA_CONDITION_PATCHED, 1)


@dataclasses.dataclass
class PruneResult:
    wheel: Path
    version: str
    kept_assets: list[str]
    removed_files: int
    removed_bytes: int
    original_size: int
    trace_methods: list[str]


def prune_robosuite_wheel(wheel: Path, out_dir: Path, python: str = sys.executable, check: bool = True,
                          use_strace: bool | None = None) -> PruneResult:
    """Write ``robosuite-<version>+coop.pruned-py3-none-any.whl`` into ``out_dir`` (see the module docstring)."""
    wheel, out_dir = Path(wheel), Path(out_dir)
    name, version, _ = wheel_metadata(wheel)
    if canonical(name) != "robosuite":
        raise BundleError(f"{wheel.name} is not a robosuite wheel")
    base_version = version.split("+")[0]
    new_version = f"{base_version}+{PRUNED_LOCAL_TAG}"
    with tempfile.TemporaryDirectory(prefix="rs-prune-") as td:
        full = Path(td) / "full"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(full)
        _log(f"tracing the files TwoArmTransport opens in {wheel.name}")
        traced = trace_robosuite_files(full, python, use_strace)
        used = set(traced["files"])
        kept_assets = sorted(f for f in used if f.startswith(ASSETS_PREFIX))
        if not any("/panda/" in f for f in kept_assets):
            raise BundleError("the trace found no Panda assets; refusing to prune blindly")
        old_dist_info = f"robosuite-{version}.dist-info"
        new_dist_info = f"robosuite-{new_version}.dist-info"
        files: dict[str, bytes] = {}
        removed_files = removed_bytes = 0
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                n = info.filename
                if n.endswith("/"):
                    continue
                if n.startswith(ASSETS_PREFIX) and n not in used:
                    removed_files += 1
                    removed_bytes += info.file_size
                    continue
                data = z.read(n)
                if n.startswith(old_dist_info + "/"):
                    n = new_dist_info + n[len(old_dist_info):]
                    if n.endswith("/METADATA"):
                        data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1,
                                      flags=re.M)
                if n == "robosuite/utils/numba.py":
                    data = patch_numba_module(data.decode()).encode()
                files[n] = data
        files[f"{new_dist_info}/coop_pruned.json"] = json.dumps({
            "pruned_from": wheel.name, "kept_assets": kept_assets, "removed_files": removed_files,
            "removed_bytes": removed_bytes, "trace_methods": traced["methods"],
            "patched": {"robosuite/utils/numba.py": "numba optional"},
            "note": "pruned for robosuite TwoArmTransport with two Panda arms by coop_transport.bundle",
        }, indent=1).encode()
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"robosuite-{new_version}-py3-none-any.whl"
        write_wheel(out, files, new_dist_info)
        verify_wheel_record(out)
        if check:
            pruned = Path(td) / "pruned"
            with zipfile.ZipFile(out) as z:
                z.extractall(pruned)
            _log("checking the pruned robosuite without " + ", ".join(SIM_BLOCKED_IMPORTS))
            check_robosuite_tree(pruned, python, SIM_BLOCKED_IMPORTS)
    return PruneResult(out, new_version, kept_assets, removed_files, removed_bytes, wheel.stat().st_size,
                       traced["methods"])


# ------------------------------------------------------------------------------------------------ project wheel
def build_project_wheel(project_dir: Path, out_dir: Path, python: str = sys.executable,
                        with_policies: bool = True) -> Path:
    """Build the project's wheel from a clean copy of its source (the source tree stays untouched).

    Policies' ONNX exports (``assets/policies/*/export``, generated by setup.sh) never go in: they are re-made from
    the checkpoint where they are used. ``with_policies=False`` leaves out the shipped policies too (the sim profile:
    simulation and rendering only, under the 64 MiB upload limit)."""
    project_dir = Path(project_dir)
    build_junk = shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__", "*.pyc", ".pytest_cache")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(build_junk(directory, names))
        here = Path(directory)
        if here.parent.name == "policies" and here.parent.parent.name == "assets":
            skipped |= {"export"} & set(names)
        if not with_policies and here.name == "assets":
            skipped |= {"policies"} & set(names)
        return skipped

    with tempfile.TemporaryDirectory(prefix="proj-wheel-") as td:
        src = Path(td) / project_dir.name
        shutil.copytree(project_dir, src, ignore=ignore)
        if "package.xml" in (src / "setup.py").read_text() and not (src / "package.xml").exists():
            # setup.py installs package.xml into share/<pkg>; it is not in the repository yet. A minimal one keeps
            # the wheel buildable (ROS 2 tooling reads it; nothing in Python does).
            _log("package.xml is missing in the project; the wheel gets a minimal one")
            (src / "package.xml").write_text(_minimal_package_xml(src / "setup.py"))
        wheel_dir = Path(td) / "wheel"
        _run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
              str(wheel_dir), str(src)])
        built = sorted(wheel_dir.glob("*.whl"))
        if len(built) != 1:
            raise BundleError(f"expected one project wheel, got {built}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built[0], Path(out_dir) / built[0].name))


def _minimal_package_xml(setup_py: Path) -> str:
    text = setup_py.read_text()

    def field(key, default):
        m = re.search(rf'{key}\s*=\s*"([^"]*)"', text)
        return m.group(1) if m else default

    name = field("PACKAGE", "coop_transport")
    return (f'<?xml version="1.0"?>\n<package format="3">\n  <name>{name}</name>\n'
            f'  <version>{field("version", "0.0.0")}</version>\n'
            f'  <description>{field("description", name)}</description>\n'
            f'  <maintainer email="{field("maintainer_email", "none@example.org")}">'
            f'{field("maintainer", name)}</maintainer>\n'
            f'  <license>{field("license", "Apache-2.0")}</license>\n'
            f'  <export><build_type>ament_python</build_type></export>\n</package>\n')


# ---------------------------------------------------------------------------------------------- resolution & pip
@dataclasses.dataclass
class Target:
    python: str
    platform: str

    @property
    def pip_args(self) -> list[str]:
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp"]
        for p in expand_platforms(self.platform):
            args += ["--platform", p]
        return args

    @property
    def tag(self) -> str:
        return "cp" + "".join(self.python.split(".")[:2])


def resolve(requirements: list[str], target: Target, find_links: list[Path] = (), constraints: list[str] = (),
            python: str = sys.executable, build_dir: Path | None = None) -> list[dict]:
    """pip's resolution of ``requirements`` for ``target`` (``pip install --dry-run --report``), nothing installed.

    A dependency that PyPI has only as a source distribution (ROS 2's empy) cannot take part in a resolution for
    another platform; with ``build_dir`` it is built here with ``pip wheel`` and kept if the wheel is pure Python
    (``py3-none-any``), then the resolution is retried. Returns the report's items:
    ``{"name", "version", "file", "url", "local_path", "sha256", "requires_dist", "extras"}``.
    """
    from urllib.parse import unquote, urlparse

    find_links = list(find_links) + ([build_dir] if build_dir is not None else [])
    with tempfile.TemporaryDirectory(prefix="resolve-") as td:
        req_file, con_file, report = Path(td) / "req.txt", Path(td) / "con.txt", Path(td) / "report.json"
        req_file.write_text("\n".join(requirements) + "\n")
        con_file.write_text("\n".join(constraints) + "\n")
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), *target.pip_args, "-r", str(req_file), "-c", str(con_file)]
        for fl in find_links:
            cmd += ["--find-links", str(fl)]
        built: set[str] = set()
        while True:
            try:
                _run(cmd)
                break
            except BundleError as e:
                m = re.search(r"satisfies the requirement (\S+) \(from [^)]*\) \(from versions: none\)", str(e))
                if m and build_dir is not None and m.group(1) not in built and len(built) < 10:
                    built.add(m.group(1))
                    if _build_pure_wheel(m.group(1), Path(build_dir), python):
                        continue
                hint = ""
                if target.platform.startswith(("manylinux2014", "manylinux2010", "manylinux1", "manylinux_2_1")):
                    hint = (f"\nhint: mujoco 3.3.7 and recent scipy ship manylinux_2_27/2_28 wheels only (glibc >= "
                            f"2.27); use --platform {DEFAULT_PLATFORM} for glibc 2.28+ targets.")
                raise BundleError(f"pip could not resolve the bundle for Python {target.python} on "
                                  f"{target.platform}:\n{e}{hint}") from None
        data = json.loads(report.read_text())
    items = []
    for it in data["install"]:
        url = it["download_info"]["url"]
        parsed = urlparse(url)
        local = Path(unquote(parsed.path)) if parsed.scheme == "file" else None
        items.append({
            "name": it["metadata"]["name"], "version": it["metadata"]["version"],
            "file": unquote(url.rsplit("/", 1)[-1]), "url": url,
            "local_path": str(local) if local is not None and local.is_file() else None,
            "sha256": it["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256"),
            "requires_dist": it["metadata"].get("requires_dist", []),
            "extras": it.get("requested_extras") or [],
        })
    return items


def prebuild_source_only(requirements: list[str], constraints: list[str], find_links: list[Path], build_dir: Path,
                         python: str = sys.executable) -> list[str]:
    """Build wheels of the dependencies that PyPI has only as source distributions (pure Python only).

    pip cannot take a source distribution into a resolution for another platform, and where one is missing it
    backtracks for many minutes before giving up (resolution-too-deep). So the requirements are first resolved
    for the builder's own interpreter, where sdists are allowed, and each sdist in that resolution is built into a
    wheel in ``build_dir``; the cross-platform resolution then finds them there. Returns the built file names.
    """
    with tempfile.TemporaryDirectory(prefix="native-") as td:
        req_file, con_file, report = Path(td) / "req.txt", Path(td) / "con.txt", Path(td) / "report.json"
        req_file.write_text("\n".join(requirements) + "\n")
        con_file.write_text("\n".join(constraints) + "\n")
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "-r", str(req_file), "-c", str(con_file)]
        for fl in find_links:
            cmd += ["--find-links", str(fl)]
        try:
            _run(cmd)
        except BundleError as e:  # the cross-platform resolution will say what is wrong
            _log(f"resolution for this interpreter failed, no source-only dependencies built: {str(e)[-300:]}")
            return []
        data = json.loads(report.read_text())
    built = []
    for it in data["install"]:
        if it["download_info"]["url"].split("#")[0].endswith(".whl"):
            continue
        req = f"{it['metadata']['name']}=={it['metadata']['version']}"
        if not _build_pure_wheel(req, Path(build_dir), python):
            raise BundleError(f"{req} exists only as a source distribution that does not build into a pure-Python "
                              "wheel here, so it cannot be bundled for another platform")
        built.append(req)
    return built


def _build_pure_wheel(requirement: str, build_dir: Path, python: str) -> bool:
    """Build ``requirement`` from its source distribution into ``build_dir``; True if the wheel is pure Python."""
    with tempfile.TemporaryDirectory(prefix="sdist-wheel-") as td:
        try:
            _run([python, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", td, requirement])
        except BundleError:
            return False
        wheels = list(Path(td).glob("*.whl"))
        if len(wheels) != 1 or not re.search(r"-py[0-9.]*-none-any\.whl$", wheels[0].name.replace("py2.py3", "py3")):
            return False
        build_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheels[0], build_dir / wheels[0].name)
        _log(f"built {wheels[0].name} from source (PyPI has no wheel)")
        return True


def download(pins: list[str], target: Target, dest: Path, extra_args: list[str] = (),
             python: str = sys.executable) -> None:
    """``pip download --no-deps`` of exact pins for ``target`` into ``dest`` (files already there are reused)."""
    if not pins:
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "pip", "download", "--no-deps", "--quiet", *target.pip_args, "-d", str(dest),
          *extra_args, *pins])


def fetch_items(items: list[dict], target: Target, cache: Path, python: str = sys.executable) -> dict[str, Path]:
    """Download the resolved ``items`` into ``cache`` (local files, e.g. wheels built here, are copied); check
    sha256 where the index gave one."""
    Path(cache).mkdir(parents=True, exist_ok=True)
    for it in items:
        if it.get("local_path") and not (Path(cache) / it["file"]).exists():
            shutil.copy2(it["local_path"], Path(cache) / it["file"])
    missing = [it for it in items if not (Path(cache) / it["file"]).exists()]
    download([f"{it['name']}=={it['version']}" for it in missing], target, cache, python=python)
    paths = {}
    for it in items:
        p = Path(cache) / it["file"]
        if not p.exists():
            raise BundleError(f"pip did not download {it['file']} (it chose another file for {it['name']})")
        if it["sha256"] and _sha256_file(p) != it["sha256"]:
            raise BundleError(f"{p.name}: sha256 differs from the index's")
        paths[canonical(it["name"])] = p
    return paths


def missing_dependencies(wheels: dict[str, Path], roots: dict[str, set[str]], python: str,
                         ignore: set[str]) -> list[str]:
    """Requirements (evaluated for the target Python) of the bundled wheels that no bundled wheel satisfies.

    pip evaluates environment markers for the interpreter that runs it, not for ``--python-version``; this walk
    re-evaluates them for the target so that a 3.12-only dependency is not missed when building on 3.11.
    """
    Marker, Requirement = _markers()
    env = target_marker_env(python)
    versions = {n: wheel_metadata(p)[1] for n, p in wheels.items()}
    seen: set[tuple[str, str]] = set()
    todo = [(n, e) for n, extras in roots.items() for e in ({""} | set(extras))]
    missing = []
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in wheels or name in ignore:
            continue
        seen.add((name, extra))
        for line in wheel_metadata(wheels[name])[2]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                continue
            dep = canonical(req.name)
            if dep in ignore:
                continue
            if dep not in wheels:
                missing.append(str(req))
            elif req.specifier and not req.specifier.contains(versions[dep], prereleases=True):
                missing.append(f"{req} (bundled {versions[dep]})")
            else:
                todo += [(dep, "")] + [(dep, e) for e in req.extras]
    return sorted(set(missing))


# ------------------------------------------------------------------------------------------------------- bundle
@dataclasses.dataclass
class BundleResult:
    out: Path
    profile: str
    wheels: dict[str, Path]
    total_bytes: int
    manifest: dict


def build_bundle(out: Path, python: str = "3.12", platform: str = DEFAULT_PLATFORM, only: str = "all",
                 with_torch: bool = False, requirements: Path | None = None, project_dir: Path | None = None,
                 cache: Path | None = None, sim_provided: tuple[str, ...] = tuple(SIM_TARGET_PROVIDED),
                 torch_index_url: str = DEFAULT_TORCH_INDEX_URL, check_pruned: bool = True,
                 use_strace: bool | None = None, builder_python: str = sys.executable) -> BundleResult:
    """Build a bundle in ``out`` (emptied first); see the module docstring for the profiles."""
    if only not in PROFILES:
        raise BundleError(f"--only must be one of {PROFILES}, got {only!r}")
    if not re.fullmatch(r"3\.\d+", python):
        raise BundleError(f"--python must look like 3.12, got {python!r}")
    repo = _repo_root()
    requirements = Path(requirements or repo / "requirements.txt")
    project_dir = Path(project_dir or _project_package_parent())
    out = Path(out)
    cache = Path(cache or out.parent / "wheel-cache") / f"cp{python.replace('.', '')}-{platform}"
    target = Target(python, platform)
    pins = parse_requirements(requirements)
    req_lines = requirement_lines(requirements)
    for need in SIM_PINNED + ("numpy",):
        if need not in pins:
            raise BundleError(f"{requirements} has no pin for {need}")
    torch_pin = pins.get("torch")
    sim, train, jit = only in ("sim", "all"), only in ("train", "all"), only == "sim-jit"
    no_deps = only in ("sim", "sim-jit")  # installed with --no-deps: exactly these wheels, nothing resolved
    if no_deps and with_torch:
        raise BundleError(f"--with-torch makes no sense with --only {only} (the simulation does not use torch)")
    sim_provided = tuple(canonical(p) for p in sim_provided) if only == "sim" else ()
    unknown = set(sim_provided) - set(SIM_TARGET_PROVIDED)
    if unknown:
        raise BundleError(f"unknown --sim-provided names {sorted(unknown)}; choose from {sorted(SIM_TARGET_PROVIDED)}")
    # What the target must have already: {distribution: import name} (install.sh checks the imports).
    must_provide = {p: SIM_PROVIDED_IMPORTS[p] for p in sim_provided}
    if jit:
        must_provide = {"numpy": "numpy", "robosuite (the sim bundle)": "robosuite"}
    elif train and torch_pin and not with_torch:
        must_provide["torch"] = "torch"

    if out.exists() and any(out.iterdir()) and not (out / "bundle.json").is_file():
        # never empty a directory that is not an earlier bundle
        raise BundleError(f"{out} exists and is not a bundle directory; choose an empty or new --out")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bundle-"))
    try:
        local = work / "local"  # wheels pip may pick while resolving: project wheel, torch (real or stub)
        local.mkdir()
        roots: list[str] = []
        constraints = [f"numpy=={pins['numpy']}", f"mujoco=={pins['mujoco']}"]
        project_wheel = None
        if not jit:
            project_wheel = build_project_wheel(project_dir, local, builder_python, with_policies=only != "sim")
            project_name, project_version, _ = wheel_metadata(project_wheel)
            roots.append(f"{project_name}=={project_version}")
        robosuite_wheel = rs_reqs = None
        if sim or jit:
            download([f"robosuite=={pins['robosuite']}"], target, cache, python=builder_python)
            robosuite_wheel = _find_wheel(cache, "robosuite", pins["robosuite"])
            rs_reqs = _robosuite_requirements(robosuite_wheel)
        wanted = None  # resolver-mode profiles take the whole resolution
        if only == "sim":
            extras = [p for p in SIM_TARGET_PROVIDED if p not in sim_provided]
            roots += [f"mujoco=={pins['mujoco']}", rs_reqs["scipy"], rs_reqs["termcolor"], *extras]
            wanted = set(SIM_RUNTIME) | set(extras)
        elif jit:
            roots.append(rs_reqs["numba"])
            wanted = set(SIM_JIT)
        else:  # train: every pin but the simulator's and ROS; all: those plus mujoco, robosuite's deps and ROS
            ros = only == "all" and python in ROS_PYTHONS
            roots += [line for n, line in req_lines.items() if n not in SIM_PINNED + ("torch",)
                      and (ros or not n.startswith(ROS_PREFIX))]
            if sim:
                roots.append(f"mujoco=={pins['mujoco']}")
                roots += [r for n, r in rs_reqs.items() if n not in ALL_SKIPPED_ROBOSUITE_DEPS]
        torch_wheel = None
        if train and torch_pin:
            if with_torch:
                torch_wheel = _fetch_cpu_torch(torch_pin, target, cache, torch_index_url, builder_python)
                shutil.copy2(torch_wheel, local / torch_wheel.name)
                constraints.append(f"torch=={wheel_metadata(torch_wheel)[1]}")
                roots.append(f"torch=={wheel_metadata(torch_wheel)[1]}")
            else:  # torch comes from the target: resolve against an empty stand-in
                stub_version = f"{torch_pin}+{TORCH_STUB_LOCAL_TAG}"
                make_stub_wheel(local, "torch", stub_version)
                constraints.append(f"torch=={stub_version}")
        built_dir = work / "built"  # wheels built here from source-only dependencies (pure Python)
        built_dir.mkdir()
        if not no_deps:
            prebuild_source_only(roots, constraints, [local], built_dir, builder_python)
        _log(f"resolving {len(roots)} requirements for Python {python} on {platform}")
        items = resolve(roots, target, [local], constraints, builder_python, build_dir=built_dir)
        if wanted is not None:
            missing = wanted - {canonical(it["name"]) for it in items}
            if missing:
                raise BundleError(f"the resolution lacks {sorted(missing)}")
            items = [it for it in items if canonical(it["name"]) in wanted]
        local_names = {"torch"} | ({canonical(wheel_metadata(project_wheel)[0])} if project_wheel else set())
        items = [it for it in items if canonical(it["name"]) not in local_names
                 and not canonical(it["name"]).startswith(TORCH_BUILD_ONLY_PREFIXES)]
        _log(f"downloading {len(items)} wheels (cache: {cache})")
        wheels = fetch_items(items, target, cache, builder_python)
        if project_wheel is not None:
            wheels[canonical(wheel_metadata(project_wheel)[0])] = project_wheel
        if torch_wheel is not None:
            wheels["torch"] = torch_wheel
        prune = None
        if sim:
            prune = prune_robosuite_wheel(robosuite_wheel, work / "pruned", builder_python, check_pruned, use_strace)
            wheels["robosuite"] = prune.wheel
        if not no_deps:  # every requirement of every bundled wheel, for the target's Python, is in the bundle
            ignore = {"robosuite"} | ({"torch"} if not with_torch else set())
            extras = {n: set(re.findall(r"\[([^\]]*)\]", line)[0].split(",")) if "[" in line else set()
                      for n, line in req_lines.items()}
            gaps = missing_dependencies(wheels, {n: extras.get(n, set()) for n in wheels}, python, ignore)
            if gaps:
                raise BundleError(f"bundled wheels need requirements that are not in the bundle: {gaps}")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for path in wheels.values():
            shutil.copy2(path, out / path.name)
        ros_left_out = sorted(n for n in pins if n.startswith(ROS_PREFIX) and canonical(n) not in wheels)
        manifest = _write_bundle_files(out, only, target, wheels, no_deps, with_torch, must_provide, prune,
                                       torch_pin, pins, ros_left_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return BundleResult(out, only, {n: out / p.name for n, p in wheels.items()}, total, manifest)


def _repo_root() -> Path:
    here = _project_package_parent()
    for p in [here, *here.parents]:
        if (p / "requirements.txt").exists():
            return p
    return here


def _find_wheel(directory: Path, name: str, version: str) -> Path:
    for p in sorted(Path(directory).glob("*.whl")):
        parts = p.name.split("-")
        if canonical(parts[0]) == canonical(name) and parts[1] == version:
            return p
    raise BundleError(f"no {name}=={version} wheel in {directory}")


def _robosuite_requirements(wheel: Path) -> dict[str, str]:
    _, Requirement = _markers()
    return {canonical(Requirement(r).name): r for r in wheel_metadata(wheel)[2]}


def _fetch_cpu_torch(pin: str, target: Target, cache: Path, index_url: str, python: str) -> Path:
    version = pin if "+" in pin else f"{pin}+cpu"
    try:
        download([f"torch=={version}"], target, cache, ["--extra-index-url", index_url] if index_url else [], python)
    except BundleError as e:
        raise BundleError(f"no CPU torch {version} wheel for Python {target.python} on {target.platform} "
                          f"(tried pip's configured indexes and find-links and {index_url}):\n{e}") from None
    return _find_wheel(cache, "torch", version)


def _write_bundle_files(out: Path, only: str, target: Target, wheels: dict[str, Path], no_deps: bool,
                        with_torch: bool, must_provide: dict[str, str], prune: PruneResult | None,
                        torch_pin: str | None, pins: dict[str, str], ros_left_out: list[str] = ()) -> dict:
    entries = []
    for name in sorted(wheels):
        wname, wversion, _ = wheel_metadata(wheels[name])
        entries.append({"name": wname, "version": wversion, "file": wheels[name].name,
                        "bytes": wheels[name].stat().st_size, "sha256": _sha256_file(wheels[name])})
    resolver_lines = [f"{e['name']}=={e['version']}" for e in entries if canonical(e["name"]) != "robosuite"]
    nodeps_lines = [f"{e['name']}=={e['version']}" for e in entries if canonical(e["name"]) == "robosuite"]
    if no_deps:
        resolver_lines, nodeps_lines = [], resolver_lines + nodeps_lines
    (out / "requirements-bundle.txt").write_text(
        "# Installed with pip's resolver, offline: pip install --no-index --find-links . -r requirements-bundle.txt\n"
        + "".join(line + "\n" for line in resolver_lines))
    (out / "requirements-nodeps.txt").write_text(
        "# Installed without dependency resolution (--no-deps): see README.md\n"
        + "".join(line + "\n" for line in nodeps_lines))
    install = _INSTALL_SH.format(profile=only, python=target.python, platform=target.platform,
                                 imports=" ".join(sorted(set(must_provide.values()))))
    (out / "install.sh").write_text(install)
    os.chmod(out / "install.sh", 0o755)
    total = sum(e["bytes"] for e in entries)
    manifest = {
        "profile": only, "python": target.python, "platform": target.platform,
        "platform_tags": expand_platforms(target.platform), "with_torch": with_torch,
        "install_no_deps": no_deps, "target_must_provide": list(must_provide),
        "wheels": entries, "total_wheel_bytes": total,
        "robosuite_pruned": None if prune is None else {
            "version": prune.version, "original_wheel_bytes": prune.original_size,
            "pruned_wheel_bytes": prune.wheel.stat().st_size, "removed_files": prune.removed_files,
            "removed_uncompressed_bytes": prune.removed_bytes, "kept_assets": prune.kept_assets,
            "trace_methods": prune.trace_methods, "patched_modules": ["robosuite/utils/numba.py"]},
        "not_bundled": (SIM_NOT_NEEDED if only == "sim" else ALL_SKIPPED_ROBOSUITE_DEPS if prune else {}) | (
            {"torch": "the target has its own torch build"} if "torch" in must_provide else {}) | (
            {", ".join(ros_left_out): f"ROS 2 (deployment) is in the full profile only, and PyPI's ROS 2 Kilted wheels "
             f"exist for CPython {', '.join(ROS_PYTHONS)} only"} if ros_left_out and only in ("train", "all") else {}),
        "pins": pins,
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "README.md").write_text(_readme(manifest))
    return manifest


def _readme(m: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [f"# coop_transport offline bundle: profile `{m['profile']}`, CPython {m['python']}, {m['platform']}",
             "", "Install with no network: `sh install.sh` (uses `python3`; `PYTHON=/path/to/python sh install.sh` "
             "for another interpreter; extra arguments go to pip). `sh install.sh --check` then builds, steps and "
             "renders TransportSim once (set `MUJOCO_GL=egl` or `MUJOCO_GL=osmesa`). Extra pip arguments such as "
             "`--user` or `--break-system-packages` follow the optional `--check`.", ""]
    if m["target_must_provide"]:
        lines += [f"The target must already have: {', '.join(m['target_must_provide'])} (install.sh checks).", ""]
    lines += ["| wheel | size |", "|---|---:|"]
    lines += [f"| {w['file']} | {mib(w['bytes'])} |" for w in m["wheels"]]
    lines += [f"| **total** | **{mib(m['total_wheel_bytes'])}** |", ""]
    if m["robosuite_pruned"]:
        p = m["robosuite_pruned"]
        lines += [f"robosuite {p['version']}: {mib(p['original_wheel_bytes'])} wheel pruned to "
                  f"{mib(p['pruned_wheel_bytes'])}; {p['removed_files']} asset files removed, "
                  f"{len(p['kept_assets'])} kept (those TwoArmTransport with two Pandas opens, traced with "
                  f"{', '.join(p['trace_methods'])}); all Python modules kept; robosuite/utils/numba.py patched so "
                  "that numba is optional.", ""]
    if m["not_bundled"]:
        lines += ["Not bundled:", ""] + [f"- {k}: {v}" for k, v in m["not_bundled"].items()] + [""]
    return "\n".join(lines)


_INSTALL_SH = """#!/bin/sh
# Offline install of a coop_transport wheel bundle (profile {profile}, CPython {python}, {platform}).
# Usage: sh install.sh [--check] [extra pip arguments]
#   PYTHON=/path/to/python sh install.sh     (default: python3; pip runs as "$PYTHON -m pip")
#   --check   after installing, build, step and render TransportSim once (MUJOCO_GL=egl or osmesa)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${{PYTHON:-python3}}
CHECK=0
if [ "${{1:-}}" = "--check" ]; then CHECK=1; shift; fi
NEEDS="{imports}"
if [ -n "$NEEDS" ]; then
  "$PY" - $NEEDS <<'EOF'
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("install.sh: this bundle expects these modules on the target, missing: " + " ".join(missing)
             + "\\n(rebuild the bundle with them included, see README.md)")
EOF
fi
if grep -q '^[^#]' "$HERE/requirements-bundle.txt"; then
  "$PY" -m pip install --no-index --find-links "$HERE" -r "$HERE/requirements-bundle.txt" "$@"
fi
if grep -q '^[^#]' "$HERE/requirements-nodeps.txt"; then
  "$PY" -m pip install --no-index --find-links "$HERE" --no-deps -r "$HERE/requirements-nodeps.txt" "$@"
fi
if [ "$CHECK" = 1 ]; then
  "$PY" -m coop_transport.bundle --smoke
fi
"""


# ------------------------------------------------------------------------------------------------- smoke check
def smoke_check(seed: int = 7, steps: int = 5, image_size: int = 64, render: bool = True) -> dict:
    """Build TransportSim, check that reset(seed) + fixed actions replay bit for bit, render one wrist image."""
    import numpy as np

    from coop_transport.sim import SimConfig, TransportSim

    import mujoco
    import robosuite

    result = {"MUJOCO_GL": os.environ.get("MUJOCO_GL"), "robosuite": getattr(robosuite, "__version__", "?"),
              "mujoco": mujoco.__version__, "numba_available": _importable("numba")}
    try:
        from importlib.metadata import version

        result["robosuite_dist"] = version("robosuite")
    except Exception:  # noqa: BLE001 - robosuite imported from a path without metadata
        pass
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps, 14))
    with TransportSim(SimConfig(image_size=image_size)) as sim:
        runs = []
        for _ in range(2):
            sim.reset(seed)
            states = [sim.get_state()]
            for a in actions:
                sim.step(a)
                states.append(sim.get_state())
            runs.append(np.stack(states))
        result["deterministic"] = bool(np.array_equal(runs[0], runs[1]))
        result["moved"] = bool(np.abs(runs[0][-1] - runs[0][0]).max() > 0)
        if render:
            img = sim.render("robot0_eye_in_hand")
            ctx = sim._renderer._renderer._gl_context
            result.update(image_shape=list(img.shape), image_dtype=str(img.dtype), image_std=float(img.std()),
                          gl_context=f"{type(ctx).__module__}.{type(ctx).__name__}")
    result["ok"] = bool(result["deterministic"] and result["moved"] and (
        not render or (result["image_shape"] == [image_size, image_size, 3] and result["image_std"] > 1.0)))
    return result


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _main(argv: list[str] | None = None) -> int:
    """Internal entry (``python -m coop_transport.bundle``): ``--smoke`` check or the ``--probe`` subprocess."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m coop_transport.bundle")
    ap.add_argument("--smoke", action="store_true", help="build/step/render TransportSim once and print JSON")
    ap.add_argument("--no-render", action="store_true")
    ap.add_argument("--probe", metavar="ROBOSUITE_ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--block", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        _probe_main(args.probe, args.out, args.block)
        return 0
    if args.smoke:
        result = smoke_check(render=not args.no_render)
        print(json.dumps(result, indent=1))
        return 0 if result["ok"] else 1
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
