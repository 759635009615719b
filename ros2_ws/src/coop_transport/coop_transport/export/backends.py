"""Inference backends behind one interface: named numpy arrays in (export.spec), z-scored action chunks out.

    backend = make_backend("onnxruntime", export_dir="exports/small")      # or "torch", "tensorrt", ...
    actions = backend.sample(inputs, num_samples=4)                          # (B*4, H, action_dim) float32

| name                   | runs                                              | needs                                  |
|------------------------|---------------------------------------------------|----------------------------------------|
| torch                  | Pi0Model.sample_actions, eager                    | the checkpoint                         |
| torch-cudagraph        | the whole chunk as one CUDA graph per (B, N)      | the checkpoint, a CUDA device          |
| torch-compile          | torch.compile over the whole chunk                | the checkpoint                         |
| onnxruntime            | the ONNX chunk graph; best available provider     | an export directory                    |
| onnxruntime-cpu / -cuda / -tensorrt | the same with that execution provider | onnxruntime(-gpu) with the provider |
| tensorrt               | the TensorRT engine built from the ONNX graph     | an export directory with engines, tensorrt |

Every backend checks its inputs against the graph's specs (names, shapes, dtypes) and refuses NaN/inf outputs.
Aliases: eager, cudagraph, compile, onnx, ort, ort-cpu, ort-cuda, ort-tensorrt, trt.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from coop_transport.export.spec import (ACTIONS, NOISE, PROMPT_MASK, PROMPT_TOKENS, STATE, ExportError, TensorSpec,
                                        check_inputs, chunk_sampler_inputs, image_input)

BACKENDS = ("torch", "torch-cudagraph", "torch-compile", "torch-compile-cudagraph", "onnxruntime", "onnxruntime-cpu",
            "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
ALIASES = {"eager": "torch", "cudagraph": "torch-cudagraph", "compile": "torch-compile",
           "compile-cudagraph": "torch-compile-cudagraph", "onnx": "onnxruntime",
           "ort": "onnxruntime", "ort-cpu": "onnxruntime-cpu", "ort-cuda": "onnxruntime-cuda",
           "ort-tensorrt": "onnxruntime-tensorrt", "trt": "tensorrt"}
TORCH_BACKENDS = ("torch", "torch-cudagraph", "torch-compile", "torch-compile-cudagraph")
CUDA_GRAPH_BACKENDS = ("torch-cudagraph", "torch-compile-cudagraph")  # capture a CUDA graph: a CUDA device only
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}


def canonical_backend(name: str) -> str:
    """The canonical backend name; ValueError naming the known ones (and the closest) otherwise."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, list(BACKENDS) + list(ALIASES), n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown inference backend {name!r}; available: {BACKENDS} (aliases {sorted(ALIASES)}).{hint}")
    return name


def needs_export(name: str) -> bool:
    return canonical_backend(name) not in TORCH_BACKENDS


class ChunkBackend:
    """Base class: ``sample(inputs, num_samples)`` checks the inputs against the graph's specs, then runs."""

    name: str = ""
    description: str = ""

    def input_specs(self, batch_size: int, num_samples: int) -> list[TensorSpec]:
        raise NotImplementedError

    def supports(self, batch_size: int, num_samples: int) -> bool:
        try:
            self.input_specs(batch_size, num_samples)
        except ExportError:
            return False
        return True

    def sample(self, inputs: Mapping[str, Any], num_samples: int) -> np.ndarray:
        """(B*N, H, action_dim) float32 z-scored actions for named inputs (export.spec), B from the state's rows."""
        batch_size = int(np.shape(inputs[STATE])[0]) if STATE in inputs else 0
        specs = self.input_specs(batch_size, num_samples)
        checked = check_inputs(specs, inputs, where=f"{self.name} (B={batch_size}, N={num_samples})")
        actions = np.asarray(self._run(checked, batch_size, num_samples), dtype=np.float32)
        if not np.all(np.isfinite(actions)):
            raise ExportError(f"backend {self.name} produced NaN or inf actions")
        return actions

    def _run(self, inputs: dict[str, np.ndarray], batch_size: int, num_samples: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- PyTorch


class TorchBackend(ChunkBackend):
    """The PyTorch model itself: eager, one CUDA graph per (B, N) (inference.CudaGraphSampler), torch.compile, or
    torch.compile captured as one CUDA graph (inference.compile_cudagraph)."""

    def __init__(self, model, mode: str = "torch"):
        import torch

        mode = canonical_backend(mode)
        if mode not in TORCH_BACKENDS:
            raise ValueError(f"TorchBackend runs {TORCH_BACKENDS}, not {mode!r}")
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        if mode in CUDA_GRAPH_BACKENDS and self.device.type != "cuda":
            raise ExportError(f"{mode} needs the model on a CUDA device, it is on {self.device}")
        self.name = mode
        self.description = f"{mode} on {self.device} ({str(model.dtype).replace('torch.', '')}), torch {torch.__version__}"
        self._samplers: dict[tuple[int, int], Any] = {}

    def input_specs(self, batch_size: int, num_samples: int) -> list[TensorSpec]:
        if batch_size < 1 or num_samples < 1:
            raise ExportError(f"batch size and N must be >= 1, got {batch_size}, {num_samples}")
        return chunk_sampler_inputs(self.config, batch_size, num_samples)

    def model_batch(self, inputs: Mapping[str, np.ndarray]) -> dict:
        import torch

        as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(self.device)  # noqa: E731
        return {"images": {slot: as_tensor(inputs[image_input(slot)]) for slot in self.config.cameras},
                "prompt_tokens": as_tensor(inputs[PROMPT_TOKENS]), "prompt_mask": as_tensor(inputs[PROMPT_MASK]),
                "state": as_tensor(inputs[STATE])}

    def _run(self, inputs: dict[str, np.ndarray], batch_size: int, num_samples: int) -> np.ndarray:
        import torch

        batch = self.model_batch(inputs)
        noise = torch.from_numpy(inputs[NOISE]).to(self.device)
        with torch.inference_mode():
            if self.name == "torch":
                out = self.model.sample_actions(batch, noise=noise, num_samples=num_samples)
            else:
                key = (batch_size, num_samples)
                if key not in self._samplers:
                    from coop_transport.inference import CudaGraphSampler, compile_cudagraph, compiled_sampler

                    if self.name == "torch-cudagraph":
                        self._samplers[key] = CudaGraphSampler(self.model, batch, num_samples)
                    elif self.name == "torch-compile-cudagraph":
                        self._samplers[key] = compile_cudagraph(self.model, batch, num_samples)
                    else:
                        self._samplers[key] = compiled_sampler(self.model, num_samples)
                out = self._samplers[key](batch, noise)
            return out.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------- ONNX Runtime


def _graphs_by_shape(manifest: dict, kind: str = "pi0_chunk_sampler") -> dict[tuple[int, int], str]:
    return {(g["settings"]["batch_size"], g["settings"]["num_samples"]): name
            for name, g in manifest["graphs"].items() if g["kind"] == kind}


def _no_graph(export_dir, batch_size: int, num_samples: int, available) -> ExportError:
    shapes = ", ".join(f"B={b} N={n}" for b, n in sorted(available)) or "none"
    return ExportError(f"{export_dir} has no graph for B={batch_size}, N={num_samples} (exported: {shapes}); "
                       f"re-export with --batch-sizes {batch_size} --samples {num_samples}")


def ort_providers(choice: str | list[str] = "auto") -> list:
    """Execution providers in preference order: 'auto' (TensorRT, CUDA, then CPU, as available), 'cpu', 'cuda',
    'tensorrt' (each with CPU as the fallback for unsupported nodes), or an explicit list."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not isinstance(choice, str):
        return list(choice)
    if choice == "auto":
        return [p for p in (ORT_PROVIDERS["tensorrt"], ORT_PROVIDERS["cuda"]) if p in available] + [ORT_PROVIDERS["cpu"]]
    if choice not in ORT_PROVIDERS:
        raise ValueError(f"unknown ONNX Runtime provider {choice!r}; expected auto, {', '.join(ORT_PROVIDERS)}")
    provider = ORT_PROVIDERS[choice]
    if provider not in available:
        raise ExportError(f"ONNX Runtime {ort.__version__} here has no {provider} (available: {available}); "
                          "install onnxruntime-gpu (CUDA, TensorRT providers) on a GPU machine")
    return [provider] + ([ORT_PROVIDERS["cpu"]] if provider != ORT_PROVIDERS["cpu"] else [])


def ort_session_options(threads: int | None = None, spinning: bool | None = None):
    """CPU settings: all graph optimizations, sequential execution, `threads` intra-op threads (None: ORT's default,
    one per physical core). spinning=False stops idle worker threads from busy-waiting (shared machines)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: constant-folding notes are not for users
    return options


def _exported_input_specs(backend, batch_size: int, num_samples: int) -> list[TensorSpec]:
    """Input specs of the exported graph for (batch, N), from the manifest (ONNX Runtime and TensorRT alike)."""
    name = backend._by_shape.get((batch_size, num_samples))
    if name is None:
        raise _no_graph(backend.export_dir, batch_size, num_samples, backend._by_shape)
    return [TensorSpec.from_dict(s) for s in backend.manifest["graphs"][name]["inputs"]]


class OnnxRuntimeBackend(ChunkBackend):
    """The exported chunk graphs in ONNX Runtime sessions, one per exported (B, N); files verified by sha256."""

    def __init__(self, export_dir: str | pathlib.Path, manifest: dict | None = None, providers: str | list = "auto",
                 threads: int | None = None, spinning: bool | None = None, fp16: bool = True,
                 graphs: tuple[str, ...] | None = None):
        import onnxruntime as ort

        from coop_transport.export.manifest import graph_files, read_manifest, verify_file

        self.export_dir = pathlib.Path(export_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.export_dir)
        self.providers = ort_providers(providers)
        provider_list = []
        for p in self.providers:
            if p == ORT_PROVIDERS["tensorrt"]:
                options = {"trt_fp16_enable": bool(fp16)}
                if os.access(self.export_dir, os.W_OK):
                    options.update(trt_engine_cache_enable=True,
                                   trt_engine_cache_path=str(self.export_dir / "ort_tensorrt_cache"))
                provider_list.append((p, options))
            else:
                provider_list.append(p)
        self._by_shape = _graphs_by_shape(self.manifest)
        if graphs is not None:
            self._by_shape = {k: v for k, v in self._by_shape.items() if v in graphs}
        if not self._by_shape:
            raise ExportError(f"{self.export_dir}: the manifest lists no π0 chunk graph")
        self.sessions = {}
        for shape, name in sorted(self._by_shape.items()):
            for file in graph_files(self.manifest, name):
                verify_file(self.export_dir, self.manifest, file)
            path = self.export_dir / self.manifest["graphs"][name]["file"]
            try:
                self.sessions[shape] = ort.InferenceSession(str(path), ort_session_options(threads, spinning),
                                                            providers=provider_list)
            except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
                raise ExportError(f"{path} is not a loadable ONNX graph: {error}") from error
        used = next(iter(self.sessions.values())).get_providers()
        self.name = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
                     "TensorrtExecutionProvider": "onnxruntime-tensorrt"}.get(used[0], "onnxruntime")
        self.description = f"onnxruntime {ort.__version__}, providers {used}, threads {threads or 'default'}"

    def input_specs(self, batch_size: int, num_samples: int) -> list[TensorSpec]:
        return _exported_input_specs(self, batch_size, num_samples)

    def _run(self, inputs: dict[str, np.ndarray], batch_size: int, num_samples: int) -> np.ndarray:
        return self.sessions[(batch_size, num_samples)].run([ACTIONS], inputs)[0]


# ---------------------------------------------------------------------------------------------------- TensorRT


class TensorRTBackend(ChunkBackend):
    """TensorRT engines built by export.tensorrt_build (manifest['tensorrt']['engines']); I/O through torch CUDA
    tensors. Engines are specific to the GPU and TensorRT version they were built with."""

    def __init__(self, export_dir: str | pathlib.Path, manifest: dict | None = None, precision: str = "fp16",
                 device: str = "cuda", allow_rejected: bool = False):
        from coop_transport.export.manifest import read_manifest, verify_file
        from coop_transport.export.tensorrt_build import require_tensorrt

        trt = require_tensorrt()
        import torch

        self.export_dir = pathlib.Path(export_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.export_dir)
        engines = (self.manifest.get("tensorrt") or {}).get("engines") or {}
        chosen = {name: e for name, e in engines.items()
                  if e["precision"] == precision and (e.get("accepted", False) or allow_rejected)}
        if not chosen:
            built = sorted(f"{n} ({'accepted' if e.get('accepted') else 'rejected'})" for n, e in engines.items())
            raise ExportError(f"{self.export_dir} has no accepted {precision} TensorRT engine (built: {built or 'none'});"
                              f" build them on this machine: python export/export.py --mode engines --out {export_dir}")
        self.torch = torch
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dtypes = {getattr(trt.DataType, k): v for k, v in (
            ("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT64", torch.int64),
            ("INT32", torch.int32), ("BOOL", torch.bool), ("UINT8", torch.uint8), ("INT8", torch.int8))
            if hasattr(trt.DataType, k)}
        self._by_shape, self._engines = {}, {}
        for name, entry in chosen.items():
            path = verify_file(self.export_dir, self.manifest, entry["file"])
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ExportError(f"{path} does not deserialize with TensorRT {trt.__version__} on this GPU (built "
                                  f"with {entry.get('tensorrt_version')} on {entry.get('gpu')}); rebuild the engines")
            context = engine.create_execution_context()
            outputs = {}
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                if engine.get_tensor_mode(tensor) == trt.TensorIOMode.OUTPUT:
                    outputs[tensor] = torch.empty(tuple(engine.get_tensor_shape(tensor)),
                                                  dtype=dtypes[engine.get_tensor_dtype(tensor)], device=self.device)
                    context.set_tensor_address(tensor, outputs[tensor].data_ptr())
            graph = entry["graph"]
            shape = (self.manifest["graphs"][graph]["settings"]["batch_size"],
                     self.manifest["graphs"][graph]["settings"]["num_samples"])
            self._by_shape[shape] = graph
            self._engines[shape] = (engine, context, outputs)
        self.name = "tensorrt"
        self.description = f"TensorRT {trt.__version__} {precision} on {torch.cuda.get_device_name(self.device)}"

    def input_specs(self, batch_size: int, num_samples: int) -> list[TensorSpec]:
        return _exported_input_specs(self, batch_size, num_samples)

    def _run(self, inputs: dict[str, np.ndarray], batch_size: int, num_samples: int) -> np.ndarray:
        torch = self.torch
        _, context, outputs = self._engines[(batch_size, num_samples)]
        held = []  # keep the device copies alive until the engine has run
        for name, array in inputs.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
            held.append(tensor)
            context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return outputs[ACTIONS].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------- factory


def make_backend(name: str, *, model=None, export_dir: str | pathlib.Path | None = None, manifest: dict | None = None,
                 threads: int | None = None, **options) -> ChunkBackend:
    """A backend by name. Torch backends take `model` (a Pi0Model); the others an export directory.

    options: onnxruntime: spinning, fp16 (TensorRT provider), graphs; tensorrt: precision, device, allow_rejected.
    """
    name = canonical_backend(name)
    if name in TORCH_BACKENDS:
        if model is None:
            raise ValueError(f"backend {name!r} needs the PyTorch model (a checkpoint)")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchBackend(model, name)
    if export_dir is None:
        raise ValueError(f"backend {name!r} needs an export directory (python export/export.py --out DIR)")
    if name.startswith("onnxruntime"):
        providers = "auto" if name == "onnxruntime" else name.split("-", 1)[1]
        return OnnxRuntimeBackend(export_dir, manifest, providers=providers, threads=threads, **options)
    return TensorRTBackend(export_dir, manifest, **options)
