"""What gets exported: a registry of network exporters, each turning a source run into named graphs.

An exporter is a function ``ExportSource -> list[ExportItem]``; an item is an ``nn.Module`` whose ``forward`` takes
the inputs in spec order and returns the outputs in spec order, with the TensorSpecs and the settings to record.
Built in: the π0 chunk sampler ("pi0") and the residual-RL networks of a run ("residual": RL token encoder,
communication head, residual actor). Another network is one more entry of the same shape:

    @register_exporter("name")
    def items(source: ExportSource) -> list[ExportItem]:
        if source.residual is None:                 # nothing of this kind in this run
            return []
        return [ExportItem("graph_name", "kind", module, inputs=[TensorSpec(...)], outputs=[TensorSpec(...)])]
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from coop_transport.export.spec import (ExportError, TensorSpec, chunk_sampler_inputs, chunk_sampler_outputs,
                                        fake_inputs)


@dataclasses.dataclass
class ExportItem:
    """One graph to export."""

    name: str
    """graph name in the manifest and file stem (``<name>.onnx``)"""
    kind: str
    """what it computes: pi0_chunk_sampler, pi0_chunk_sampler_prefix, rl_token_encoder, communication_head,
    residual_actor"""
    module: nn.Module
    """forward(*inputs in `inputs` order) -> output(s) in `outputs` order"""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """recorded in the manifest beside the graph (batch size, sample count, flow steps, ...)"""
    example: dict[str, np.ndarray] | None = None
    """inputs to trace with (None: random inputs from the specs)"""
    reference: nn.Module | None = None
    """the module parity checks compare with, where `module` is a rewrite of it (the fused π0 sampler: the original
    model's sampler); None: `module` itself"""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reference PyTorch module on named numpy inputs: named numpy outputs (the reference of parity checks)."""
        module = self.reference if self.reference is not None else self.module
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.inputs))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {s.name: o.detach().cpu().numpy() for s, o in zip(self.outputs, out)}


@dataclasses.dataclass
class ExportSource:
    """Everything exporters may draw on."""

    checkpoint_dir: pathlib.Path
    model: nn.Module
    """the π0 model, float32, eval mode, on the CPU"""
    config: Any
    """its Pi0Config"""
    extra: dict[str, Any]
    batch_sizes: tuple[int, ...] = (1,)
    samples: tuple[int, ...] = (1, 4)
    num_flow_steps: int | None = None
    """None: the config's (π0: 10)"""
    residual: pathlib.Path | None = None
    """a residual-RL checkpoint or run directory (its best checkpoint), if one is exported alongside"""
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)
    """manifest sections exporters add (e.g. 'residual': architecture, config, checkpoint hash)"""
    fused: bool = True
    """export the π0 chunk sampler as export.fused.FusedChunkSampler (the same function, fused weights: fewer, larger
    graph nodes); False: the plain trace of Pi0Model.sample_actions"""


EXPORTERS: dict[str, Callable[[ExportSource], list[ExportItem]]] = {}


def register_exporter(name: str):
    def wrap(fn):
        EXPORTERS[name] = fn
        return fn
    return wrap


def collect_items(source: ExportSource, only: tuple[str, ...] | None = None) -> list[ExportItem]:
    items = []
    for name, exporter in EXPORTERS.items():
        if only is None or name in only:
            items.extend(exporter(source))
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise ValueError(f"exporters produced duplicate graph names: {names}")
    return items


# ---------------------------------------------------------------------------------------------------- π0 sampler


class Pi0ChunkSampler(nn.Module):
    """π0's whole chunk sampler as one graph: prefix encoding once, its K/V cache reused by every flow step (the
    step loop is unrolled: static trip count), N samples per observation as the batch dimension.

    forward(image_<slot>..., prompt_tokens, prompt_mask, state, noise) -> actions, as in export.spec.
    """

    def __init__(self, model: nn.Module, num_samples: int, num_steps: int | None = None):
        super().__init__()
        self.model = model
        self.cameras = tuple(model.config.cameras)
        self.num_samples = num_samples
        self.num_steps = num_steps

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        images = inputs[: len(self.cameras)]
        prompt_tokens, prompt_mask, state, noise = inputs[len(self.cameras):]
        batch = {"images": dict(zip(self.cameras, images)), "prompt_tokens": prompt_tokens,
                 "prompt_mask": prompt_mask, "state": state}
        return self.model.sample_actions(batch, noise=noise, num_steps=self.num_steps, num_samples=self.num_samples)


def chunk_graph_name(batch_size: int, num_samples: int) -> str:
    return f"pi0_chunk_b{batch_size}_n{num_samples}"


@register_exporter("pi0")
def pi0_items(source: ExportSource) -> list[ExportItem]:
    """One chunk-sampler graph per (B, N). Traced from export.fused.FusedChunkSampler (the same function with fused
    weights: about 40% fewer ONNX Runtime nodes, faster on a CPU) unless source.fused is False; the reference outputs
    and the parity check always come from the original model."""
    from coop_transport.export.fused import FusedChunkSampler

    config = source.config
    steps = source.num_flow_steps or config.num_flow_steps
    items = []
    for b in source.batch_sizes:
        for n in source.samples:
            inputs = chunk_sampler_inputs(config, b, n)
            original = Pi0ChunkSampler(source.model, n, steps).eval()
            items.append(ExportItem(
                name=chunk_graph_name(b, n), kind="pi0_chunk_sampler",
                module=FusedChunkSampler(source.model, n, steps).eval() if source.fused else original,
                inputs=inputs, outputs=chunk_sampler_outputs(config, b, n),
                settings={"batch_size": b, "num_samples": n, "num_flow_steps": steps, "prefix_kv_cache": True,
                          "flow_steps_unrolled": True, "fused": source.fused},
                example=fake_inputs(inputs, seed=1000 + 10 * b + n, vocab_size=config.vocab_size),
                reference=original,  # references and parity: the original model's sampler, never the rewrite
            ))
    return items


# ------------------------------------------------------------------------------------------- residual networks


class Pi0ChunkSamplerWithPrefix(Pi0ChunkSampler):
    """The chunk sampler that also returns the prefix tokens the residual-RL token encoder reads:
    forward(...) -> actions (B*N, H, A), prefix (B, Lp, D_vlm) float32, prefix_mask (B, Lp) bool."""

    def __init__(self, model: nn.Module, num_samples: int, num_steps: int | None, prefix_source: str):
        super().__init__(model, num_samples, num_steps)
        if prefix_source not in ("embeddings", "hidden"):
            raise ValueError(f"prefix_source must be 'embeddings' or 'hidden', got {prefix_source!r}")
        self.prefix_source = prefix_source

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = inputs[: len(self.cameras)]
        prompt_tokens, prompt_mask, state, noise = inputs[len(self.cameras):]
        batch = {"images": dict(zip(self.cameras, images)), "prompt_tokens": prompt_tokens,
                 "prompt_mask": prompt_mask, "state": state}
        actions, cache = self.model.sample_actions(batch, noise=noise, num_steps=self.num_steps,
                                                   num_samples=self.num_samples, return_prefix=True)
        prefix = cache.prefix_embeddings if self.prefix_source == "embeddings" else cache.prefix_hidden
        return actions, prefix.float(), cache.prefix_mask


@register_exporter("residual")
def residual_items(source: ExportSource) -> list[ExportItem]:
    """A residual-RL policy's networks per agent (coop_transport.residual): the RL token encoder, the communication
    (message) head where the architecture learns one (V5), the residual actor, and the twin critics where the policy
    consults them when it acts (the critic gate, the choice among K π0 draws); plus the π0 chunk graph that also
    outputs the prefix tokens the encoder reads, at the run's K·N samples (draw k: samples k·N to (k+1)·N - 1).
    Batch 1: one agent's boundary, as a ROS node runs. The run must have been trained on the exported π0
    checkpoint (weights sha256)."""
    if source.residual is None:
        return []
    from coop_transport.residual.checkpoint import POLICY_JSON, load_policy, resolve_policy_dir, sha256
    from coop_transport.residual.config import config_to_json

    path = resolve_policy_dir(source.residual)
    try:  # π0 from the exported checkpoint, verified against the hash the run recorded
        system = load_policy(path, device="cpu", vla_path=source.checkpoint_dir)
    except ValueError as error:
        raise ExportError(f"residual run {source.residual}: {error}") from error
    if system.agents is None:
        return []  # B1 / B2: π0 alone, already exported
    spec, cfg, pc = system.spec, system.config, source.config
    length, width = pc.num_prefix_tokens, pc.vlm.width
    proprio_dim, chunk, action_dim, latent = spec.proprio_dim, system.chunk, spec.action_dim, cfg.latent_dim
    n = system.recipe.num_samples * cfg.candidates
    steps = source.num_flow_steps or pc.num_flow_steps
    system.agents.float().eval()

    prefix = TensorSpec("prefix", (1, length, width), "float32", f"π0 prefix tokens ({cfg.prefix_source})")
    prefix_mask = TensorSpec("prefix_mask", (1, length), "bool", "True for real prefix tokens")
    proprio = TensorSpec("proprio", (1, proprio_dim), "float32", "proprioception, z-scored (the leading entries of π0's norm_stats['state'])")
    z = TensorSpec("latent", (1, latent), "float32", "RL token z")
    reference = TensorSpec("reference", (1, chunk, action_dim), "float32",
                           "π0 reference chunk in [-1, 1] (mean-of-N, clipping and the first C steps applied)")
    items = [ExportItem(
        name=f"pi0_chunk_prefix_b1_n{n}", kind="pi0_chunk_sampler_prefix",
        module=Pi0ChunkSamplerWithPrefix(source.model, n, steps, cfg.prefix_source).eval(),
        inputs=chunk_sampler_inputs(pc, 1, n),
        outputs=chunk_sampler_outputs(pc, 1, n) + [prefix, prefix_mask],
        settings={"batch_size": 1, "num_samples": n, "num_flow_steps": steps, "prefix_source": cfg.prefix_source,
                  "draws": cfg.candidates, "samples_per_draw": system.recipe.num_samples},
        example=fake_inputs(chunk_sampler_inputs(pc, 1, n), seed=2000 + n, vocab_size=pc.vocab_size),
    )]
    for agent in spec.agents:
        nets = system.agents[agent]
        settings = {"architecture": spec.name, "agent": agent}
        items.append(ExportItem(f"rl_token_encoder_{agent}", "rl_token_encoder", nets.encoder,
                                [prefix, prefix_mask, proprio], [z], settings))
        if nets.message_head is not None:
            items.append(ExportItem(
                f"communication_head_{agent}", "communication_head", nets.message_head, [z, proprio],
                [TensorSpec("message_mean", (1, cfg.message_dim), "float32", "the message sent (deployment: the mean)"),
                 TensorSpec("message_log_std", (1, cfg.message_dim), "float32", "log std (training-time sampling)")],
                settings))
        actor_inputs = [z, proprio, reference]
        if nets.received_dim:
            actor_inputs.append(TensorSpec("message", (1, nets.received_dim), "float32",
                                           "the partner's message; zeros when missing or stale (FiLM identity)"))
        items.append(ExportItem(
            f"residual_actor_{agent}", "residual_actor", nets.actor, actor_inputs,
            [TensorSpec("actions", (1, chunk, action_dim), "float32", "executed chunk clip(ref + s tanh(delta), -1, 1)")],
            settings))
        if cfg.gate_margin is not None or cfg.candidates > 1:  # the policy consults its critics when it acts
            critic_inputs = [z, proprio, TensorSpec("actions", (1, chunk, action_dim), "float32",
                                                    "a chunk to rate: the actor's over a draw, or the clipped reference")]
            critic_inputs += actor_inputs[3:]  # the partner's message, where the architecture has one
            items.append(ExportItem(
                f"critic_{agent}", "twin_critic", nets.q, critic_inputs,
                [TensorSpec(f"q{i}", (1,), "float32", f"critic {i}'s value; the policy acts on the lower of the two")
                 for i in (1, 2)], settings))
    meta = system.checkpoint_meta
    source.sections["residual"] = {
        "checkpoint": {"path": str(path.resolve()), "weights_sha256": meta["weights_sha256"],
                       "residual_json_sha256": sha256(path / POLICY_JSON), "step": meta.get("step")},
        "architecture": spec.name, "agents": list(spec.agents), "chunk": chunk, "message": spec.message,
        "recipe": dataclasses.asdict(system.recipe), "config": config_to_json(cfg),
        "pose_mean": meta.get("pose_mean"), "pose_std": meta.get("pose_std"), "vla": meta.get("vla"),
    }
    return items
