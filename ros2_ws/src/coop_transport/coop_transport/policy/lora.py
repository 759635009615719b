"""LoRA (peft) and the one rule that decides which parameters train.

openpi's π0-LIBERO LoRA recipe: rank 16 (alpha 16) adapters on the VLM Gemma's attention (q, k, v, o) and MLP
(gate, up, down) projections, rank 32 (alpha 32) on the action expert's; the Gemma base weights (projections,
norms, token embedding) frozen. Everything outside the two Gemma streams trains: the action/state projections and
time MLP, and the image encoder with its projection (openpi's freeze filter only matches '.*llm.*').
Difference from openpi: peft initializes lora_B to zero (the adapted model starts exactly at the base model),
openpi draws both LoRA factors from N(0, 0.01^2).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from coop_transport.policy.config import Pi0Config

# Module names (relative to Pi0Model) that get adapters: every attention and MLP projection of both Gemma streams.
LORA_TARGET_MODULES = r"(vlm|expert)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_GEMMA_STREAMS = re.compile(r"^(vlm|expert)\.")
_VISION = re.compile(r"^(vision|image_projector)\.")


def lora_config(config: Pi0Config) -> LoraConfig:
    """peft LoraConfig of the recipe: VLM rank/alpha by default, the expert's through rank/alpha patterns."""
    return LoraConfig(
        r=config.lora_rank_vlm,
        lora_alpha=config.lora_alpha_vlm,
        target_modules=LORA_TARGET_MODULES,
        rank_pattern={r"expert\..*": config.lora_rank_expert},
        alpha_pattern={r"expert\..*": config.lora_alpha_expert},
        lora_dropout=0.0,
        bias="none",
    )


def apply_lora(model: nn.Module) -> nn.Module:
    """Inject LoRA adapters into `model` (a Pi0Model) in place and set trainable flags; returns the model.

    Adapted linears keep their names: 'vlm.layers.0.self_attn.q_proj' holds base_layer (the frozen weight),
    lora_A.default and lora_B.default.
    """
    inject_adapter_in_model(lora_config(model.config), model)
    set_trainable(model)
    return model


def trainable_parameter_filter(name: str, config: Pi0Config) -> bool:
    """Whether parameter `name` (a Pi0Model parameter name) trains under `config`. The single source of this rule."""
    if not config.lora:
        return True  # full fine-tuning (models trained from scratch)
    if "lora_" in name:
        return True  # the adapters
    if _GEMMA_STREAMS.match(name):
        return False  # frozen Gemma base weights: projections, norms, token embedding
    if _VISION.match(name):
        return config.lora_train_vision
    return True  # state_proj, action_in_proj, action_out_proj, action_time_mlp_in/out


def set_trainable(model: nn.Module) -> None:
    """Set requires_grad of every parameter from trainable_parameter_filter."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable_parameter_filter(name, model.config))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{'total', 'trainable', 'frozen'} parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (faster inference, same outputs).

    The result has the module layout of a model built without LoRA.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model
