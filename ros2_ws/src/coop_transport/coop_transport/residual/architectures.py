"""The six architectures of the seed paper (section 3.4) as data: who the agents are and what they exchange.

    B1  per-arm π0, both arms independently, no residual, no message            (evaluation only)
    B2  joint π0 on the full bimanual observation, no residual                  (evaluation only)
    V3  one centralized agent: 14-D residual over the joint π0 reference, both arms' state, no message
    V4  two independent 7-D residual agents; the message path is the identity (no message)
    V5  V4 + a learned 16-D Gaussian message, supervised to the sender's phase, gripper, readiness and pose
    V6  V4 + the partner's raw C x 7 π0 reference chunk (70-D at C=10) through FiLM

Agents share architecture, never weights: every agent owns its encoder, message head, actor and critics.
``get_arch(name)`` is the one lookup; an unknown name is a ``ValueError`` listing the six.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coop_transport.constants import ARM_ACTION_DIM, ARMS, JOINT_ACTION_DIM, PROPRIO_DIM

MessageKind = Literal["none", "learned", "chunk"]


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture is made of."""

    name: str
    description: str
    vla_variant: Literal["per-arm", "joint"]
    """π0 variant that produces the reference chunk: per-arm (one row per arm) or joint (one 14-D row)."""
    residual: bool
    """False for B1/B2: the π0 reference is executed as it is (nothing to train)."""
    message: MessageKind = "none"
    """What agent i receives from agent j: nothing, j's learned 16-D message, or j's raw reference chunk."""

    @property
    def agents(self) -> tuple[str, ...]:
        """Agent names: the arms for per-arm architectures, ``("joint",)`` for the centralized ones."""
        return ARMS if self.vla_variant == "per-arm" else ("joint",)

    @property
    def action_dim(self) -> int:
        return ARM_ACTION_DIM if self.vla_variant == "per-arm" else JOINT_ACTION_DIM

    @property
    def proprio_dim(self) -> int:
        return PROPRIO_DIM if self.vla_variant == "per-arm" else 2 * PROPRIO_DIM

    @property
    def trains(self) -> bool:
        return self.residual

    def message_dim(self, learned_dim: int, chunk: int) -> int:
        """Width of the received message: 0 (V3, V4), ``learned_dim`` (V5) or ``chunk * 7`` (V6)."""
        if self.message == "learned":
            return learned_dim
        if self.message == "chunk":
            return chunk * ARM_ACTION_DIM
        return 0

    def partner(self, agent: str) -> str | None:
        """The agent whose message ``agent`` receives (None without a message)."""
        if self.message == "none":
            return None
        return ARMS[1 - ARMS.index(agent)]


ARCHS: dict[str, ArchSpec] = {
    "B1": ArchSpec("B1", "Per-arm VLA", "per-arm", residual=False),
    "B2": ArchSpec("B2", "Joint VLA", "joint", residual=False),
    "V3": ArchSpec("V3", "Centralized residual RL", "joint", residual=True),
    "V4": ArchSpec("V4", "Per-arm residual RL, no message", "per-arm", residual=True),
    "V5": ArchSpec("V5", "Per-arm RL, supervised 16-D msg", "per-arm", residual=True, message="learned"),
    "V6": ArchSpec("V6", "Per-arm RL, oracle 70-D passing", "per-arm", residual=True, message="chunk"),
}


def get_arch(name: str) -> ArchSpec:
    """The architecture called ``name`` (B1, B2, V3, V4, V5, V6)."""
    if name not in ARCHS:
        listing = ", ".join(f"{k} ({v.description})" for k, v in ARCHS.items())
        raise ValueError(f"unknown architecture {name!r}; choose one of: {listing}")
    return ARCHS[name]
