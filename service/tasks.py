"""Per task: tokenize -> forward -> postprocess, and how two variants' outputs are compared.

Items travel through the batcher as token id lists (tokenized once, in the handler, so their
cost in tokens is known before batching); :meth:`TaskAdapter.run` pads a batch, runs any
variant's module and returns one output per item, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quantization.fidelity import fidelity, sentence_chrf
from quantization.task_model import TaskModel

from .errors import InvalidInput

# the per-input agreement that shadow traffic averages, by task
SHADOW_METRIC = {"embed": "mean_cosine", "classify": "top1_agreement", "translate": "chrf"}


@dataclass
class Encoded:
    items: list[Any]  # per input: token ids (or a task's item carrying them)
    truncated: list[int]  # indices of the inputs that were cut to the limit


class TaskAdapter:
    def __init__(self, tm: TaskModel, max_tokens: int) -> None:
        self.tm = tm
        self.task = tm.task
        self.max_tokens = max_tokens
        tok = tm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._fast = self._fast_tokenizer(tok, max_tokens + 1)

    @staticmethod
    def _fast_tokenizer(tok: Any, max_length: int) -> Any:
        """A copy of a fast tokenizer's Rust core set to cut at ``max_length``, or None for a slow one.

        The same ids as ``tok(texts, truncation=True, max_length=max_length)``, without the Python
        wrapper's per-call work (~0.15 ms per request on the event loop, most of tokenizing one sentence).
        """
        backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        if backend is None:
            return None
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_padding()
        fast.enable_truncation(max_length=max_length)
        return fast

    def tokenize(self, texts: list[str], **options: Any) -> list[Any]:
        return self.encode(texts, **options).items

    def encode(self, texts: list[str], truncation: str = "truncate", field: str = "inputs", **options: Any) -> Encoded:
        """Batcher items per text. Over ``max_tokens``: cut (and reported) or refused, as ``truncation`` says."""
        # one token over the limit is enough to tell "too long" without tokenizing a huge text in full twice
        if self._fast is not None:
            encodings = self._fast.encode_batch(list(texts)) if len(texts) != 1 else [self._fast.encode(texts[0])]
            ids = [e.ids for e in encodings]
        else:
            ids = self.tm.tokenizer(list(texts), truncation=True, max_length=self.max_tokens + 1)["input_ids"]
        over = [i for i, x in enumerate(ids) if len(x) > self.max_tokens]
        if over and truncation == "error":
            i = over[0]
            raise InvalidInput(f"{field}.{i}: longer than the model's limit of {self.max_tokens} tokens; shorten it "
                               f"or send \"truncation\": \"truncate\"",
                               fields=[{"field": f"{field}.{i}", "message": f"over {self.max_tokens} tokens"}
                                       for i in over])
        if over:
            cut = self.tm.tokenizer([texts[i] for i in over], truncation=True, max_length=self.max_tokens)["input_ids"]
            for i, x in zip(over, cut):
                ids[i] = x
        return Encoded(self.items(texts, [list(x) for x in ids], set(over), **options), over)

    def items(self, texts: list[str], ids: list[list[int]], truncated: set[int]) -> list[Any]:
        """What travels through the batcher: here the token ids themselves."""
        return ids

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
        # numpy, not torch: on one 384-float vector torch's per-op dispatch cost ~0.1 ms per request
        v = vector.numpy()
        if normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)  # F.normalize's eps
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
            return sentence_chrf(reference.text, output.text)
        if task == "classify":
            return float(reference.argmax() == output.argmax())
        return float(F.cosine_similarity(reference, output, dim=0))
