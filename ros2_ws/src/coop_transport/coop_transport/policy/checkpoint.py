"""Self-describing π0 checkpoints: `model.safetensors` + `config.json`, written atomically, verified on load.

config.json holds the resolved Pi0Config, the normalization statistics, the step, free-form extras, the format
version and the sha256 of the weights file, so `load_checkpoint(dir)` rebuilds the model from the directory alone.
No pickle anywhere: tensors in safetensors, everything else JSON.

    save_checkpoint("runs/x/step_30000", model, config, norm_stats, step=30000, extra={"success": 0.3})
    ckpt = load_checkpoint("runs/x/step_30000"); ckpt.model.sample_actions(batch)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coop_transport.policy.config import Pi0Config, config_from_dict, config_to_dict
from coop_transport.utils.atomic import replace_directory

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be trusted: corrupt, truncated, tampered with, or not matching its config."""


@dataclasses.dataclass
class Checkpoint:
    model: nn.Module
    """the rebuilt Pi0Model (LoRA adapters included if the config has them), in eval mode"""
    config: Pi0Config
    norm_stats: dict[str, Any]
    """as saved; lists of numbers come back as numpy arrays"""
    step: int
    extra: dict[str, Any]
    weights_sha256: str | None = None
    """the weights file's digest, as config.json records it (and loading checked)"""


def _to_json(value: Any) -> Any:
    """Tensors and numpy arrays to (nested) lists, numpy scalars to Python numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


def _arrays_from_json(value: Any) -> Any:
    """Lists of numbers (nested) back to numpy arrays, dicts recursed."""
    if isinstance(value, dict):
        return {k: _arrays_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return [_arrays_from_json(v) for v in value]
        return array if array.dtype.kind in "fiub" else [_arrays_from_json(v) for v in value]
    return value


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    directory: str | pathlib.Path,
    model: nn.Module,
    config: Pi0Config,
    norm_stats: dict[str, Any],
    step: int,
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write `directory`/model.safetensors and config.json atomically (a temporary sibling, then renamed).

    An existing checkpoint at `directory` is replaced only once the new one is complete.
    """
    if getattr(model, "config", config) != config:
        raise ValueError("config differs from model.config: the checkpoint would not rebuild this model")
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(config),
            "norm_stats": _to_json(norm_stats),
            "step": int(step),
            "extra": _to_json(extra or {}),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync(tmp / name)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | pathlib.Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from `directory` alone, refusing anything that does not verify (CheckpointError) and
    missing files (FileNotFoundError)."""
    from coop_transport.policy.model import build_model

    directory = pathlib.Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}"
            f", this code reads {FORMAT_VERSION}"
        )
    for key in ("config", "norm_stats", "step", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"{directory / CONFIG_FILE} lacks {key!r}")

    weights_path = directory / WEIGHTS_FILE
    actual_hash = _sha256(weights_path)
    if actual_hash != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path} sha256 {actual_hash[:16]}... does not match config.json's {meta['weights_sha256'][:16]}...: "
            "the weights file is truncated, corrupt or from another checkpoint"
        )
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from error
    try:
        config = config_from_dict(meta["config"])
    except ValueError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from error

    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
    model = build_model(config, dtype=dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"weights in {directory} do not match the model its config.json describes: missing {missing[:8]} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), shape mismatch {mismatched[:8]} "
            f"({len(mismatched)})"
        )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        config=config,
        norm_stats=_arrays_from_json(meta["norm_stats"]),
        step=int(meta["step"]),
        extra=meta.get("extra", {}),
        weights_sha256=meta["weights_sha256"],
    )
