"""A trained π0 policy at inference time: checkpoint -> observations in, action chunks out (environment units).

``Pi0Policy.load(dir)`` rebuilds the model from its checkpoint directory alone (weights, config, normalization
statistics, variant and prompts are all in it) and offers the chunk samplers that the recipe, the evaluator, the ROS
nodes and the residual-RL pipeline use:

    policy = Pi0Policy.load()                                 # the shipped default (per-arm, small)
    chunks = policy.sample_arm(arm_obs, "robot0", num_samples=4)   # (4, H, 7)
    chunks, prefix = policy.sample_arm(arm_obs, "robot0", 4, return_prefix=True)  # + prefix embeddings for RL
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from coop_transport.adapters import (ARM_PROMPTS, JOINT_PROMPT, StateHistory, arm_images, check_image, check_state,
                                     joint_images, joint_proprio, policy_state, variant_spec)
from coop_transport.recipe import demonstrated_range

DEFAULT_POLICY_NAME = "per_arm_small"


def default_policy_dir() -> Path:
    """The per-arm small policy shipped inside the package (``coop_transport/assets/policies/per_arm_small``)."""
    return Path(str(resources.files("coop_transport") / "assets" / "policies" / DEFAULT_POLICY_NAME))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Pi0Policy:
    """A π0 checkpoint with its robot adapter: numpy observations in, unnormalized action chunks out."""

    def __init__(self, model, config, norm_stats: dict, extra: dict, device: torch.device, step: int = 0,
                 weights_sha256: str | None = None):
        self.model = model.eval()
        self.config = config
        self.extra = extra
        self.step = step
        self.weights_sha256 = weights_sha256  # of the checkpoint's weights file (None: not loaded from one)
        self.device = device
        self.variant = extra.get("variant", "per-arm")
        self.spec = variant_spec(self.variant)
        if config.action_dim != self.spec.action_dim:
            raise ValueError(f"checkpoint variant {self.variant!r} needs {self.spec.action_dim}-D actions, "
                             f"its model has {config.action_dim}")
        # Earlier proprioceptive states the policy sees (adapters.StateHistory; none for checkpoints without one).
        self.state_history = StateHistory.from_dict(extra.get("state_history"))
        self.state_dim = self.state_history.state_dim(self.spec.state_dim)
        if config.state_dim != self.state_dim:
            raise ValueError(f"checkpoint state: {self.state_dim} values ({self.state_history.frames} x "
                             f"{self.spec.state_dim}) by its variant and history, {config.state_dim} by its model")
        self.prompts = dict(extra.get("prompts") or ({**ARM_PROMPTS} if self.variant == "per-arm"
                                                     else {"joint": JOINT_PROMPT}))
        self.state_mean = np.asarray(norm_stats["state"]["mean"], dtype=np.float32)
        self.state_std = np.asarray(norm_stats["state"]["std"], dtype=np.float32)
        self.action_mean = np.asarray(norm_stats["actions"]["mean"], dtype=np.float32)
        self.action_std = np.asarray(norm_stats["actions"]["std"], dtype=np.float32)
        self.action_min, self.action_max = demonstrated_range(norm_stats)
        from coop_transport.policy.tokenizer import make_tokenizer

        self.tokenizer = make_tokenizer(config, extra.get("weights_dir"))
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Optional flow-noise source, callable(shape) -> numpy standard normal (e.g. export.runtime.EpisodeNoise):
        # set, every backend can be fed the same noise (parity); None keeps torch's own RNG.
        self.noise_source = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto") -> "Pi0Policy":
        from coop_transport.policy.checkpoint import load_checkpoint

        path = Path(path) if path else default_policy_dir()
        dev = resolve_device(device)
        ckpt = load_checkpoint(path, device=dev)
        return cls(ckpt.model, ckpt.config, ckpt.norm_stats, ckpt.extra, dev, ckpt.step, ckpt.weights_sha256)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def horizon(self) -> int:
        return self.config.action_horizon

    # ---------------------------------------------------------------------------------------------- batches
    def _prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._prompt_cache:
            tokens, mask = self.tokenizer.encode(prompt)
            self._prompt_cache[prompt] = (torch.as_tensor(tokens, device=self.device),
                                          torch.as_tensor(mask, device=self.device))
        return self._prompt_cache[prompt]

    def make_batch(self, images: list[dict[str, np.ndarray]], states: list[np.ndarray], prompts: list[str]) -> dict:
        """Model batch from B observations: images per slot (uint8), raw policy states (``arm_state`` /
        ``joint_state``), prompts."""
        batch_images = {}
        for slot in self.spec.slots:
            arrays = [check_image(slot, im[slot], None) for im in images]
            batch_images[slot] = torch.as_tensor(np.stack(arrays), device=self.device)  # (B, H, W, 3) uint8
        state = np.stack([check_state(s, self.state_dim) for s in states])
        state = (state - self.state_mean) / self.state_std
        tokens, masks = zip(*(self._prompt(p) for p in prompts))
        return {
            "images": batch_images,
            "prompt_tokens": torch.stack(tokens),
            "prompt_mask": torch.stack(masks),
            "state": torch.as_tensor(state, dtype=torch.float32, device=self.device),
        }

    @torch.no_grad()
    def sample_batch(self, batch: dict, num_samples: int, noise: torch.Tensor | None = None,
                     return_prefix: bool = False, groups: int = 1):
        """(B, G * N, H, D) unnormalized actions (numpy) for a model batch; optionally the prefix cache too.

        With ``groups`` G > 1 the G * N samples of a row are integrated in G passes of N over one prefix cache. One
        pass puts all of a row's samples into one token sequence, whose attention grows with the square of their
        number, so the critics' K draws of N samples each take K passes (``bench/candidate_draws.py``: 8 draws of
        4 for 20 rows took 1.8-2.0x as long in one pass on the 2-core CPU). Sample n of group g of row b is row
        b * G * N + g * N + n of ``noise``, as in one pass of G * N, and group g is computed exactly as N samples
        alone on its noise."""
        b = batch["state"].shape[0]
        total = num_samples * groups
        pad_shape = (self.horizon, self.config.action_pad_dim)
        if noise is None and self.noise_source is not None:
            noise = torch.as_tensor(self.noise_source((b * total, *pad_shape)), dtype=torch.float32,
                                    device=self.device)
        if groups == 1:
            out = self.model.sample_actions(batch, noise=noise, num_samples=num_samples, return_prefix=return_prefix)
            actions, cache = out if return_prefix else (out, None)
        else:
            cache = self.model.prepare_prefix(batch, num_samples)
            grouped = None if noise is None else noise.view(b, groups, num_samples, *pad_shape)
            passes = [self.model.integrate_flow(cache, None if grouped is None else
                                                grouped[:, g].reshape(b * num_samples, *pad_shape))
                      for g in range(groups)]  # each (B * N, H, D), row-major
            actions = torch.stack([a.view(b, num_samples, self.horizon, -1) for a in passes], dim=1)
        actions = actions.float().view(b, total, self.horizon, -1).cpu().numpy()
        actions = actions * self.action_std + self.action_mean
        if not np.all(np.isfinite(actions)):
            raise ValueError("policy produced NaN or inf actions")
        return (actions, cache) if return_prefix else actions

    # ------------------------------------------------------------------------------------------ per-variant
    def arm_state(self, arm_obs: dict) -> np.ndarray:
        """The raw state vector this policy sees in an ``arm_observation`` (with its earlier states if it has a
        state history: then the observation must carry ``proprio_history``)."""
        return policy_state(arm_obs, self.state_history)

    def joint_state(self, obs: dict) -> np.ndarray:
        """The raw state vector of a joint policy in a full observation (``proprio_history``: (L, 36), newest
        first, for a policy with a state history)."""
        return policy_state({**obs, "proprio": joint_proprio(obs)}, self.state_history)

    def sample_arm(self, arm_obs: dict, arm: str, num_samples: int = 1, noise: torch.Tensor | None = None,
                   return_prefix: bool = False):
        """(N, H, 7) chunks for one arm from its ``arm_observation``."""
        if self.variant != "per-arm":
            raise ValueError(f"sample_arm needs a per-arm policy, this one is {self.variant!r}")
        batch = self.make_batch([arm_images(arm_obs)], [self.arm_state(arm_obs)], [self.prompts[arm]])
        out = self.sample_batch(batch, num_samples, noise, return_prefix)
        return (out[0][0], out[1]) if return_prefix else out[0]

    def sample_arms(self, arm_obs: dict[str, dict], num_samples: int = 1) -> dict[str, np.ndarray]:
        """Both arms in one batched forward pass: {arm: (N, H, 7)}."""
        arms = list(arm_obs)
        batch = self.make_batch([arm_images(arm_obs[a]) for a in arms], [self.arm_state(arm_obs[a]) for a in arms],
                                [self.prompts[a] for a in arms])
        actions = self.sample_batch(batch, num_samples)
        return {a: actions[i] for i, a in enumerate(arms)}

    def sample_joint(self, obs: dict, num_samples: int = 1, noise: torch.Tensor | None = None) -> np.ndarray:
        """(N, H, 14) chunks from a full simulation observation."""
        if self.variant != "joint":
            raise ValueError(f"sample_joint needs a joint policy, this one is {self.variant!r}")
        batch = self.make_batch([joint_images(obs)], [self.joint_state(obs)], [self.prompts["joint"]])
        return self.sample_batch(batch, num_samples, noise)[0]
