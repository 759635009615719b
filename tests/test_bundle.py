"""The offline wheel bundle (coop_transport.bundle, export/offline_bundle.py).

The slow test builds the ``--only sim`` bundle for this interpreter's Python, installs it into an empty venv with no
index (the venv first gets, also offline, the packages the GPU machine already has: numpy, pillow, opencv-headless,
typing_extensions, plus pytest), then runs the smoke check through EGL and through OSMesa and the project's
simulation tests against the pruned robosuite, without numba. It needs PyPI (pip download) and libosmesa6.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from coop_transport import bundle

REPO = Path(__file__).resolve().parents[1]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


# ---------------------------------------------------------------------------------------------------- fast tests
def test_platform_expansion_admits_older_manylinux_tags():
    tags = bundle.expand_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_27_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    legacy = bundle.expand_platforms("manylinux2014_x86_64")
    assert "manylinux_2_17_x86_64" in legacy and "manylinux_2_27_x86_64" not in legacy
    assert bundle.expand_platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_requirements_are_read_as_exact_pins(tmp_path):
    pins = bundle.parse_requirements(REPO / "requirements.txt")
    assert pins["robosuite"] == "1.5.2" and pins["mujoco"] == "3.3.7" and "torch" in pins
    bad = tmp_path / "r.txt"
    bad.write_text("numpy>=1.0\n")
    with pytest.raises(bundle.BundleError, match="exact pin"):
        bundle.parse_requirements(bad)


def test_rewritten_wheel_has_a_valid_record(tmp_path):
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/data/a,b.txt": b"comma in name",
             "pkg-1.0+local.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0+local\n",
             "pkg-1.0+local.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    wheel = tmp_path / "pkg-1.0+local-py3-none-any.whl"
    bundle.write_wheel(wheel, files, "pkg-1.0+local.dist-info")
    bundle.verify_wheel_record(wheel)
    assert bundle.wheel_metadata(wheel)[:2] == ("pkg", "1.0+local")
    tampered = tmp_path / "tampered-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tampered, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, b"y = 2\n" if n == "pkg/__init__.py" else src.read(n))
    with pytest.raises(bundle.BundleError, match="does not match"):
        bundle.verify_wheel_record(tampered)


def test_numba_patch_keeps_jit_optional():
    original = "import numba\n\nimport robosuite.macros as macros\n\n\ndef jit_decorator(func):\n" \
               "    if macros.ENABLE_NUMBA:\n        return numba.jit(nopython=True)(func)\n    return func\n"
    patched = bundle.patch_numba_module(original)
    assert "except ImportError" in patched and "numba is not None" in patched
    compile(patched, "numba.py", "exec")
    with pytest.raises(bundle.BundleError):
        bundle.patch_numba_module(patched.replace("import numba\n", "import numba as nb\n"))


# ---------------------------------------------------------------------------------------------------- slow test
def _offline_env(**extra) -> dict:
    """Environment for pip with no index, no find-links and no config of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd, **kw):
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


@pytest.mark.slow
def test_sim_bundle_installs_offline_and_simulates(tmp_path, monkeypatch):
    if ctypes.util.find_library("OSMesa") is None:
        pytest.fail("libOSMesa not found: install the packages of .ci/apt-packages.txt (libosmesa6)")
    cache, out = tmp_path / "wheels", tmp_path / "bundle"
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))  # nothing cached outside tmp_path
    _run([sys.executable, str(REPO / "export" / "offline_bundle.py"), "--out", str(out), "--python", PY,
          "--only", "sim", "--cache", str(cache)], cwd=REPO)
    manifest = json.loads((out / "bundle.json").read_text())
    names = {bundle.canonical(w["name"]) for w in manifest["wheels"]}
    assert names == {"robosuite", "mujoco", "glfw", "pyopengl", "scipy", "termcolor", "coop-transport"}
    total = sum(f.stat().st_size for f in out.iterdir())
    assert total <= bundle.SIM_SIZE_LIMIT_BYTES, f"sim bundle is {total / 2**20:.1f} MiB"
    pruned = manifest["robosuite_pruned"]
    assert pruned["pruned_wheel_bytes"] < 20 * 2**20 < pruned["original_wheel_bytes"]
    kept = pruned["kept_assets"]
    assert any(a.startswith("robosuite/models/assets/robots/panda/") for a in kept)
    assert any(a.startswith("robosuite/models/assets/grippers/meshes/panda_gripper/") for a in kept)
    assert not any(k in a for a in kept for k in ("/sawyer/", "/ur5e/", "/gr1/", "bullet_data", "robotiq"))
    for w in out.glob("robosuite-*.whl"):
        bundle.verify_wheel_record(w)

    # The target: an empty venv holding what the GPU machine already has (installed offline too), plus pytest.
    target = bundle.Target(PY, bundle.DEFAULT_PLATFORM)
    provided = tmp_path / "provided"
    pins = bundle.parse_requirements(REPO / "requirements.txt")
    items = bundle.resolve([f"numpy=={pins['numpy']}", f"pytest=={pins['pytest']}", *bundle.SIM_TARGET_PROVIDED],
                           target)
    bundle.fetch_items(items, target, provided)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, sorted(provided.glob("*.whl")))],
         env=_offline_env())

    # Install from the bundle alone, and check through EGL (install.sh --check) and OSMesa.
    _run(["sh", str(out / "install.sh"), "--check"], env=_offline_env(PYTHON=python, MUJOCO_GL="egl"),
         cwd=tmp_path)
    listed = _run([python, "-m", "pip", "list", "--format", "json"], env=_offline_env()).stdout
    versions = {bundle.canonical(p["name"]): p["version"] for p in json.loads(listed)}
    assert versions["robosuite"] == "1.5.2+coop.pruned" and versions["mujoco"] == pins["mujoco"]
    assert "numba" not in versions and "llvmlite" not in versions
    for gl in ("egl", "osmesa"):
        proc = _run([python, "-m", "coop_transport.bundle", "--smoke"],
                    env=_offline_env(MUJOCO_GL=gl, PYOPENGL_PLATFORM=gl), cwd=tmp_path)
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert result["ok"] and result["deterministic"] and result["image_shape"] == [64, 64, 3]
        assert result["gl_context"].startswith(f"mujoco.{gl}.") and result["numba_available"] is False
        assert result["robosuite_dist"] == "1.5.2+coop.pruned"

    # The project's simulation tests against the pruned install (the venv's coop_transport, not the source tree).
    proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_sim.py")],
                          text=True, capture_output=True, cwd=REPO, env=_offline_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    where = _run([python, "-c", "import coop_transport, robosuite; print(coop_transport.__file__, robosuite.__file__)"],
                 env=_offline_env()).stdout
    assert str(venv) in where and str(REPO) not in where.split()[0]
