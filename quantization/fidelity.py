"""Fidelity of a variant's outputs against the FP32 model's outputs, by task.

- embed: cosine similarity of each sentence embedding to its FP32 embedding (mean and min).
- classify: top-1 agreement with FP32, and the change in probability of FP32's top label
  (mean and max of |p_variant - p_fp32| for that label).
- seq2seq: share of identical outputs and chrF of the variant's outputs against FP32's.

Each task has one *primary* score in [0, 1] (mean cosine, top-1 agreement, chrF/100) that
fidelity targets are stated in, and a continuous *ranking* score that automatic mixed precision
uses to compare layers (top-1 agreement moves in whole flips, so it cannot rank small effects).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PRIMARY = {"embed": "mean_cosine", "classify": "top1_agreement", "seq2seq": "chrf"}


def embed_fidelity(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(reference.float(), output.float(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n": int(cos.numel())}


def classify_fidelity(reference_logits: torch.Tensor, output_logits: torch.Tensor) -> dict[str, float]:
    p_ref = reference_logits.float().softmax(-1)
    p_out = output_logits.float().softmax(-1)
    top = p_ref.argmax(-1)
    agree = (p_out.argmax(-1) == top).float()
    dprob = (p_out.gather(1, top[:, None]) - p_ref.gather(1, top[:, None])).abs().squeeze(1)
    return {"top1_agreement": float(agree.mean()), "mean_abs_dprob": float(dprob.mean()),
            "max_abs_dprob": float(dprob.max()), "n": int(top.numel())}


def seq2seq_fidelity(reference: list[str], output: list[str]) -> dict[str, float]:
    import sacrebleu

    same = sum(a == b for a, b in zip(reference, output))
    chrf = sacrebleu.corpus_chrf(list(output), [list(reference)]).score if reference else 0.0
    bad = sum(degenerate(o, r) for r, o in zip(reference, output))
    return {"identical": same / max(len(reference), 1), "chrf": float(chrf),
            "degenerate": bad / max(len(reference), 1), "n": len(reference)}


def sentence_chrf(reference: str, output: str) -> float:
    """One translation's chrF against its reference, in [0, 1] (per-input agreement, e.g. for shadow traffic)."""
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


def fidelity(task: str, reference: Any, output: Any) -> dict[str, float]:
    if task == "embed":
        return embed_fidelity(reference, output)
    if task == "classify":
        return classify_fidelity(reference, output)
    if task == "seq2seq":
        return seq2seq_fidelity(reference, output)
    raise ValueError(f"unknown task {task!r}")


# metrics where less is better: a bound on them is an upper bound
UPPER_BOUND_METRICS = frozenset({"degenerate", "mean_abs_dprob", "max_abs_dprob"})


def bound_problems(bound: dict[str, float], measured: dict[str, float]) -> list[str]:
    """Each bound that ``measured`` misses, as 'metric value < bound' (or '>' for an upper bound)."""
    out = []
    for metric, limit in bound.items():
        value = measured.get(metric)
        if value is None:
            continue
        if metric in UPPER_BOUND_METRICS and value > limit:
            out.append(f"{metric} {value:.4g} > {limit:g}")
        elif metric not in UPPER_BOUND_METRICS and value < limit:
            out.append(f"{metric} {value:.4g} < {limit:g}")
    return out


def primary_score(task: str, metrics: dict[str, float]) -> float:
    value = metrics[PRIMARY[task]]
    return value / 100.0 if task == "seq2seq" else value


def ranking_score(task: str, metrics: dict[str, float]) -> float:
    """Higher is more faithful; continuous even where the primary score is a count of flips."""
    if task == "classify":
        return 1.0 - metrics["mean_abs_dprob"]
    return primary_score(task, metrics)
