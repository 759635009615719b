"""π0's chunk sampler rewritten for inference: the same function as `Pi0Model.sample_actions`, with fused weights
so that the exported graph has fewer, larger nodes (what TensorRT's layer fusion does, done here once at export
time so that every runtime gets it).

Why: on a CPU, ONNX Runtime runs the plain trace of the sampler as ~2,000 small nodes (10 unrolled flow steps x 3
expert layers of projections, rotary slices, concatenations, norms), and at a few microseconds each their overhead
costs about as much as the math. Every rewrite below is exact algebra in float32 (results differ from the original
only in rounding); the export's parity check compares the graph with the original, unmodified model.

What changes, per Gemma layer (VLM and action expert alike) unless said otherwise:
  * q and k projections: one matmul, q's columns pre-scaled by the attention scale 1/sqrt(head_dim) (a power of two
    for head_dim 64 or 256: exact). v, gate and up have a matmul each: in ONNX Runtime a Split (a strided copy)
    costs more than one more matmul.
  * rotary embedding: rotate_half swaps the two halves of a head and negates one, so q and k are rotated together
    as x * cos + swap_halves(x) * sin, with the sign folded into the sin table: one Slice (step -1 on a size-2 axis)
    instead of slices, a negation and a concatenation per tensor.
  * attention masks: built once per chunk, additive, at the scores' full shape (a broadcasting Add in every layer
    and step is slower), rows laid out for grouped-query attention without head transposes (one KV head).
  * GELU-tanh written in the pattern ONNX Runtime fuses into one node.
  * the VLM's last layer: keys and values only (nothing reads its queries, attention output or MLP).
Per chunk:
  * the state token attends only to the prefix and itself, and depends on neither the flow time nor the noise, so
    its keys and values are the same at every step: computed once, after the prefix; the steps run the action
    tokens only (32 rows, not 33). Its and the prefix's keys/values (the context) are expanded to the N samples once.
  * the ViT (SigLIP): q, k, v in one matmul with the attention scale folded in, the same GELU pattern.
Per flow step:
  * action_in_proj folded into action_time_mlp_in (a product of two linear maps), and the time half of
    action_time_mlp_in evaluated at export time for the fixed flow times, as one bias per step.
  * the Euler step's dt folded into action_out_proj.

Reading order: rms_norm / gelu_tanh -> FusedGemmaLayer -> FusedVisionLayer -> FusedChunkSampler (embed_prefix,
context: once per chunk; forward: the flow steps).
Shapes: B observations, N samples, BN = B * N, T action horizon, D width, H query heads, K KV heads, G = H / K,
hd head dim, Lp prefix tokens, C = Lp + 1 context tokens (prefix + state), P action pad width. Token rows are
flattened, sample-major: (BN * T, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coop_transport.policy.image_transforms import to_model_images
from coop_transport.policy.model import Pi0Model, posemb_sincos, rope_cos_sin

GELU_TANH_COEFFICIENT = math.sqrt(2.0 / math.pi)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """GemmaRMSNorm with its (1 + w) precomputed as `scale`; ONNX Runtime fuses the pattern into one node."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") (gelu_pytorch_tanh of Gemma and SigLIP) in the form ONNX Runtime's
    FastGeluFusion matches (one node instead of nine): x * 0.5 * (1 + tanh(sqrt(2/pi) * x * (1 + 0.044715 x^2)))."""
    return x * 0.5 * (1.0 + torch.tanh(GELU_TANH_COEFFICIENT * x * (1.0 + 0.044715 * x * x)))


def additive_mask(mask: torch.Tensor, groups: int, kv_heads: int) -> torch.Tensor:
    """(B, Lq, Lk) bool -> (B, K, Lq * G, Lk) additive float mask (0 or -inf) for FusedGemmaLayer's query rows
    (token-major: query token t, group g at row t * G + g), expanded to full size."""
    batch, lq, lk = mask.shape
    full = mask[:, None, :, None, :].expand(batch, kv_heads, lq, groups, lk).reshape(batch, kv_heads, lq * groups, lk)
    return torch.zeros(full.shape, dtype=torch.float32, device=mask.device).masked_fill(~full, float("-inf"))


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, hd) tables of rope_cos_sin -> (B * L, heads, 2, hd/2) cos and signed sin for rotating q and k as
    x * cos + swap_halves(x) * sin: rotate_half(x) = [-x2, x1] = swap_halves(x) * [-1, 1]."""
    batch, length, hd = cos.shape
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)[:, None]  # (2, 1)
    cos = cos.reshape(batch * length, 1, 2, hd // 2).expand(-1, heads, -1, -1)
    sin = (sin.reshape(batch * length, 1, 2, hd // 2) * sign).expand(-1, heads, -1, -1)
    return cos.contiguous(), sin.contiguous()  # full size: a broadcasting Mul in every layer is slower


def _float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def _t(weight: torch.Tensor) -> torch.Tensor:
    """An nn.Linear weight (out, in) as (in, out) for x @ W: the exported initializer is stored transposed, so the
    graph has no Transpose. A view (no copy in memory: π0-3B's weights are 13 GB)."""
    return weight.detach().t()


def _siglip(model: Pi0Model) -> nn.Module:
    """The SigLIP vision transformer (embeddings, encoder, post_layernorm): transformers >= 5 puts it in
    SiglipVisionModel itself, earlier versions in its .vision_model."""
    return getattr(model.vision, "vision_model", model.vision)


class FusedGemmaLayer(nn.Module):
    """One GemmaDecoderLayer (of the VLM or the action expert) with fused weights; buffers only, nothing trains."""

    def __init__(self, layer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps = layer.input_layernorm.eps
        attention_scale = head_dim**-0.5  # SDPA's default, moved into q's weights
        qk = torch.cat([_float64(attn.q_proj.weight) * attention_scale, _float64(attn.k_proj.weight)])
        self.register_buffer("qk_weight", qk.t().float().contiguous())  # (D, (H + K) * hd): q columns, then k
        self.register_buffer("v_weight", _t(attn.v_proj.weight))
        self.register_buffer("o_weight", _t(attn.o_proj.weight))
        self.register_buffer("gate_weight", _t(mlp.gate_proj.weight))
        self.register_buffer("up_weight", _t(mlp.up_proj.weight))
        self.register_buffer("down_weight", _t(mlp.down_proj.weight))
        self.register_buffer("input_norm_scale", 1.0 + layer.input_layernorm.weight.detach().float())
        self.register_buffer("post_norm_scale", 1.0 + layer.post_attention_layernorm.weight.detach().float())

    def keys_values(self, h: torch.Tensor, rows: int, rope_cos: torch.Tensor,
                    rope_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys (rotated) and values of the tokens h (rows * T, D): each (rows, K, T, hd)."""
        kv_heads, hd = self.num_kv_heads, self.head_dim
        x = rms_norm(h, self.input_norm_scale, self.eps)
        k = (x @ self.qk_weight[:, self.num_heads * hd:]).view(-1, kv_heads, 2, hd // 2)
        k = k * rope_cos[:, -kv_heads:] + k.flip(-2) * rope_sin[:, -kv_heads:]
        return self._heads(k, rows), self._heads(x @ self.v_weight, rows)

    def _heads(self, x: torch.Tensor, rows: int, groups: int = 1) -> torch.Tensor:
        """Token rows (rows * T, K * G * hd), in any view, -> (rows, K, T * G, hd): each KV head's G query heads (or
        its key / value, G = 1) along the query axis, token-major. With one KV head (π0) a plain reshape."""
        kv_heads, hd = self.num_kv_heads, self.head_dim
        if kv_heads == 1:
            return x.reshape(rows, 1, -1, hd)
        return x.reshape(rows, -1, kv_heads, groups * hd).transpose(1, 2).reshape(rows, kv_heads, -1, hd)

    def forward(self, h: torch.Tensor, rows: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor, mask: torch.Tensor,
                context: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """h: (rows * T, D) tokens. rope_cos, rope_sin: (rows * T, H + K, 2, hd/2) (rotary_tables). mask:
        (rows, K, T * G, C + T) additive (additive_mask), C = 0 without context. context: cached (k, v), each
        (rows, K, C, hd), that the tokens attend to before themselves.
        Returns the layer's output (rows * T, D) and the tokens' own (k, v), each (rows, K, T, hd)."""
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        groups, tokens = heads // kv_heads, h.shape[0] // rows

        x = rms_norm(h, self.input_norm_scale, self.eps)
        qk = (x @ self.qk_weight).view(-1, heads + kv_heads, 2, hd // 2)
        qk = qk * rope_cos + qk.flip(-2) * rope_sin
        q, k = qk.split([heads, kv_heads], dim=1)
        # Grouped-query attention as in policy.model.grouped_attention, but with the G query heads of a KV head laid
        # along the query axis token-major, which with one KV head is a plain reshape of q (no transposes).
        q, k, v = self._heads(q, rows, groups), self._heads(k, rows), self._heads(x @ self.v_weight, rows)
        keys, values = (k, v) if context is None else (torch.cat([context[0], k], 2), torch.cat([context[1], v], 2))
        attended = torch.softmax(q @ keys.transpose(-1, -2) + mask, dim=-1) @ values  # (rows, K, T * G, hd)
        if kv_heads > 1:
            attended = attended.reshape(rows, kv_heads, tokens, groups * hd).transpose(1, 2)
        h = h + attended.reshape(rows * tokens, heads * hd) @ self.o_weight

        x = rms_norm(h, self.post_norm_scale, self.eps)
        h = h + (gelu_tanh(x @ self.gate_weight) * (x @ self.up_weight)) @ self.down_weight
        return h, (k, v)


class FusedVisionLayer(nn.Module):
    """One SiglipEncoderLayer with q, k, v in one matmul (attention scale folded in) and the fusable GELU."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.norm1, self.norm2 = layer.layer_norm1, layer.layer_norm2  # nn.LayerNorm: one ONNX node each
        scale = attn.scale
        qkv = [(_float64(attn.q_proj.weight) * scale, _float64(attn.q_proj.bias) * scale),
               (_float64(attn.k_proj.weight), _float64(attn.k_proj.bias)),
               (_float64(attn.v_proj.weight), _float64(attn.v_proj.bias))]
        self.register_buffer("qkv_weight", torch.cat([w for w, _ in qkv]).t().float().contiguous())  # (W, 3W)
        self.register_buffer("qkv_bias", torch.cat([b for _, b in qkv]).float())
        self.register_buffer("out_weight", _t(attn.out_proj.weight))
        self.register_buffer("out_bias", attn.out_proj.bias.detach())
        self.register_buffer("fc1_weight", _t(mlp.fc1.weight))
        self.register_buffer("fc1_bias", mlp.fc1.bias.detach())
        self.register_buffer("fc2_weight", _t(mlp.fc2.weight))
        self.register_buffer("fc2_bias", mlp.fc2.bias.detach())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (images, patches, W) -> (images, patches, W)."""
        images, patches, width = h.shape
        qkv = self.norm1(h) @ self.qkv_weight + self.qkv_bias  # (images, patches, 3W)
        qkv = qkv.view(images, patches, 3 * self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.num_heads, dim=1)  # (images, heads, patches, hd) each
        attended = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # no mask: every patch is real
        h = h + attended.transpose(1, 2).reshape(images, patches, width) @ self.out_weight + self.out_bias
        return h + gelu_tanh(self.norm2(h) @ self.fc1_weight + self.fc1_bias) @ self.fc2_weight + self.fc2_bias


class FusedChunkSampler(nn.Module):
    """forward(image_<slot>..., prompt_tokens, prompt_mask, state, noise) -> actions (B*N, T, action_dim): the same
    inputs, outputs and function as graphs.Pi0ChunkSampler over `model`, which is read, not modified. The fused
    weights are made at construction (a snapshot: build it after loading, merging LoRA, casting to float32)."""

    def __init__(self, model: Pi0Model, num_samples: int, num_steps: int | None = None):
        super().__init__()
        config = model.config
        if model.dtype != torch.float32:
            raise ValueError(f"the fused sampler is built from a float32 model, got {model.dtype}")
        vlm, expert = config.vlm, config.expert
        self.model = model  # for the modules used as they are: patch embedding, layer norms, projections
        self.config = config
        self.cameras = tuple(config.cameras)
        self.num_samples = num_samples
        self.num_steps = config.num_flow_steps if num_steps is None else num_steps
        self.vision_layers = nn.ModuleList(FusedVisionLayer(layer) for layer in _siglip(model).encoder.layers)
        self.vlm_layers = nn.ModuleList(FusedGemmaLayer(layer, vlm.num_heads, vlm.num_kv_heads, vlm.head_dim)
                                        for layer in model.vlm.layers)
        self.expert_layers = nn.ModuleList(FusedGemmaLayer(layer, expert.num_heads, expert.num_kv_heads,
                                                           expert.head_dim) for layer in model.expert.layers)
        self.final_norm_eps = model.expert.norm.eps
        self.register_buffer("final_norm_scale", 1.0 + model.expert.norm.weight.detach().float())

        # Action tokens: action_time_mlp_in([action_in_proj(x), time_emb]) = x @ (A_in^T A_a^T) + b_step, where
        # b_step = b_in A_a^T + time_emb(t_step) A_t^T + b_mlp for the fixed flow times t_step = 1 + step * dt.
        width = expert.width
        mlp_in = _float64(model.action_time_mlp_in.weight)  # (D, 2D): action half, then time half
        action_half, time_half = mlp_in[:, :width], mlp_in[:, width:]
        self.register_buffer("action_in_weight",
                             (_float64(model.action_in_proj.weight).t() @ action_half.t()).float())  # (P, D)
        dt = -1.0 / self.num_steps
        # The flow times exactly as sample_actions makes them (a float32 tensor of 1 + step * dt).
        times = torch.tensor([1.0 + step * dt for step in range(self.num_steps)], dtype=torch.float32)
        time_emb = _float64(posemb_sincos(times, width, config.time_min_period, config.time_max_period))
        step_bias = (_float64(model.action_in_proj.bias) @ action_half.t() + time_emb @ time_half.t()
                     + _float64(model.action_time_mlp_in.bias))  # (steps, D)
        self.register_buffer("action_in_step_bias", step_bias.float())
        self.register_buffer("action_mlp_out_weight", _t(model.action_time_mlp_out.weight))
        self.register_buffer("action_mlp_out_bias", model.action_time_mlp_out.bias.detach())
        # x_{t+dt} = x_t + dt * (h @ W_out^T + b_out): dt folded into the output projection.
        self.register_buffer("euler_weight", (_float64(model.action_out_proj.weight).t() * dt).float())
        self.register_buffer("euler_bias", (_float64(model.action_out_proj.bias) * dt).float())

    # ---- once per chunk ------------------------------------------------------------------------------------------

    def embed_prefix(self, images: list[torch.Tensor], prompt_tokens: torch.Tensor,
                     prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pi0Model.embed_prefix with the fused ViT: (B, Lp, D_vlm) embeddings, (B, Lp) bool mask. Every camera
        is present (the graph has no image-mask input)."""
        model, config = self.model, self.config
        pixels = torch.stack([to_model_images(image, config.vision.image_size) for image in images], dim=1)
        batch_size, num_cameras = pixels.shape[:2]
        vit = _siglip(model)
        h = vit.embeddings(pixels.flatten(0, 1))  # (B * C, patches, W): patch embedding + position embedding
        for layer in self.vision_layers:
            h = layer(h)
        image_tokens = model.image_projector(vit.post_layernorm(h))  # (B * C, patches, D_vlm)
        image_tokens = image_tokens.reshape(batch_size, -1, image_tokens.shape[-1])
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        prompt = model.vlm.embed_tokens(prompt_tokens) * math.sqrt(config.vlm.width)  # Gemma's scale
        return torch.cat([image_tokens, prompt], dim=1), torch.cat([image_mask, prompt_mask.to(torch.bool)], dim=1)

    def context(self, images: list[torch.Tensor], prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor,
                state: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
        """The prefix through the VLM and the state token through the expert, once per chunk.

        Returns per expert layer (k, v) of the context (prefix + state token), each (BN, K, C, hd); the action
        tokens' additive mask (BN, K, T * G, C + T) and rotary tables (BN * T, H + K, 2, hd/2).
        """
        model, config = self.model, self.config
        heads, kv_heads, hd = config.vlm.num_heads, config.vlm.num_kv_heads, config.vlm.head_dim
        groups = heads // kv_heads
        prefix, prefix_mask = self.embed_prefix(images, prompt_tokens, prompt_mask)
        batch, prefix_len = prefix_mask.shape
        mask, positions = model._full_mask_and_positions(prefix_mask)  # (B, L, L), (B, L), L = Lp + 1 + T
        cos, sin = rope_cos_sin(positions, hd)  # (B, L, hd)
        spans = {"prefix": slice(0, prefix_len), "state": slice(prefix_len, prefix_len + 1),
                 "actions": slice(prefix_len + 1, None)}
        tables = {name: rotary_tables(cos[:, span], sin[:, span], heads + kv_heads) for name, span in spans.items()}

        # Prefix: the VLM's keys and values per layer (rows attend within the prefix).
        h = prefix.flatten(0, 1)
        prefix_attention = additive_mask(mask[:, spans["prefix"], spans["prefix"]], groups, kv_heads)
        prefix_kv = []
        for layer in self.vlm_layers[:-1]:
            h, kv = layer(h, batch, *tables["prefix"], prefix_attention)
            prefix_kv.append(kv)
        prefix_kv.append(self.vlm_layers[-1].keys_values(h, batch, *tables["prefix"]))

        # State token: the expert's layers on the suffix's first token, attending to the prefix and itself.
        h = model.state_proj(model.pad_state(state))  # (B, D)
        state_attention = additive_mask(mask[:, spans["state"], : prefix_len + 1], groups, kv_heads)
        context_kv = []
        for layer, (prefix_k, prefix_v) in zip(self.expert_layers, prefix_kv):
            h, (state_k, state_v) = layer(h, batch, *tables["state"], state_attention, context=(prefix_k, prefix_v))
            context_kv.append((torch.cat([prefix_k, state_k], 2), torch.cat([prefix_v, state_v], 2)))

        def per_sample(x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B * N, ...), sample-major per observation
            return x.repeat_interleave(self.num_samples, dim=0) if self.num_samples > 1 else x

        action_attention = additive_mask(mask[:, spans["actions"]], groups, kv_heads)  # (B, K, T * G, C + T)
        horizon = config.action_horizon
        action_cos, action_sin = (per_sample(t.view(batch, horizon, *t.shape[1:])).flatten(0, 1)
                                  for t in tables["actions"])
        return ([(per_sample(k), per_sample(v)) for k, v in context_kv], per_sample(action_attention),
                action_cos, action_sin)

    # ---- the flow steps --------------------------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        images = list(inputs[: len(self.cameras)])
        prompt_tokens, prompt_mask, state, noise = inputs[len(self.cameras):]
        context_kv, mask, rope_cos, rope_sin = self.context(images, prompt_tokens, prompt_mask, state)
        rows, horizon, pad = noise.shape
        x_t = noise.float().reshape(rows * horizon, pad)  # t = 1; one row per action token, sample-major
        for step in range(self.num_steps):  # unrolled in the trace: static trip count
            h = x_t @ self.action_in_weight + self.action_in_step_bias[step]
            h = F.silu(h) @ self.action_mlp_out_weight + self.action_mlp_out_bias  # (BN * T, D)
            for layer, context in zip(self.expert_layers, context_kv):
                h, _ = layer(h, rows, rope_cos, rope_sin, mask, context)
            h = rms_norm(h, self.final_norm_scale, self.final_norm_eps)
            x_t = x_t + (h @ self.euler_weight + self.euler_bias)
        return x_t.reshape(rows, horizon, pad)[..., : self.config.action_dim]
