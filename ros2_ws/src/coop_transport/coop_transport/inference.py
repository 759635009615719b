"""Fast paths for the π0 chunk sampler: CUDA graphs and torch.compile over the whole chunk.

On the GPU machine eager PyTorch is launch-bound (hundreds of small kernels per chunk, ~11 µs of host time each),
so one chunk is captured once as a CUDA graph — prefix encoding, the prefix K/V cache, all flow steps, mean-of-N
as a batch dimension — and replayed with new inputs copied into its static buffers. This works because the
sampler has static shapes and a fixed trip count (no data-dependent Python branches, no host syncs).

A graph removes the launch cost but not the kernel count: at batch 1-4 most of π0's kernels (norms, rotary, gates,
residual adds) are tiny and each costs a few microseconds of GPU time even inside a graph. ``compile_cudagraph``
first lets torch.compile (Inductor) fuse those elementwise chains into fewer kernels (the prefix and one flow step
compiled as two regions, ``regional_compiled_sampler``), then captures the compiled sampler as one graph
(``CudaGraphSampler(sample_fn=...)``).
"""

from __future__ import annotations

import functools

import torch


def _clone_batch(batch: dict) -> dict:
    out = {}
    for key, value in batch.items():
        out[key] = _clone_batch(value) if isinstance(value, dict) else value.clone()
    return out


def _copy_batch(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict):
            _copy_batch(dst[key], value)
        else:
            if dst[key].shape != value.shape or dst[key].dtype != value.dtype:
                raise ValueError(f"input {key!r} is {tuple(value.shape)} {value.dtype}; the captured graph "
                                 f"needs {tuple(dst[key].shape)} {dst[key].dtype}")
            dst[key].copy_(value, non_blocking=True)


class CudaGraphSampler:
    """``model.sample_actions`` captured as one CUDA graph for a fixed batch shape and sample count.

    ``sampler(batch, noise)`` copies the inputs into static buffers, replays the graph and returns the static
    output tensor (clone it if you keep it across calls).
    """

    def __init__(self, model, example_batch: dict, num_samples: int, warmup: int = 3, sample_fn=None):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model = model
        sample = model.sample_actions if sample_fn is None else sample_fn
        self.num_samples = num_samples
        self.static_batch = _clone_batch(example_batch)
        rows = example_batch["state"].shape[0] * num_samples
        config = model.config
        self.static_noise = torch.randn(rows, config.action_horizon, config.action_pad_dim,
                                        device=example_batch["state"].device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuBLAS handles, autotuning)
            for _ in range(warmup):  # (and, with a compiled sample_fn, its compilation)
                sample(self.static_batch, noise=self.static_noise, num_samples=num_samples)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = sample(self.static_batch, noise=self.static_noise, num_samples=num_samples)

    @torch.no_grad()
    def __call__(self, batch: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        _copy_batch(self.static_batch, batch)
        if noise is None:
            self.static_noise.normal_()
        else:
            self.static_noise.copy_(noise)
        self.graph.replay()
        return self.static_out


def compiled_sampler(model, num_samples: int, mode: str = "max-autotune-no-cudagraphs"):
    """``model.sample_actions`` under torch.compile (one region, static shapes)."""
    compiled = torch.compile(model.sample_actions, dynamic=False, mode=mode)

    def sample(batch: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        return compiled(batch, noise=noise, num_samples=num_samples)

    return sample


def regional_compiled_sampler(model, mode: str = "default", attention: str = "matmul"):
    """``sample_actions`` with its two regions compiled separately: the prefix (run once per chunk) and one flow
    step (compiled once, called at every step). Compiling the whole sampler unrolls all ten steps into one graph;
    for pi0-3b that compilation ran past five minutes on an H200. Same arguments as ``sample_actions``.
    attention: policy.model.grouped_attention's impl inside the compiled regions; "matmul" lets Inductor fuse the
    softmax with its mask (faster than the fused SDPA kernels there, see grouped_attention)."""
    if mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"mode {mode!r} brings Inductor's own CUDA graphs; use 'default' or "
                         f"'max-autotune-no-cudagraphs' (compile_cudagraph captures the graph itself)")
    prefix = torch.compile(functools.partial(model.prepare_prefix, attention=attention), dynamic=False, mode=mode)
    velocity = torch.compile(functools.partial(model.denoise_velocity, attention=attention), dynamic=False, mode=mode)

    @torch.no_grad()
    def sample(batch: dict, noise: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
        return model.integrate_flow(prefix(batch, num_samples), noise, velocity_fn=velocity)

    return sample


def compile_cudagraph(model, example_batch: dict, num_samples: int, mode: str = "default",
                      attention: str = "matmul") -> CudaGraphSampler:
    """The regionally compiled sampler (Inductor's fused kernels; its own CUDA graphs off) captured as one CUDA
    graph. ``mode="default"`` keeps cuBLAS for the matmuls: max-autotune's kernel search takes minutes for the
    3B model and matters little where the chunk is bound by the number of small kernels."""
    sample_fn = regional_compiled_sampler(model, mode, attention)
    return CudaGraphSampler(model, example_batch, num_samples, sample_fn=sample_fn)
