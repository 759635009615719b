"""Random inputs for benchmarks and tests, where speed and shapes do not depend on what the pixels show."""

from __future__ import annotations

import numpy as np


def random_arm_observation(image_size: int, rng: np.random.Generator, history: int = 8) -> dict:
    """One arm's random observation as ``adapters.arm_observation`` gives it: wrist and agentview images, and a
    still arm's proprioception repeated over ``history`` earlier states."""
    from coop_transport.constants import PROPRIO_DIM

    proprio = rng.normal(size=PROPRIO_DIM).astype(np.float32)
    return {"wrist_image": rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8),
            "agentview_image": rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8),
            "proprio": proprio, "proprio_history": np.repeat(proprio[None], history, axis=0)}


def random_arm_batch(policy, rows: int, rng: np.random.Generator, history: int = 8) -> dict:
    """A per-arm π0 policy's model batch of ``rows`` random observations (``random_arm_observation`` at its image
    size), prompted as robot0 and robot1 in turn."""
    from coop_transport.adapters import arm_images, policy_state
    from coop_transport.constants import ARMS

    observations = [random_arm_observation(policy.image_size, rng, history) for _ in range(rows)]
    return policy.make_batch([arm_images(o) for o in observations],
                             [policy_state(o, policy.state_history) for o in observations],
                             [policy.prompts[ARMS[i % len(ARMS)]] for i in range(rows)])
