"""ONNX Runtime int8: export the FP32 model to ONNX once, quantize the graph with ORT's quantizers.

Why a second int8 path next to ``dynamic-int8``: ORT ships fused CPU kernels (Attention,
SkipLayerNormalization, BiasGelu, MatMulInteger, QAttention) and its artifact is one
self-contained ``.onnx`` file. The module is exported once in :meth:`OnnxInt8.prepare` (cached
as bytes); :meth:`OnnxInt8.build` only re-quantizes, so automatic mixed precision, which builds
many variants, never re-exports.

Units are the torch ``nn.Linear`` names, as for every strategy. Each maps to the ONNX node that
holds its weight: by scope (``model.encoder.layer.0.attention.self.query`` ->
``/model/encoder/layer.0/attention/self/query/MatMul``), or, for nodes the optimizer created, by
finding the Linear's weight inside the node's weight. With ``optimize`` each layer's query, key
and value become one ``Attention_<i>`` node with one concatenated weight, quantized whole
(QAttention): keeping any one of the three keeps all three in FP32 (``notes.kept_with_fused``).
ORT's static quantizers have no Attention operator, so static mode does not fuse attention.
Units missing from the graph (a pooler the forward never uses) are in ``notes.unmapped_units``.

ORT's dynamic mode quantizes each MatMul's whole input with one scale (not per token like
``dynamic-int8``), so one outlier token sets the step for the batch and outputs depend on which
sentences share the batch.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import onnx
import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import CalibrationError
from .base import Batch, Strategy, StrategyParams, register

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")
FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization")
QuantTypeName = Literal["QInt8", "QUInt8"]


class OnnxRuntimeModule:
    """An ORT session called like the torch module it was exported from.

    ``model_bytes`` is the whole serialized graph, weights included: its length is the stored
    size; write it to a ``.onnx`` file to save, and load it back with :meth:`from_bytes`.
    """

    runtime = "onnxruntime"

    def __init__(self, model_bytes: bytes, threads: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.model_bytes = bytes(model_bytes)
        self.threads = int(threads or torch.get_num_threads())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # ORT warns about every unfused pattern; errors still raise
        # ORT's idle workers spin for a while after each call, stealing the cores from torch
        # variants served in the same process; measured: torch int8 layers ran 2x slower after it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.model_bytes, options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_bytes(cls, model_bytes: bytes, threads: int | None = None) -> OnnxRuntimeModule:
        return cls(model_bytes, threads)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], threads: int | None = None) -> OnnxRuntimeModule:
        return cls(Path(path).read_bytes(), threads)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.model_bytes)

    @property
    def nbytes(self) -> int:
        return len(self.model_bytes)

    def eval(self) -> OnnxRuntimeModule:
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if token_type_ids is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)  # what the HF model does without them
        feed = {name: _int64(given[name]) for name in self.input_names}  # only what the graph declares
        return torch.from_numpy(np.asarray(self.session.run(self.output_names[:1], feed)[0], dtype=np.float32))

    forward = __call__

    def __reduce__(self) -> tuple[Any, ...]:  # a session cannot be pickled; its bytes can
        return (type(self), (self.model_bytes, self.threads))

    def __repr__(self) -> str:
        return f"OnnxRuntimeModule({self.nbytes} bytes, inputs={self.input_names}, threads={self.threads})"


class OnnxParams(StrategyParams):
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: activation ranges per batch at run time; static: fixed by calibration")
    per_channel: bool = Field(True, description="one weight scale per output channel, or one per matrix")
    optimize: bool = Field(True, description="export with eager attention and fuse with onnxruntime.transformers' optimizer")
    weight_type: QuantTypeName = Field("QInt8", description="int8 weight type")
    activation_type: QuantTypeName = Field(
        "QUInt8", description="static only: activation type (dynamic mode always quantizes activations to uint8)")
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field(
        "MinMax", description="static only: how activation ranges are chosen from the calibration texts")
    quant_format: Literal["QDQ", "QOperator"] = Field(
        "QDQ", description="static only: QuantizeLinear/DequantizeLinear pairs, or QLinear* operators")
    opset: int = Field(17, ge=14, le=20, description="ONNX opset of the export")

    @model_validator(mode="after")
    def _supported(self) -> OnnxParams:
        if self.mode == "static" and (self.activation_type, self.weight_type) == ("QInt8", "QUInt8"):
            raise ValueError("ONNX Runtime's quantizer does not support int8 activations with uint8 weights; "
                             "use weight_type QInt8")
        return self


@register
class OnnxInt8(Strategy):
    name = "onnx-int8"
    summary = "ONNX export fused for ONNX Runtime (Attention, SkipLayerNorm, BiasGelu); int8 MatMuls by ORT's quantizer"
    Params = OnnxParams
    runtime = "onnxruntime"

    def __init__(self, params: StrategyParams) -> None:
        super().__init__(params)
        self.fp32_bytes = b""
        self.unit_node: dict[str, str] = {}  # Linear name -> the ONNX node holding its weight
        self.node_units: dict[str, list[str]] = {}
        self.node_weight: dict[str, str] = {}  # node -> its weight initializer
        self.node_op: dict[str, str] = {}
        self.calibration: list[Batch] = []
        self._calib_cache: bytes | None = None
        self._notes: dict[str, Any] = {}

    # -- export once -----------------------------------------------------------------------------
    def prepare(self, module: nn.Module, calibration: list[Batch] | None) -> None:
        import onnxruntime

        p: OnnxParams = self.params  # type: ignore[assignment]
        if p.mode == "static" and not calibration:
            raise CalibrationError("onnx-int8 in static mode calibrates activation ranges and needs sample texts; "
                                   "give at least one calibration text, or use mode 'dynamic'")
        self.calibration = list(calibration or [])
        notes: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "opset": p.opset, "optimized": False}
        start = time.perf_counter()
        source = _eager_copy(module, notes) if p.optimize else module
        with tempfile.TemporaryDirectory(prefix="onnx-int8-") as tmp:
            raw = Path(tmp) / "fp32.onnx"
            notes["inputs"] = _export(source, raw, p.opset)
            notes["export_seconds"] = round(time.perf_counter() - start, 3)
            model = onnx.load(str(raw))
            if p.optimize:
                start = time.perf_counter()
                try:
                    model = _optimize(raw, module, fuse_attention=p.mode == "dynamic")
                    notes["optimized"] = True
                except Exception as exc:  # the optimizer is best effort; the plain export still works
                    notes["optimize_error"] = f"{type(exc).__name__}: {exc}; quantized the plain export instead"
                notes["optimize_seconds"] = round(time.perf_counter() - start, 3)
        if p.mode == "dynamic":
            _gemm_to_matmul(model)
        model, notes["shape_inference"] = _infer_shapes(model)
        notes["fused_nodes"] = {op: sum(n.op_type == op for n in model.graph.node) for op in FUSED_OPS}
        self._map_units(module, model)
        self.fp32_bytes = model.SerializeToString()
        notes["fp32_onnx_bytes"] = len(self.fp32_bytes)
        notes["unmapped_units"] = sorted(set(self.units(module)) - set(self.unit_node))
        self._notes = notes

    def _map_units(self, module: nn.Module, model: onnx.ModelProto) -> None:
        """The node holding each Linear's weight: by scope name first, then by weight content."""
        self.unit_node, self.node_units, self.node_weight, self.node_op = {}, {}, {}, {}
        units = self.units(module)
        inits = {t.name: t for t in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]
        for node in nodes:
            scope = node.name.lstrip("/").rpartition("/")[0].replace("/", ".")
            if scope in units and scope not in self.unit_node:
                self._link(scope, node)
        rest = [u for u in units if u not in self.unit_node]
        for node in nodes:
            if rest and node.name not in self.node_units:
                array = onnx.numpy_helper.to_array(inits[node.input[1]])
                for unit in [u for u in rest if _holds(array, module.get_submodule(u).weight)]:
                    self._link(unit, node)
                    rest.remove(unit)

    def _link(self, unit: str, node: onnx.NodeProto) -> None:
        self.unit_node[unit] = node.name
        self.node_units.setdefault(node.name, []).append(unit)
        self.node_weight[node.name] = node.input[1]
        self.node_op[node.name] = node.op_type

    # -- quantize per kept set -------------------------------------------------------------------
    def build(self, module: nn.Module, kept: frozenset[str]) -> tuple[OnnxRuntimeModule, dict[str, dict[str, Any]]]:
        p: OnnxParams = self.params  # type: ignore[assignment]
        if not self.fp32_bytes:
            self.prepare(module, self.calibration)
        ops = ["MatMul", "Attention"] if p.mode == "dynamic" else ["MatMul", "Gemm"]  # what ORT can quantize
        excluded = sorted({self.unit_node[u] for u in kept if u in self.unit_node})
        chosen = sorted(n for n, op in self.node_op.items() if op in ops and n not in excluded)
        start = time.perf_counter()
        data = self.fp32_bytes  # everything kept: the FP32 graph is the variant
        if chosen:  # (an empty nodes_to_quantize would mean "all" to ORT)
            with tempfile.TemporaryDirectory(prefix="onnx-int8-") as tmp:
                src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
                src.write_bytes(self.fp32_bytes)
                self._quantize(src, dst, Path(tmp) / "calibration.json", ops, chosen, excluded)
                data = dst.read_bytes()
        seconds = time.perf_counter() - start
        layers = self._records(onnx.load_from_string(data), kept)
        self._notes.update(
            quantize_seconds=round(seconds, 3), int8_onnx_bytes=len(data),
            quantized_nodes=len({r["node"] for r in layers.values()}),
            kept_with_fused=sorted(u for n in excluded for u in self.node_units[n] if u not in kept),
            not_quantizable=sorted(u for u, n in self.unit_node.items() if self.node_op[n] not in ops))
        return OnnxRuntimeModule(data), layers

    def _quantize(self, src: Path, dst: Path, cache: Path, ops: list[str], chosen: list[str],
                  excluded: list[str]) -> None:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)

        p: OnnxParams = self.params  # type: ignore[assignment]
        # DefaultTensorType: without it ORT fails on fused graphs ("Unable to find data type for
        # weight_name") if shape inference missed a tensor. reduce_range off: it wrecks fidelity.
        common: dict[str, Any] = dict(
            op_types_to_quantize=ops, per_channel=p.per_channel, reduce_range=False,
            weight_type=QuantType[p.weight_type], nodes_to_quantize=chosen, nodes_to_exclude=excluded or None,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
        if p.mode == "dynamic":
            with _quiet():
                quantize_dynamic(str(src), str(dst), **common)
            return
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            if self._calib_cache is not None:  # ranges do not depend on the kept set: calibrate once
                cache.write_bytes(self._calib_cache)
            common["calibration_cache_path"] = str(cache)
        names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
        reader = _Reader(self.calibration, names, pad=p.calibrate_method != "MinMax")
        with _quiet():
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat[p.quant_format],
                            activation_type=QuantType[p.activation_type],
                            calibrate_method=CalibrationMethod[p.calibrate_method], **common)
        if self._calib_cache is None and cache.is_file():
            self._calib_cache = cache.read_bytes()

    def _records(self, model: onnx.ModelProto, kept: frozenset[str]) -> dict[str, dict[str, Any]]:
        """Per quantized unit: its node, the quantized weight's scale count and stored bytes."""
        inits = {t.name: t for t in model.graph.initializer}
        ops = {n.name: n.op_type for n in model.graph.node}
        layers: dict[str, dict[str, Any]] = {}
        for node, units in self.node_units.items():
            weight = self.node_weight[node]
            q = inits.get(f"{weight}_quantized")
            if q is None or kept.intersection(units):
                continue
            scale, zero = inits.get(f"{weight}_scale"), inits.get(f"{weight}_zero_point")
            scales = int(np.prod(scale.dims)) if scale is not None else None
            stored = sum(_nbytes(t) for t in (q, scale, zero) if t is not None)
            for unit in units:
                layers[unit] = {
                    "kind": "onnx-int8", "node": node, "op_type": self.node_op[node],
                    "quantized_op": next((ops[n] for n in (f"{node}_quant", node) if n in ops), None),
                    "weight_dtype": onnx.TensorProto.DataType.Name(q.data_type), "weight_scales": scales,
                    "per_channel": bool(scales and scales > 1), "weight_bytes": stored // len(units),
                    **({"fused_with": [u for u in units if u != unit]} if len(units) > 1 else {})}
        return layers

    def notes(self) -> dict[str, Any]:
        return dict(self._notes)


class _Reader:
    """Calibration batches as ORT feeds: int64 arrays for exactly the graph's inputs.

    ``pad``: ORT's histogram calibrators (Entropy, Percentile) stack every batch's activations
    into one array, so every batch is padded (masked) to the longest one first.
    """

    def __init__(self, batches: list[Batch], names: list[str], pad: bool = False) -> None:
        feeds = [{n: _int64(b.get(n) if b.get(n) is not None else torch.zeros_like(b["input_ids"])) for n in names}
                 for b in batches]
        if pad and feeds:
            length = max(f["input_ids"].shape[1] for f in feeds)
            pad_id = next((int(f["input_ids"][f["attention_mask"] == 0][0]) for f in feeds
                           if "attention_mask" in f and (f["attention_mask"] == 0).any()), 0)
            feeds = [{k: np.pad(v, ((0, 0), (0, length - v.shape[1])), constant_values=pad_id if k == "input_ids" else 0)
                      for k, v in f.items()} for f in feeds]
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def _int64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)


def _hf_models(module: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in module.modules() if isinstance(m, PreTrainedModel)]


def _eager_copy(module: nn.Module, notes: dict[str, Any]) -> nn.Module:
    """A copy with eager attention: ORT's fuser recognises its Softmax(QK^T) pattern, not SDPA's."""
    if not _hf_models(module):
        return module
    copied = copy.deepcopy(module)
    for m in _hf_models(copied):
        try:
            m.set_attn_implementation("eager")
        except Exception:  # older transformers, or a model without the API
            m.config._attn_implementation = "eager"
    notes["attention"] = ",".join(sorted({str(m.config._attn_implementation) for m in _hf_models(copied)}))
    return copied


def _export(module: nn.Module, path: Path, opset: int) -> list[str]:
    """TorchScript export with dynamic batch and sequence axes; without token_type_ids if refused.

    The example has padding in its second row so that the trace keeps the attention-mask path.
    """
    ids = torch.arange(16, dtype=torch.long).reshape(2, 8) % 50 + 100
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    error: Exception | None = None
    for names in (INPUTS, INPUTS[:2]):
        axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["output"] = {0: "batch"}
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # dynamo=False is deprecated but the fuser needs its graph
                torch.onnx.export(module.eval(), tuple(example[n] for n in names), str(path), dynamo=False,
                                  input_names=list(names), output_names=["output"], dynamic_axes=axes,
                                  opset_version=opset, do_constant_folding=True)
            return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        except Exception as exc:  # e.g. a forward that takes no token_type_ids
            error = exc
    raise RuntimeError(f"ONNX export failed: {type(error).__name__}: {error}") from error


def _optimize(path: Path, module: nn.Module, fuse_attention: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    config = next((m.config for m in _hf_models(module)), None)
    model_type = getattr(config, "model_type", "bert")
    model_type = model_type if model_type in MODEL_TYPES else "bert"
    options = FusionOptions(model_type)
    options.enable_attention = fuse_attention
    with _quiet():
        return optimize_model(str(path), model_type=model_type, optimization_options=options,
                              num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                              hidden_size=int(getattr(config, "hidden_size", 0) or 0)).model


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """ORT's integer ops have no Gemm (a Linear on 2-D input, e.g. a classifier head); MatMul + Add do."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    wrapped = ONNXModel(model)
    wrapped.replace_gemm_with_matmul()
    wrapped.remove_unused_constant()  # the untransposed Gemm weight


def _infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Types of every tensor, contrib ops included: without them static mode silently skips activations."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        with _quiet():
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True), True
    except Exception:  # best effort: DefaultTensorType still lets the quantizers run
        return model, False


class _DropOrtWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's optimizer and quantizer log progress and advice (some on the root logger); a library should not."""
    root, drop, ort_logger = logging.getLogger(), _DropOrtWarnings(), logging.getLogger("onnxruntime")
    level = ort_logger.level
    root.addFilter(drop)
    ort_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        ort_logger.setLevel(level)
        root.removeFilter(drop)


def _holds(array: np.ndarray, weight: torch.Tensor) -> bool:
    """Whether an ONNX weight holds a Linear's weight [out, in]: as W, W^T, or a W^T column block."""
    w = weight.detach().float().cpu().numpy()
    out_f, in_f = w.shape
    if array.ndim != 2:
        return False
    if array.shape == w.shape and np.array_equal(array, w):
        return True
    if array.shape[0] != in_f or array.shape[1] % out_f:
        return False
    return any(np.array_equal(array[:, k:k + out_f], w.T) for k in range(0, array.shape[1], out_f))


def _nbytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
