"""Export a π0 policy for deployment: ONNX graphs of the full chunk sampler, a manifest, parity figures, and
TensorRT engines where TensorRT is installed (library: ``coop_transport.export``).

Usage:
    python export/export.py --out exports/small                                   # the shipped default policy
    python export/export.py --out exports/x --checkpoint runs/x/checkpoints/step_030000 --samples 1 4
    python export/export.py --out exports/small --mode engines --tensorrt fp16 int8   # on the deployment GPU
    python export/export.py --out exports/small --mode verify                     # hashes + stored-output parity
    python export/export.py --out exports/small --closed-loop-episodes 100        # + closed-loop parity (slow)

Prints the ONNX file sizes and export times, then the parity table: each available backend against PyTorch eager
on fresh random inputs with the same noise (max abs error per action dimension).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import coop_transport.export  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "coop_transport"))

import tyro  # noqa: E402

from coop_transport.export.exporter import ExportConfig, main  # noqa: E402
from coop_transport.export.spec import ExportError  # noqa: E402

if __name__ == "__main__":
    try:
        main(tyro.cli(ExportConfig))
    except ExportError as error:  # refusals (wrong checkpoint, corrupt files, ...) are messages, not tracebacks
        raise SystemExit(f"export: {error}")
