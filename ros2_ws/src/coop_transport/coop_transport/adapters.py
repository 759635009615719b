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

from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class StateHistory:
    """Which earlier proprioceptive states a policy sees beside the current one, and how they are encoded.

    The proprioception is pose, gripper and joint positions: one state has no velocity in it, and the scripted
    demonstrator aims each hand from where it will coast to. The privileged-state BC reference went from 36% to 61%
    success when it also saw the states 5, 10 and 15 control steps back (README, twelfth session); consecutive
    states did not help, because one step moves a hand by about the input noise.

    The policy state is [s_t, e_1, ..., e_{K-1}] with e_k = s_t - s_{t-kS} (``delta``: displacements since then, a
    velocity at K - 1 time scales, z-scored with their own statistics) or e_k = s_{t-kS} (``absolute``). Before the
    episode's first step, the first state stands in for the missing ones (zero displacement), in training and at
    inference alike. ``frames = 1`` is the plain current state.
    """

    frames: int = 1
    """K: the current state and K - 1 earlier ones."""
    stride: int = 5
    """S: control steps between the states (5 steps = 0.25 s at 20 Hz)."""
    encoding: str = "delta"
    """delta | absolute: how the earlier states enter the state vector."""

    def __post_init__(self):
        if self.frames < 1 or self.stride < 1:
            raise ValueError(f"state history needs frames >= 1 and stride >= 1, got {self.frames}, {self.stride}")
        if self.encoding not in ("delta", "absolute"):
            raise ValueError(f"state history encoding must be 'delta' or 'absolute', got {self.encoding!r}")

    @property
    def span(self) -> int:
        """Control steps back to the oldest state seen (0 without a history)."""
        return (self.frames - 1) * self.stride

    def state_dim(self, proprio_dim: int) -> int:
        return self.frames * proprio_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "StateHistory":
        return cls(**d) if d else cls()

    def encode(self, states: np.ndarray) -> np.ndarray:
        """(..., K, D) raw states, newest first -> (..., K * D) policy state."""
        states = np.asarray(states, dtype=np.float32)
        if states.shape[-2] != self.frames:
            raise ValueError(f"state history has {states.shape[-2]} states, the policy needs {self.frames}")
        if self.encoding == "delta" and self.frames > 1:
            states = np.concatenate([states[..., :1, :], states[..., :1, :] - states[..., 1:, :]], axis=-2)
        return states.reshape(*states.shape[:-2], -1)

    def from_recent(self, recent: np.ndarray) -> np.ndarray:
        """(K * D,) policy state from the states of the latest control steps, newest first ((L, D), L >= 1: an
        observation's ``proprio_history``); steps before the first one repeat the oldest given."""
        recent = np.asarray(recent, dtype=np.float32)
        if recent.ndim != 2 or len(recent) == 0:
            raise ValueError(f"proprio_history must be a non-empty (L, D) array, got shape {recent.shape}")
        index = np.minimum(np.arange(self.frames) * self.stride, len(recent) - 1)
        return self.encode(recent[index])

    def step_index(self, steps: int) -> np.ndarray:
        """(T, K) for every step t of a T-step episode, the steps its frames come from: t, t - S, t - 2S, ...,
        the first step standing in before the episode's start."""
        return np.maximum(np.arange(steps)[:, None] - np.arange(self.frames)[None] * self.stride, 0)

    def from_trajectory(self, proprio: np.ndarray) -> np.ndarray:
        """(T, K * D) policy states of every step of one trajectory's (T, D) proprioception."""
        proprio = np.asarray(proprio, dtype=np.float32)
        return self.encode(proprio[self.step_index(len(proprio))])


def policy_state(obs: dict, history: StateHistory, key: str = "proprio") -> np.ndarray:
    """The raw (un-normalized) state vector a policy with ``history`` sees in an observation: ``obs[key]`` alone, or
    with the earlier states of ``obs[key + "_history"]`` (newest first, the current state at index 0)."""
    if history.frames == 1:
        return np.asarray(obs[key], dtype=np.float32)
    recent = obs.get(f"{key}_history")
    if recent is None:
        raise ValueError(f"this policy sees the arm's state {history.span} control steps back, but the observation has "
                         f"no {key}_history: record the state every control step (sim.TransportSim does; a ROS node "
                         f"keeps its own) and pass the latest ones, newest first")
    recent = np.asarray(recent, dtype=np.float32)
    if recent.ndim != 2 or len(recent) == 0 or not np.allclose(recent[0], obs[key], atol=1e-5):
        raise ValueError(f"{key}_history must be (L, D) with the current {key} first")
    return history.from_recent(recent)


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
