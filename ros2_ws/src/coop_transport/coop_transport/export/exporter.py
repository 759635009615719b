"""Export a π0 checkpoint: ONNX graphs, reference outputs, manifest, parity figures, TensorRT engines.

    export_policy(ExportConfig(out=Path("exports/small")))                 # the shipped default policy
    export_policy(ExportConfig(out=Path("exports/x"), checkpoint=Path("runs/x/checkpoints/step_030000")))
    build_engines_for(ExportConfig(out=Path("exports/small"), mode="engines"))   # on the deployment GPU
    verify_export(ExportConfig(out=Path("exports/small"), mode="verify"))         # hashes + stored-reference parity

The export directory is written beside `out` and renamed into place once complete (an existing export is replaced
only then). The manifest records: the source checkpoint (path, weights sha256, config.json sha256, step), the
policy's shapes, normalization stats, prompts (with their tokens), recipe defaults, every graph's named inputs and
outputs (shape, dtype), every file's sha256 and size, opset and exporter versions, export times, the open-loop
parity figures, and the TensorRT build settings and results (or why they were skipped).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import shutil
import tempfile
import time
from typing import Any, Literal

import numpy as np

from coop_transport.export.manifest import (FORMAT, FORMAT_VERSION, checkpoint_identity, file_record, read_manifest,
                                            verify_file, write_manifest)
from coop_transport.export.spec import DEFAULT_OPSET, ExportFileMissing
from coop_transport.utils.atomic import replace_directory
from coop_transport.utils.jsonable import to_jsonable


@dataclasses.dataclass
class ExportConfig:
    """Export settings (the command line of export/export.py)."""

    out: pathlib.Path
    """export directory: created, or replaced once the new export is complete"""
    checkpoint: pathlib.Path | None = None
    """π0 checkpoint directory (model.safetensors + config.json); None: the shipped default policy"""
    mode: Literal["export", "engines", "verify"] = "export"
    """export: ONNX + manifest + parity (+ engines where TensorRT imports); engines: build TensorRT engines into an
    existing export (on the deployment GPU); verify: check an existing export's hashes and its parity against the
    PyTorch outputs stored at export time"""
    samples: tuple[int, ...] = (1, 4)
    """mean-of-N sample counts to export (one graph each; the recipe's default is 4)"""
    batch_sizes: tuple[int, ...] = (1,)
    """observations per call to export (one graph each; a per-arm node plans one observation at a time)"""
    opset: int = DEFAULT_OPSET
    """ONNX opset"""
    external_data: bool | None = None
    """weights in a separate <graph>.onnx.data file: None = only above 1.8 GB (π0-3B)"""
    residual: pathlib.Path | None = None
    """a residual-RL run (training/residual.py --out) whose RL token encoder, communication head and residual actor
    are exported too"""
    fused: bool = True
    """export the π0 chunk sampler with fused weights (export.fused: the same function in about 40% fewer ONNX
    Runtime nodes, faster on a CPU); False (--no-fused): the plain trace of Pi0Model.sample_actions. Parity is against
    the original model either way"""
    parity_trials: int = 3
    """fresh random input sets per graph in the parity check"""
    parity_backends: tuple[str, ...] = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
    """backends compared with PyTorch eager (those not available here are reported as skipped)"""
    threads: int = 1
    """CPU threads for PyTorch and ONNX Runtime during the parity check"""
    tensorrt: tuple[str, ...] = ("fp16",)
    """TensorRT engine precisions to build where TensorRT imports (fp32, fp16, bf16, int8, fp8); () for none"""
    tensorrt_workspace_gib: float = 8.0
    """TensorRT builder workspace"""
    tensorrt_calibration: str | None = None
    """int8: .npz of calibration inputs (one array per graph input, stacked on a leading axis)"""
    closed_loop_episodes: int = 0
    """> 0 (modes export, verify): evaluate PyTorch and ONNX Runtime closed-loop on the same reset seeds 1..K with
    the same flow noise (slow: simulation with cameras); results in the manifest / report and DIR/closed_loop/"""
    closed_loop_workers: int = 2
    """worker processes for the closed-loop evaluation"""
    noise_seed: int = 0
    """closed loop: flow-noise seed shared by the backends (the same noise per episode and chunk)"""

    def __post_init__(self):
        if not self.samples or min(self.samples) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"samples and batch_sizes must be non-empty and >= 1, got {self.samples}, {self.batch_sizes}")


def _versions() -> dict[str, str]:
    import onnx
    import torch

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _prompts(config, extra: dict, variant: str) -> dict[str, dict[str, Any]]:
    from coop_transport.adapters import ARM_PROMPTS, JOINT_PROMPT
    from coop_transport.policy.tokenizer import make_tokenizer

    texts = dict(extra.get("prompts") or (ARM_PROMPTS if variant == "per-arm" else {"joint": JOINT_PROMPT}))
    tokenizer = make_tokenizer(config, extra.get("weights_dir"))
    out = {}
    for key, text in texts.items():
        tokens, mask = tokenizer.encode(text)
        out[key] = {"text": text, "tokens": [int(t) for t in tokens], "mask": [bool(m) for m in mask]}
    return out


def export_policy(cfg: ExportConfig, log=print) -> dict[str, Any]:
    """Export cfg.checkpoint (or the default policy) to cfg.out; returns the manifest (also written there)."""
    import torch

    from coop_transport.export.graphs import ExportSource
    from coop_transport.pi0_policy import default_policy_dir
    from coop_transport.policy.checkpoint import _to_json, load_checkpoint
    from coop_transport.recipe import RecipeConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        checkpoint_dir = pathlib.Path(cfg.checkpoint) if cfg.checkpoint else default_policy_dir()
        if cfg.checkpoint is None and not (checkpoint_dir / "config.json").is_file():
            raise ExportFileMissing(f"the shipped default policy is not at {checkpoint_dir} (yet); export another "
                                    "checkpoint with --checkpoint DIR")
        identity = checkpoint_identity(checkpoint_dir)  # raises a clear error for a missing checkpoint
        ckpt = load_checkpoint(checkpoint_dir, device="cpu")
        config, extra = ckpt.config, ckpt.extra
        variant = extra.get("variant", "per-arm")
        source_dtype = str(next(ckpt.model.parameters()).dtype).replace("torch.", "")
        model = ckpt.model.float().eval()  # graphs are float32; TensorRT lowers precision itself
        lora_merged = False
        if config.lora:
            from coop_transport.policy.lora import merge_lora

            model, lora_merged = merge_lora(model).eval(), True
        log(f"exporting {checkpoint_dir} (config {config.name!r}, variant {variant}, step {ckpt.step}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) to {cfg.out}")

        out = pathlib.Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from a robot's service user
        try:
            source = ExportSource(checkpoint_dir, model, config, extra, tuple(cfg.batch_sizes), tuple(cfg.samples),
                                  residual=cfg.residual, fused=cfg.fused)
            graphs, files, reference, items = export_graphs(source, tmp, cfg.opset, cfg.external_data, log)

            recipe = RecipeConfig.per_arm() if variant == "per-arm" else RecipeConfig.joint()
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "exporter": {"method": "torch.onnx.export, TorchScript tracer (dynamo=False), static shapes",
                             "opset": cfg.opset, "versions": _versions(), "host": platform.node()},
                "source_checkpoint": {**identity, "config_name": config.name, "dtype": source_dtype},
                "policy": policy_section(config, variant, lora_merged, extra.get("state_history")),
                "norm_stats": _to_json(ckpt.norm_stats),
                "prompts": _prompts(config, extra, variant),
                "recipe_defaults": dataclasses.asdict(recipe),
                "export_settings": to_jsonable(dataclasses.asdict(cfg)),
                "graphs": graphs,
                "files": files,
                **source.sections,  # e.g. "residual": the run's architecture, config and checkpoint hash
            }
            manifest["tensorrt"] = _engines(cfg, tmp, manifest, log)  # before parity: engines join the comparison
            manifest["parity"] = run_parity(cfg, tmp, manifest, reference, log, items)
            write_manifest(tmp, manifest)
            replace_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        torch.set_num_threads(threads)
    log(f"wrote {out}/manifest.json ({len(manifest['files'])} files, "
        f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB)")
    if cfg.closed_loop_episodes > 0:
        manifest["closed_loop"] = run_closed_loop(cfg, checkpoint_dir, log)
        write_manifest(out, manifest)
    return manifest


def export_graphs(source, directory: pathlib.Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                  log=print) -> tuple[dict, dict, Any, list]:
    """Every registered exporter's graphs into `directory`, each with a reference file (fixed random inputs and
    the PyTorch module's outputs). Returns (graph records, file records, the PyTorch π0 backend, the items)."""
    from coop_transport.export.backends import TorchBackend
    from coop_transport.export.graphs import collect_items
    from coop_transport.export.onnx_export import export_onnx
    from coop_transport.export.parity import save_reference
    from coop_transport.export.spec import fake_inputs

    graphs, files = {}, {}
    items = collect_items(source)
    for item in items:
        record = export_onnx(item, directory, opset, external_data)
        for name in (record["file"], record["external_data"]):
            if name:
                files[name] = file_record(directory, name)
        inputs = fake_inputs(item.inputs, seed=7 + 100 * len(graphs), vocab_size=source.config.vocab_size)
        record["reference"] = save_reference(directory, item.name, inputs, item.run(inputs))
        files[record["reference"]] = file_record(directory, record["reference"])
        graphs[item.name] = record
        log(f"  {record['file']}: {files[record['file']]['bytes'] / 1e6:.1f} MB, {record['onnx_nodes']} nodes, "
            f"exported in {record['export_seconds']:.1f} s")
    return graphs, files, TorchBackend(source.model, "torch"), items


def policy_section(config, variant: str, lora_merged: bool = False, state_history: dict | None = None
                   ) -> dict[str, Any]:
    from coop_transport.adapters import StateHistory
    from coop_transport.policy.config import config_to_dict

    return {
        "variant": variant, "config_name": config.name, "slots": list(config.cameras),
        "image_size": config.vision.image_size, "horizon": config.action_horizon,
        "action_dim": config.action_dim, "action_pad_dim": config.action_pad_dim,
        "state_dim": config.state_dim, "state_pad_dim": config.state_pad_dim,
        "state_history": StateHistory.from_dict(state_history).to_dict(),  # raw state = adapters.policy_state
        "max_token_len": config.max_token_len, "vocab_size": config.vocab_size,
        "tokenizer": config.tokenizer, "num_flow_steps": config.num_flow_steps, "graph_dtype": "float32",
        "lora_merged": lora_merged, "config": config_to_dict(config),
        "io": "images uint8 (B,S,S,3) per slot; state z-scored; noise (B*N,H,P); actions z-scored",
    }


def export_model(model, config, out: pathlib.Path, samples: tuple[int, ...] = (1, 4), batch_sizes: tuple[int, ...] = (1,),
                 opset: int = DEFAULT_OPSET, log=print, fused: bool = True) -> dict[str, Any]:
    """Export a model that has no checkpoint (benchmarks: random weights) with a minimal manifest: identity
    normalization, no prompts. Not for deployment (load_backend_policy needs a checkpoint's export)."""
    import torch

    from coop_transport.export.graphs import ExportSource

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    with torch.no_grad():
        source = ExportSource(out, model, config, {}, tuple(batch_sizes), tuple(samples), fused=fused)
        graphs, files, _, _ = export_graphs(source, out, opset, None, log)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "exporter": {"method": "torch.onnx.export, TorchScript tracer (dynamo=False), static shapes", "opset": opset,
                     "versions": _versions()},
        "source_checkpoint": {"path": None, "weights_sha256": None, "note": "random weights (benchmark)"},
        "policy": policy_section(config, "per-arm" if config.action_dim == 7 else "joint"),
        "norm_stats": {"state": {"mean": [0.0] * config.state_dim, "std": [1.0] * config.state_dim},
                       "actions": {"mean": [0.0] * config.action_dim, "std": [1.0] * config.action_dim}},
        "prompts": {}, "graphs": graphs, "files": files,
    }
    write_manifest(out, manifest)
    return manifest

def _available_backends(cfg: ExportConfig, export_dir: pathlib.Path, manifest: dict, log) -> tuple[dict, dict]:
    """The parity backends that can run here, built; the others logged as skipped with the reason."""
    from coop_transport.export.backends import make_backend
    from coop_transport.export.spec import ExportError

    backends, skipped = {}, {}
    for name in cfg.parity_backends:
        try:
            backends[name] = make_backend(name, export_dir=export_dir, manifest=manifest, threads=cfg.threads)
        except ExportError as error:
            skipped[name] = str(error).split(";")[0]
    for name, why in skipped.items():
        log(f"parity {name}: skipped ({why})")
    return backends, skipped


def run_parity(cfg: ExportConfig, export_dir: pathlib.Path, manifest: dict, reference, log=print,
               items: list | None = None) -> dict[str, Any]:
    """Open-loop parity of every available backend against PyTorch eager on fresh random inputs, and of every other
    exported graph (residual networks) against its PyTorch module through ONNX Runtime CPU; printed."""
    from coop_transport.export.parity import format_parity, graph_parity, open_loop_parity

    backends, skipped = _available_backends(cfg, export_dir, manifest, log)
    shapes = sorted({(g["settings"]["batch_size"], g["settings"]["num_samples"])
                     for g in manifest["graphs"].values() if g["kind"] == "pi0_chunk_sampler"})
    report = open_loop_parity(reference, backends, shapes, reference.input_specs, trials=cfg.parity_trials,
                              vocab_size=manifest["policy"]["vocab_size"],
                              action_std=np.asarray(manifest["norm_stats"]["actions"]["std"], dtype=np.float64))
    if report:
        log("parity against PyTorch eager (same inputs, same noise; max abs error of z-scored actions):")
        log(format_parity(report))
    for name, r in report.items():
        log(f"parity {name}: max abs error {r['max_abs']:.2e} (tolerance {r['tolerance']:.0e}) "
            f"{'PASS' if r['pass'] else 'FAIL'}")
    graphs = graph_parity(items or [], export_dir, manifest, trials=cfg.parity_trials, threads=cfg.threads)
    for name, r in graphs.items():
        log(f"parity {name} (onnxruntime-cpu vs PyTorch): max abs error {r['max_abs']:.2e} "
            f"(tolerance {r['tolerance']:.0e}) {'PASS' if r['pass'] else 'FAIL'}")
    return {"reference": reference.description, "trials": cfg.parity_trials, "units": "z-scored actions",
            "backends": report, "skipped": skipped, "graphs": graphs}


def _engines(cfg: ExportConfig, export_dir: pathlib.Path, manifest: dict, log) -> dict[str, Any]:
    from coop_transport.export.tensorrt_build import EngineSettings, build_engines

    if not cfg.tensorrt:
        return {"status": "skipped", "reason": "no precisions requested (--tensorrt)", "engines": {}}
    settings = EngineSettings(precisions=tuple(cfg.tensorrt), workspace_gib=cfg.tensorrt_workspace_gib,
                              calibration=cfg.tensorrt_calibration)
    return build_engines(export_dir, manifest, settings, log)


def build_engines_for(cfg: ExportConfig, log=print) -> dict[str, Any]:
    """Mode 'engines': TensorRT engines into an existing export directory (manifest updated)."""
    from coop_transport.export.tensorrt_build import require_tensorrt

    require_tensorrt()  # a clear error, not a silent skip, when engines were asked for explicitly
    out = pathlib.Path(cfg.out)
    manifest = read_manifest(out)
    for name in manifest["files"]:
        verify_file(out, manifest, name)
    manifest["tensorrt"] = _engines(cfg, out, manifest, log)
    write_manifest(out, manifest)
    return manifest


def verify_export(cfg: ExportConfig, log=print) -> dict[str, Any]:
    """Mode 'verify': every listed file against its hash, then each available backend against the PyTorch outputs
    stored at export time (no PyTorch needed); with closed_loop_episodes, the closed-loop comparison too."""
    from coop_transport.export.parity import format_parity, reference_parity, stored_graph_parity

    out = pathlib.Path(cfg.out)
    manifest = read_manifest(out)
    for name in manifest["files"]:
        verify_file(out, manifest, name)
    log(f"{out}: {len(manifest['files'])} files match their sha256; source checkpoint "
        f"{manifest['source_checkpoint']['path']} (weights {manifest['source_checkpoint']['weights_sha256'][:16]}...)")
    backends, _ = _available_backends(cfg, out, manifest, log)
    report = {name: reference_parity(b, out, manifest) for name, b in backends.items()}
    if report:
        log(format_parity(report))
    graphs = stored_graph_parity(out, manifest, cfg.threads)
    for name, r in graphs.items():
        log(f"parity {name} (onnxruntime-cpu vs stored PyTorch outputs): max abs error {r['max_abs']:.2e} "
            f"{'PASS' if r['pass'] else 'FAIL'}")
    if graphs:
        report["graphs"] = graphs
    if cfg.closed_loop_episodes > 0:
        checkpoint = pathlib.Path(cfg.checkpoint or manifest["source_checkpoint"]["path"])
        report["closed_loop"] = run_closed_loop(cfg, checkpoint, log)
    return report


def run_closed_loop(cfg: ExportConfig, checkpoint_dir: pathlib.Path, log=print) -> dict[str, Any]:
    from coop_transport.export.parity import closed_loop_parity

    start = time.perf_counter()
    result = closed_loop_parity(str(checkpoint_dir), str(cfg.out), ("torch", "onnxruntime"),
                                episodes=cfg.closed_loop_episodes, workers=cfg.closed_loop_workers,
                                noise_seed=cfg.noise_seed, out=pathlib.Path(cfg.out) / "closed_loop")
    for name, r in result["backends"].items():
        lo, hi = r["wilson95"]
        log(f"closed loop {name}: success {r['successes']}/{cfg.closed_loop_episodes} ({100 * r['success_rate']:.0f}%, "
            f"95% CI {100 * lo:.0f}-{100 * hi:.0f}%), same outcome as torch on {r['same_outcome_as_reference']} "
            f"seeds, within torch's CI: {r['within_reference_ci']}")
    result["wall_s"] = time.perf_counter() - start
    return result


def main(cfg: ExportConfig, log=print) -> dict[str, Any]:
    if cfg.mode == "export":
        return export_policy(cfg, log)
    if cfg.mode == "engines":
        return build_engines_for(cfg, log)
    return verify_export(cfg, log)
