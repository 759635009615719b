"""ExportItem -> ONNX file, with torch.onnx.export's TorchScript tracer (``dynamo=False``).

Why the tracer: torch 2.13's dynamo exporter (``dynamo=True``) needs the ``onnxscript`` package, which the pinned
environment does not have; the tracer handles everything the π0 sampler uses (SDPA with an additive mask, rotary
embeddings, repeat_interleave for mean-of-N, the KV cache as plain tensors) at opset >= 14. Tracing records one
static shape per file, so each (batch size, sample count) gets its own graph: a dynamic batch axis was tried and is
not robust (traced constants such as the per-camera mask keep the example's batch size; B=3 fails at a Concat).
The flow-step loop is unrolled (10 copies of the expert) and the step times become constants that ONNX Runtime
folds away. Graphs over 2 GB (π0-3B) are written with their weights in one ``<name>.onnx.data`` file.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

from coop_transport.export.graphs import ExportItem
from coop_transport.export.spec import DEFAULT_OPSET, ExportError, fake_inputs

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which they go to a separate file (protobuf: 2 GB)
ONNX_DTYPES = {1: "float32", 2: "uint8", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


def export_onnx(item: ExportItem, directory: str | pathlib.Path, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None) -> dict[str, Any]:
    """Export `item` to ``directory/<item.name>.onnx``; returns what the manifest records about it.

    external_data: True puts the weights in ``<name>.onnx.data``; None does so only above EXTERNAL_DATA_THRESHOLD.
    """
    import onnx

    directory = pathlib.Path(directory)
    example = item.example if item.example is not None else fake_inputs(item.inputs)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in item.inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in item.module.parameters())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    file = f"{item.name}.onnx"
    data_file = f"{file}.data" if external_data else None

    start = time.perf_counter()
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{item.name}.", dir=directory))
    try:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # nn.TransformerEncoderLayer's inference fast path (the RL token encoder) is one fused op without an ONNX
        # form; the regular path computes the same function from exportable ops.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks: shapes are static
                torch.onnx.export(
                    item.module, args, str(scratch / file), input_names=[s.name for s in item.inputs],
                    output_names=[s.name for s in item.outputs], opset_version=opset, dynamo=False,
                    do_constant_folding=True,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        # Re-save: one weights file whatever the exporter did (it writes one file per tensor above 2 GB).
        model = onnx.load(str(scratch / file), load_external_data=True)
        if external_data:
            onnx.save_model(model, str(directory / file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file, size_threshold=1024)
        else:
            onnx.save_model(model, str(directory / file))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(directory / file))
    check_graph_io(str(directory / file), item)
    return {
        "kind": item.kind,
        "file": file,
        "external_data": data_file,
        "inputs": [s.to_dict() for s in item.inputs],
        "outputs": [s.to_dict() for s in item.outputs],
        "settings": item.settings,
        "opset": opset,
        "onnx_nodes": len(model.graph.node),
        "weight_bytes": int(weight_bytes),
        "export_seconds": round(seconds, 2),
    }


def check_graph_io(path: str, item: ExportItem) -> None:
    """The exported graph's inputs and outputs must be exactly the item's specs (names, order, shapes, dtypes)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph

    def describe(values) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append((v.name, tuple(d.dim_value for d in t.shape.dim), ONNX_DTYPES.get(t.elem_type, str(t.elem_type))))
        return out

    for kind, actual, specs in (("inputs", describe(graph.input), item.inputs),
                                ("outputs", describe(graph.output), item.outputs)):
        expected = [(s.name, s.shape, s.dtype) for s in specs]
        if actual != expected:
            raise ExportError(f"{path}: exported {kind} {actual} differ from the spec {expected}")
