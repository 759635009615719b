"""π0 in PyTorch: a PaliGemma-style prefix and a Gemma action expert that share attention, trained by flow matching.

Prefix: SigLIP image tokens of every camera (projected to the VLM width), then the prompt's token embeddings
(scaled by sqrt(width) as Gemma does). Suffix: one proprioceptive-state token, then `action_horizon` action tokens
(noisy actions fused with a sinusoidal embedding of the flow time by `action_time_mlp`). The VLM stream processes the
prefix, the expert stream the suffix; in every layer both streams compute q/k/v with their own weights, attend over
the concatenated sequence, and apply their own output projection and MLP.

Reading order: make_attention_mask -> Pi0Model.embed_prefix / embed_suffix -> Pi0Model.run_layers (the joint
layer) -> compute_loss -> prepare_prefix / denoise_velocity / sample_actions.

Shapes: B batch, L tokens (Lp prefix, Ls = 1 + T suffix), D width, H query heads, K key/value heads,
G = H / K query heads per KV head, hd head dim, T action horizon, P action pad width.
Time convention (openpi's): t = 1 is pure noise, t = 0 the data; x_t = t * noise + (1 - t) * actions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, apply_rotary_pos_emb

from coop_transport.policy.config import Pi0Config, StreamConfig
from coop_transport.policy.image_transforms import to_model_images

ROPE_THETA = 10_000.0  # Gemma's rotary base


# ----------------------------------------------------------------------------------------------------------------------
# Masks, positions and embeddings


def make_attention_mask(input_mask: torch.Tensor, block_starts: torch.Tensor) -> torch.Tensor:
    """π0's blockwise attention mask (big_vision's prefix-LM scheme, openpi's make_attn_mask).

    The sequence is cut into blocks: a new block begins wherever `block_starts` is True. A token attends to every
    real token of its own block and of all earlier blocks, never to later blocks. π0 uses three blocks: the prefix
    (images + prompt: bidirectional), the state token, and the action tokens (bidirectional among themselves).
    So the prefix never sees the suffix, the state token sees the prefix and itself, the actions see everything.

    input_mask: (B, L) bool, True for real tokens, False for padding (padding is seen by no one and sees no one).
    block_starts: (L,) or (B, L) bool.
    Returns (B, L, L) bool, [b, query, key] True where query may attend to key.
    """
    block_starts = block_starts.expand_as(input_mask)
    block_index = torch.cumsum(block_starts.long(), dim=1)  # (B, L)
    earlier_or_same_block = block_index[:, None, :] <= block_index[:, :, None]  # (B, Lq, Lk)
    both_real = input_mask[:, None, :] & input_mask[:, :, None]
    return earlier_or_same_block & both_real


def posemb_sincos(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """(B,) scalars in [0, 1] -> (B, dim) [sin | cos] features with periods spaced geometrically (π0's time embedding)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float32, device=time.device)
    period = min_period * (max_period / min_period) ** fraction  # (dim/2,)
    angle = time.float()[:, None] * (2 * math.pi / period)[None, :]  # (B, dim/2)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) integer positions -> cos, sin (B, L, head_dim) float32 for transformers' apply_rotary_pos_emb.

    Computed from scratch each call rather than from a buffer, so that model.to(bfloat16) cannot round the
    frequencies; it is a handful of tiny ops, done once per forward (once per chunk at inference).
    """
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angle = positions.float()[:, :, None] * inv_freq[None, None, :]  # (B, L, hd/2)
    angle = torch.cat([angle, angle], dim=-1)  # (B, L, hd), the rotate_half layout
    return angle.cos(), angle.sin()


def fold_mask_for_gqa(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lq, Lk) bool -> (B, 1, G * Lq, Lk) additive mask (0 or -inf) in `dtype`, the layout of `grouped_attention`
    (rows repeat once per query group). Additive rather than bool because SDPA converts a bool mask to an additive
    one on every call; done here once per forward (once per chunk at inference) instead of once per layer and step.
    Every row must allow at least one key (see Pi0Model._full_mask_and_positions), else softmax gives NaN.
    """
    batch, lq, lk = mask.shape
    folded = mask[:, None].expand(batch, groups, lq, lk).reshape(batch, 1, groups * lq, lk)
    return torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill(~folded, float("-inf"))


ATTENTION_IMPLS = ("sdpa", "matmul")


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, folded_mask: torch.Tensor, impl: str = "sdpa"
) -> torch.Tensor:
    """Grouped-query attention without copying K/V per head.

    The G query heads that share one KV head are laid along the query axis, so K and V (π0: a single KV head) are
    used as they are, prefix cache included. Head h belongs to KV head h // G, transformers' repeat_kv order.
    q: (B, H, Lq, hd); k, v: (B, K, Lk, hd); folded_mask: (B, 1, G * Lq, Lk) additive. Returns (B, Lq, H * hd).
    impl "sdpa": one fused SDPA kernel (the default: fastest in eager mode and for training). impl "matmul": two
    matmuls around a float32 softmax, written out so that torch.compile fuses scale, mask and softmax into one
    kernel between two cuBLAS calls; on pi0-3b's inference shapes (head dim 256, short suffix queries over the
    prefix cache) that beat both fused SDPA kernels (cuDNN, memory-efficient) under compilation on an H100 (the
    README's latency table).
    """
    batch, heads, lq, hd = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, (heads // kv_heads) * lq, hd)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=folded_mask)  # (B, K, G * Lq, hd)
    elif impl == "matmul":
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * hd**-0.5 + folded_mask
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    else:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    return out.reshape(batch, heads, lq, hd).transpose(1, 2).reshape(batch, lq, heads * hd)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the token axis; a single stream (inference) needs no copy."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Modules


class GemmaStream(nn.Module):
    """The weights of one Gemma stream (the VLM or the action expert): transformers' GemmaDecoderLayer per layer and a
    final GemmaRMSNorm. The layers' own forward is not used: both streams run together in Pi0Model.run_layers."""

    def __init__(self, config: StreamConfig, vocab_size: int | None):
        super().__init__()
        hf_config = config.to_hf(vocab_size or 1)
        # Only the VLM embeds prompt tokens; the expert has no vocabulary.
        self.embed_tokens = nn.Embedding(vocab_size, config.width) if vocab_size else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(hf_config, i) for i in range(config.depth))
        self.norm = GemmaRMSNorm(config.width, eps=hf_config.rms_norm_eps)


class ObjectStateHead(nn.Module):
    """Training-time auxiliary head: the simulator's object state from the VLM's final image-token states.

    One learned query attends over the image tokens (SigLIP's attention-pooling head, single layer), then an MLP
    maps the pooled vector to the (z-scored) object state. Its gradient reaches the image encoder through every VLM
    layer, so the tokens the action expert attends to come to carry the objects' poses; sampling never calls it.
    """

    def __init__(self, width: int, object_state_dim: int, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads if width % num_heads == 0 else 1
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, object_state_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D), mask (B, N) bool (False: a missing camera's tokens) -> (B, object_state_dim) float32."""
        batch, num_tokens, width = tokens.shape
        heads = self.num_heads
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # a row with every camera missing: pool over all (not NaN)
        k, v = self.kv_proj(tokens).view(batch, num_tokens, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        q = self.query.to(tokens.dtype).expand(batch, -1, -1).view(batch, 1, heads, width // heads).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, 1, hd)
        return self.out(pooled.transpose(1, 2).reshape(batch, width)).float()


class PrefixCache(NamedTuple):
    """Everything the 10 flow steps reuse, computed once per observation by Pi0Model.prepare_prefix.

    Batch BN = B * num_samples (sample n of observation b at row b * num_samples + n). The flow steps run the N
    samples of an observation as one sequence of N suffixes (N * Ls tokens) over one copy of its prefix K/V, each
    suffix blind to the others (a block-diagonal mask): attention is then one large matmul per observation instead
    of N small ones, and the cache is not copied N times.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """per layer (k, v), each (B, K, Lp, hd), rotary already applied"""
    state: torch.Tensor
    """(BN, state_pad_dim) padded state"""
    suffix_mask: torch.Tensor
    """(B, 1, G * N * Ls, Lp + N * Ls) folded additive attention mask of the N suffixes' queries"""
    suffix_cos: torch.Tensor
    """(B, N * Ls, hd) rotary tables of the suffix positions (the same for every sample)"""
    suffix_sin: torch.Tensor
    """(B, N * Ls, hd)"""
    prefix_embeddings: torch.Tensor
    """(B, Lp, D_vlm) prefix input embeddings (image + prompt tokens), for the residual-RL token encoder"""
    prefix_hidden: torch.Tensor
    """(B, Lp, D_vlm) the VLM's final (normed) hidden states of the prefix"""
    prefix_mask: torch.Tensor
    """(B, Lp) bool, True for real prefix tokens"""
    num_samples: int
    """N"""


class Pi0Model(nn.Module):
    """π0: `compute_loss` for training, `sample_actions` for inference, `embed_prefix` for downstream encoders.

    Batches are dicts of tensors (already normalized; normalization lives in the data transforms):
      images:        camera -> (B, H, W, 3) uint8, or float in [-1, 1]; cameras as in config.cameras
      image_masks:   camera -> (B,) bool, False for a missing camera (optional, default all True)
      prompt_tokens: (B, max_token_len) int64;  prompt_mask: (B, max_token_len) bool
      state:         (B, state_dim) float
      actions:       (B, action_horizon, action_dim) float            (compute_loss only)
      action_pad_mask: (B, action_horizon) bool, True for real steps, False for steps past the episode end
                     (compute_loss only, optional)
    """

    def __init__(self, config: Pi0Config):
        super().__init__()
        self.config = config
        vision = config.vision
        self.vision = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=vision.width, intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
                num_attention_heads=vision.num_heads, image_size=vision.image_size, patch_size=vision.patch_size,
                vision_use_head=False, attn_implementation="sdpa",
            )
        )
        self.image_projector = nn.Linear(vision.width, config.vlm.width)  # PaliGemma's multi_modal_projector
        self.vlm = GemmaStream(config.vlm, vocab_size=config.vocab_size)
        self.expert = GemmaStream(config.expert, vocab_size=None)

        width = config.expert.width
        self.state_proj = nn.Linear(config.state_pad_dim, width)
        self.action_in_proj = nn.Linear(config.action_pad_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)
        self.action_out_proj = nn.Linear(width, config.action_pad_dim)
        self.object_state_head = (ObjectStateHead(config.vlm.width, config.object_state_dim)
                                  if config.object_state_dim else None)

        # Gemma-style init of the token embedding: sqrt(width) * N(0, 1/width) has unit scale, like image tokens.
        nn.init.normal_(self.vlm.embed_tokens.weight, std=config.vlm.width**-0.5)

        # Constant parts of the masks. Block starts: prefix one block, then [state] [action_1 ... action_T].
        self.register_buffer(
            "_suffix_block_starts",
            torch.tensor([True, True] + [False] * (config.action_horizon - 1)),
            persistent=False,
        )
        self.register_buffer("_action_dim_mask", torch.arange(config.action_pad_dim) < config.action_dim, persistent=False)

    # ---- embeddings ------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    def embed_prefix(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens of every camera, then prompt embeddings: (B, Lp, D_vlm) embeddings and (B, Lp) bool mask.

        These are the prefix embeddings the residual-RL token encoder consumes.
        """
        config = self.config
        missing = [c for c in config.cameras if c not in batch["images"]]
        if missing:
            raise ValueError(f"batch['images'] lacks cameras {missing}; config.cameras = {config.cameras}")
        size = config.vision.image_size
        # All cameras through the shared ViT in one call: (B, C, 3, S, S) -> (B * C, 3, S, S).
        pixels = torch.stack([to_model_images(batch["images"][c], size) for c in config.cameras], dim=1)
        batch_size, num_cameras = pixels.shape[:2]
        pixels = pixels.flatten(0, 1).to(self.dtype)
        patches = self.vision(pixel_values=pixels).last_hidden_state  # (B * C, N, D_vit)
        image_tokens = self.image_projector(patches)  # (B * C, N, D_vlm)
        tokens_per_image = image_tokens.shape[1]
        image_tokens = image_tokens.reshape(batch_size, num_cameras * tokens_per_image, -1)  # (B, C * N, D_vlm)

        image_masks = batch.get("image_masks") or {}
        camera_mask = torch.stack(
            [
                image_masks[c].to(torch.bool) if c in image_masks
                else torch.ones(batch_size, dtype=torch.bool, device=pixels.device)
                for c in config.cameras
            ],
            dim=1,
        )  # (B, C)
        image_mask = camera_mask[:, :, None].expand(-1, -1, tokens_per_image).reshape(batch_size, -1)  # (B, C * N)

        prompt_tokens = batch["prompt_tokens"]
        if prompt_tokens.shape[1] != config.max_token_len:
            raise ValueError(f"prompt_tokens has length {prompt_tokens.shape[1]}, config.max_token_len is {config.max_token_len}")
        prompt = self.vlm.embed_tokens(prompt_tokens) * math.sqrt(config.vlm.width)  # (B, Lt, D_vlm), Gemma's scale
        embeddings = torch.cat([image_tokens, prompt], dim=1)
        mask = torch.cat([image_mask, batch["prompt_mask"].to(torch.bool)], dim=1)
        return embeddings, mask

    def embed_suffix(self, state: torch.Tensor, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """State token + action tokens for the expert: (B, 1 + T, D_expert).

        state: (B, state_pad_dim); noisy_actions: (B, T, P); time: (B,) flow time in [0, 1].
        """
        state_token = self.state_proj(state.to(self.dtype))[:, None, :]  # (B, 1, D)
        action_tokens = self.action_in_proj(noisy_actions.to(self.dtype))  # (B, T, D)
        config = self.config
        time_emb = posemb_sincos(time, config.expert.width, config.time_min_period, config.time_max_period)
        time_emb = time_emb.to(self.dtype)[:, None, :].expand_as(action_tokens)  # (B, T, D)
        # π0 (not π0.5): action and time fused by a 2-layer swish MLP.
        fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([action_tokens, time_emb], dim=-1))))
        return torch.cat([state_token, fused], dim=1)

    def pad_state(self, state: torch.Tensor) -> torch.Tensor:
        """(B, state_dim) -> (B, state_pad_dim), zeros appended."""
        if state.shape[-1] != self.config.state_dim:
            raise ValueError(f"state has width {state.shape[-1]}, config.state_dim is {self.config.state_dim}")
        return F.pad(state.float(), (0, self.config.state_pad_dim - self.config.state_dim))

    def pad_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, T, action_dim) -> (B, T, action_pad_dim), zeros appended."""
        expected = (self.config.action_horizon, self.config.action_dim)
        if tuple(actions.shape[1:]) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}, expected (B, {expected[0]}, {expected[1]})")
        return F.pad(actions.float(), (0, self.config.action_pad_dim - self.config.action_dim))

    # ---- the joint transformer -------------------------------------------------------------------------------------

    def run_layers(
        self,
        prefix: torch.Tensor | None,
        suffix: torch.Tensor | None,
        folded_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep_kv: bool = False,
        attention: str = "sdpa",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """π0's joint transformer over the given streams (VLM on `prefix`, expert on `suffix`; either may be None).

        prefix: (B, Lp, D_vlm); suffix: (B, Ls, D_expert). The query tokens are the concatenation of the given
        streams' tokens (Lq). folded_mask: (B, 1, G * Lq, Lk) from fold_mask_for_gqa, where Lk = Lq plus the cached
        prefix length if `prefix_kv` is given. cos, sin: (B, Lq, hd) rotary tables of the query tokens.
        prefix_kv: per layer (k, v) of an earlier prefix pass, prepended to the keys/values (inference).
        keep_kv: return this pass's per-layer (k, v) (rotary applied) to use as `prefix_kv` later.
        attention: grouped_attention's impl ("sdpa" or "matmul").
        Returns (prefix_out, suffix_out, kv): final-normed hidden states of each stream (None if absent), and kv.
        """
        streams = [s for s, x in ((self.vlm, prefix), (self.expert, suffix)) if x is not None]
        hidden = [x for x in (prefix, suffix) if x is not None]
        lengths = [x.shape[1] for x in hidden]
        config = self.config.vlm  # heads, kv heads and head dim are shared by both streams
        batch = hidden[0].shape[0]
        kept_kv = []
        for i in range(config.depth):
            layers = [stream.layers[i] for stream in streams]
            # Each stream projects its own tokens with its own weights ...
            qs, ks, vs = [], [], []
            for layer, x in zip(layers, hidden):
                h = layer.input_layernorm(x)
                qs.append(layer.self_attn.q_proj(h).view(batch, -1, config.num_heads, config.head_dim))
                ks.append(layer.self_attn.k_proj(h).view(batch, -1, config.num_kv_heads, config.head_dim))
                vs.append(layer.self_attn.v_proj(h).view(batch, -1, config.num_kv_heads, config.head_dim))
            # ... then all tokens attend over the concatenated sequence.
            q = _cat(qs).transpose(1, 2)  # (B, H, Lq, hd)
            k = _cat(ks).transpose(1, 2)  # (B, K, Lq, hd)
            v = _cat(vs).transpose(1, 2)  # (B, K, Lq, hd)
            q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
            if keep_kv:
                kept_kv.append((k, v))
            if prefix_kv is not None:
                k = torch.cat([prefix_kv[i][0], k], dim=2)  # (B, K, Lp + Lq, hd)
                v = torch.cat([prefix_kv[i][1], v], dim=2)
            attended = grouped_attention(q, k, v, folded_mask, attention)  # (B, Lq, H * hd)
            # Each stream its own output projection, residual, and MLP.
            new_hidden = []
            for layer, x, a in zip(layers, hidden, attended.split(lengths, dim=1)):
                x = x + layer.self_attn.o_proj(a)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                new_hidden.append(x)
            hidden = new_hidden
        outputs = [stream.norm(x) for stream, x in zip(streams, hidden)]
        prefix_out = outputs[0] if prefix is not None else None
        suffix_out = outputs[-1] if suffix is not None else None
        return prefix_out, suffix_out, kept_kv

    def _full_mask_and_positions(self, prefix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask (B, L, L) and positions (B, L) of prefix + suffix, L = Lp + 1 + T."""
        batch, prefix_len = prefix_mask.shape
        suffix_len = self.config.num_suffix_tokens
        input_mask = torch.cat([prefix_mask, prefix_mask.new_ones(batch, suffix_len)], dim=1)  # (B, L)
        block_starts = torch.cat([prefix_mask.new_zeros(prefix_len), self._suffix_block_starts])  # (L,)
        mask = make_attention_mask(input_mask, block_starts)
        # A padding token sees nothing, and an all-masked attention row gives NaN in SDPA, which would then leak
        # through 0 * NaN into every token. Letting each token see itself changes nothing for real tokens.
        # (The diagonal is built by comparing two aranges rather than torch.eye: ONNX Runtime has no bool EyeLike.)
        diagonal = torch.arange(mask.shape[-1], device=mask.device)
        mask = mask | (diagonal[:, None] == diagonal[None, :])
        positions = torch.cumsum(input_mask.long(), dim=1) - 1  # padding does not advance the position (π0)
        return mask, positions

    # ---- training --------------------------------------------------------------------------------------------------

    def sample_time(self, batch_size: int, device) -> torch.Tensor:
        """(B,) flow times t ~ Beta(1.5, 1) * 0.999 + 0.001 (π0: more weight on noisy t)."""
        config = self.config
        beta = torch.distributions.Beta(
            torch.tensor(config.time_beta_alpha, device=device), torch.tensor(config.time_beta_beta, device=device)
        )
        return beta.sample((batch_size,)) * config.time_scale + config.time_offset

    def predict_velocity(
        self, batch: dict, noisy_actions: torch.Tensor, time: torch.Tensor, return_prefix: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Velocity (B, T, P) float32 from one full pass over prefix + suffix (no cache). Training path.
        return_prefix: also return the VLM's final prefix states (B, Lp, D_vlm) and the prefix mask (B, Lp)."""
        prefix, prefix_mask = self.embed_prefix(batch)
        suffix = self.embed_suffix(self.pad_state(batch["state"]), noisy_actions, time)
        mask, positions = self._full_mask_and_positions(prefix_mask)
        cos, sin = rope_cos_sin(positions, self.config.vlm.head_dim)
        groups = self.config.vlm.num_heads // self.config.vlm.num_kv_heads
        prefix_out, suffix_out, _ = self.run_layers(prefix, suffix, fold_mask_for_gqa(mask, groups, self.dtype),
                                                    cos, sin)
        velocity = self.action_out_proj(suffix_out[:, 1:]).float()  # action tokens only
        return (velocity, prefix_out, prefix_mask) if return_prefix else velocity

    def predict_object_state(self, prefix_out: torch.Tensor, prefix_mask: torch.Tensor) -> torch.Tensor:
        """(B, object_state_dim) z-scored object state read from the final prefix states' image tokens."""
        if self.object_state_head is None:
            raise ValueError("this model has no object-state head (config.object_state_dim is 0)")
        num_image = len(self.config.cameras) * self.config.vision.tokens_per_image
        return self.object_state_head(prefix_out[:, :num_image], prefix_mask[:, :num_image])

    def compute_loss(
        self, batch: dict, noise: torch.Tensor | None = None, time: torch.Tensor | None = None,
        object_state_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss: mean of (v - u)^2 over real steps and real action dims, u = noise - actions.

        noise: (B, T, P) standard normal (drawn if None); time: (B,) in (0, 1] (π0's Beta sampling if None).
        object_state_weight > 0 (a model with an object-state head, a batch with "object_state" (B, object_state_dim),
        z-scored): adds that weight times the head's mean squared error.
        Returns the scalar loss and an info dict of detached scalars.
        """
        use_object_state = object_state_weight > 0
        if use_object_state and (self.object_state_head is None or "object_state" not in batch):
            raise ValueError("object_state_weight > 0 needs a model with an object-state head "
                             "(config.object_state_dim > 0) and batch['object_state']")
        actions = self.pad_actions(batch["actions"])  # (B, T, P)
        batch_size = actions.shape[0]
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = self.sample_time(batch_size, actions.device)
        t = time.float()[:, None, None]
        x_t = t * noise + (1 - t) * actions
        target_velocity = noise - actions
        if use_object_state:
            velocity, prefix_out, prefix_mask = self.predict_velocity(batch, x_t, time, return_prefix=True)
        else:
            velocity = self.predict_velocity(batch, x_t, time)

        # Weight 1 for real (step, dim) entries: padded action dims and steps past the episode end carry no loss.
        step_mask = batch.get("action_pad_mask")
        if step_mask is None:
            step_mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
        weight = (step_mask[:, :, None] & self._action_dim_mask[None, None, :]).float()  # (B, T, P)
        squared_error = (velocity - target_velocity) ** 2
        loss = (squared_error * weight).sum() / weight.sum().clamp(min=1.0)
        info = {"losses/flow_matching": loss.detach(), "flow/time_mean": time.float().mean().detach()}
        if use_object_state:
            predicted = self.predict_object_state(prefix_out, prefix_mask)
            object_loss = F.mse_loss(predicted, batch["object_state"].float())
            info["losses/object_state"] = object_loss.detach()
            loss = loss + object_state_weight * object_loss
        return loss, info

    # ---- inference -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_prefix(self, batch: dict, num_samples: int = 1, attention: str = "sdpa") -> PrefixCache:
        """Run the prefix through the VLM once and keep every layer's K/V (one copy per observation, shared by its
        `num_samples` samples: see PrefixCache). attention: grouped_attention's impl."""
        prefix, prefix_mask = self.embed_prefix(batch)  # (B, Lp, D), (B, Lp)
        state = self.pad_state(batch["state"])  # (B, Ps)
        prefix_len = prefix.shape[1]
        mask, positions = self._full_mask_and_positions(prefix_mask)
        cos, sin = rope_cos_sin(positions, self.config.vlm.head_dim)
        groups = self.config.vlm.num_heads // self.config.vlm.num_kv_heads

        prefix_fold = fold_mask_for_gqa(mask[:, :prefix_len, :prefix_len], groups, self.dtype)
        hidden, _, kv = self.run_layers(
            prefix, None, prefix_fold, cos[:, :prefix_len], sin[:, :prefix_len], keep_kv=True, attention=attention
        )

        # The N suffixes of an observation as one token sequence: each sees the prefix as the suffix would, and
        # inside its own block only itself (eye(N) x the suffix's own mask), so sample n is computed exactly as if
        # it ran alone. Every suffix has the same positions.
        n = num_samples
        to_prefix = mask[:, prefix_len:, :prefix_len].repeat(1, n, 1)  # (B, N * Ls, Lp)
        within = mask[:, prefix_len:, prefix_len:]  # (B, Ls, Ls)
        own_block = torch.eye(n, dtype=torch.bool, device=mask.device)[None, :, None, :, None]
        suffix_len = within.shape[1]
        within = (own_block & within[:, None, :, None, :]).reshape(-1, n * suffix_len, n * suffix_len)
        return PrefixCache(
            kv=kv,
            state=state.repeat_interleave(n, dim=0) if n > 1 else state,
            suffix_mask=fold_mask_for_gqa(torch.cat([to_prefix, within], dim=2), groups, self.dtype),
            suffix_cos=cos[:, prefix_len:].repeat(1, n, 1),
            suffix_sin=sin[:, prefix_len:].repeat(1, n, 1),
            prefix_embeddings=prefix,
            prefix_hidden=hidden,
            prefix_mask=prefix_mask,
            num_samples=n,
        )

    def denoise_velocity(
        self, cache: PrefixCache, noisy_actions: torch.Tensor, time: torch.Tensor, attention: str = "sdpa"
    ) -> torch.Tensor:
        """One flow step's velocity (BN, T, P) float32: only the expert runs, over the suffix, on the cached prefix K/V.
        attention: grouped_attention's impl."""
        suffix = self.embed_suffix(cache.state, noisy_actions, time)  # (BN, Ls, D)
        rows, suffix_len, width = suffix.shape
        samples = suffix.reshape(rows // cache.num_samples, cache.num_samples * suffix_len, width)  # (B, N * Ls, D)
        _, suffix_out, _ = self.run_layers(None, samples, cache.suffix_mask, cache.suffix_cos, cache.suffix_sin,
                                           prefix_kv=cache.kv, attention=attention)
        return self.action_out_proj(suffix_out.reshape(rows, suffix_len, width)[:, 1:]).float()

    @torch.no_grad()
    def sample_actions(
        self,
        batch: dict,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        num_samples: int = 1,
        return_prefix: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, PrefixCache]:
        """Integrate the flow from noise (t = 1) to actions (t = 0) with `num_steps` Euler steps (π0: 10).

        The prefix K/V cache is computed once and shared by all steps and all `num_samples` samples. Shapes are
        static and the step loop has a fixed trip count, so the whole sampler can be captured or compiled.
        noise: (B * num_samples, T, P) standard normal (drawn if None).
        Returns actions (B * num_samples, T, action_dim) float32, sample n of observation b at row
        b * num_samples + n (`.view(B, num_samples, T, -1)`), and with return_prefix the PrefixCache, whose
        prefix_embeddings / prefix_hidden / prefix_mask feed the residual-RL token encoder.
        """
        cache = self.prepare_prefix(batch, num_samples)
        actions = self.integrate_flow(cache, noise, num_steps)
        return (actions, cache) if return_prefix else actions

    @torch.no_grad()
    def integrate_flow(self, cache: PrefixCache, noise: torch.Tensor | None = None, num_steps: int | None = None,
                       velocity_fn=None) -> torch.Tensor:
        """The Euler steps of `sample_actions` on a prepared prefix: (B * N, T, action_dim) float32.

        velocity_fn: what computes one step's velocity, `denoise_velocity` by default (inference.py passes a
        compiled copy, compiled once and called at every step: the time is a tensor, so no step recompiles)."""
        config = self.config
        velocity_fn = self.denoise_velocity if velocity_fn is None else velocity_fn
        num_steps = config.num_flow_steps if num_steps is None else num_steps
        rows = cache.state.shape[0]
        shape = (rows, config.action_horizon, config.action_pad_dim)
        if noise is None:
            noise = torch.randn(shape, device=cache.state.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape} (B * num_samples, T, P)")
        dt = -1.0 / num_steps
        x_t = noise.float()
        for step in range(num_steps):
            time = torch.full((rows,), 1.0 + step * dt, device=x_t.device)
            x_t = x_t + dt * velocity_fn(cache, x_t, time)
        return x_t[..., : config.action_dim]


def build_model(
    config: Pi0Config,
    weights: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    skip_mismatched: tuple[str, ...] = (),
) -> Pi0Model:
    """Build a Pi0Model ready to train or run: optional π0 weights (openpi / LeRobot names, see policy.weights),
    LoRA adapters if config.lora, trainable flags from policy.lora.trainable_parameter_filter, dtype and device.

    weights: a model.safetensors file or a directory holding one; None keeps the random initialization.
    device: where to move the model (None: leave it where it was built, e.g. under `with torch.device("meta")`).
    dtype: defaults to config.dtype.
    """
    from coop_transport.policy.lora import apply_lora, set_trainable
    from coop_transport.policy.weights import load_pi0_weights

    model = Pi0Model(config)
    if weights is not None:
        load_pi0_weights(model, weights, skip_mismatched=skip_mismatched)
    if config.lora:
        apply_lora(model)
    set_trainable(model)
    dtype = dtype if dtype is not None else getattr(torch, config.dtype)
    return model.to(dtype=dtype) if device is None else model.to(device=device, dtype=dtype)
