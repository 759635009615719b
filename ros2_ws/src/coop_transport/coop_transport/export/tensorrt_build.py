"""TensorRT engines from the exported ONNX graphs, each checked against PyTorch before it is accepted.

Runs where ``import tensorrt`` succeeds (``pip install tensorrt-cu12`` with internet access, or NVIDIA's container
images); elsewhere ``build_engines`` returns a "skipped" record with the reason, which the manifest keeps. Engines
are specific to the GPU model and TensorRT version: build them on the deployment machine
(``python export/export.py --mode engines --out DIR``).

Precisions: fp32, fp16 (the default), bf16, int8 (implicit quantization calibrated on `calibration` inputs, or on
random inputs, which rarely pass the accuracy gate), fp8 (not built: TensorRT's FP8 needs explicit Q/DQ nodes in the
ONNX graph, e.g. from NVIDIA's TensorRT Model Optimizer, which this exporter does not insert). Each built engine runs
the graph's reference inputs; its max abs error against PyTorch's outputs must be within the precision's tolerance,
else it is recorded with ``accepted: false`` and the tensorrt backend will not load it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import numpy as np

from coop_transport.export.spec import ExportError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Max abs error of z-scored actions against PyTorch float32 for an engine to be accepted.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 1e-1, "fp8": 1e-1}


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) where TensorRT imports, else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as error:  # ImportError, or a broken install failing to load its libraries
        return False, (f"TensorRT is not installed here ({type(error).__name__}: {error}); engines are built where "
                       "`import tensorrt` succeeds (pip install tensorrt-cu12 with internet access, or an NGC "
                       "container): python export/export.py --mode engines --out DIR")
    return True, trt.__version__


def require_tensorrt():
    ok, message = tensorrt_status()
    if not ok:
        raise ExportError(message)
    import tensorrt as trt

    return trt


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How engines are built (all recorded in the manifest)."""

    precisions: tuple[str, ...] = ("fp16",)
    """fp32 | fp16 | bf16 | int8 | fp8"""
    workspace_gib: float = 8.0
    """builder workspace memory limit"""
    optimization_level: int = 3
    """TensorRT builder optimization level 0-5 (3 is TensorRT's default)"""
    calibration: str | None = None
    """int8: .npz with one array per graph input, stacked on a new leading axis (K calibration batches)"""
    calibration_batches: int = 16
    """int8 without `calibration`: this many random input sets"""

    def __post_init__(self):
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown TensorRT precisions {unknown}; expected {PRECISIONS}")


def build_engines(export_dir: str | pathlib.Path, manifest: dict, settings: EngineSettings = EngineSettings(),
                  log=print) -> dict[str, Any]:
    """Build engines for every π0 chunk graph of the manifest; returns the manifest's 'tensorrt' section and adds
    the engine files to manifest['files'] (the caller writes the manifest)."""
    section: dict[str, Any] = {"settings": dataclasses.asdict(settings), "tolerance": TOLERANCE, "engines": {}}
    ok, version = tensorrt_status()
    if not ok:
        log(f"TensorRT: skipped. {version}")
        return {**section, "status": "skipped", "reason": version}
    export_dir = pathlib.Path(export_dir)
    section.update(status="built", tensorrt_version=version)
    for graph, entry in manifest["graphs"].items():
        if entry["kind"] != "pi0_chunk_sampler":
            continue
        for precision in settings.precisions:
            name = f"{graph}.{precision}"
            if precision == "fp8":
                section["engines"][name] = {"graph": graph, "precision": precision, "status": "skipped",
                                            "accepted": False, "reason": "FP8 needs explicit Q/DQ quantization of "
                                            "the ONNX graph (NVIDIA TensorRT Model Optimizer); not inserted here"}
                log(f"TensorRT {name}: skipped (FP8 needs a Q/DQ-quantized graph)")
                continue
            section["engines"][name] = _build_one(export_dir, manifest, graph, precision, settings, log)
    return section


def _build_one(export_dir: pathlib.Path, manifest: dict, graph: str, precision: str, settings: EngineSettings,
               log) -> dict[str, Any]:
    import tensorrt as trt
    import torch

    entry = manifest["graphs"][graph]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(export_dir / entry["file"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        log(f"TensorRT {graph}.{precision}: ONNX parse failed: {errors[:3]}")
        return {"graph": graph, "precision": precision, "status": "parse_failed", "accepted": False, "errors": errors}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    config.builder_optimization_level = settings.optimization_level
    calibrator = None
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _make_calibrator(trt, torch, entry, settings)
        config.int8_calibrator = calibrator
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        log(f"TensorRT {graph}.{precision}: build failed")
        return {"graph": graph, "precision": precision, "status": "build_failed", "accepted": False,
                "build_seconds": round(seconds, 1)}
    file = f"{graph}.{precision}.engine"
    (export_dir / file).write_bytes(bytes(serialized))
    record = {"graph": graph, "precision": precision, "status": "built", "file": file,
              "build_seconds": round(seconds, 1), "tensorrt_version": trt.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "bytes": (export_dir / file).stat().st_size}
    # Accuracy gate on the reference inputs (PyTorch float32 outputs stored at export).
    from coop_transport.export.manifest import file_record

    manifest["files"][file] = file_record(export_dir, file)
    try:
        error = _reference_error(export_dir, manifest, graph, precision)
    except Exception as failure:  # an engine that cannot run its reference inputs is not deployable
        log(f"TensorRT {graph}.{precision}: built, but running the reference inputs failed: {failure}")
        return {**record, "status": "reference_check_failed", "accepted": False, "error": str(failure)}
    record.update(max_abs_error=error, tolerance=TOLERANCE[precision], accepted=bool(error <= TOLERANCE[precision]))
    log(f"TensorRT {graph}.{precision}: built in {seconds:.0f} s, {record['bytes'] / 1e6:.1f} MB, max abs error "
        f"{error:.2e} vs PyTorch ({'accepted' if record['accepted'] else 'REJECTED'}, tolerance {TOLERANCE[precision]})")
    return record


def _reference_error(export_dir: pathlib.Path, manifest: dict, graph: str, precision: str) -> float:
    from coop_transport.export.backends import TensorRTBackend
    from coop_transport.export.parity import load_reference

    inputs, expected = load_reference(export_dir, manifest, graph)
    settings = manifest["graphs"][graph]["settings"]
    engines = {f"{graph}.{precision}": {"graph": graph, "precision": precision, "accepted": True,
                                          "file": f"{graph}.{precision}.engine"}}
    backend = TensorRTBackend(export_dir, {**manifest, "tensorrt": {"engines": engines}}, precision=precision)
    actual = backend.sample(inputs, settings["num_samples"])
    return float(np.abs(actual - expected["actions"]).max())


def _make_calibrator(trt, torch, entry: dict, settings: EngineSettings):
    from coop_transport.export.spec import TensorSpec, fake_inputs

    specs = [TensorSpec.from_dict(s) for s in entry["inputs"]]
    if settings.calibration:
        data = np.load(settings.calibration)
        count = min(len(data[s.name]) for s in specs)
        batches = [{s.name: np.ascontiguousarray(data[s.name][i]) for s in specs} for i in range(count)]
    else:
        batches = [fake_inputs(specs, seed=10_000 + i) for i in range(settings.calibration_batches)]

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.index = 0
            self.held = []

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            if self.index >= len(batches):
                return None
            batch = batches[self.index]
            self.index += 1
            self.held = [torch.from_numpy(batch[n]).cuda() for n in names]
            return [int(t.data_ptr()) for t in self.held]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    return Calibrator()
