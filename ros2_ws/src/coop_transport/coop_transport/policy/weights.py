"""Real π0 weights from a local directory: openpi's and LeRobot's PyTorch checkpoint names -> Pi0Model names.

openpi's examples/convert_jax_model_to_pytorch.py writes `model.safetensors` from its PI0Pytorch module
(transformers 4.53 layout); LeRobot's PI0Policy holds the same module under `model.`, and early LeRobot pi0
checkpoints use the pre-4.52 transformers layout. Pi0Model keeps transformers' sub-module names, so each mapping is
a prefix rewrite, listed in NAME_TABLE. Nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file
from torch import nn

# (external name prefix, Pi0Model name prefix); None marks weights that exist in the file but π0 never uses.
NAME_TABLE: tuple[tuple[str, str | None], ...] = (
    ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.", "vision."),  # SigLIP So400m
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear.", "image_projector."),
    ("paligemma_with_expert.paligemma.model.language_model.", "vlm."),  # Gemma 2B: embed_tokens, layers.*, norm
    # PaliGemma ties lm_head to embed_tokens; safetensors' save_model keeps only one name of a tied pair, and it
    # picks lm_head (alphabetical order), so openpi's file holds the token embedding under this name.
    ("paligemma_with_expert.paligemma.lm_head.weight", "vlm.embed_tokens.weight"),
    ("paligemma_with_expert.gemma_expert.model.", "expert."),  # Gemma 300M: layers.*, norm
    ("paligemma_with_expert.gemma_expert.lm_head.", None),  # the expert never decodes tokens
    ("state_proj.", "state_proj."),
    ("action_in_proj.", "action_in_proj."),
    ("action_out_proj.", "action_out_proj."),
    ("action_time_mlp_in.", "action_time_mlp_in."),
    ("action_time_mlp_out.", "action_time_mlp_out."),
)

# transformers < 4.52 (early LeRobot pi0 checkpoints) nested PaliGemma differently; rewritten to the table's layout.
LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("paligemma_with_expert.paligemma.vision_tower.", "paligemma_with_expert.paligemma.model.vision_tower."),
    ("paligemma_with_expert.paligemma.multi_modal_projector.",
     "paligemma_with_expert.paligemma.model.multi_modal_projector."),
    ("paligemma_with_expert.paligemma.language_model.model.", "paligemma_with_expert.paligemma.model.language_model."),
    ("paligemma_with_expert.paligemma.language_model.lm_head.", "paligemma_with_expert.paligemma.lm_head."),
)
LEROBOT_PREFIX = "model."  # LeRobot's PI0Policy wraps the π0 module as `self.model`
IGNORED_SUFFIXES = ("position_ids", "inv_freq")  # buffers some exports persist; Pi0Model recomputes them


class WeightLoadingError(ValueError):
    """The weights file does not fit the model: lists missing, unexpected and mis-shaped tensors."""


def external_to_model_name(name: str) -> str | None:
    """Pi0Model name of an openpi / LeRobot tensor name; None for known-unused tensors; KeyError if unknown."""
    if name.startswith(LEROBOT_PREFIX):
        name = name[len(LEROBOT_PREFIX):]
    for old, new in LEGACY_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for external, ours in NAME_TABLE:
        if name.startswith(external):
            return None if ours is None else ours + name[len(external):]
    raise KeyError(name)


def model_to_external_name(name: str) -> str:
    """openpi name of a Pi0Model tensor name (the token embedding under its own name, not lm_head)."""
    if name == "vlm.embed_tokens.weight":
        return "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    for external, ours in NAME_TABLE:
        if ours is not None and ours.endswith(".") and name.startswith(ours):
            return external + name[len(ours):]
    raise KeyError(name)


def openpi_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under openpi's PyTorch names (merge LoRA adapters first with policy.lora.merge_lora)."""
    state = model.state_dict()
    if any("lora_" in k or ".base_layer." in k for k in state):
        raise ValueError("model has LoRA adapters; merge them first (coop_transport.policy.lora.merge_lora)")
    return {model_to_external_name(k): v for k, v in state.items()}


def read_safetensors(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a directory's model.safetensors (or its sharded index)."""
    path = pathlib.Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(path / shard)))
            return state
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no π0 weights at {path} (expected model.safetensors from openpi or LeRobot)")
    return load_file(str(path))


def _list(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_pi0_weights(
    model: nn.Module, path: str | pathlib.Path, skip_mismatched: tuple[str, ...] = ()
) -> None:
    """Copy openpi / LeRobot π0 weights into `model` (a Pi0Model, with or without LoRA adapters injected).

    Every model tensor must be provided and every file tensor must map, with equal shapes, else WeightLoadingError
    lists the offenders. skip_mismatched: Pi0Model name prefixes whose tensors may differ in shape and then keep
    their initialization (e.g. ('state_proj.',) for the joint setting's wider state input).
    """
    source = read_safetensors(path)
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in source.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        try:
            ours = external_to_model_name(name)
        except KeyError:
            unexpected.append(name)
            continue
        if ours is None:
            continue
        # Both halves of the tied embedding may be present: keep the embedding's own name.
        if ours in mapped and not name.endswith("embed_tokens.weight"):
            continue
        mapped[ours] = tensor

    # With LoRA injected, 'x.q_proj.weight' lives at 'x.q_proj.base_layer.weight'.
    targets = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    missing = sorted(set(targets) - set(mapped))
    unexpected += sorted(set(mapped) - set(targets))
    mismatched, skipped = [], []
    for name in sorted(set(targets) & set(mapped)):
        if targets[name].shape != mapped[name].shape:
            if skip_mismatched and name.startswith(skip_mismatched):
                skipped.append(name)
            else:
                mismatched.append(f"{name}: file {tuple(mapped[name].shape)} vs model {tuple(targets[name].shape)}")
    if missing or unexpected or mismatched:
        raise WeightLoadingError(
            f"π0 weights at {path} do not fit the model ({type(model).__name__} config "
            f"{getattr(getattr(model, 'config', None), 'name', '?')!r}):\n"
            f"  missing ({len(missing)}): {_list(missing)}\n"
            f"  unexpected ({len(unexpected)}): {_list(unexpected)}\n"
            f"  shape mismatch ({len(mismatched)}): {_list(mismatched)}"
        )
    for name, target in targets.items():
        if name not in skipped:
            target.copy_(mapped[name].to(target.dtype))
