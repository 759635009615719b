"""IQL critics + AWR actor, one ``update(batch) -> metrics`` per agent (seed paper §3.3), CleanRL-style.

``AgentLearner.update`` takes one agent's view of a batch (its own latent, proprio, reference, action, the shared
team reward, and the message it *receives*) and does, in order:

    1. value:   L_V = expectile(min(Q1_targ, Q2_targ)(s, a) - V(s), τ)              clip 1.0
    2. critics: L_Q = SmoothL1(Q_k(s, a), r + γ^k V(s') (1 - done)), k = 1, 2         clip 1.0
    3. actor:   L_π = E[min(exp(β (Q_targ - V)), 100) ||π(s) - a||²]                 clip 5.0
                (``advantage_norm``: Q_targ - V divided by its batch standard deviation first;
                 ``actor_data="online"``: the mean over the batch's online rows only)
    4. message (V5, the sender's own head): λ_sup (CE + BCE + BCE + MSE)(decoder(m_i), labels_i) + 1e-4 KL(m_i)
    5. Polyak: Q_targ <- (1 - 0.005) Q_targ + 0.005 Q

``Learner.update(joint_batch)`` builds each agent's view and calls its ``update``. The only thing one agent's update
reads from another agent is the received message (V5: the partner's message head on the partner's latent, without
gradient; V6: the partner's reference chunk); V3 has one agent and V4 none of that: no data or gradient path.
Metrics are namespaced ``losses/q``, ``losses/v``, ``losses/actor``, ``losses/message``, ``charts/...`` per agent
(the learner prefixes them with the agent's name).
"""

from __future__ import annotations

import torch
from torch import nn

from coop_transport.constants import ARMS
from coop_transport.residual.losses import (awr_loss, awr_weights, expectile_loss, gaussian_kl,
                                            message_supervision_loss, td_loss, td_target)
from coop_transport.residual.networks import gripper_dims


def polyak_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, rate)


class AgentLearner:
    """Optimizers and the update of one ``ResidualAgent``."""

    def __init__(self, agent, config):
        self.agent, self.config = agent, config
        lr = config.lr
        self.v_opt = torch.optim.Adam(agent.v.parameters(), lr=lr)
        self.q_opt = torch.optim.Adam(agent.q.parameters(), lr=lr)
        self.actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=lr)
        self.message_opt = None
        if agent.message_head is not None:
            self.message_opt = torch.optim.Adam(
                list(agent.message_head.parameters()) + list(agent.message_decoder.parameters()), lr=lr)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"v": self.v_opt, "q": self.q_opt, "actor": self.actor_opt}
        if self.message_opt is not None:
            out["message"] = self.message_opt
        return out

    @staticmethod
    def _step(optimizer, loss, params, clip) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return norm

    def update(self, b: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, float]:
        """One gradient step on every loss from an agent-view batch (see ``Learner.agent_view`` for the keys)."""
        agent, cfg = self.agent, self.config
        z, p, a, m = b["latent"], b["proprio"], b["action"], b.get("message")

        # 1. value: expectile regression towards the target critics (actor-free)
        with torch.no_grad():
            q_target = torch.min(*agent.q_target(z, p, a, m))
        v = agent.v(z, p, m)
        loss_v = expectile_loss(q_target - v, cfg.expectile)
        self._step(self.v_opt, loss_v, agent.v.parameters(), cfg.critic_grad_clip)

        # 2. twin critics: SmoothL1 against r + γ^k V(s') (1 - done)
        with torch.no_grad():
            next_v = agent.v(b["next_latent"], b["next_proprio"], b.get("next_message"))
            y = td_target(b["reward"], b["discount"], b["done"], next_v)
        q1, q2 = agent.q(z, p, a, m)
        loss_q = td_loss(q1, q2, y)
        self._step(self.q_opt, loss_q, agent.q.parameters(), cfg.critic_grad_clip)

        # 3. actor: advantage-weighted regression of the executed chunk (before the final clip) onto a
        with torch.no_grad():
            advantage = q_target - agent.v(z, p, m)
            weights = awr_weights(advantage, cfg.beta, cfg.max_weight, cfg.advantage_norm)
            actor_rows = torch.ones_like(weights)
            if cfg.actor_data == "online" and "from_demo" in b:
                actor_rows = (~b["from_demo"]).to(weights.dtype)
        predicted = agent.actor.residual_action(z, p, b["ref"], m)
        # mean over the rows the actor learns from (all of them, or the online ones); none: no actor step
        loss_pi = awr_loss(predicted, a, weights * actor_rows) / actor_rows.mean().clamp(min=1e-12)
        if actor_rows.any():
            self._step(self.actor_opt, loss_pi, agent.actor.parameters(), cfg.actor_grad_clip)

        with torch.no_grad():  # for the logs: the radius after this step, the residual of the chunk it learned from
            radius, residual = agent.actor.scale(), (predicted - b["ref"]).abs()
        grippers = list(gripper_dims(agent.actor.action_dim))
        metrics = {
            "losses/v": loss_v.item(), "losses/q": loss_q.item(), "losses/actor": loss_pi.item(),
            "charts/q": q1.mean().item(), "charts/v": v.mean().item(), "charts/td_target": y.mean().item(),
            "charts/advantage": advantage.mean().item(), "charts/advantage_std": advantage.std().item(),
            "charts/awr_weight": (weights * actor_rows).sum().item() / max(actor_rows.sum().item(), 1.0),
            "charts/awr_weight_max": (weights * actor_rows).max().item(),
            "charts/residual_radius": radius.mean().item(),
            "charts/residual_magnitude": residual.mean().item(),
            "charts/gripper_radius": radius[grippers].mean().item(),
            "charts/gripper_residual": residual[..., grippers].mean().item(),
        }

        # 4. the sender's own message: supervision of its decoder + KL to N(0, I)
        if self.message_opt is not None:
            mean, log_std = agent.message_head(z, p)
            sent = mean + log_std.exp() * torch.randn(mean.shape, generator=generator).to(mean.device)
            decoded = agent.message_decoder(sent)
            loss_sup, parts = message_supervision_loss(decoded, b["own_labels"], cfg.lambda_sup)
            kl = gaussian_kl(mean, log_std)
            loss_msg = loss_sup + cfg.kl_weight * kl
            params = list(agent.message_head.parameters()) + list(agent.message_decoder.parameters())
            self._step(self.message_opt, loss_msg, params, cfg.critic_grad_clip)
            with torch.no_grad():
                metrics.update({
                    "losses/message": loss_msg.item(), "losses/message_kl": kl.item(),
                    **{f"losses/message_{k}": v.item() for k, v in parts.items()},
                    "charts/message_phase_acc": (decoded["phase"].argmax(-1) == b["own_labels"]["phase"]
                                                 ).float().mean().item(),
                })

        # 5. target critics
        polyak_update(agent.q_target, agent.q, cfg.polyak)
        return metrics


class Learner:
    """All agents of an architecture: per-agent views of a joint batch, one ``AgentLearner`` each."""

    def __init__(self, system, config):
        self.system, self.config = system, config
        self.learners = {name: AgentLearner(system.agents[name], config) for name in system.agent_names}

    def agent_view(self, batch: dict[str, torch.Tensor], i: int, generator: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
        """Agent i's share of a joint batch: its own fields, the team reward, and what it receives."""
        name = self.system.agent_names[i]
        view = {k: batch[k][:, i] for k in ("latent", "proprio", "ref", "action", "next_latent", "next_proprio")}
        view.update({k: batch[k] for k in ("reward", "discount", "done", "from_demo") if k in batch})
        spec = self.system.spec
        if spec.message != "none":
            j = self.system.agent_names.index(spec.partner(name))
            with torch.no_grad():  # what the partner sends (V5: sampled from its current head), no gradient
                if spec.message == "learned":
                    partner = self.system.agents[spec.partner(name)]
                    view["message"] = partner.message(batch["latent"][:, j], batch["proprio"][:, j], generator)
                    view["next_message"] = partner.message(batch["next_latent"][:, j], batch["next_proprio"][:, j],
                                                           generator)
                else:
                    view["message"] = batch["ref"][:, j].flatten(1)
                    view["next_message"] = batch["next_ref"][:, j].flatten(1)
        if spec.message == "learned":  # supervision labels of the sender itself
            arm = ARMS.index(name)
            view["own_labels"] = {
                "phase": batch["phase"][:, arm], "gripper": batch["gripper"][:, arm], "ready": batch["ready"][:, arm],
                "pose": (batch["pose"][:, arm] - self.system.pose_mean) / self.system.pose_std,
            }
        return view

    def update(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, float]:
        metrics = {}
        views = [self.agent_view(batch, i, generator) for i in range(len(self.system.agent_names))]  # before any step
        for view, name in zip(views, self.system.agent_names):
            metrics.update({f"{name}/{k}": v for k, v in self.learners[name].update(view, generator).items()})
        if "from_demo" in batch:
            metrics["charts/demo_fraction"] = batch["from_demo"].float().mean().item()
        return metrics
