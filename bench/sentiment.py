"""Accuracy of every route to a smaller sentiment model, on the held-out test split.

    .venv/bin/python -m quantization finetune          # once: models/sentiment (FP32)
    .venv/bin/python -m quantization finetune --qat    # once: its qat-int8 variant
    .venv/bin/python bench/sentiment.py                # rewrites its section of bench/RESULTS.md
    .venv/bin/python bench/sentiment.py --quick        # 200 test snippets, few rounds; prints only

The baseline to beat is a logistic regression on frozen (not fine-tuned) MiniLM embeddings,
trained on the same training split. Throughput is measured on batches of 32 real test snippets
in interleaved rounds (every variant once per round) and given as a ratio to FP32 in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine_summary, publish  # noqa: E402
from quantization.artifacts import load_artifact  # noqa: E402
from quantization.datasets import CITATION, LABEL_THRESHOLD, movie_reviews  # noqa: E402
from quantization.finetune import predict  # noqa: E402
from quantization.models import load_task_model, sentiment_model_dir  # noqa: E402
from quantization.pipeline import quantize_model  # noqa: E402
from quantization.report import serialized_bytes  # noqa: E402

PTQ = [("dynamic-int8", {}), ("static-int8", {}), ("weight-only-int4", {}), ("weight-sharing", {"bits": 4})]


def frozen_encoder_baseline(train, test) -> float:
    """Logistic regression on the normalised embeddings of the original MiniLM."""
    from sklearn.linear_model import LogisticRegression

    mini = load_task_model("minilm")

    def embed(examples):
        texts = [e.text for e in examples]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = mini.run(None, [texts[i] for i in order], 64)
        emb = torch.empty_like(out)
        emb[torch.tensor(order)] = out
        return torch.nn.functional.normalize(emb, dim=-1).numpy()

    clf = LogisticRegression(max_iter=2000, C=1.0).fit(embed(train), [e.label for e in train])
    return float((clf.predict(embed(test)) == [e.label for e in test]).mean())


def time_rounds(tm, variants: dict[str, object], batches: list[dict], rounds: int) -> dict[str, float]:
    """Seconds per batch of 32 snippets, median over interleaved rounds."""
    samples: dict[str, list[float]] = {n: [] for n in variants}
    with torch.inference_mode():
        for module in variants.values():
            module(**batches[0])  # warm-up
        for r in range(rounds):
            for name, module in variants.items():
                batch = batches[r % len(batches)]
                t = time.perf_counter()
                module(**batch)
                samples[name].append(time.perf_counter() - t)
    return {n: statistics.median(s) for n, s in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    train, test = movie_reviews("train"), movie_reviews("test")
    if args.quick:
        test = test[:200]
    texts, labels = [e.text for e in test], torch.tensor([e.label for e in test])

    tm = load_task_model("sentiment")
    record = json.loads((sentiment_model_dir() / "classifier.json").read_text())
    variants: dict[str, object] = {"fp32": tm.module}
    notes: dict[str, dict] = {"fp32": {"seconds": 0.0}}
    for name, params in PTQ:
        print(f"quantizing with {name} ...", file=sys.stderr)
        qm = quantize_model(tm, name, params)  # calibration: the model's own training snippets
        label = name + (f" ({params['bits']} bits)" if params else "")
        variants[label], notes[label] = qm.module, {"seconds": qm.seconds}
    if "qat-int8" not in tm.artifacts:
        raise SystemExit("no qat-int8 variant yet: run `python -m quantization finetune --qat` first")
    qat = load_artifact(tm.artifacts["qat-int8"], tm)
    variants["qat-int8"] = qat.module
    notes["qat-int8"] = {"seconds": qat.notes.get("quantization_seconds_at_build") or 0.0}

    rows, fp32_pred = [], None
    for name, module in variants.items():
        print(f"evaluating {name} ...", file=sys.stderr)
        pred = predict(tm, module, texts)
        fp32_pred = pred if fp32_pred is None else fp32_pred
        rows.append({"variant": name, "accuracy": float((pred == labels).float().mean()),
                     "agreement": float((pred == fp32_pred).float().mean()),
                     "bytes": serialized_bytes(module), "build_s": notes[name]["seconds"]})
    print("frozen-encoder logistic regression ...", file=sys.stderr)
    baseline = frozen_encoder_baseline(train, test)

    print("timing ...", file=sys.stderr)
    ordered = sorted(texts, key=len)
    batches = [tm.encode(ordered[i:i + 32]) for i in range(0, len(ordered) - 31, max(32, len(ordered) // 8))]
    times = time_rounds(tm, variants, batches, 8 if args.quick else 40)
    for r in rows:
        r["sentences_per_s"] = 32 / times[r["variant"]]
        r["throughput_x"] = times["fp32"] / times[r["variant"]]
        r["bytes_x"] = r["bytes"] / rows[0]["bytes"]
    result = {"date": started, "machine": machine_summary(), "load_average": load, "test_snippets": len(test),
              "train_snippets": len(train), "frozen_encoder_logreg": baseline, "rows": rows,
              "training": {"fp32": record.get("training"), "qat": qat.notes.get("training")},
              "command": "bench/sentiment.py" + (" --quick" if args.quick else "")}
    table = render(result)
    print(table)
    if not args.quick:
        publish("sentiment", result, table)
    return 0


def render(result: dict) -> str:
    fp32 = result["rows"][0]["accuracy"]
    ft, qt = result["training"]["fp32"] or {}, result["training"]["qat"] or {}
    lines = [
        "## Sentiment: fine-tuned MiniLM and its quantized variants",
        "",
        f"Measured {result['date']} on {result['machine']} (load average {result['load_average']}) with "
        f"`{result['command']}`. Accuracy on the {result['test_snippets']} held-out test snippets of the "
        f"movie-review data (|score| >= {LABEL_THRESHOLD}; {CITATION}). Throughput: batches of 32 test snippets, "
        "median of interleaved rounds, as a ratio to FP32 in the same run.",
        "",
        "| variant | test accuracy | vs FP32 (points) | same label as FP32 | stored | x FP32 | throughput x FP32 | "
        "sentences/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| frozen MiniLM + logistic regression (baseline) | {100 * result['frozen_encoder_logreg']:.1f}% | "
        f"{100 * (result['frozen_encoder_logreg'] - fp32):+.1f} | - | - | - | - | - |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - fp32):+.1f} | "
                     f"{100 * r['agreement']:.1f}% | "
                     f"{r['bytes'] / 1e6:.1f} MB | {r['bytes_x']:.3f} | **{r['throughput_x']:.2f}** | "
                     f"{r['sentences_per_s']:.0f} |")
    if ft:
        lines += ["", f"Training (`python -m quantization finetune`): {ft.get('steps')} steps of batch "
                      f"{ft.get('config', {}).get('batch_size')} on {result['train_snippets']} snippets, best dev "
                      f"accuracy {100 * ft.get('best_dev_accuracy', 0):.1f}% at step {ft.get('best_step')}, "
                      f"{ft.get('seconds', 0) / 60:.1f} min."]
    if qt:
        agreement = (f", agreeing with FP32 on {100 * qt['best_dev_agreement']:.1f}% of dev"
                     if qt.get("best_dev_agreement") is not None else "")
        lines += [f"QAT (`python -m quantization finetune --qat`): {qt.get('steps')} steps from static-int8, kept "
                  f"step {qt.get('best_step')} by {qt.get('selected_by', 'dev accuracy')} (dev accuracy "
                  f"{100 * qt.get('best_dev_accuracy', 0):.1f}%{agreement}), {qt.get('seconds', 0) / 60:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
