"""What a strategy gained and lost, measured: storage, per-layer error, time, fidelity.

- Storage is measured from what is stored: the bytes of the serialised state dict (safetensors)
  of the FP32 module and of the variant (or the serialised ONNX graph), and, per quantized
  layer, the bytes of the tensors that layer stores for its weight.
- Per-layer error: the SQNR of each quantized layer's effective weight against the FP32 weight,
  and of its *output* against the FP32 layer's output on the same FP32 inputs (captured on a
  few texts), so each layer is judged alone, not with the drift of the layers before it.
- Fidelity against the FP32 model by task (see :mod:`quantization.fidelity`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .affine import sqnr_db
from .calibration import collect_layer_inputs
from .fidelity import fidelity
from .layers import QuantizedLinear
from .runtimes import runtime_of
from .strategies import QuantizedModel
from .tasks import get_task
from .task_model import TaskModel

LAYER_PROBE_TEXTS = 16


def serialized_bytes(module: Any) -> int:
    """Bytes of the module as its runtime stores it (a safetensors state dict, an ONNX graph, an engine's file)."""
    return runtime_of(module).stored_bytes(module)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _effective_weight(layer: nn.Module) -> torch.Tensor | None:
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight().float()
    inner = getattr(layer, "module", layer)  # FP32 islands wrap their module
    w = getattr(inner, "weight", None)
    return w.detach().float() if isinstance(w, torch.Tensor) else None


def _stored_weight_bytes(layer: nn.Module) -> int | None:
    if isinstance(layer, QuantizedLinear):
        return layer.weight_bytes()
    w = getattr(layer, "weight", None)
    return _tensor_bytes(w) if isinstance(w, torch.Tensor) else None


def _capture_inputs(module: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, list]:
    captured: dict[str, list] = {n: [] for n in names}
    collect_layer_inputs(module, names, batches, lambda name, x: captured[name].append(x))
    return captured


def layer_errors(tm: TaskModel, qm: QuantizedModel, texts: list[str], errors: bool = True) -> list[dict[str, Any]]:
    """Per quantized layer: stored bytes vs FP32 and (with ``errors``) weight and output SQNR in dB."""
    names = list(qm.layers)
    rows: list[dict[str, Any]] = []
    torch_variant = isinstance(qm.module, nn.Module)
    inputs = (_capture_inputs(tm.module, names, tm.batches(texts[:LAYER_PROBE_TEXTS]))
              if torch_variant and errors else {})
    for name in names:
        fp32 = tm.module.get_submodule(name)
        row: dict[str, Any] = {"layer": name, "kind": qm.layers[name].get("kind"),
                               "fp32_weight_bytes": _tensor_bytes(fp32.weight)}
        if torch_variant:
            layer = qm.module.get_submodule(name)
            stored = _stored_weight_bytes(layer)
            w = _effective_weight(layer)
            row["weight_bytes"] = stored
            if not errors:
                rows.append(row)
                continue
            row["weight_sqnr_db"] = _round(sqnr_db(fp32.weight.detach().float(), w)) if w is not None else None
            ref, out = [], []
            dtype = next((t.dtype for t in layer.buffers() if t.is_floating_point()), torch.float32)
            dtype = next((p.dtype for p in layer.parameters()), dtype)
            with torch.inference_mode():
                for x in inputs[name]:
                    ref.append(fp32(x).float().flatten())
                    out.append(layer(x.to(dtype)).float().flatten())
            row["output_sqnr_db"] = _round(sqnr_db(torch.cat(ref), torch.cat(out))) if ref else None
        else:
            row.update({k: v for k, v in qm.layers[name].items() if k != "kind"})
        rows.append(row)
    return rows


def _round(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 2)


def build_report(tm: TaskModel, qm: QuantizedModel, texts: list[str], *, reference: Any = None,
                 include_layers: bool = True) -> dict[str, Any]:
    reference = tm.run(None, texts) if reference is None else reference
    fid = fidelity(tm.task, reference, tm.run(qm.module, texts))
    fp32_bytes = serialized_bytes(tm.module)
    variant_bytes = serialized_bytes(qm.module)
    layers = layer_errors(tm, qm, texts, errors=include_layers)
    quantized = [r for r in layers if r.get("weight_bytes") is not None]
    storage: dict[str, Any] = {"fp32_bytes": fp32_bytes, "variant_bytes": variant_bytes,
                               "ratio": round(variant_bytes / fp32_bytes, 4)}
    if quantized:
        lin_fp32 = sum(r["fp32_weight_bytes"] for r in quantized)
        lin_q = sum(r["weight_bytes"] for r in quantized)
        storage.update(linear_fp32_bytes=lin_fp32, linear_variant_bytes=lin_q,
                       linear_ratio=round(lin_q / lin_fp32, 4))
    sq = [r["output_sqnr_db"] for r in layers if r.get("output_sqnr_db") is not None]
    record = qm.record()
    record.pop("layers")
    return {
        "model": tm.describe(),
        "strategy": record,
        "quantization_seconds": round(qm.seconds, 3),
        "storage": storage,
        "fidelity": {"texts": len(texts), **fid},
        "layer_summary": {"quantized": len(qm.layers), "kept": len(qm.kept),
                          "worst_output_sqnr_db": min(sq) if sq else None,
                          "median_output_sqnr_db": sorted(sq)[len(sq) // 2] if sq else None},
        "layers": layers if include_layers else [],
    }


# -------------------------------------------------------------------------------------------------
# Tables for people
# -------------------------------------------------------------------------------------------------

def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def fidelity_cells(task: str, fid: dict[str, float]) -> str:
    return get_task(task).summary(fid)


def format_summary_table(reports: list[dict[str, Any]]) -> str:
    """One row per strategy: sizes, time, fidelity."""
    head = "| strategy | stored | x FP32 | Linear weights x FP32 | quantize s | fidelity vs FP32 | kept |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in reports:
        s = r["storage"]
        lin = f"{s['linear_ratio']:.3f}" if "linear_ratio" in s else "-"
        lines.append(f"| {r['strategy']['strategy']} | {_mb(s['variant_bytes'])} | {s['ratio']:.3f} | {lin} | "
                     f"{r['quantization_seconds']:.2f} | {fidelity_cells(r['model']['task'], r['fidelity'])} | "
                     f"{len(r['strategy']['kept'])} |")
    return "\n".join(lines)


def format_layer_table(report: dict[str, Any], limit: int | None = None) -> str:
    rows = sorted(report["layers"], key=lambda r: (r.get("output_sqnr_db") is None, r.get("output_sqnr_db") or 0))
    rows = rows[:limit] if limit else rows
    lines = ["| layer | kind | stored | x FP32 | weight SQNR dB | output SQNR dB |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['weight_bytes'] / r['fp32_weight_bytes']:.3f}" if r.get("weight_bytes") else "-"
        lines.append(f"| {r['layer']} | {r['kind']} | {_mb(r.get('weight_bytes'))} | {ratio} | "
                     f"{r.get('weight_sqnr_db', '-')} | {r.get('output_sqnr_db', '-')} |")
    return "\n".join(lines)
