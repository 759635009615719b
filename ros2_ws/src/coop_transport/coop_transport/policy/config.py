"""Named π0 configurations: one model code, complete recipes in one registry.

    config = get_config("small")                       # the default: trains from scratch, per-arm data setting
    config = get_config("pi0-3b", setting="joint")     # π0-3B shape, two wrist cameras + agentview, 14-D actions
    config = get_config("small", action_horizon=32)    # any field can be overridden by name

Per-arm and joint policies are the same model with other data settings (cameras, action and state widths), not
separate classes: see DATA_SETTINGS.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from coop_transport import constants

# The model's camera slots (keys of `batch["images"]`). A slot named "...wrist..." gets no geometric augmentation
# (openpi's convention). Adapters map robosuite camera names onto these slots.
PER_ARM_CAMERAS = ("wrist", "agentview")
JOINT_CAMERAS = ("robot0_wrist", "robot1_wrist", "agentview")

BYTE_VOCAB_SIZE = 259  # ByteTokenizer: 0 pad, 1 bos, 2 eos, 3..258 the 256 byte values
PALIGEMMA_VOCAB_SIZE = 257_152


def _check_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP-style ViT (transformers' SiglipVisionModel), shared by all cameras, then a linear map to the VLM width."""

    image_size: int = 96
    """square input resolution in pixels; other sizes are resized (aspect kept, padded) to it"""
    patch_size: int = 12
    """patch side in pixels; (image_size / patch_size)^2 image tokens per camera"""
    width: int = 192
    """ViT hidden size"""
    depth: int = 4
    """number of ViT layers"""
    num_heads: int = 3
    """ViT attention heads (head dim = width / num_heads)"""
    mlp_dim: int = 768
    """ViT MLP hidden size"""

    def __post_init__(self) -> None:
        _check_positive("vision", **dataclasses.asdict(self))
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision.width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One Gemma transformer stream: the VLM (PaliGemma's Gemma) or the action expert."""

    width: int
    """hidden size"""
    depth: int
    """number of layers (must equal the other stream's: the streams run layer by layer together)"""
    num_heads: int
    """query heads (must equal the other stream's: queries of both streams attend in one call)"""
    num_kv_heads: int
    """key/value heads (grouped-query attention; π0: 1)"""
    head_dim: int
    """per-head size (must equal the other stream's)"""
    mlp_dim: int
    """GeGLU MLP hidden size"""

    def __post_init__(self) -> None:
        _check_positive("stream", **dataclasses.asdict(self))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def to_hf(self, vocab_size: int = 1):
        """transformers' GemmaConfig of this stream (for GemmaDecoderLayer / GemmaRMSNorm / GemmaMLP)."""
        from transformers import GemmaConfig

        return GemmaConfig(
            vocab_size=vocab_size,
            hidden_size=self.width,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.depth,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """A complete π0 model recipe: architecture, data setting, flow matching, fine-tuning."""

    name: str
    """registry name this config was derived from"""
    vision: VisionConfig
    """image encoder"""
    vlm: StreamConfig
    """the vision-language stream (prefix: image and prompt tokens)"""
    expert: StreamConfig
    """the action expert stream (suffix: state token and action tokens)"""
    tokenizer: Literal["bytes", "paligemma"] = "bytes"
    """'bytes': the project's byte-level tokenizer (no files); 'paligemma': SentencePiece from the weights directory"""
    vocab_size: int = BYTE_VOCAB_SIZE
    """prompt vocabulary size (VLM token embedding rows)"""
    max_token_len: int = 48
    """prompt tokens, padded/truncated to this length (π0: 48)"""
    cameras: tuple[str, ...] = PER_ARM_CAMERAS
    """camera slots in prefix order; keys of batch['images']"""
    action_dim: int = constants.ARM_ACTION_DIM
    """true action width: 7 per arm, 14 joint"""
    state_dim: int = constants.PROPRIO_DIM
    """true proprioceptive state width: 18 per arm, 36 joint"""
    action_pad_dim: int = 32
    """actions are zero-padded to this width inside the model (π0: 32); padded dims carry no loss"""
    state_pad_dim: int = 32
    """state is zero-padded to this width (π0: 32, the input width of state_proj)"""
    action_horizon: int = 16
    """actions per chunk (π0: 50)"""
    num_flow_steps: int = 10
    """Euler steps from t=1 (noise) to t=0 (actions) at inference (π0: 10)"""
    time_beta_alpha: float = 1.5
    """training time t ~ Beta(alpha, beta) * time_scale + time_offset (π0: Beta(1.5, 1), emphasises noisy t)"""
    time_beta_beta: float = 1.0
    """see time_beta_alpha"""
    time_scale: float = 0.999
    """see time_beta_alpha"""
    time_offset: float = 0.001
    """see time_beta_alpha; keeps t > 0"""
    time_min_period: float = 4e-3
    """shortest period of the sinusoidal time embedding (π0: 4e-3)"""
    time_max_period: float = 4.0
    """longest period of the sinusoidal time embedding (π0: 4.0)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype the model is built in (bfloat16 for pi0-3b on GPU)"""
    lora: bool = False
    """True: LoRA adapters on both Gemma streams, their base weights frozen (openpi π0-LIBERO recipe);
    False: full fine-tuning (the default for models trained from scratch)"""
    lora_rank_vlm: int = 16
    """LoRA rank on the VLM's attention and MLP projections (openpi: 16)"""
    lora_alpha_vlm: float = 16.0
    """LoRA alpha on the VLM (openpi: 16; scale alpha / rank = 1)"""
    lora_rank_expert: int = 32
    """LoRA rank on the action expert's attention and MLP projections (openpi: 32)"""
    lora_alpha_expert: float = 32.0
    """LoRA alpha on the action expert (openpi: 32)"""
    lora_train_vision: bool = True
    """with LoRA, also train the image encoder and its projection: openpi's LoRA freeze filter covers only the
    Gemma weights ('.*llm.*'), so SigLIP stays trainable there"""
    ema_decay: float | None = 0.99
    """EMA of the weights used for evaluation (openpi: 0.99 for full fine-tuning, None with LoRA)"""
    object_state_dim: int = 0
    """> 0: an auxiliary head (Pi0Model.object_state_head) reads this many values of the simulator's object state
    (z-scored) from the VLM's final image-token states, trained beside the flow-matching loss so that the image
    encoder learns where the objects are. It plays no part in sampling (π0 as published has none: 0)."""

    def __post_init__(self) -> None:
        _check_positive(
            "config",
            vocab_size=self.vocab_size, max_token_len=self.max_token_len, action_dim=self.action_dim,
            state_dim=self.state_dim, action_horizon=self.action_horizon, num_flow_steps=self.num_flow_steps,
            time_beta_alpha=self.time_beta_alpha, time_beta_beta=self.time_beta_beta, time_scale=self.time_scale,
            time_min_period=self.time_min_period, lora_rank_vlm=self.lora_rank_vlm,
            lora_rank_expert=self.lora_rank_expert, lora_alpha_vlm=self.lora_alpha_vlm,
            lora_alpha_expert=self.lora_alpha_expert,
        )
        for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            vlm_value, expert_value = getattr(self.vlm, field), getattr(self.expert, field)
            if vlm_value != expert_value:
                raise ValueError(
                    f"vlm.{field} ({vlm_value}) != expert.{field} ({expert_value}): π0's two streams attend jointly "
                    "layer by layer, so they must share depth, head count and head size"
                )
        if self.action_dim > self.action_pad_dim:
            raise ValueError(f"action_dim {self.action_dim} exceeds action_pad_dim {self.action_pad_dim}")
        if self.state_dim > self.state_pad_dim:
            raise ValueError(f"state_dim {self.state_dim} exceeds state_pad_dim {self.state_pad_dim}")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be non-empty and unique, got {self.cameras!r}")
        if self.tokenizer not in ("bytes", "paligemma"):
            raise ValueError(f"tokenizer must be 'bytes' or 'paligemma', got {self.tokenizer!r}")
        if self.tokenizer == "bytes" and self.vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"the byte tokenizer needs vocab_size >= {BYTE_VOCAB_SIZE}, got {self.vocab_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not 0.0 <= self.time_offset < 1.0 or self.time_scale + self.time_offset > 1.0:
            raise ValueError(f"time_scale {self.time_scale} + time_offset {self.time_offset} must stay within (0, 1]")
        if self.time_max_period <= self.time_min_period:
            raise ValueError(f"time_max_period {self.time_max_period} must exceed time_min_period {self.time_min_period}")
        if self.expert.width % 2:
            raise ValueError(f"expert.width {self.expert.width} must be even (sinusoidal time embedding)")
        if self.object_state_dim < 0:
            raise ValueError(f"object_state_dim must be >= 0, got {self.object_state_dim}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {self.ema_decay}")

    @property
    def num_prefix_tokens(self) -> int:
        """image tokens of all cameras + prompt tokens"""
        return len(self.cameras) * self.vision.tokens_per_image + self.max_token_len

    @property
    def num_suffix_tokens(self) -> int:
        """one state token + action_horizon action tokens"""
        return 1 + self.action_horizon


# Data settings: the same model for one arm (its wrist camera + agentview, 7-D actions, 18-D proprio) or both.
# The joint state (2 x 18 = 36) exceeds π0's 32-wide state input, so the joint setting widens state_proj's input;
# loading π0 weights then leaves state_proj freshly initialised (it is trained in openpi's LoRA recipe anyway).
DATA_SETTINGS: dict[str, dict[str, Any]] = {
    "per_arm": dict(
        cameras=PER_ARM_CAMERAS, action_dim=constants.ARM_ACTION_DIM, state_dim=constants.PROPRIO_DIM, state_pad_dim=32
    ),
    "joint": dict(
        cameras=JOINT_CAMERAS, action_dim=constants.JOINT_ACTION_DIM, state_dim=2 * constants.PROPRIO_DIM,
        state_pad_dim=64,
    ),
}

CONFIGS: dict[str, Pi0Config] = {
    # The default, trained from scratch (full fine-tuning with EMA, as openpi does without LoRA). Sized by
    # measurement: one thread of the project's CPU machine runs a chunk (N=4 samples, 10 flow steps) in ~32 ms
    # and N=1 in ~23 ms; eager PyTorch spends most of a flow step on per-op overhead, so depth costs the most.
    # 96 px images in 16 px patches: 36 tokens per camera; prefix 2 x 36 + 32 prompt bytes = 104 tokens.
    "small": Pi0Config(
        name="small",
        vision=VisionConfig(image_size=constants.SMALL_IMAGE_SIZE, patch_size=16, width=128, depth=4, num_heads=2,
                            mlp_dim=512),
        vlm=StreamConfig(width=256, depth=3, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=512),
        expert=StreamConfig(width=128, depth=3, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=256),
        tokenizer="bytes",
        vocab_size=BYTE_VOCAB_SIZE,
        max_token_len=32,
        action_horizon=32,  # what the shipped default is trained with: covers the joint recipe's chunk of 25
        lora=False,
        ema_decay=0.99,
    ),
    # π0 exactly as sized: PaliGemma 3B (SigLIP So400m/14 at 224 px + Gemma 2B) with the Gemma 300M action expert;
    # loads real π0 weights from a local directory, random init otherwise. openpi's π0-LIBERO LoRA recipe.
    "pi0-3b": Pi0Config(
        name="pi0-3b",
        vision=VisionConfig(image_size=constants.PI0_IMAGE_SIZE, patch_size=14, width=1152, depth=27, num_heads=16,
                            mlp_dim=4304),
        vlm=StreamConfig(width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16_384),
        expert=StreamConfig(width=1024, depth=18, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=4096),
        tokenizer="paligemma",
        vocab_size=PALIGEMMA_VOCAB_SIZE,
        max_token_len=48,
        action_horizon=50,
        dtype="bfloat16",
        lora=True,
        ema_decay=None,
    ),
    # For tests and smoke runs: ~50k parameters, milliseconds per training step on a CPU.
    "tiny": Pi0Config(
        name="tiny",
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
        vlm=StreamConfig(width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64),
        expert=StreamConfig(width=16, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=32),
        tokenizer="bytes",
        vocab_size=BYTE_VOCAB_SIZE,
        max_token_len=8,
        action_pad_dim=16,
        action_horizon=4,
        lora=False,
        ema_decay=0.99,
    ),
}


def _closest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_config(name: str, setting: str = "per_arm", **overrides: Any) -> Pi0Config:
    """The registry's config `name` in data setting `setting` ('per_arm' or 'joint'), with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {sorted(CONFIGS)}.{_closest(name, CONFIGS)}")
    if setting not in DATA_SETTINGS:
        raise ValueError(f"unknown data setting {setting!r}; known: {sorted(DATA_SETTINGS)}.{_closest(setting, DATA_SETTINGS)}")
    fields = {f.name for f in dataclasses.fields(Pi0Config)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"Pi0Config has no field {key!r}.{_closest(key, fields)}")
    return dataclasses.replace(CONFIGS[name], **{**DATA_SETTINGS[setting], **overrides})


def config_to_dict(config: Pi0Config) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> Pi0Config:
    """Inverse of config_to_dict; unknown or missing fields raise ValueError."""
    data = dict(data)
    fields = {f.name for f in dataclasses.fields(Pi0Config)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown Pi0Config fields {unknown}")
    try:
        data["vision"] = VisionConfig(**data["vision"])
        data["vlm"] = StreamConfig(**data["vlm"])
        data["expert"] = StreamConfig(**data["expert"])
        data["cameras"] = tuple(data["cameras"])
        return Pi0Config(**data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed Pi0Config dict: {error}") from error
