"""A π0 policy over any backend: Pi0Policy's inference surface (sample_arm / sample_arms / sample_joint,
action_mean / action_std, image_size, variant) with the adapters and normalization of the export manifest.

    policy = load_backend_policy("exports/small", "onnxruntime")    # an export directory: no PyTorch needed
    policy = load_backend_policy("runs/x/step_30000", "onnxruntime", export_dir="exports/small")  # checked match
    policy = load_backend_policy("runs/x/step_30000", "torch-cudagraph")
    chunks = policy.sample_arm(arm_obs, "robot0", num_samples=4)     # (4, H, 7), environment units

The ROS policy node and the evaluator get these through ``deploy.load_arm_policy(..., backend=...)`` and the ``pi0``
controller's ``backend`` / ``export`` arguments. Transforms, in order (as Pi0Policy): pick camera slots -> z-score the
state -> the prompt's tokens (pre-tokenized in the manifest) -> backend -> un-z-score the actions.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import numpy as np

from coop_transport.adapters import (StateHistory, arm_images, check_image, check_state, joint_images, joint_proprio,
                                     policy_state, variant_spec)
from coop_transport.export.backends import (CUDA_GRAPH_BACKENDS, ChunkBackend, canonical_backend, make_backend,
                                            needs_export)
from coop_transport.export.manifest import MANIFEST_FILE, check_source, read_manifest
from coop_transport.export.spec import NOISE, PROMPT_MASK, PROMPT_TOKENS, STATE, ExportError, ExportFileMissing, \
    image_input
from coop_transport.recipe import demonstrated_range

DEFAULT_EXPORT_SUBDIR = "export"  # load_backend_policy looks for <checkpoint>/export when no export_dir is given


class EpisodeNoise:
    """Flow noise from a seeded stream restarted at every episode: a draw depends only on (seed, episode seed,
    draw index), so two backends evaluated on the same reset seeds see the same noise (paired closed-loop parity)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.reset(0)

    def reset(self, episode_seed: int) -> None:
        self.rng = np.random.default_rng([self.seed, int(episode_seed)])

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)


@dataclasses.dataclass
class PolicyMeta:
    """What the runtime needs besides the network: shapes, normalization, prompts."""

    variant: str
    slots: tuple[str, ...]
    image_size: int
    horizon: int
    action_dim: int
    action_pad_dim: int
    state_dim: int
    max_token_len: int
    tokenizer: str
    state_mean: np.ndarray
    state_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray
    action_min: np.ndarray | None
    action_max: np.ndarray | None
    """the demonstrations' action range (recipe.clip_beyond_demonstrated); None in manifests without it"""
    prompts: dict[str, str]
    """prompt key (arm name, or 'joint') -> text"""
    prompt_tokens: dict[str, tuple[np.ndarray, np.ndarray]]
    """prompt text -> (tokens int64, mask bool), each (max_token_len,)"""
    state_history: StateHistory = StateHistory()
    """earlier proprioceptive states in the policy state (adapters.StateHistory); manifests without one: none"""

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "PolicyMeta":
        p, stats = manifest["policy"], manifest["norm_stats"]
        f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
        action_min, action_max = demonstrated_range(stats)
        return cls(
            variant=p["variant"], slots=tuple(p["slots"]), image_size=int(p["image_size"]), horizon=int(p["horizon"]),
            action_dim=int(p["action_dim"]), action_pad_dim=int(p["action_pad_dim"]), state_dim=int(p["state_dim"]),
            max_token_len=int(p["max_token_len"]), tokenizer=p["tokenizer"],
            state_mean=f32(stats["state"]["mean"]), state_std=f32(stats["state"]["std"]),
            action_mean=f32(stats["actions"]["mean"]), action_std=f32(stats["actions"]["std"]),
            action_min=action_min, action_max=action_max,
            prompts={k: v["text"] for k, v in manifest["prompts"].items()},
            prompt_tokens={v["text"]: (np.asarray(v["tokens"], dtype=np.int64), np.asarray(v["mask"], dtype=bool))
                           for v in manifest["prompts"].values()},
            state_history=StateHistory.from_dict(p.get("state_history")),
        )

    @classmethod
    def from_pi0_policy(cls, policy) -> "PolicyMeta":
        config = policy.config
        tokens = {}
        for text in policy.prompts.values():
            t, m = policy.tokenizer.encode(text)
            tokens[text] = (np.asarray(t, dtype=np.int64), np.asarray(m, dtype=bool))
        return cls(
            variant=policy.variant, slots=tuple(config.cameras), image_size=config.vision.image_size,
            horizon=config.action_horizon, action_dim=config.action_dim, action_pad_dim=config.action_pad_dim,
            state_dim=config.state_dim, max_token_len=config.max_token_len, tokenizer=config.tokenizer,
            state_mean=policy.state_mean, state_std=policy.state_std, action_mean=policy.action_mean,
            action_std=policy.action_std, action_min=policy.action_min, action_max=policy.action_max,
            prompts=dict(policy.prompts), prompt_tokens=tokens, state_history=policy.state_history,
        )


class BackendPolicy:
    """numpy observations in, unnormalized action chunks out, through a ChunkBackend."""

    def __init__(self, backend: ChunkBackend, meta: PolicyMeta,
                 noise_source: Callable[[tuple[int, ...]], np.ndarray] | None = None):
        self.backend = backend
        self.meta = meta
        self.variant = meta.variant
        self.spec = variant_spec(meta.variant)
        if tuple(self.spec.slots) != tuple(meta.slots):
            raise ExportError(f"variant {meta.variant!r} reads camera slots {self.spec.slots}, the graph takes {meta.slots}")
        self.prompts = dict(meta.prompts)
        self.state_mean, self.state_std = meta.state_mean, meta.state_std
        self.action_mean, self.action_std = meta.action_mean, meta.action_std
        self.action_min, self.action_max = meta.action_min, meta.action_max
        self.state_history = meta.state_history
        self.noise_source = noise_source
        """callable(shape) -> float32 standard normal noise; None draws from an unseeded generator"""
        self._rng = np.random.default_rng()

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def horizon(self) -> int:
        return self.meta.horizon

    # ---------------------------------------------------------------------------------------------- inputs
    def _prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if text not in self.meta.prompt_tokens:
            if self.meta.tokenizer != "bytes":
                raise ExportError(f"prompt {text!r} was not tokenized at export; known prompts: {sorted(self.prompts)}")
            from coop_transport.policy.tokenizer import ByteTokenizer

            tokens, mask = ByteTokenizer(self.meta.max_token_len).encode(text)
            self.meta.prompt_tokens[text] = (tokens.astype(np.int64), mask.astype(bool))
        return self.meta.prompt_tokens[text]

    def make_inputs(self, images: list[dict[str, np.ndarray]], states: list[np.ndarray], prompts: list[str]) -> dict:
        """Graph inputs (without noise) for B observations: uint8 images per slot, raw states, prompt texts."""
        size = self.meta.image_size
        inputs = {image_input(slot): np.stack([check_image(slot, im[slot], size) for im in images])
                  for slot in self.meta.slots}
        state = np.stack([check_state(s, self.meta.state_dim) for s in states])
        inputs[STATE] = ((state - self.state_mean) / self.state_std).astype(np.float32)
        tokens, masks = zip(*(self._prompt(p) for p in prompts))
        inputs[PROMPT_TOKENS] = np.stack(tokens)
        inputs[PROMPT_MASK] = np.stack(masks)
        return inputs

    def draw_noise(self, rows: int) -> np.ndarray:
        shape = (rows, self.meta.horizon, self.meta.action_pad_dim)
        if self.noise_source is not None:
            return np.asarray(self.noise_source(shape), dtype=np.float32)
        return self._rng.standard_normal(shape).astype(np.float32)

    def sample_batch(self, inputs: dict, num_samples: int, noise: np.ndarray | None = None) -> np.ndarray:
        """(B, N, H, D) unnormalized actions. Batches the backend has no graph for run one observation at a time."""
        b = inputs[STATE].shape[0]
        noise = self.draw_noise(b * num_samples) if noise is None else np.asarray(noise, dtype=np.float32)
        inputs = {**inputs, NOISE: noise}
        if b > 1 and not self.backend.supports(b, num_samples) and self.backend.supports(1, num_samples):
            rows = [self.backend.sample({k: v[i * num_samples:(i + 1) * num_samples] if k == NOISE else v[i:i + 1]
                                         for k, v in inputs.items()}, num_samples) for i in range(b)]
            actions = np.concatenate(rows)
        else:
            actions = self.backend.sample(inputs, num_samples)
        actions = actions.reshape(b, num_samples, self.meta.horizon, -1) * self.action_std + self.action_mean
        if not np.all(np.isfinite(actions)):
            raise ValueError("policy produced NaN or inf actions")
        return actions

    # ------------------------------------------------------------------------------------------ per-variant
    def arm_state(self, arm_obs: dict) -> np.ndarray:
        """Raw policy state of an ``arm_observation`` (as ``Pi0Policy.arm_state``)."""
        return policy_state(arm_obs, self.state_history)

    def joint_state(self, obs: dict) -> np.ndarray:
        return policy_state({**obs, "proprio": joint_proprio(obs)}, self.state_history)

    def sample_arm(self, arm_obs: dict, arm: str, num_samples: int = 1, noise=None,
                   return_prefix: bool = False) -> np.ndarray:
        """(N, H, 7) chunks for one arm from its ``arm_observation``."""
        if return_prefix:
            raise ExportError(f"backend {self.backend.name} returns actions only (no prefix cache for the RL encoder)")
        if self.variant != "per-arm":
            raise ValueError(f"sample_arm needs a per-arm policy, this one is {self.variant!r}")
        inputs = self.make_inputs([arm_images(arm_obs)], [self.arm_state(arm_obs)], [self.prompts[arm]])
        return self.sample_batch(inputs, num_samples, _numpy(noise))[0]

    def sample_arms(self, arm_obs: dict[str, dict], num_samples: int = 1) -> dict[str, np.ndarray]:
        arms = list(arm_obs)
        inputs = self.make_inputs([arm_images(arm_obs[a]) for a in arms], [self.arm_state(arm_obs[a]) for a in arms],
                                  [self.prompts[a] for a in arms])
        actions = self.sample_batch(inputs, num_samples)
        return {a: actions[i] for i, a in enumerate(arms)}

    def sample_joint(self, obs: dict, num_samples: int = 1, noise=None) -> np.ndarray:
        if self.variant != "joint":
            raise ValueError(f"sample_joint needs a joint policy, this one is {self.variant!r}")
        inputs = self.make_inputs([joint_images(obs)], [self.joint_state(obs)], [self.prompts["joint"]])
        return self.sample_batch(inputs, num_samples, _numpy(noise))[0]


def _numpy(noise):
    if noise is None or isinstance(noise, np.ndarray):
        return noise
    return noise.detach().cpu().numpy()  # a torch tensor, as Pi0Policy takes


def is_export_dir(path: str | pathlib.Path | None) -> bool:
    return path is not None and str(path) != "" and (pathlib.Path(path) / MANIFEST_FILE).is_file()


def checkpoint_and_export(path: str | pathlib.Path | None, export_dir: str | pathlib.Path | None = None
                          ) -> tuple[pathlib.Path | None, pathlib.Path]:
    """(checkpoint, export directory) that ``path`` names: an export directory itself (checkpoint None: its manifest
    names it), or a checkpoint (None: the shipped default) whose export is ``export_dir`` or ``<checkpoint>/export``
    (which need not exist)."""
    if is_export_dir(path):
        return None, pathlib.Path(path)
    if path:
        checkpoint = pathlib.Path(path)
    else:
        from coop_transport.pi0_policy import default_policy_dir  # (imports torch)

        checkpoint = default_policy_dir()
    return checkpoint, pathlib.Path(export_dir) if export_dir else checkpoint / DEFAULT_EXPORT_SUBDIR


def load_backend_policy(path: str | pathlib.Path | None, backend: str, device: str = "auto",
                        threads: int | None = None, export_dir: str | pathlib.Path | None = None,
                        **options) -> BackendPolicy:
    """A BackendPolicy from a checkpoint or an export directory.

    path: an export directory (has manifest.json), or a checkpoint directory (None: the shipped default).
    export_dir: the export of that checkpoint for exported backends (default ``<checkpoint>/export``); refused when
    its manifest was made from another checkpoint. Torch backends given an export directory load the checkpoint
    the manifest names (checked by hash).
    """
    name = canonical_backend(backend)
    checkpoint, export = checkpoint_and_export(path, export_dir)
    if needs_export(name):
        if not is_export_dir(export):
            raise ExportFileMissing(f"backend {name!r} runs an exported policy, and {export} has no {MANIFEST_FILE}; "
                                    f"export it with: python export/export.py --checkpoint {checkpoint} --out {export}")
        manifest = read_manifest(export)
        if checkpoint is not None:
            check_source(manifest, checkpoint, export)
        return BackendPolicy(make_backend(name, export_dir=export, manifest=manifest, threads=threads, **options),
                             PolicyMeta.from_manifest(manifest))
    from coop_transport.pi0_policy import Pi0Policy

    if checkpoint is None:
        manifest = read_manifest(export)
        checkpoint = pathlib.Path(manifest["source_checkpoint"]["path"])
        check_source(manifest, checkpoint, export)
    if name in CUDA_GRAPH_BACKENDS and device == "auto":
        device = "cuda"
    pi0 = Pi0Policy.load(checkpoint, device=device)
    return BackendPolicy(make_backend(name, model=pi0.model, threads=threads, **options), PolicyMeta.from_pi0_policy(pi0))
