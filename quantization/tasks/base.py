"""What a task is: the one place that knows how a model of that task is fed, run, answered and judged.

A :class:`Task` subclass describes one task (embed, classify, translate) and registers itself with
``@register``. Its class-level half needs no model: the fidelity measures (:meth:`Task.compare` over
whole outputs, :meth:`Task.agreement` per input), the scores targets are stated in, and the
defaults a service gates quantized variants on. An instance is bound to one loaded
:class:`~quantization.task_model.TaskModel` and does the work of a request: encode texts into
batcher items (token ids, counted before batching), pad and run a batch through *any* variant's
module, and turn each output into a plain-data result. Nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InputTooLong


@dataclass
class Encoded:
    items: list[Any]  # per input: what travels through a batcher (token ids, or a task's item carrying them)
    truncated: list[int]  # indices of the inputs that were cut to the limit


class Task:
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # older names still accepted on input
    # fidelity: the metrics compare() returns that a bound may name, the primary one targets are stated in,
    # and what the per-input agreement (shadow traffic, /v1/compare) is reported as
    bound_metrics: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    agreement_metric: ClassVar[str]
    # what a quantized variant must keep on the start-up probe (and in shadow traffic) by default
    default_bound: ClassVar[dict[str, float]]
    probe_count: ClassVar[int] = 64  # built-in probe sentences that measure it
    # strategy `auto`'s default candidates: (strategy, params)
    auto_candidates: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    timing_rounds: ClassVar[int | None] = None  # rounds when timing variants against each other (None: the default)
    compilable: ClassVar[bool] = True  # whether torch.compile applies to its modules
    needs_languages: ClassVar[bool] = False  # whether serving needs the model's language pair
    # per request, where the task's work per input is far above an encoder forward's (None: no ceiling of its own)
    max_inputs: ClassVar[int | None] = None
    max_chars: ClassVar[int | None] = None

    def __init__(self, tm: Any, max_tokens: int | None = None) -> None:
        self.tm = tm
        self.max_tokens = max_tokens or tm.max_length
        tok = tm.tokenizer
        self.pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
        self._fast = _fast_tokenizer(tok, self.max_tokens + 1)

    # -- comparing two variants' outputs ---------------------------------------------------------
    @classmethod
    def compare(cls, reference: Any, output: Any) -> dict[str, float]:
        """Fidelity of ``output`` against ``reference``, both as :meth:`run_texts` returns them."""
        raise NotImplementedError

    @classmethod
    def compare_outputs(cls, reference: list[Any], output: list[Any]) -> dict[str, float]:
        """The same measures over per-input outputs as :meth:`run` returns them."""
        return cls.compare(torch.stack(reference), torch.stack(output))

    @classmethod
    def agreement(cls, reference: Any, output: Any) -> float:
        """One input's agreement in [0, 1], reported as ``agreement_metric``."""
        raise NotImplementedError

    @classmethod
    def primary_score(cls, metrics: dict[str, float]) -> float:
        """The score in [0, 1] fidelity targets are stated in."""
        return metrics[cls.primary_metric]

    @classmethod
    def ranking_score(cls, metrics: dict[str, float]) -> float:
        """Higher is more faithful; continuous even where the primary score counts flips."""
        return cls.primary_score(metrics)

    @classmethod
    def summary(cls, metrics: dict[str, float]) -> str:
        """One table cell for people."""
        raise NotImplementedError

    # -- running a model -------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode()
    def run_texts(cls, tm: Any, module: Any, texts: list[str], batch_size: int = 32) -> Any:
        """Raw outputs of ``module`` for ``texts`` in batches of ``batch_size`` (what :meth:`compare` reads)."""
        outs = [module(**batch).float() for batch in tm.batches(texts, batch_size)]
        return torch.cat(outs) if outs else torch.empty(0)

    def encode(self, texts: list[str], truncation: str = "truncate", **options: Any) -> Encoded:
        """Batcher items per text. Over ``max_tokens``: cut (and reported) or refused (:class:`InputTooLong`)."""
        # one token over the limit is enough to tell "too long" without tokenizing a huge text in full twice
        if self._fast is not None:
            encodings = self._fast.encode_batch(list(texts)) if len(texts) != 1 else [self._fast.encode(texts[0])]
            ids = [e.ids for e in encodings]
        else:
            ids = self.tm.tokenizer(list(texts), truncation=True, max_length=self.max_tokens + 1)["input_ids"]
        over = [i for i, x in enumerate(ids) if len(x) > self.max_tokens]
        if over and truncation == "error":
            raise InputTooLong(over, self.max_tokens)
        if over:
            cut = self.tm.tokenizer([texts[i] for i in over], truncation=True, max_length=self.max_tokens)["input_ids"]
            for i, x in zip(over, cut):
                ids[i] = x
        return Encoded(self.items(texts, [list(x) for x in ids], set(over), **options), over)

    def tokenize(self, texts: list[str], **options: Any) -> list[Any]:
        return self.encode(texts, **options).items

    def items(self, texts: list[str], ids: list[list[int]], truncated: set[int], **options: Any) -> list[Any]:
        """What travels through a batcher; its ``len`` is its cost in tokens. Here the token ids themselves."""
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
    def run(self, module: Any, items: list[Any]) -> list[Any]:
        """One output per item, in order: pad the batch and run any variant's module on it."""
        return list(module(**self.collate(items)).float().unbind(0))

    def work(self, module: Any, count: int, **options: Any) -> int | None:
        """The most model steps ``count`` inputs with these options may take (a compute budget is checked
        against it before anything runs), or None where the work per input is one bounded forward."""
        return None

    # -- answering -------------------------------------------------------------------------------
    def result(self, index: int, output: Any, **options: Any) -> dict[str, Any]:
        """One input's answer as plain data."""
        raise NotImplementedError

    def results(self, outputs: list[Any], **options: Any) -> list[dict[str, Any]]:
        return [self.result(i, o, **options) for i, o in enumerate(outputs)]


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


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: a module of this package that defines a task registers it by name."""
    TASKS[cls.name] = cls
    return cls
