"""Deployment export of the π0 policy: ONNX graphs + manifest, TensorRT engines, backends behind one interface,
parity checks. Importing this package is light (numpy only); PyTorch, onnx, onnxruntime and tensorrt are imported
where they are used, so an exported policy runs through ONNX Runtime without PyTorch.

    python export/export.py --out exports/small                        # export the shipped default policy
    policy = load_backend_policy("exports/small", "onnxruntime")       # Pi0Policy's inference surface
    deploy.load_arm_policy("exports/small", "robot0", backend="onnxruntime")

Modules: spec (named inputs/outputs), graphs (what is exported; the registry), fused (the chunk sampler rewritten with
fused weights, which the π0 graphs are traced from), onnx_export, manifest (hashes, source checkpoint), backends
(torch, torch-cudagraph, torch-compile, torch-compile-cudagraph, onnxruntime[-cpu|-cuda|-tensorrt], tensorrt),
runtime (BackendPolicy), parity, tensorrt_build, exporter (the command's library).
"""

from coop_transport.export.backends import BACKENDS, ChunkBackend, canonical_backend, make_backend, needs_export
from coop_transport.export.manifest import MANIFEST_FILE, check_source, read_manifest, verify_file
from coop_transport.export.spec import ExportError, ExportFileMissing, TensorSpec

__all__ = [
    "BACKENDS", "MANIFEST_FILE", "ChunkBackend", "ExportError", "ExportFileMissing", "TensorSpec", "canonical_backend",
    "check_source", "make_backend", "needs_export", "read_manifest", "verify_file",
]
