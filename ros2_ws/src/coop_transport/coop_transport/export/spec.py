"""Named, typed inputs and outputs of the exported graphs, derived from the model config (openpi's inputs_spec).

The π0 chunk sampler graph (one file per batch size B and sample count N; shapes are static):

    image_<slot>   (B, S, S, 3) uint8     one per camera slot, in config.cameras order (per-arm: wrist, agentview)
    prompt_tokens  (B, L) int64           token ids, padded to config.max_token_len
    prompt_mask    (B, L) bool            True for real tokens
    state          (B, state_dim) float32 proprioception, z-scored with the manifest's norm_stats["state"]
    noise          (B*N, H, P) float32    standard normal flow noise, sample n of observation b at row b*N + n
    ->
    actions        (B*N, H, action_dim) float32, z-scored (un-z-score with norm_stats["actions"])

Everything a caller feeds is checked against these specs before it reaches a backend (wrong name, shape or dtype
raises ``ExportError``), so no backend ever runs on silently broadcast or cast inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

IMAGE_PREFIX = "image_"
PROMPT_TOKENS = "prompt_tokens"
PROMPT_MASK = "prompt_mask"
STATE = "state"
NOISE = "noise"
ACTIONS = "actions"
DEFAULT_OPSET = 17  # ONNX opset of the exported graphs (TensorRT 8.6-10 and ONNX Runtime >= 1.14 read it)


class ExportError(ValueError):
    """An exported artifact or an input that cannot be trusted: wrong checkpoint, corrupt file, wrong shape/dtype."""


class ExportFileMissing(ExportError, FileNotFoundError):
    """A file the manifest lists (or the manifest itself) is missing."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    shape: tuple[int, ...]
    """static shape"""
    dtype: str
    """numpy dtype name: uint8, int64, bool, float32"""
    doc: str = ""
    """meaning, units, layout"""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "doc": self.doc}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]), str(data.get("doc", "")))

    def check(self, value: Any, where: str = "") -> np.ndarray:
        """The value as a numpy array, or ExportError naming the input and the expected shape/dtype."""
        array = np.asarray(value)
        where = f" of {where}" if where else ""
        if array.dtype != np.dtype(self.dtype):
            raise ExportError(f"input {self.name!r}{where} has dtype {array.dtype}, the graph expects {self.dtype} "
                              f"{self.shape}")
        if tuple(array.shape) != self.shape:
            raise ExportError(f"input {self.name!r}{where} has shape {tuple(array.shape)}, the graph expects "
                              f"{self.shape} {self.dtype}")
        return array


def image_input(slot: str) -> str:
    return f"{IMAGE_PREFIX}{slot}"


def chunk_sampler_inputs(config, batch_size: int, num_samples: int) -> list[TensorSpec]:
    """The π0 chunk sampler's inputs for a Pi0Config, in graph order."""
    size = config.vision.image_size
    specs = [TensorSpec(image_input(slot), (batch_size, size, size, 3), "uint8",
                        f"camera slot {slot!r}, RGB, row 0 at the top") for slot in config.cameras]
    specs += [
        TensorSpec(PROMPT_TOKENS, (batch_size, config.max_token_len), "int64", "prompt token ids, 0-padded"),
        TensorSpec(PROMPT_MASK, (batch_size, config.max_token_len), "bool", "True for real prompt tokens"),
        TensorSpec(STATE, (batch_size, config.state_dim), "float32", "proprioception, z-scored (norm_stats['state'])"),
        TensorSpec(NOISE, (batch_size * num_samples, config.action_horizon, config.action_pad_dim), "float32",
                   "standard normal flow noise at t=1; row b*N + n is sample n of observation b"),
    ]
    return specs


def chunk_sampler_outputs(config, batch_size: int, num_samples: int) -> list[TensorSpec]:
    return [TensorSpec(ACTIONS, (batch_size * num_samples, config.action_horizon, config.action_dim), "float32",
                       "action chunks, z-scored (norm_stats['actions']); row b*N + n is sample n of observation b")]


def check_inputs(specs: list[TensorSpec], inputs: Mapping[str, Any], where: str = "") -> dict[str, np.ndarray]:
    """Inputs in spec order, each checked; missing or unexpected names raise ExportError."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in inputs]
    unexpected = sorted(set(inputs) - set(names))
    if missing or unexpected:
        raise ExportError(f"inputs{' of ' + where if where else ''}: missing {missing}, unexpected {unexpected}; "
                          f"the graph takes {names}")
    return {s.name: s.check(inputs[s.name], where) for s in specs}


def fake_inputs(specs: list[TensorSpec], seed: int = 0, vocab_size: int = 256) -> dict[str, np.ndarray]:
    """Random inputs matching `specs`: uniform uint8 images, a prompt of random length with valid token ids,
    standard normal floats (state, noise). For export tracing, parity checks and calibration."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    lengths = None
    for spec in specs:
        if spec.dtype == "uint8":
            out[spec.name] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
        elif spec.name == PROMPT_TOKENS or spec.dtype == "int64":
            batch, length = spec.shape
            lengths = rng.integers(1, length + 1, batch) if lengths is None else lengths
            tokens = rng.integers(3, max(4, vocab_size), spec.shape).astype(np.int64)
            tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
            out[spec.name] = tokens
        elif spec.dtype == "bool":
            batch, length = spec.shape
            lengths = rng.integers(1, length + 1, batch) if lengths is None else lengths
            out[spec.name] = np.arange(length)[None, :] < lengths[:, None]
        else:
            out[spec.name] = rng.standard_normal(spec.shape).astype(np.dtype(spec.dtype))
    return out
