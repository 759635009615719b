"""The TwoArmTransport simulation. Importing this package selects the OpenGL backend (``MUJOCO_GL``) first."""

from coop_transport.sim.rendering import configure_gl

configure_gl()

from coop_transport.sim.env import SimConfig, TransportSim, arm_observation, join_actions, split_action  # noqa: E402

__all__ = ["SimConfig", "TransportSim", "arm_observation", "join_actions", "split_action", "configure_gl"]
