#!/usr/bin/env bash
# Sets up coop_transport on a fresh Debian/Ubuntu machine: system libraries for headless MuJoCo rendering
# (EGL and OSMesa), a virtual environment .venv at the repository root with the pinned Python stack, and the
# library itself (editable). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}

# System packages (headless OpenGL). Installed only where missing and where we may (root or sudo).
missing=()
while read -r pkg; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < .ci/apt-packages.txt
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi
    if [[ "$SUDO" == none ]]; then
        echo "setup.sh: missing system packages (${missing[*]}); install them with apt-get as root" >&2
        exit 1
    fi
    echo "setup.sh: installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e ros2_ws/src/coop_transport
# Simulated FR3 arms (franky-sim) for the libfranka backend's robot-in-the-loop test and bench: an environment of
# their own, because they need mujoco 4 and robosuite needs mujoco 3.3.7 (about 660 MB).
if [[ ! -x .venv-franky-sim/bin/python ]]; then
    "$PYTHON" -m venv .venv-franky-sim
fi
.venv-franky-sim/bin/python -m pip install -q --upgrade pip
.venv-franky-sim/bin/python -m pip install -q -r requirements-franky-sim.txt
# The shipped default's ONNX export, next to it: the policy nodes' backend "auto" runs it through ONNX Runtime on a
# CPU (2x faster than eager PyTorch there, which is what keeps two policy nodes on 2 cores at 20 Hz). Re-made on
# every run so that it always matches the committed checkpoint (an export of another checkpoint is refused).
.venv/bin/python export/export.py --out ros2_ws/src/coop_transport/coop_transport/assets/policies/per_arm_small/export \
    --parity-trials 1 | tail -n 2
echo "setup.sh: environment ready in .venv"
