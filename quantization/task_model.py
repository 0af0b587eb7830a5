"""The record of a loaded model: :class:`TaskModel`, an FP32 ``nn.Module`` plus what it takes to run it on
text (its tokenizer, task, source and a hash of its weights, so a saved artifact can be matched to its
source). :meth:`TaskModel.run` runs *any* variant of the module (the FP32 original or a quantized copy) on a
list of texts the way its task (:mod:`quantization.tasks`) runs it, so fidelity is always measured by the same
code path. Loaders (:mod:`quantization.models`, :mod:`quantization.marian`) build it; nothing here knows a
source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .tasks import get_task

DEFAULT_MAX_LENGTH = 256


@dataclass
class TaskModel:
    name: str
    task: str  # a registered task's name (quantization.tasks)
    module: nn.Module
    tokenizer: Any
    source: str
    source_hash: str
    labels: list[str] | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    info: dict[str, Any] = field(default_factory=dict)
    # texts in the model's own input language, where the built-in English sets do not fit
    calibration: list[str] | None = None
    probes: list[str] | None = None
    # variants that only training can make, saved with the model: strategy -> artifact directory
    artifacts: dict[str, Path] = field(default_factory=dict)
    # strategies whose variant of this model must come from training (and so from ``artifacts``)
    trained_strategies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.task = get_task(self.task).name  # one name per task, whatever older name a loader or file gave

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=max_length or self.max_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in enc.items() if k in keep}

    def batches(self, texts: list[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        """Tokenised batches of ``batch_size`` texts, in order, each padded to its longest text."""
        return [self.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]

    # -- outputs --------------------------------------------------------------------------------
    def run(self, module: Callable[..., Any] | None, texts: list[str], batch_size: int = 32) -> Any:
        """Raw outputs of ``module`` (default: the FP32 module) for ``texts``, as the task defines them.

        embed -> unnormalised sentence embeddings [n, d]; classify -> logits [n, classes];
        translate -> the generated texts (a list of strings).
        """
        return get_task(self.task).run_texts(self, module if module is not None else self.module, texts, batch_size)

    def calibration_batches(self, texts: list[str], batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
        return self.batches(texts, batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "source": self.source,
                "source_hash": self.source_hash, **self.info}


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
