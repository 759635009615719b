"""Parity: the same inputs and the same noise through every backend, max abs error per action dimension against
PyTorch; and the closed-loop version (success on the same reset seeds and flow noise).

Open-loop figures are in z-scored action units (the graphs' output; 1.0 = one demonstration standard deviation) and,
per dimension, in environment units (times the action std). Tolerances: float32 backends 5e-4 (see TOLERANCE_FP32),
float16 ones 5e-2.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from coop_transport.export.spec import ACTIONS, ExportError, fake_inputs

# Max abs error in z-scored action units between two float32 implementations of the sampler. Rounding is amplified
# through the 10 flow steps: over 400 random inputs of the shipped default (2026-11-26, 2-core CPU host) ONNX
# Runtime's CPU graph differed from PyTorch eager by 2e-6 at the median and up to 1.08e-4 (N = 4). On the worst
# input the original PyTorch model was 8e-6 from a float64 run of it, the fused rewrite 3.9e-5, and ONNX Runtime
# (its approximate exp / tanh kernels on top) 9.6e-5. 5e-4 leaves a margin over that; an export fault (a wrong
# weight, mask or step) shows as errors of 1e-2 and more. The sampler's own spread is ~0.08.
TOLERANCE_FP32 = 5e-4
TOLERANCE_FP16 = 5e-2
REFERENCE_SUFFIX = ".reference.npz"


def tolerance_for(backend_name: str, fp16: bool = False) -> float:
    return TOLERANCE_FP16 if fp16 or backend_name in ("onnxruntime-tensorrt", "tensorrt") else TOLERANCE_FP32


def save_reference(directory: pathlib.Path, graph: str, inputs: dict[str, np.ndarray],
                   outputs: dict[str, np.ndarray]) -> str:
    """``<graph>.reference.npz``: fixed inputs and PyTorch's outputs (``expected_<name>``), so that any machine can
    check a backend without PyTorch."""
    file = f"{graph}{REFERENCE_SUFFIX}"
    np.savez(directory / file, **inputs, **{f"expected_{k}": v for k, v in outputs.items()})
    return file


def load_reference(export_dir: pathlib.Path, manifest: dict,
                   graph: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) stored for `graph`, the file verified against its hash."""
    from coop_transport.export.manifest import verify_file

    entry = manifest["graphs"][graph]
    path = verify_file(export_dir, manifest, entry["reference"])
    with np.load(path) as data:
        return ({s["name"]: data[s["name"]] for s in entry["inputs"]},
                {s["name"]: data[f"expected_{s['name']}"] for s in entry["outputs"]})


def compare(actual: np.ndarray, expected: np.ndarray, action_std: np.ndarray | None = None) -> dict[str, Any]:
    """Errors of (rows, H, D) actions: overall max/mean abs and max abs per action dimension."""
    if actual.shape != expected.shape:
        raise ExportError(f"parity: actions have shape {actual.shape}, PyTorch's {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise ExportError("parity: the backend produced NaN or inf actions")
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    per_dim = error.reshape(-1, error.shape[-1]).max(axis=0)
    out = {"max_abs": float(error.max()), "mean_abs": float(error.mean()),
           "max_abs_per_dim": [float(x) for x in per_dim]}
    if action_std is not None:
        out["max_abs_per_dim_env_units"] = [float(x) for x in per_dim * np.asarray(action_std, dtype=np.float64)]
    return out


def open_loop_parity(reference, backends: dict[str, Any], shapes: list[tuple[int, int]], specs_for,
                     trials: int = 3, seed: int = 12345, vocab_size: int = 256,
                     action_std: np.ndarray | None = None) -> dict[str, Any]:
    """Each backend against `reference` (the PyTorch backend) on `trials` fresh random input sets per (B, N).

    specs_for(B, N) -> list[TensorSpec] of the graph's inputs. Returns {backend: {"B1_N4": stats, ..., "max_abs",
    "tolerance", "pass"}}; stats merge the trials (max of maxima).
    """
    report: dict[str, Any] = {}
    for name, backend in backends.items():
        rows: dict[str, Any] = {}
        for b, n in shapes:
            merged = None
            for trial in range(trials):
                inputs = fake_inputs(specs_for(b, n), seed=seed + 1000 * trial + 10 * b + n, vocab_size=vocab_size)
                result = compare(backend.sample(inputs, n), reference.sample(inputs, n), action_std)
                merged = result if merged is None else _merge(merged, result)
            rows[f"B{b}_N{n}"] = merged
        worst = max(r["max_abs"] for r in rows.values())
        tol = tolerance_for(backend.name)
        report[name] = {"backend": backend.name, "description": backend.description, "trials": trials,
                        "shapes": rows, "max_abs": worst, "tolerance": tol, "pass": bool(worst <= tol)}
    return report


def _merge(a: dict, b: dict) -> dict:
    out = {"max_abs": max(a["max_abs"], b["max_abs"]), "mean_abs": (a["mean_abs"] + b["mean_abs"]) / 2,
           "max_abs_per_dim": [max(x, y) for x, y in zip(a["max_abs_per_dim"], b["max_abs_per_dim"])]}
    if "max_abs_per_dim_env_units" in a:
        out["max_abs_per_dim_env_units"] = [max(x, y) for x, y in zip(a["max_abs_per_dim_env_units"],
                                                                        b["max_abs_per_dim_env_units"])]
    return out


def reference_parity(backend, export_dir: pathlib.Path, manifest: dict) -> dict[str, Any]:
    """A backend against the PyTorch outputs stored at export time (no PyTorch needed)."""
    rows = {}
    for graph, entry in manifest["graphs"].items():
        if entry["kind"] != "pi0_chunk_sampler" or not entry.get("reference"):
            continue
        settings = entry["settings"]
        if not backend.supports(settings["batch_size"], settings["num_samples"]):
            continue
        inputs, expected = load_reference(export_dir, manifest, graph)
        rows[f"B{settings['batch_size']}_N{settings['num_samples']}"] = compare(
            backend.sample(inputs, settings["num_samples"]), expected[ACTIONS])
    worst = max((r["max_abs"] for r in rows.values()), default=float("nan"))
    tol = tolerance_for(backend.name)
    return {"backend": backend.name, "description": backend.description, "shapes": rows, "max_abs": worst,
            "tolerance": tol, "pass": bool(worst <= tol)}


def onnx_session(export_dir: pathlib.Path, manifest: dict, graph: str, threads: int | None = 1):
    """An ONNX Runtime CPU session of any exported graph, its files verified."""
    import onnxruntime as ort

    from coop_transport.export.backends import ort_session_options
    from coop_transport.export.manifest import graph_files, verify_file

    for file in graph_files(manifest, graph):
        verify_file(export_dir, manifest, file)
    path = export_dir / manifest["graphs"][graph]["file"]
    try:
        return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"{path} is not a loadable ONNX graph: {error}") from error


def graph_parity(items, export_dir: pathlib.Path, manifest: dict, trials: int = 2, seed: int = 4242,
                 threads: int | None = 1) -> dict[str, Any]:
    """Every exported graph other than the π0 chunk sampler (residual networks, the π0 graph with prefix outputs)
    against its PyTorch module on fresh random inputs, ONNX Runtime CPU: max abs error per output."""
    report = {}
    for item in items:
        if item.kind == "pi0_chunk_sampler":
            continue  # open_loop_parity covers it, per backend
        session = onnx_session(export_dir, manifest, item.name, threads)
        errors = {s.name: 0.0 for s in item.outputs}
        for trial in range(trials):
            inputs = fake_inputs(item.inputs, seed=seed + trial, vocab_size=manifest["policy"]["vocab_size"])
            expected = item.run(inputs)
            actual = dict(zip([s.name for s in item.outputs], session.run([s.name for s in item.outputs], inputs)))
            for name in errors:
                a, e = np.asarray(actual[name]), np.asarray(expected[name])
                if a.shape != e.shape or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
                    raise ExportError(f"parity {item.name}: output {name!r} {a.shape} vs PyTorch {e.shape}, or NaN/inf")
                err = float(np.abs(a.astype(np.float64) - e.astype(np.float64)).max()) if a.size else 0.0
                errors[name] = max(errors[name], err)
        worst = max(errors.values()) if errors else 0.0
        report[item.name] = {"kind": item.kind, "backend": "onnxruntime-cpu", "max_abs": worst,
                             "max_abs_per_output": errors, "tolerance": TOLERANCE_FP32,
                             "pass": bool(worst <= TOLERANCE_FP32)}
    return report


def stored_graph_parity(export_dir: pathlib.Path, manifest: dict, threads: int | None = 1) -> dict[str, Any]:
    """Graphs other than the π0 chunk sampler against the PyTorch outputs stored at export (ONNX Runtime CPU)."""
    report = {}
    for graph, entry in manifest["graphs"].items():
        if entry["kind"] == "pi0_chunk_sampler" or not entry.get("reference"):
            continue
        inputs, expected = load_reference(export_dir, manifest, graph)
        session = onnx_session(export_dir, manifest, graph, threads)
        actual = dict(zip(expected, session.run(list(expected), inputs)))
        errors = {k: float(np.abs(np.asarray(actual[k], np.float64) - np.asarray(v, np.float64)).max())
                  for k, v in expected.items()}
        worst = max(errors.values()) if errors else 0.0
        report[graph] = {"kind": entry["kind"], "max_abs": worst, "max_abs_per_output": errors,
                         "tolerance": TOLERANCE_FP32, "pass": bool(worst <= TOLERANCE_FP32)}
    return report


def format_parity(report: dict[str, Any]) -> str:
    """Markdown table: one row per backend and shape, max abs error overall and per action dimension."""
    lines = ["| backend | B, N | max abs err (z) | per action dim (z) | tolerance | pass |", "|---|---|---|---|---|---|"]
    for name, r in report.items():
        for shape, s in r["shapes"].items():
            dims = " ".join(f"{x:.1e}" for x in s["max_abs_per_dim"])
            lines.append(f"| {name} | {shape.replace('_', ', ')} | {s['max_abs']:.2e} | {dims} | {r['tolerance']:.0e} | "
                         f"{'yes' if s['max_abs'] <= r['tolerance'] else 'NO'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ closed loop


def closed_loop_parity(checkpoint: str | None, export_dir: str, backends: tuple[str, ...] = ("torch", "onnxruntime"),
                       episodes: int = 100, first_seed: int = 1, workers: int = 2, noise_seed: int | None = 0,
                       threads: int = 1, out: str | pathlib.Path | None = None, progress: bool = True,
                       horizon: int | None = None, recipe: dict | None = None) -> dict[str, Any]:
    """Closed-loop success of each backend on the same reset seeds (and, with noise_seed, the same flow noise per
    episode, so the rollouts are paired), PyTorch first. The exported policy passes when its success rate lies in
    PyTorch's Wilson 95% interval."""
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate

    summaries = {}
    for backend in backends:
        args = {"policy": checkpoint, "backend": backend, "threads": threads, "noise_seed": noise_seed,
                "recipe": recipe}
        if backend not in ("torch",):
            args["export"] = export_dir
        spec = ControllerSpec("pi0", args, label=f"pi0[{backend}]")
        target = pathlib.Path(out) / backend if out else None
        eval_config = EvalConfig(episodes=episodes, first_seed=first_seed, workers=workers,
                                 **({"horizon": horizon} if horizon else {}))
        summaries[backend] = evaluate(spec, eval_config, target, progress=progress)
    base = summaries[backends[0]]
    lo, hi = base["wilson95"]
    result = {"episodes": episodes, "first_seed": first_seed, "noise_seed": noise_seed, "backends": {}}
    base_outcomes = {r["seed"]: r["success"] for r in base["per_seed"]}
    for backend, s in summaries.items():
        same = sum(base_outcomes[r["seed"]] == r["success"] for r in s["per_seed"])
        result["backends"][backend] = {
            "success_rate": s["success_rate"], "wilson95": s["wilson95"], "successes": s["successes"],
            "same_outcome_as_reference": same, "within_reference_ci": bool(lo <= s["success_rate"] <= hi)}
    return result
