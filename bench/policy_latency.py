"""Time one π0 chunk (prefix + 10 flow steps, N samples batched) per backend; prints a markdown table.

Usage:
    python bench/policy_latency.py                          # small config; CPU here, + CUDA graphs on a GPU
    python bench/policy_latency.py --configs small pi0-3b   # π0-3B at random init (bf16 on GPU)
    python bench/policy_latency.py --backends eager cudagraph compile --reps 50

Weights are random (speed does not depend on them); the batch is one per-arm observation: wrist + agentview
images at the config's resolution, the prompt padded to its token length, an 18-D state. Eager and fast paths
are timed in the same process, so their ratio is meaningful even on a noisy machine.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro


@dataclass
class Config:
    configs: tuple[str, ...] = ("small",)
    """Model configurations to time."""
    samples: tuple[int, ...] = (1, 4)
    """N values (mean-of-N batch sizes)."""
    backends: tuple[str, ...] = ("eager", "cudagraph")
    """eager | cudagraph | compile (the GPU-only ones are skipped on CPU)."""
    reps: int = 30
    """Timed repetitions per cell (after warm-up)."""
    warmup: int = 3
    """Untimed calls first."""
    threads: int = 0
    """CPU threads for torch (0: all cores)."""
    device: str = "auto"
    """cuda | cpu | auto."""


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


def main(cfg: Config) -> list[dict]:
    from coop_transport.pi0_policy import resolve_device
    from coop_transport.policy.config import get_config
    from coop_transport.policy.model import build_model

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hw = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()}, " \
                                                          f"{torch.get_num_threads()} threads"
    print(f"# π0 chunk latency on {device.type} ({hw}); torch {torch.__version__}; load {os.getloadavg()[0]:.1f}")
    rows = []
    for name in cfg.configs:
        config = get_config(name)
        dtype = torch.bfloat16 if cuda and name != "tiny" else torch.float32
        with torch.device(device):
            model = build_model(config, device=device, dtype=dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        for n in cfg.samples:
            batch = make_batch(config, device)
            for backend in cfg.backends:
                if backend in ("cudagraph", "compile") and not cuda:
                    continue
                if backend == "eager":
                    fn = lambda: model.sample_actions(batch, num_samples=n)  # noqa: E731
                elif backend == "cudagraph":
                    from coop_transport.inference import CudaGraphSampler

                    sampler = CudaGraphSampler(model, batch, n)
                    fn = lambda: sampler(batch)  # noqa: E731
                elif backend == "compile":
                    from coop_transport.inference import compiled_sampler

                    sampler = compiled_sampler(model, n)
                    fn = lambda: sampler(batch)  # noqa: E731
                else:
                    raise ValueError(f"unknown backend {backend!r}")
                with torch.inference_mode():
                    times = time_calls(fn, cfg.reps, cfg.warmup, cuda)
                rows.append({"config": name, "params_M": params / 1e6, "N": n, "backend": backend,
                             "median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)),
                             "dtype": str(dtype).replace("torch.", "")})
        del model
        if cuda:
            torch.cuda.empty_cache()
    print("| config | params | dtype | N | backend | median ms | p99 ms | speed-up vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eager = next((e for e in rows if e["config"] == r["config"] and e["N"] == r["N"] and e["backend"] == "eager"),
                     None)
        ratio = f"{eager['median_ms'] / r['median_ms']:.1f}x" if eager else "—"
        print(f"| {r['config']} | {r['params_M']:.1f} M | {r['dtype']} | {r['N']} | {r['backend']} | "
              f"{r['median_ms']:.2f} | {r['p99_ms']:.2f} | {ratio} |")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
