"""Greedy and beam-search decoding for :class:`~.model.TinyTransformer`, with a per-sentence shortlist.

Each sentence may only produce the target words its own shortlist allows (as when Marian
translates it alone), whatever else is in the batch: a step scores the union of the batch's
shortlists and masks, per row, the words outside that row's list. ``<unk>`` is never produced
(Marian's default). Output length is bounded per sentence by ``max_length_factor`` x its source
length (in tokens, with the end-of-sentence token) and by ``max_new_tokens``.
Finished sentences leave the batch, so long stragglers do not drag short sentences' rows along.
Every step passes a :func:`~quantization.steps.checkpoint`, where the caller may step in or stop.
"""

from __future__ import annotations

import math

import torch

from ..steps import checkpoint
from .model import DecoderState, TinyTransformer

NEG_INF = float("-inf")


def length_limits(attention_mask: torch.Tensor, max_length_factor: float, max_new_tokens: int) -> list[int]:
    lengths = attention_mask.sum(1).tolist()
    return [max(1, min(max_new_tokens, int(max_length_factor * n))) for n in lengths]


def _candidates(allowed: torch.Tensor, unk_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted vocabulary ids any row may use, per-row additive mask over them)."""
    allowed = allowed.clone()
    allowed[:, unk_id] = False
    vocab = allowed.any(0).nonzero().squeeze(1)
    mask = torch.zeros(allowed.shape[0], vocab.numel())
    mask.masked_fill_(~allowed[:, vocab], NEG_INF)
    return vocab, mask


@torch.inference_mode()
def greedy(model: TinyTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, allowed: torch.Tensor,
           limits: list[int], eos_id: int, unk_id: int) -> list[list[int]]:
    """``allowed``: boolean [B, vocab] (all True without a shortlist). Token ids without EOS."""
    state = model.encode(input_ids, attention_mask)
    vocab, mask = _candidates(allowed, unk_id)
    output = model.output_layer(vocab)
    batch = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch)  # which sentence each live row is
    previous = None
    limit = torch.tensor(limits)
    for t in range(max(limits)):
        checkpoint()
        scores = model.logits(model.step(previous, state), layer=output) + mask[rows]
        words = vocab[scores.argmax(-1)]
        done = (words == eos_id) | (limit[rows] <= t + 1)
        for r, w in zip(rows.tolist(), words.tolist()):
            if w != eos_id:
                out[r].append(w)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            rows, words, state = rows[keep], words[keep], state.select(keep)
        previous = words
    return out


@torch.inference_mode()
def beam_search(model: TinyTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                allowed: torch.Tensor, limits: list[int], eos_id: int, unk_id: int, beam_size: int,
                normalize: float = 1.0) -> list[list[int]]:
    """Beam search as Marian does it: a hypothesis that ends shrinks its sentence's beam by one;
    the best finished hypothesis by ``log p / length ** normalize`` (length with EOS) wins."""
    if beam_size == 1:
        return greedy(model, input_ids, attention_mask, allowed, limits, eos_id, unk_id)
    batch = input_ids.shape[0]
    vocab, mask = _candidates(allowed, unk_id)
    output = model.output_layer(vocab)
    base = model.encode(input_ids, attention_mask)
    # live hypotheses: (sentence, tokens, log-prob) with one state row each
    hyps: list[tuple[int, list[int], float]] = [(b, [], 0.0) for b in range(batch)]
    state: DecoderState = base
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    previous = None
    for t in range(max(limits)):
        checkpoint()
        logp = (model.logits(model.step(previous, state), layer=output) + mask[[h[0] for h in hyps]]).log_softmax(-1)
        logp = logp.nan_to_num(nan=NEG_INF)
        totals = logp + torch.tensor([h[2] for h in hyps])[:, None]
        next_hyps, next_rows, next_words = [], [], []
        by_sentence: dict[int, list[int]] = {}
        for i, h in enumerate(hyps):
            by_sentence.setdefault(h[0], []).append(i)
        for b, members in by_sentence.items():
            width = beam_size - len(finished[b])
            if width <= 0:
                continue
            flat = totals[members].reshape(-1)
            top = flat.topk(min(width, flat.numel()))
            for score, idx in zip(top.values.tolist(), top.indices.tolist()):
                if score == NEG_INF:
                    continue
                src, word = members[idx // vocab.numel()], int(vocab[idx % vocab.numel()])
                tokens = hyps[src][1]
                last = t + 1 >= limits[b]
                if word == eos_id or last:
                    kept = tokens if word == eos_id else tokens + [word]
                    length = len(tokens) + 1
                    finished[b].append((score / math.pow(length, normalize), kept))
                else:
                    next_hyps.append((b, tokens + [word], score))
                    next_rows.append(src)
                    next_words.append(word)
        if not next_hyps:
            break
        hyps = next_hyps
        state = state.select(torch.tensor(next_rows))
        previous = torch.tensor(next_words)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
