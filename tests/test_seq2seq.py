"""Seq2seq models go through the same strategies; fidelity is identical outputs and chrF.

No seq2seq checkpoint ships in any package here, so the test builds a tiny Marian model from a
config and a word-level tokenizer made on the spot, and teaches it to copy its input (a couple
of hundred steps on CPU), so that its outputs are real text that quantization can disturb.
"""

from __future__ import annotations

import pytest
import torch

from quantization.fidelity import fidelity
from quantization.models import load_task_model
from quantization.texts import eval_texts
from quantization.pipeline import quantize_model
from quantization.tasks import get_task
from quantization.report import build_report


def _build_copy_model(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    sentences = [t.lower() for t in eval_texts()[:120] if len(t.split()) <= 10]
    words = sorted({w for t in sentences for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = MarianConfig(vocab_size=len(vocab), d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0, forced_eos_token_id=1)
    torch.manual_seed(0)
    model = MarianMTModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(300):
        batch = [sentences[(step * 16 + i) % len(sentences)] for i in range(16)]
        enc = tokenizer(batch, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-marian")
    _build_copy_model(directory)
    tm = load_task_model(str(directory), task="translate")
    texts = [t.lower() for t in eval_texts()[:120] if len(t.split()) <= 10][:40]
    return tm, texts, tm.run(None, texts)


def test_the_tiny_model_really_translates_its_input(copier):
    tm, texts, ref = copier
    assert tm.task == "translate" and tm.info["architecture"] == "MarianMTModel"
    copied = fidelity("translate", texts, ref)  # FP32 output against its own input: the task it learned
    assert copied["chrf"] > 50


def test_int8_keeps_seq2seq_outputs_and_the_report_measures_it(copier):
    tm, texts, ref = copier
    qm = quantize_model(tm, "dynamic-int8", calibration=texts[:16])
    assert any("decoder" in name for name in qm.layers) and any("encoder" in name for name in qm.layers)
    rep = build_report(tm, qm, texts, reference=ref)
    assert rep["fidelity"]["identical"] >= 0.8 and rep["fidelity"]["chrf"] >= 90, rep["fidelity"]
    assert rep["storage"]["linear_ratio"] <= 0.30


def test_fidelity_discriminates_a_crude_variant(copier):
    tm, texts, ref = copier
    crude = quantize_model(tm, "weight-sharing", {"bits": 1})
    good = quantize_model(tm, "weight-only-int8", {"group_size": 32})
    f_crude = fidelity("translate", ref, tm.run(crude.module, texts))
    f_good = fidelity("translate", ref, tm.run(good.module, texts))
    assert f_good["chrf"] > f_crude["chrf"] and f_good["identical"] >= f_crude["identical"]


def test_a_transformers_model_translates_through_the_service_task_code(copier):

    tm, texts, ref = copier
    adapter = get_task("translate")(tm, max_tokens=64)
    items = adapter.tokenize(texts[:8])
    assert [t.text for t in adapter.run(tm.module, items)] == ref[:8]  # the same outputs as the library's run
    qm = quantize_model(tm, "dynamic-int8", calibration=texts[:16])
    assert adapter.compare_outputs(adapter.run(tm.module, items), adapter.run(qm.module, items))["chrf"] >= 80
    capped = adapter.run(tm.module, adapter.tokenize(texts[:8], beam_size=2, max_new_tokens=3))
    assert all(0 < t.generated_tokens <= 3 for t in capped)
