"""Time one π0 chunk (prefix + 10 flow steps, N samples batched) per backend; prints a markdown table.

Usage:
    python bench/policy_latency.py                          # small: eager vs ONNX Runtime CPU (+ CUDA graphs on GPU)
    python bench/policy_latency.py --configs small pi0-3b   # π0-3B at random init (bf16 on GPU)
    python bench/policy_latency.py --configs default        # the shipped default policy itself (horizon 32)
    python bench/policy_latency.py --backends eager cudagraph compile --reps 50
    python bench/policy_latency.py --backends eager ort-cpu ort-cuda ort-tensorrt tensorrt --threads 1

Backends: eager | cudagraph | compile | compile-cudagraph (PyTorch; the last three GPU-only; the last is Inductor's
fused kernels captured as one CUDA graph) | ort-cpu | ort-cuda | ort-tensorrt (ONNX
Runtime execution providers) | tensorrt (engines built here, fp16). The exported ones are exported from the same
random-weight model into a temporary directory first (export and engine build times and file sizes are reported);
unavailable ones (no CUDA provider, no TensorRT) are listed as skipped with the reason.

Weights are random (speed does not depend on them) except for `default`, the shipped default policy's checkpoint
(the `small` architecture and its 32-step action horizon, with trained weights). The batch is one per-arm
observation: wrist + agentview images at the config's resolution, the prompt padded to its token length, an 18-D
state. ONNX Runtime runs the graph export/export.py ships (fused, export.fused), its threads spinning between nodes
as in deployment (--no-fused, --no-ort-spinning: the plain trace, sleeping threads). All backends of one
(config, N) cell are timed in the same process, interleaved in short rounds (rotating order, one untimed re-warm
call per round), so their ratio is meaningful even on a shared, noisy machine; the load average is printed before
and after.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

TORCH_BACKENDS = ("eager", "cudagraph", "compile", "compile-cudagraph")
EXPORTED_BACKENDS = {"ort-cpu": "onnxruntime-cpu", "ort-cuda": "onnxruntime-cuda",
                     "ort-tensorrt": "onnxruntime-tensorrt", "tensorrt": "tensorrt"}


@dataclass
class Config:
    configs: tuple[str, ...] = ("small",)
    """Model configurations to time."""
    samples: tuple[int, ...] = (1, 4)
    """N values (mean-of-N batch sizes)."""
    backends: tuple[str, ...] = ("eager", "cudagraph", "ort-cpu")
    """eager | cudagraph | compile | compile-cudagraph | ort-cpu | ort-cuda | ort-tensorrt | tensorrt (unavailable ones are skipped)."""
    reps: int = 30
    """Timed repetitions per cell (after warm-up)."""
    warmup: int = 3
    """Untimed calls first."""
    threads: int = 0
    """CPU threads for torch and ONNX Runtime (0: all cores)."""
    ort_threads: int = 0
    """ONNX Runtime intra-op threads if different from torch's (0: the same)."""
    ort_spinning: bool = True
    """ONNX Runtime's intra-op threads spin between nodes instead of sleeping: its default, what the runtime and the
    policy nodes use, and what PyTorch's OpenMP threads do. --no-ort-spinning: they sleep at once (kinder to other
    processes on a shared machine; every parallel node then pays a thread wake-up)."""
    fused: bool = True
    """Export the fused chunk sampler (export.fused, what export/export.py ships); --no-fused: the plain trace of
    Pi0Model.sample_actions."""
    device: str = "auto"
    """cuda | cpu | auto."""
    interleave: bool = True
    """Alternate the backends in short rounds (fair under a changing load; see time_interleaved); False times
    each backend's reps in a row."""
    block: int = 5
    """Timed calls per backend per round when interleaving."""
    ort_cpu_max_params_m: float = 500.0
    """Skip ort-cpu for models above this many million parameters (π0-3B on CPU takes seconds per chunk)."""
    export_dir: str | None = None
    """Where to export (kept for inspection); default: a temporary directory."""


def make_batch(config, device, batch_size: int = 1) -> dict:
    from coop_transport.policy.tokenizer import ByteTokenizer

    size = config.vision.image_size
    gen = torch.Generator().manual_seed(0)
    images = {c: torch.randint(0, 256, (batch_size, size, size, 3), generator=gen, dtype=torch.uint8).to(device)
              for c in config.cameras}
    tokens, mask = ByteTokenizer(config.max_token_len).encode("pick up the hammer")  # ids < every vocab size
    return {
        "images": images,
        "prompt_tokens": torch.as_tensor(tokens, device=device)[None].repeat(batch_size, 1),
        "prompt_mask": torch.as_tensor(mask, device=device)[None].repeat(batch_size, 1),
        "state": torch.randn(batch_size, config.state_dim, generator=gen).to(device),
    }


def graph_inputs(batch: dict, config, n: int) -> dict[str, np.ndarray]:
    """The same observation as named numpy inputs of the exported graph (export.spec), with fresh noise."""
    from coop_transport.export.spec import image_input

    out = {image_input(c): batch["images"][c].cpu().numpy() for c in config.cameras}
    out.update(prompt_tokens=batch["prompt_tokens"].cpu().numpy(), prompt_mask=batch["prompt_mask"].cpu().numpy(),
               state=batch["state"].float().cpu().numpy(),
               noise=np.random.default_rng(0).standard_normal(
                   (batch["state"].shape[0] * n, config.action_horizon, config.action_pad_dim)).astype(np.float32))
    return out


def time_calls(fn, reps: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def time_interleaved(fns: dict, reps: int, warmup: int, cuda: bool, block: int = 5) -> dict[str, list[float]]:
    """Rounds over the backends in rotating order; in each round a backend makes one untimed call (its caches
    warm again after the previous backend's) and then `block` timed calls. Every backend sees the same machine
    load (rounds are short) without paying for the others' cache footprint. Returns ms per call per backend."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    names = list(fns)
    times = {name: [] for name in names}
    rounds = -(-reps // block)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fns[name]()  # re-warm, untimed
            for _ in range(min(block, reps - len(times[name]))):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fns[name]()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def _unavailable(backend: str) -> str | None:
    """Why an exported backend cannot run here (checked before exporting), or None."""
    if backend == "tensorrt":
        from coop_transport.export.tensorrt_build import tensorrt_status

        ok, why = tensorrt_status()
        return None if ok else why.split(";")[0]
    try:
        import onnxruntime as ort
    except ImportError as error:
        return f"onnxruntime is not installed ({error})"
    provider = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                "ort-tensorrt": "TensorrtExecutionProvider"}[backend]
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} here has no {provider} (install onnxruntime-gpu)"
    return None


def _export(model, config, name: str, cfg: Config, exported: list[str], root: Path) -> dict:
    """Export the (random) model's chunk graphs, build TensorRT engines if asked; sizes and times per backend."""
    from coop_transport.export.exporter import export_model

    directory = root / name
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    manifest = export_model(cpu_model, config, directory, samples=tuple(cfg.samples), log=lambda *_: None,
                            fused=cfg.fused)
    del cpu_model
    info = {"dir": directory, "manifest": manifest, "engines": {}}
    if "tensorrt" in exported:
        from coop_transport.export.tensorrt_build import EngineSettings, build_engines

        manifest["tensorrt"] = build_engines(directory, manifest, EngineSettings(precisions=("fp16",)),
                                             log=lambda *_: None)
        info["engines"] = manifest["tensorrt"].get("engines", {})
        from coop_transport.export.manifest import write_manifest

        write_manifest(directory, manifest)
    return info


def _artifact(info: dict | None, backend: str, n: int) -> tuple[float | None, float | None]:
    """(file MB, export or build seconds) of the graph/engine a backend runs for N=n."""
    if info is None:
        return None, None
    from coop_transport.export.graphs import chunk_graph_name

    graph = chunk_graph_name(1, n)
    manifest = info["manifest"]
    if backend == "tensorrt":
        engine = info["engines"].get(f"{graph}.fp16", {})
        return (engine.get("bytes", 0) / 1e6 or None), engine.get("build_seconds")
    entry = manifest["graphs"][graph]
    size = sum(manifest["files"][f]["bytes"] for f in (entry["file"], entry.get("external_data")) if f)
    return size / 1e6, entry["export_seconds"]


def main(cfg: Config) -> list[dict]:
    from coop_transport.pi0_policy import resolve_device
    from coop_transport.policy.config import get_config
    from coop_transport.policy.model import build_model

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    hw = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()}, " \
                                                          f"{threads} threads"
    load_before = os.getloadavg()
    ort_note = (f"; ONNX Runtime {cfg.ort_threads or threads} threads, spinning {'on' if cfg.ort_spinning else 'off'}, "
                f"{'fused' if cfg.fused else 'plain'} graph")
    print(f"# π0 chunk latency on {device.type} ({hw}{ort_note}); torch {torch.__version__}; load {load_before[0]:.1f} "
          f"(1/5/15 min: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, {os.cpu_count()} cores)")
    rows, skipped = [], []
    scratch = tempfile.TemporaryDirectory(prefix="policy_latency_") if cfg.export_dir is None else None
    root = Path(cfg.export_dir) if cfg.export_dir else Path(scratch.name)
    for name in cfg.configs:
        dtype = torch.bfloat16 if cuda and name != "tiny" else torch.float32
        if name == "default":  # the shipped default policy: its weights and config
            from coop_transport.pi0_policy import default_policy_dir
            from coop_transport.policy.checkpoint import load_checkpoint

            model = load_checkpoint(default_policy_dir(), device=device).model.to(dtype).eval()
            config = model.config
        else:
            config = get_config(name)
            with torch.device(device):
                model = build_model(config, device=device, dtype=dtype).eval()
        params = sum(p.numel() for p in model.parameters())

        # Which backends run here; the exported ones share one export of this model.
        wanted = []
        for backend in cfg.backends:
            if backend in TORCH_BACKENDS and backend != "eager" and not cuda:
                continue  # GPU-only PyTorch paths: silently absent on CPU, as before
            if backend == "ort-cpu" and params / 1e6 > cfg.ort_cpu_max_params_m:
                skipped.append(f"ort-cpu for {name}: {params / 1e9:.1f} B parameters on CPU (raise "
                               "--ort-cpu-max-params-m to run it)")
                continue
            if backend not in TORCH_BACKENDS and backend not in EXPORTED_BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; expected {TORCH_BACKENDS + tuple(EXPORTED_BACKENDS)}")
            why = _unavailable(backend) if backend in EXPORTED_BACKENDS else None
            if why:
                skipped.append(f"{backend} for {name}: {why}")
                continue
            wanted.append(backend)
        exported = [EXPORTED_BACKENDS[b] for b in wanted if b in EXPORTED_BACKENDS]
        info = _export(model, config, name, cfg, exported, root) if exported else None
        ort_backends = {}
        for backend in [b for b in wanted if b in EXPORTED_BACKENDS]:
            from coop_transport.export.backends import make_backend
            from coop_transport.export.spec import ExportError

            try:
                options = {} if backend == "tensorrt" else {"spinning": cfg.ort_spinning}
                ort_backends[backend] = make_backend(EXPORTED_BACKENDS[backend], export_dir=info["dir"],
                                                     manifest=info["manifest"], threads=cfg.ort_threads or threads,
                                                     **options)
            except ExportError as error:
                skipped.append(f"{backend} for {name}: {str(error).split(';')[0]}")
                wanted.remove(backend)

        for n in cfg.samples:
            batch = make_batch(config, device)
            inputs = graph_inputs(batch, config, n)
            fns = {}
            for backend in wanted:
                if backend == "eager":
                    fns[backend] = lambda: model.sample_actions(batch, num_samples=n)  # noqa: E731
                elif backend == "cudagraph":
                    from coop_transport.inference import CudaGraphSampler

                    sampler = CudaGraphSampler(model, batch, n)
                    fns[backend] = lambda s=sampler: s(batch)  # noqa: E731
                elif backend == "compile":
                    from coop_transport.inference import compiled_sampler

                    sampler = compiled_sampler(model, n)
                    fns[backend] = lambda s=sampler: s(batch)  # noqa: E731
                elif backend == "compile-cudagraph":
                    from coop_transport.inference import compile_cudagraph

                    t0 = time.perf_counter()
                    sampler = compile_cudagraph(model, batch, n)
                    print(f"{name} N={n}: compile + capture {time.perf_counter() - t0:.0f} s", flush=True)
                    fns[backend] = lambda s=sampler: s(batch)  # noqa: E731
                else:
                    fns[backend] = lambda b=ort_backends[backend]: b.sample(inputs, n)  # noqa: E731
            with torch.inference_mode():
                if cfg.interleave:
                    times = time_interleaved(fns, cfg.reps, cfg.warmup, cuda, cfg.block)
                else:
                    times = {b: time_calls(fn, cfg.reps, cfg.warmup, cuda) for b, fn in fns.items()}
            for backend in wanted:
                size_mb, seconds = _artifact(info, backend, n) if backend in EXPORTED_BACKENDS else (None, None)
                rows.append({"config": name, "params_M": params / 1e6, "N": n, "backend": backend,
                             "median_ms": float(np.median(times[backend])),
                             "p99_ms": float(np.percentile(times[backend], 99)),
                             "dtype": ({"tensorrt": "float16"}.get(backend, "float32") if backend in EXPORTED_BACKENDS
                                       else str(dtype).replace("torch.", "")),
                             "file_MB": size_mb, "export_s": seconds})
        del model, ort_backends
        if cuda:
            torch.cuda.empty_cache()
    load_after = os.getloadavg()
    print("| config | params | dtype | N | backend | median ms | p99 ms | speed-up vs eager | file MB | export/build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eager = next((e for e in rows if e["config"] == r["config"] and e["N"] == r["N"] and e["backend"] == "eager"),
                     None)
        ratio = f"{eager['median_ms'] / r['median_ms']:.1f}x" if eager else "—"
        size = f"{r['file_MB']:.1f}" if r["file_MB"] else "—"
        secs = f"{r['export_s']:.1f}" if r["export_s"] is not None else "—"
        print(f"| {r['config']} | {r['params_M']:.1f} M | {r['dtype']} | {r['N']} | {r['backend']} | "
              f"{r['median_ms']:.2f} | {r['p99_ms']:.2f} | {ratio} | {size} | {secs} |")
    for line in skipped:
        print(f"skipped: {line}")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if scratch is not None:
        scratch.cleanup()
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
