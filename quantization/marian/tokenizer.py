"""SentencePiece tokenization for Marian models, with the small part of the transformers
tokenizer interface that :class:`~quantization.models.TaskModel` and the service use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class SentencePieceTokenizer:
    """Source: pieces then ``</s>``; padding with ``</s>`` (the attention mask marks it)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = str(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.eos_token_id = self.sp.piece_to_id("</s>")
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.eos_token_id
        self.vocab_size = self.sp.get_piece_size()

    def __deepcopy__(self, memo: dict) -> "SentencePieceTokenizer":
        return self  # immutable and not picklable: variants share it

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = self.sp.encode(text)
        if max_length is not None:
            ids = ids[: max(0, max_length - 1)]
        return ids + [self.eos_token_id]

    def __call__(self, texts: list[str] | str, padding: bool = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> dict[str, Any]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.encode(t, max_length if truncation else None) for t in texts]
        if not padding and return_tensors is None:
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        longest = max((len(i) for i in ids), default=0)
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.sp.decode(ids)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]
