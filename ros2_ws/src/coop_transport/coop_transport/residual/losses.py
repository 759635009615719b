"""The losses of cooperative residual RL, one short function each (seed paper eq. 2-4 and §3.4 V5).

    expectile_loss   L_V = E[|τ - 1(u < 0)| u²],  u = Q_target(s, a) - V(s),  τ = 0.6           (eq. 2)
    td_target        y = r + γ^k V(s') (1 - done)   for a k-step chunk transition (r: discounted chunk return)
    td_loss          L_Q = SmoothL1(Q1(s, a), y) + SmoothL1(Q2(s, a), y)                          (eq. 3)
    awr_weights      w = min(exp(β A), 100),  A = Q_target(s, a) - V(s),  β = 3
                     (optionally A / std(A) over the batch: the paper's raw A, ≈ 1e-3 here, gives w ≈ 1)
    awr_loss         L_π = E[w ||π(s) - a||²]   (squared norm over the whole chunk)               (eq. 4)
    message_supervision_loss   λ_sup (CE(phase) + BCE(gripper) + BCE(ready) + MSE(pose)) of the SENDER
    gaussian_kl      KL(N(μ, σ²) || N(0, I)), summed over the message dimensions, averaged over the batch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expectile_loss(diff: torch.Tensor, expectile: float = 0.6) -> torch.Tensor:
    """Asymmetric squared loss of ``diff = target - prediction``: weight τ above, 1 - τ below."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def td_target(reward: torch.Tensor, discount: torch.Tensor, done: torch.Tensor, next_value: torch.Tensor
              ) -> torch.Tensor:
    """r + γ^k V(s') (1 - done); ``discount`` is γ^k of each transition (k: steps the chunk actually ran)."""
    return reward + discount * next_value * (1.0 - done)


def td_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 of both critics against one (detached) target."""
    target = target.detach()
    return F.smooth_l1_loss(q1, target) + F.smooth_l1_loss(q2, target)


def awr_weights(advantage: torch.Tensor, beta: float = 3.0, max_weight: float = 100.0,
                normalize: bool = False) -> torch.Tensor:
    """min(exp(β A), max_weight), detached.

    ``normalize`` divides A by its standard deviation over the batch first, so β acts on how many standard deviations
    an action is better than V rather than on the critic's scale (which the shaped reward leaves at ~1e-3 here).
    """
    advantage = advantage.detach()
    if normalize:
        advantage = advantage / (advantage.std() + 1e-6)
    return torch.exp(beta * advantage).clamp(max=max_weight)


def awr_loss(predicted: torch.Tensor, action: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E[w ||π(s) - a||²]; ``predicted`` and ``action`` are (B, C, A) chunks, ``weights`` (B,)."""
    squared = (predicted - action).pow(2).flatten(1).sum(-1)
    return (weights.detach() * squared).mean()


def message_supervision_loss(decoded: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                             weight: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λ_sup times the sum of the four heads' losses on the sender's labels.

    labels: ``phase`` (B,) int64 in [0, 5), ``gripper`` and ``ready`` (B,) in {0, 1}, ``pose`` (B, 6) standardized.
    Returns the weighted loss and the unweighted parts (detached) for logging.
    """
    parts = {
        "phase": F.cross_entropy(decoded["phase"], labels["phase"].long()),
        "gripper": F.binary_cross_entropy_with_logits(decoded["gripper"], labels["gripper"].float()),
        "ready": F.binary_cross_entropy_with_logits(decoded["ready"], labels["ready"].float()),
        "pose": F.mse_loss(decoded["pose"], labels["pose"].float()),
    }
    return weight * sum(parts.values()), {k: v.detach() for k, v in parts.items()}


def gaussian_kl(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, I)) = ½ Σ (σ² + μ² - 1 - 2 log σ), averaged over the batch."""
    return 0.5 * (torch.exp(2 * log_std) + mean.pow(2) - 1.0 - 2 * log_std).sum(-1).mean()
