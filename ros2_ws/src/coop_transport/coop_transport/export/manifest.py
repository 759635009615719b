"""The export directory's manifest: what was exported from which checkpoint, with hashes of every file.

    DIR/manifest.json                   this file's contents (see `export.exporter.export_policy` for the fields)
    DIR/pi0_chunk_b1_n4.onnx            one ONNX graph per (batch size, sample count)
    DIR/pi0_chunk_b1_n4.reference.npz   fixed inputs + PyTorch's outputs, for parity checks without PyTorch
    DIR/pi0_chunk_b1_n4.fp16.engine     TensorRT engines, where they were built (GPU- and version-specific)

Loading refuses (ExportError, naming the file and what is wrong): a manifest of another format or version, a
manifest whose source checkpoint is not the checkpoint asked for (weights sha256 mismatch), a listed file that is
missing, truncated or modified (sha256 mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from coop_transport.export.spec import ExportError, ExportFileMissing

MANIFEST_FILE = "manifest.json"
FORMAT = "coop_transport.export"
FORMAT_VERSION = 1
CHECKPOINT_CONFIG = "config.json"  # policy.checkpoint.CONFIG_FILE, named here so that loading needs no PyTorch


def sha256_file(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(directory: pathlib.Path, name: str) -> dict[str, Any]:
    path = directory / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: str | pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
    """Write manifest.json atomically (temporary file, fsync, rename)."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST_FILE
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | pathlib.Path) -> dict[str, Any]:
    """The manifest of an export directory; ExportError if it is missing, unreadable or of another format."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ExportFileMissing(f"{directory} is not an export directory: it has no {MANIFEST_FILE} "
                                "(create one with: python export/export.py --out DIR)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    for key in ("source_checkpoint", "policy", "norm_stats", "graphs", "files"):
        if key not in manifest:
            raise ExportError(f"{path} lacks {key!r}")
    return manifest


def verify_file(directory: str | pathlib.Path, manifest: dict[str, Any], name: str) -> pathlib.Path:
    """The path of a listed file after checking that it exists with the recorded size and sha256."""
    directory = pathlib.Path(directory)
    record = manifest["files"].get(name)
    if record is None:
        raise ExportError(f"{name} is not listed in {directory / MANIFEST_FILE}")
    path = directory / name
    if not path.is_file():
        raise ExportFileMissing(f"{path} is missing (listed in {MANIFEST_FILE}); re-export the policy")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ExportError(f"{path} has {size} bytes, the manifest records {record['bytes']}: the file is truncated "
                          "or modified; re-export the policy")
    actual = sha256_file(path)
    if actual != record["sha256"]:
        raise ExportError(f"{path} sha256 {actual[:16]}... does not match the manifest's {record['sha256'][:16]}...: "
                          "the file is corrupt or from another export; re-export the policy")
    return path


def graph_files(manifest: dict[str, Any], graph: str) -> list[str]:
    """Files one graph needs: the ONNX file, its external data if any."""
    entry = manifest["graphs"][graph]
    return [entry["file"]] + ([entry["external_data"]] if entry.get("external_data") else [])


def checkpoint_identity(checkpoint_dir: str | pathlib.Path) -> dict[str, Any]:
    """What identifies a checkpoint: the weights' sha256 its config.json records (checked against the file by
    load_checkpoint), the sha256 of config.json itself, its step and path."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    config_path = checkpoint_dir / CHECKPOINT_CONFIG
    if not config_path.is_file():
        raise ExportFileMissing(f"checkpoint {checkpoint_dir} has no {CHECKPOINT_CONFIG}")
    meta = json.loads(config_path.read_text())
    return {
        "path": str(checkpoint_dir.resolve()),
        "weights_sha256": meta.get("weights_sha256"),
        "config_sha256": sha256_file(config_path),
        "step": meta.get("step"),
    }


def check_source(manifest: dict[str, Any], checkpoint_dir: str | pathlib.Path, export_dir: str | pathlib.Path = "") -> None:
    """Refuse an export whose source checkpoint is not `checkpoint_dir` (weights sha256 mismatch)."""
    expected = checkpoint_identity(checkpoint_dir)["weights_sha256"]
    recorded = manifest["source_checkpoint"].get("weights_sha256")
    if recorded != expected:
        raise ExportError(
            f"export {export_dir or '(manifest)'} was made from another checkpoint: its manifest records weights "
            f"sha256 {str(recorded)[:16]}... ({manifest['source_checkpoint'].get('path')}), checkpoint "
            f"{checkpoint_dir} has {str(expected)[:16]}...; re-export with: python export/export.py "
            f"--checkpoint {checkpoint_dir} --out DIR"
        )
