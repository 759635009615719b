"""Robot adapters: TwoArmTransport observations <-> π0 model batches (openpi's split of model vs robot code).

The model sees tensors only. What goes where is decided here, once, for training and for inference alike:

    per-arm variant (7-D actions)                  joint variant (14-D actions)
    slot "wrist"     <- the arm's wrist camera      slot "robot0_wrist" <- robot0_eye_in_hand_image
    slot "agentview" <- agentview_image             slot "robot1_wrist" <- robot1_eye_in_hand_image
    state (18)       <- arm_proprio                 slot "agentview"    <- agentview_image
    prompt           <- ARM_PROMPTS[arm]            state (36)          <- [robot0 | robot1] arm_proprio
                                                    prompt              <- JOINT_PROMPT

Input transforms, in order: pick cameras -> (images stay uint8; the model maps them to [-1, 1]) -> z-score the
state with the demonstration statistics -> tokenize the prompt. Output transform: un-z-score the actions.
The per-arm policy is one network for both arms; the prompt tells it which arm it drives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coop_transport.constants import AGENTVIEW_CAMERA, ARM_ACTION_DIM, ARMS, JOINT_ACTION_DIM, PROPRIO_DIM, \
    WRIST_CAMERA, image_key
from coop_transport.sim.frames import arm_proprio

# Short on purpose: the small default tokenizes bytes into 32 tokens (BOS and a newline included), and the prompt
# only has to tell the shared per-arm network which arm it drives.
ARM_PROMPTS = {
    "robot0": "left: open bin, hand hammer",
    "robot1": "right: bin trash, place hammer",
}
JOINT_PROMPT = "transport hammer, bin trash"

VARIANTS = ("per-arm", "joint")


@dataclass(frozen=True)
class VariantSpec:
    """How one policy variant reads observations."""

    name: str
    model_setting: str  # policy.config.DATA_SETTINGS key
    action_dim: int
    state_dim: int
    slots: tuple[str, ...]  # model camera slots, in the model config's order


VARIANT_SPECS = {
    "per-arm": VariantSpec("per-arm", "per_arm", ARM_ACTION_DIM, PROPRIO_DIM, ("wrist", "agentview")),
    "joint": VariantSpec("joint", "joint", JOINT_ACTION_DIM, 2 * PROPRIO_DIM,
                         ("robot0_wrist", "robot1_wrist", "agentview")),
}


def variant_spec(name: str) -> VariantSpec:
    if name not in VARIANT_SPECS:
        raise ValueError(f"unknown policy variant {name!r}; expected one of {VARIANTS}")
    return VARIANT_SPECS[name]


def arm_images(arm_obs: dict) -> dict[str, np.ndarray]:
    """Per-arm camera slots from an ``arm_observation`` dict."""
    missing = [k for k in ("wrist_image", "agentview_image") if k not in arm_obs]
    if missing:
        raise ValueError(f"per-arm observation lacks {missing}: render the wrist and agentview cameras")
    return {"wrist": arm_obs["wrist_image"], "agentview": arm_obs["agentview_image"]}


def joint_images(obs: dict) -> dict[str, np.ndarray]:
    """Joint camera slots from a full simulation observation."""
    keys = {"robot0_wrist": image_key(WRIST_CAMERA["robot0"]), "robot1_wrist": image_key(WRIST_CAMERA["robot1"]),
            "agentview": image_key(AGENTVIEW_CAMERA)}
    missing = [k for k in keys.values() if k not in obs]
    if missing:
        raise ValueError(f"joint observation lacks {missing}: render both wrist cameras and agentview")
    return {slot: obs[key] for slot, key in keys.items()}


def joint_proprio(obs: dict) -> np.ndarray:
    """(36,) [robot0 | robot1] per-arm proprioception from a full simulation observation."""
    return np.concatenate([
        arm_proprio(arm, obs[f"{arm}_eef_pos"], obs[f"{arm}_eef_quat"], obs[f"{arm}_gripper_qpos"],
                    obs[f"{arm}_joint_pos"]) for arm in ARMS
    ])


def check_image(name: str, image: np.ndarray, size: int | None) -> np.ndarray:
    """Refuse images a policy must not act on: wrong rank, channels, dtype or (when given) size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {name!r} must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {name!r} must be uint8, got {image.dtype}")
    if size is not None and image.shape[:2] != (size, size):
        raise ValueError(f"image {name!r} is {image.shape[1]}x{image.shape[0]}, the policy expects {size}x{size}")
    return image


def check_state(state: np.ndarray, dim: int) -> np.ndarray:
    state = np.asarray(state, dtype=np.float32)
    if state.shape != (dim,):
        raise ValueError(f"state must have shape ({dim},), got {state.shape}")
    if not np.all(np.isfinite(state)):
        raise ValueError("state contains NaN or inf")
    return state
