"""The built-in texts, shipped in ``quantization/data``: calibration, evaluation, translation and hard
sentences, and the start-up probe set made of them. Plain data, no torch: anything may import it."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def _data_file(name: str) -> tuple[str, ...]:
    text = resources.files("quantization").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def calibration_texts() -> list[str]:
    """128 varied English sentences used to calibrate activation ranges."""
    return list(_data_file("calibration_sentences.txt"))


def eval_texts() -> list[str]:
    """240 varied English sentences, disjoint from the calibration set, used to measure fidelity."""
    return list(_data_file("eval_sentences.txt"))


def translation_texts(language: str) -> list[str]:
    """200 varied sentences written in ``language`` (``en`` or ``pt``) for translation fidelity."""
    return list(_data_file(f"translate_{language}.txt"))


def hard_texts(language: str = "en") -> list[str]:
    """32 sentences unlike the calibration texts (``en`` or ``pt``): formal letters, numbers, dates, addresses,
    amounts, codes, and long sentences of 40-70 words."""
    return list(_data_file(f"hard_{language}.txt"))


def probe_texts(language: str = "en", n: int | None = 64) -> list[str]:
    """The start-up probe set: the hard sentences first, then ordinary ones (evaluation, or translation texts in
    ``language``), ``n`` in all (at most half of them hard); what a variant's fidelity bound is checked on.
    ``n=None``: every hard sentence, then every ordinary one (the pool a caller takes its own count from)."""
    ordinary = eval_texts() if language == "en" else translation_texts(language)
    hard = hard_texts(language) if language in ("en", "pt") else []
    return hard + ordinary if n is None else (hard[: n // 2] + ordinary)[:n]


def calibration_texts_for(language: str | None) -> list[str]:
    """Calibration sentences in ``language``: the English set, or 48 Portuguese ones."""
    return list(_data_file("calibration_sentences_pt.txt")) if language == "pt" else calibration_texts()
