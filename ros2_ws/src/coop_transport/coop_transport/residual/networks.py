"""The networks of one residual agent (seed paper §3.3, Figure 2 right).

At a chunk boundary agent i has the frozen π0's reference chunk ``ref`` (C, A) and prefix tokens (L, D_vlm), and
its normalized proprioception ``p``. Then:

    z      = RLTokenEncoder(prefix, p)                       (Z,)  a light Transformer, RL token read out, Z = 2048
    m_i    ~ MessageHead(z, p) = N(mu, sigma^2)              (16,) V5 only: sampled in training, mu at evaluation
    delta  = ResidualActor(z, p, ref, FiLM(m_j))             (C, A) conditioned on the partner's message
    a      = clip(ref + s * tanh(delta), -1, 1),  s = bound * sigmoid(rho)            (eq. 1)

where ``bound`` is max_radius (0.10) in every action dimension, the paper's; ``gripper_radius`` optionally gives the
gripper dimensions a bound of their own.

and the critics read (z, p, [m_j], a): twin Q and V, LayerNorm in every trunk layer. FiLM is the identity at a zero
message by construction (bias-free generator with tanh inside, f(0) = 0), so a missing message (ROS: stale or
absent) is exactly the no-message input, and V5/V6 start as V4 (the generator's output layer starts at zero).

The encoder is pre-trained by reconstructing the π0 prefix from z (``PrefixDecoder``, the "RL token" recipe) and
then frozen: RL updates never touch it, so z is computed once per boundary and stored in the replay buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coop_transport.constants import ARM_ACTION_DIM, GRIPPER_INDEX

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(sizes: list[int], layer_norm: bool = True, final_zero: bool = False) -> nn.Sequential:
    """Linear -> [LayerNorm] -> ReLU blocks, then a final Linear (zero-initialized when ``final_zero``)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b)] + ([nn.LayerNorm(b)] if layer_norm else []) + [nn.ReLU()]
    last = nn.Linear(sizes[-2], sizes[-1])
    if final_zero:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------------------- RL token encoder
class RLTokenEncoder(nn.Module):
    """Prefix tokens (B, L, D_vlm) + proprio (B, P) -> RL token z (B, Z).

    Tokens: [RL token, proprio token, prefix tokens + learned positions]; padding tokens of the prefix are masked.
    The RL token's output, layer-normed and projected to Z, is z (final LayerNorm without affine: unit scale).
    """

    def __init__(self, prefix_dim: int, prefix_len: int, proprio_dim: int, latent_dim: int = 2048,
                 width: int = 256, layers: int = 2, heads: int = 4):
        super().__init__()
        self.prefix_in = nn.Sequential(nn.LayerNorm(prefix_dim), nn.Linear(prefix_dim, width))
        self.proprio_in = nn.Linear(proprio_dim, width)
        self.rl_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, prefix_len + 2, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, latent_dim), nn.LayerNorm(latent_dim,
                                                                                                elementwise_affine=False))
        self.prefix_len = prefix_len

    def forward(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        b, length, _ = prefix.shape
        if length != self.prefix_len:
            raise ValueError(f"prefix has {length} tokens, the encoder was built for {self.prefix_len}")
        tokens = torch.cat([self.rl_token.expand(b, -1, -1), self.proprio_in(proprio)[:, None],
                            self.prefix_in(prefix.float())], dim=1) + self.position  # (B, L + 2, W)
        real = torch.cat([prefix_mask.new_ones(b, 2), prefix_mask.bool()], dim=1)  # (B, L + 2)
        hidden = self.transformer(tokens, src_key_padding_mask=~real)
        return self.out(hidden[:, 0])  # (B, Z)


class PrefixDecoder(nn.Module):
    """z (B, Z) -> reconstructed prefix (B, L, D_vlm) and proprio (B, P): the encoder's pre-training objective."""

    def __init__(self, prefix_dim: int, prefix_len: int, proprio_dim: int, latent_dim: int, width: int = 256,
                 layers: int = 1, heads: int = 4):
        super().__init__()
        self.latent_in = nn.Linear(latent_dim, width)
        self.queries = nn.Parameter(torch.randn(1, prefix_len, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.prefix_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, prefix_dim))
        self.proprio_out = nn.Linear(latent_dim, proprio_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.queries + self.latent_in(z)[:, None]  # (B, L, W)
        return self.prefix_out(self.transformer(tokens)), self.proprio_out(z)


def reconstruction_loss(decoder: PrefixDecoder, z: torch.Tensor, prefix: torch.Tensor, prefix_mask: torch.Tensor,
                        proprio: torch.Tensor) -> torch.Tensor:
    """MSE between the decoded and the layer-normed true prefix (real tokens only), plus the proprio MSE."""
    target = F.layer_norm(prefix.float(), prefix.shape[-1:])
    pred_prefix, pred_proprio = decoder(z)
    mask = prefix_mask.float()[..., None]  # (B, L, 1)
    prefix_mse = (((pred_prefix - target) ** 2) * mask).sum() / (mask.sum() * prefix.shape[-1]).clamp(min=1.0)
    return prefix_mse + F.mse_loss(pred_proprio, proprio)


# ------------------------------------------------------------------------------------------------ message (V5)
class MessageHead(nn.Module):
    """(z, p) -> Gaussian message (mean, log-std), each (B, M)."""

    def __init__(self, latent_dim: int, proprio_dim: int, message_dim: int = 16, hidden: int = 256):
        super().__init__()
        self.net = mlp([latent_dim + proprio_dim, hidden, hidden, 2 * message_dim])

    def forward(self, z: torch.Tensor, proprio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(torch.cat([z, proprio], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def sample_message(mean: torch.Tensor, log_std: torch.Tensor, generator: torch.Generator | None = None,
                   deterministic: bool = False) -> torch.Tensor:
    """m = mean + exp(log_std) * eps (training) or the mean (evaluation, deployment)."""
    if deterministic:
        return mean
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)  # CPU generator: same draws on any device
    return mean + log_std.exp() * eps


class MessageDecoder(nn.Module):
    """Sender-side supervision decoder: message (B, M) -> phase logits (B, 5), gripper and readiness logits (B,),
    pose (B, 6) (standardized)."""

    def __init__(self, message_dim: int = 16, hidden: int = 128, num_phases: int = 5):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(message_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_phases + 2 + 6)
        self.num_phases = num_phases

    def forward(self, message: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.trunk(message))
        k = self.num_phases
        return {"phase": out[:, :k], "gripper": out[:, k], "ready": out[:, k + 1], "pose": out[:, k + 2:]}


# ------------------------------------------------------------------------------------------------------ actor
class FiLM(nn.Module):
    """Feature-wise modulation by a message: h -> (1 + g(m)) * h + b(m), with g(0) = b(0) = 0 exactly.

    The generator has no biases and a tanh inside, so a zero message is the identity whatever the weights; its
    output layer starts at zero, so a freshly built FiLM is the identity for every message.
    """

    def __init__(self, message_dim: int, features: int, hidden: int = 128):
        super().__init__()
        self.inner = nn.Linear(message_dim, hidden, bias=False)
        self.outer = nn.Linear(hidden, 2 * features, bias=False)
        nn.init.zeros_(self.outer.weight)

    def forward(self, h: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.outer(torch.tanh(self.inner(message))).chunk(2, dim=-1)
        return (1.0 + gamma) * h + beta


def gripper_dims(action_dim: int) -> tuple[int, ...]:
    """The gripper dimensions of an action row: 6 for one arm (7-D), 6 and 13 for both (14-D, V3)."""
    return tuple(range(GRIPPER_INDEX, action_dim, ARM_ACTION_DIM))


class ResidualActor(nn.Module):
    """(z, p, ref, [m_j]) -> Δ (B, C, A) and the bounded executed chunk.

    a = clip(ref + s * tanh(Δ), -1, 1) with s = bound * sigmoid(ρ) per action dimension: |a - ref| ≤ s < bound
    before the final clip, for any weights and inputs (tanh ∈ [-1, 1], sigmoid ∈ (0, 1]). ``bound`` is max_radius
    in every dimension, or ``gripper_radius`` in the gripper dimensions (``gripper_dims``) when that is given; every
    dimension starts at the same fraction init_radius / max_radius of its bound (ρ0 is shared).

    Why a gripper bound of its own: robosuite's Panda gripper integrates the sign of its command, and the mean-of-4
    reference's gripper value lies at ±0.5 or ±1 on all but a few steps, so a residual within 0.10 can change what
    the gripper does only where the π0 samples split evenly; the release at the hand-over is out of its reach.
    """

    def __init__(self, latent_dim: int, proprio_dim: int, chunk: int, action_dim: int, message_dim: int = 0,
                 hidden: int = 512, max_radius: float = 0.10, init_radius: float = 0.05,
                 gripper_radius: float | None = None, gripper_dims: tuple[int, ...] = ()):
        super().__init__()
        self.chunk, self.action_dim, self.message_dim = chunk, action_dim, message_dim
        self.max_radius = float(max_radius)
        bound = torch.full((action_dim,), self.max_radius)
        if gripper_radius is not None:
            bound[list(gripper_dims)] = float(gripper_radius)
        # not persistent: the bound follows from the run's config, so checkpoints of either kind load unchanged
        self.register_buffer("bound", bound, persistent=False)
        in_dim = latent_dim + proprio_dim + chunk * action_dim
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden))
        self.layer2 = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.out = nn.Linear(hidden, chunk * action_dim)
        nn.init.uniform_(self.out.weight, -1e-3, 1e-3)  # day zero: a ≈ ref
        nn.init.zeros_(self.out.bias)
        self.film1 = FiLM(message_dim, hidden) if message_dim else None
        self.film2 = FiLM(message_dim, hidden) if message_dim else None
        p = init_radius / max_radius
        self.rho = nn.Parameter(torch.full((action_dim,), math.log(p / (1.0 - p))))

    def scale(self) -> torch.Tensor:
        """s (A,): the learned residual radius per action dimension, in (0, bound]."""
        return self.bound * torch.sigmoid(self.rho)

    def delta(self, z: torch.Tensor, proprio: torch.Tensor, ref: torch.Tensor,
              message: torch.Tensor | None = None) -> torch.Tensor:
        """Δ (B, C, A), before the tanh."""
        x = torch.cat([z, proprio, ref.flatten(1)], dim=-1)
        h = self.layer1(x)
        if self.film1 is not None:
            h = self.film1(h, self._message(message, h))
        h = self.layer2(F.relu(h))
        if self.film2 is not None:
            h = self.film2(h, self._message(message, h))
        return self.out(F.relu(h)).view(-1, self.chunk, self.action_dim)

    def _message(self, message: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if message is None:  # missing message: zeros, which FiLM maps to the identity
            return like.new_zeros(like.shape[0], self.message_dim)
        return message

    def residual_action(self, z, proprio, ref, message=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """ref + s * tanh(Δ [+ noise]) (B, C, A), before the final clip (within ref ± s)."""
        delta = self.delta(z, proprio, ref, message)
        if noise is not None:
            delta = delta + noise
        return ref + self.scale() * torch.tanh(delta)

    def forward(self, z, proprio, ref, message=None, noise=None) -> torch.Tensor:
        """The executed chunk clip(ref + s * tanh(Δ), -1, 1) (B, C, A) (eq. 1)."""
        return self.residual_action(z, proprio, ref, message, noise).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------- critics
class ValueNetwork(nn.Module):
    """V(z, p, [m]) -> (B,), LayerNorm trunk."""

    def __init__(self, latent_dim: int, proprio_dim: int, message_dim: int = 0, hidden: int = 512):
        super().__init__()
        self.net = mlp([latent_dim + proprio_dim + message_dim, hidden, hidden, 1])

    def forward(self, z, proprio, message=None) -> torch.Tensor:
        parts = [z, proprio] + ([message] if message is not None else [])
        return self.net(torch.cat(parts, -1)).squeeze(-1)


class TwinQ(nn.Module):
    """Q1, Q2 (z, p, [m], a) -> two (B,) estimates, LayerNorm trunks; ``a`` is the executed chunk (B, C, A)."""

    def __init__(self, latent_dim: int, proprio_dim: int, chunk: int, action_dim: int, message_dim: int = 0,
                 hidden: int = 512):
        super().__init__()
        in_dim = latent_dim + proprio_dim + message_dim + chunk * action_dim
        self.q1 = mlp([in_dim, hidden, hidden, 1])
        self.q2 = mlp([in_dim, hidden, hidden, 1])

    def forward(self, z, proprio, action, message=None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [z, proprio] + ([message] if message is not None else []) + [action.flatten(1)]
        x = torch.cat(parts, -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------------------------------------------- an agent
class ResidualAgent(nn.Module):
    """Everything one agent owns. Two agents never share a module (share architecture, not weights)."""

    def __init__(self, prefix_dim: int, prefix_len: int, proprio_dim: int, chunk: int, action_dim: int,
                 received_dim: int, learned_message_dim: int, config):
        super().__init__()
        z = config.latent_dim
        self.encoder = RLTokenEncoder(prefix_dim, prefix_len, proprio_dim, z, config.encoder_width,
                                      config.encoder_layers, config.encoder_heads)
        self.decoder = PrefixDecoder(prefix_dim, prefix_len, proprio_dim, z, config.encoder_width, 1,
                                     config.encoder_heads)
        self.message_head = MessageHead(z, proprio_dim, learned_message_dim) if learned_message_dim else None
        self.message_decoder = MessageDecoder(learned_message_dim) if learned_message_dim else None
        self.actor = ResidualActor(z, proprio_dim, chunk, action_dim, received_dim, config.hidden_dim,
                                   config.max_radius, config.init_radius, config.gripper_radius,
                                   gripper_dims(action_dim))
        self.q = TwinQ(z, proprio_dim, chunk, action_dim, received_dim, config.hidden_dim)
        self.q_target = TwinQ(z, proprio_dim, chunk, action_dim, received_dim, config.hidden_dim)
        self.q_target.load_state_dict(self.q.state_dict())
        self.q_target.requires_grad_(False)
        self.v = ValueNetwork(z, proprio_dim, received_dim, config.hidden_dim)
        self.received_dim = received_dim

    def message(self, z, proprio, generator=None, deterministic=False) -> torch.Tensor:
        mean, log_std = self.message_head(z, proprio)
        return sample_message(mean, log_std, generator, deterministic)
