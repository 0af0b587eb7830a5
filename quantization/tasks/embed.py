"""embed: a sentence embedding per input, judged by cosine similarity to the FP32 embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Task, register

# the int8 candidates for transformer encoders; keeping the FFN output layers in FP32 is the candidate for CPUs
# whose only fast int8 kernel has 7-bit activations (under the AVX2 cap, intent top-1 with them in FP32 went
# 97.5% -> 98.75%, mean |dp| 0.0101 -> 0.0072). PyTorch strategies only: onnx-int8 and native are variants of
# their own, which auto names only when params.candidates lists them.
ENCODER_CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("dynamic-int8", {}), ("dynamic-int8", {"smooth_alpha": None}), ("dynamic-int8", {"keep": ["*.output.dense"]}),
    ("static-int8", {}), ("weight-only-int8", {})]


@register
class Embed(Task):
    """Outputs: unnormalised sentence embeddings [n, d]; results: the (optionally normalised) vector."""

    name = "embed"
    bound_metrics = ("mean_cosine", "min_cosine")
    primary_metric = "mean_cosine"
    agreement_metric = "mean_cosine"
    default_bound = {"mean_cosine": 0.995, "min_cosine": 0.98}
    auto_candidates = ENCODER_CANDIDATES

    @classmethod
    def compare(cls, reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
        cos = F.cosine_similarity(reference.float(), output.float(), dim=-1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n": int(cos.numel())}

    @classmethod
    def agreement(cls, reference: torch.Tensor, output: torch.Tensor) -> float:
        return float(F.cosine_similarity(reference, output, dim=0))

    @classmethod
    def summary(cls, metrics: dict[str, float]) -> str:
        return f"cos mean {metrics['mean_cosine']:.4f} / min {metrics['min_cosine']:.4f}"

    @staticmethod
    def embedding(vector: torch.Tensor, normalize: bool) -> list[float]:
        # numpy, not torch: on one 384-float vector torch's per-op dispatch cost ~0.1 ms per request
        v = vector.numpy()
        if normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)  # F.normalize's eps
        return v.tolist()

    def result(self, index: int, output: torch.Tensor, normalize: bool = True, **_: Any) -> dict[str, Any]:
        return {"index": index, "embedding": self.embedding(output, normalize)}
