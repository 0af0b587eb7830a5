"""Per task: tokenize -> forward -> postprocess, and how two variants' outputs are compared.

Items travel through the batcher as token id lists (tokenized once, in the handler, so their
cost in tokens is known before batching); :meth:`TaskAdapter.run` pads a batch, runs any
variant's module and returns one output per item, in order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from quantization.fidelity import fidelity
from quantization.models import TaskModel

# the per-input agreement that shadow traffic averages, by task
SHADOW_METRIC = {"embed": "mean_cosine", "classify": "top1_agreement", "translate": "chrf"}


class TaskAdapter:
    def __init__(self, tm: TaskModel, max_tokens: int) -> None:
        self.tm = tm
        self.task = tm.task
        self.max_tokens = max_tokens
        tok = tm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tm.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
        return [list(ids) for ids in enc["input_ids"]]

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids in items)
        input_ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, ids in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}

    @torch.inference_mode()
    def run(self, module: Any, items: list[list[int]]) -> list[torch.Tensor]:
        """embed: unnormalised embedding per item; classify: class probabilities per item."""
        out = module(**self.collate(items)).float()
        if self.task == "classify":
            out = out.softmax(-1)
        return list(out.unbind(0))

    # -- outputs for clients -------------------------------------------------------------------
    def labels(self, probs: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        k = min(top_k, probs.numel())
        values, idx = probs.topk(k)
        names = self.tm.labels or [str(i) for i in range(probs.numel())]
        return [{"label": names[int(i)], "score": float(v)} for v, i in zip(values, idx)]

    @staticmethod
    def embedding(vector: torch.Tensor, normalize: bool) -> list[float]:
        v = F.normalize(vector, dim=-1) if normalize else vector
        return v.tolist()

    # -- agreement -----------------------------------------------------------------------------
    def agreement(self, reference: list[torch.Tensor], output: list[torch.Tensor]) -> dict[str, float]:
        """Fidelity of ``output`` against ``reference`` with the library's own measures."""
        ref, out = torch.stack(reference), torch.stack(output)
        if self.task == "classify":  # the library's measure takes logits; log-probabilities are logits
            return fidelity("classify", ref.clamp_min(1e-30).log(), out.clamp_min(1e-30).log())
        return fidelity(self.task, ref, out)

    @staticmethod
    def per_input_agreement(task: str, reference: Any, output: Any) -> float:
        if task == "translate":
            from .translation import sentence_chrf

            return sentence_chrf(reference.text, output.text)
        if task == "classify":
            return float(reference.argmax() == output.argmax())
        return float(F.cosine_similarity(reference, output, dim=0))
