"""classify: class probabilities per input, judged by top-1 agreement with FP32 and the move in its top label."""

from __future__ import annotations

from typing import Any

import torch

from .base import Task, register
from .embed import ENCODER_CANDIDATES


@register
class Classify(Task):
    """Outputs: logits [n, classes] from :meth:`run_texts`, class probabilities per input from :meth:`run`."""

    name = "classify"
    bound_metrics = ("top1_agreement",)
    primary_metric = "top1_agreement"
    agreement_metric = "top1_agreement"
    default_bound = {"top1_agreement": 0.98}  # one flip in the 64 default probe texts is within it
    auto_candidates = ENCODER_CANDIDATES

    @classmethod
    def compare(cls, reference_logits: torch.Tensor, output_logits: torch.Tensor) -> dict[str, float]:
        """Top-1 agreement, and the change in probability of FP32's top label (mean and max |p - p_fp32|)."""
        p_ref = reference_logits.float().softmax(-1)
        p_out = output_logits.float().softmax(-1)
        top = p_ref.argmax(-1)
        agree = (p_out.argmax(-1) == top).float()
        dprob = (p_out.gather(1, top[:, None]) - p_ref.gather(1, top[:, None])).abs().squeeze(1)
        return {"top1_agreement": float(agree.mean()), "mean_abs_dprob": float(dprob.mean()),
                "max_abs_dprob": float(dprob.max()), "n": int(top.numel())}

    @classmethod
    def compare_outputs(cls, reference: list[torch.Tensor], output: list[torch.Tensor]) -> dict[str, float]:
        # served outputs are probabilities; log-probabilities are logits
        return cls.compare(torch.stack(reference).clamp_min(1e-30).log(), torch.stack(output).clamp_min(1e-30).log())

    @classmethod
    def agreement(cls, reference: torch.Tensor, output: torch.Tensor) -> float:
        return float(reference.argmax() == output.argmax())

    @classmethod
    def ranking_score(cls, metrics: dict[str, float]) -> float:
        return 1.0 - metrics["mean_abs_dprob"]  # top-1 agreement moves in whole flips

    @classmethod
    def summary(cls, metrics: dict[str, float]) -> str:
        return f"top-1 {100 * metrics['top1_agreement']:.1f}%, mean |dp| {metrics['mean_abs_dprob']:.4f}"

    @torch.inference_mode()
    def run(self, module: Any, items: list[list[int]]) -> list[torch.Tensor]:
        return list(module(**self.collate(items)).float().softmax(-1).unbind(0))

    def labels(self, probs: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        k = min(top_k, probs.numel())
        values, idx = probs.topk(k)
        names = self.tm.labels or [str(i) for i in range(probs.numel())]
        return [{"label": names[int(i)], "score": float(v)} for v, i in zip(values, idx)]

    def result(self, index: int, output: torch.Tensor, top_k: int = 1, **_: Any) -> dict[str, Any]:
        return {"index": index, "labels": self.labels(output, top_k)}
