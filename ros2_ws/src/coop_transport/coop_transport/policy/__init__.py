"""π0 in PyTorch: model, named configs, LoRA, weight loading, checkpoints.

    from coop_transport.policy import build_model, get_config, make_tokenizer
    config = get_config("small")                 # or "pi0-3b"; setting="joint" for the centralized variant
    model = build_model(config)                  # build_model(get_config("pi0-3b"), weights="/path/to/pi0")
    loss, info = model.compute_loss(batch)
    actions = model.sample_actions(obs_batch, num_samples=4)   # (B * 4, T, action_dim)
"""

from coop_transport.policy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from coop_transport.policy.config import (
    CONFIGS,
    DATA_SETTINGS,
    JOINT_CAMERAS,
    PER_ARM_CAMERAS,
    Pi0Config,
    StreamConfig,
    VisionConfig,
    config_from_dict,
    config_to_dict,
    get_config,
)
from coop_transport.policy.ema import EMA
from coop_transport.policy.image_transforms import augment_images, to_model_images
from coop_transport.policy.lora import apply_lora, count_parameters, merge_lora, set_trainable, trainable_parameter_filter
from coop_transport.policy.model import Pi0Model, PrefixCache, build_model, make_attention_mask
from coop_transport.policy.tokenizer import ByteTokenizer, PaliGemmaTokenizer, make_tokenizer
from coop_transport.policy.weights import WeightLoadingError, load_pi0_weights, openpi_state_dict

__all__ = [
    "CONFIGS", "DATA_SETTINGS", "EMA", "JOINT_CAMERAS", "PER_ARM_CAMERAS", "ByteTokenizer", "Checkpoint",
    "CheckpointError", "PaliGemmaTokenizer", "Pi0Config", "Pi0Model", "PrefixCache", "StreamConfig", "VisionConfig",
    "WeightLoadingError", "apply_lora", "augment_images", "build_model", "config_from_dict", "config_to_dict",
    "count_parameters", "get_config", "load_checkpoint", "load_pi0_weights", "make_attention_mask", "make_tokenizer",
    "merge_lora", "openpi_state_dict", "save_checkpoint", "set_trainable", "to_model_images",
    "trainable_parameter_filter",
]
