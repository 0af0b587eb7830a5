"""``python -m quantization``: quantize a model, report what it cost, inspect a saved artifact.

Examples:
    python -m quantization strategies
    python -m quantization report --model minilm --strategy dynamic-int8 --strategy static-int8
    python -m quantization quantize --model intent --strategy static-int8 --out artifacts/intent-int8
    python -m quantization quantize --model minilm --strategy weight-only-int4 -p group_size=64 --out a/
    python -m quantization inspect artifacts/intent-int8 --verify intent
    python -m quantization data                  # fetch the labelled movie-review snippets (pip sdist)
    python -m quantization finetune              # MiniLM + 2-class head -> models/sentiment
    python -m quantization finetune --qat        # QAT of that model -> models/sentiment/variants/qat-int8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .errors import QuantizationError
from .tasks import get_task, task_names

MODEL_HELP = ("model source: a built-in (minilm = all-MiniLM-L6-v2 embedder, intent = intent classifier, "
              "sentiment = the model `finetune` trains), "
              "a local model directory, or a Hugging Face hub id (needs network)")


def _params(pairs: list[str], keep: list[str], auto_target: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QuantizationError(f"parameter {pair!r} is not KEY=VALUE (e.g. -p group_size=64)")
        params[key.strip()] = yaml.safe_load(value)
    if keep:
        params["keep"] = keep
    if auto_target is not None:
        params["auto_target"] = auto_target
    return params


def _texts(path: str | None, default: list[str]) -> list[str]:
    if path is None:
        return default
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


class ProgressBars:
    """One tqdm bar per stage of a long step (layers quantized, sensitivity measured, ...)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"  {stage}", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]


def _load(args: argparse.Namespace):
    from .models import load_task_model

    print(f"loading {args.model} ...", file=sys.stderr)
    return load_task_model(args.model, args.task)


def cmd_strategies(args: argparse.Namespace) -> int:
    from .strategies import get_strategy, strategy_names

    for name in strategy_names():
        cls = get_strategy(name)
        print(f"{name}\n    {cls.summary}{' (needs calibration texts)' if cls.needs_calibration else ''}")
        for field, info in cls.Params.model_fields.items():
            default = info.get_default(call_default_factory=True)
            print(f"    -p {field}={json.dumps(default)}  {info.description or ''}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .artifacts import save_artifact
    from .texts import calibration_texts
    from .pipeline import quantize_model

    tm = _load(args)
    params = _params(args.param, args.keep, args.auto_target)
    calib = _texts(args.calibration, calibration_texts())
    print(f"quantizing {tm.name} with {args.strategy} ...", file=sys.stderr)
    qm = quantize_model(tm, args.strategy, params, calibration=calib, progress=ProgressBars())
    manifest = save_artifact(tm, qm, args.out)
    print(f"{args.strategy}: {len(qm.layers)} layers quantized, {len(qm.kept)} kept, {qm.seconds:.2f} s -> {manifest.parent}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .artifacts import load_artifact
    from .texts import calibration_texts, eval_texts
    from .pipeline import quantize_model
    from .report import build_report, format_layer_table, format_summary_table

    tm = _load(args)
    texts = _texts(args.texts, eval_texts())
    calib = _texts(args.calibration, calibration_texts())
    params = _params(args.param, args.keep, args.auto_target)
    reference = tm.run(None, texts)
    reports = []
    jobs = [("artifact", a) for a in args.artifact] + [("strategy", s) for s in args.strategy]
    if not jobs:
        raise QuantizationError("say what to report on: --strategy NAME (repeatable) or --artifact DIR")
    for kind, what in tqdm(jobs, desc="variants", file=sys.stderr, disable=len(jobs) < 2):
        if kind == "artifact":
            qm = load_artifact(what, tm)
        else:
            qm = quantize_model(tm, what, params, calibration=calib, progress=ProgressBars())
        reports.append(build_report(tm, qm, texts, reference=reference, include_layers=not args.no_layers))
    if args.json:
        text = json.dumps(reports if len(reports) > 1 else reports[0], indent=2, default=str)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(f"\n{tm.name} ({tm.task}), fidelity on {len(texts)} texts\n")
    print(format_summary_table(reports))
    if not args.no_layers:
        for r in reports:
            if r["layers"]:
                print(f"\n{r['strategy']['strategy']}: the {args.layers} layers with the lowest output SQNR\n")
                print(format_layer_table(r, args.layers))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .artifacts import read_manifest, verify_artifact

    if args.verify:
        from .models import load_task_model

        verify_artifact(args.directory, load_task_model(args.verify, args.task))
        print("verified: files, versions and source model match", file=sys.stderr)
    m = read_manifest(args.directory)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    src = m["source"]
    print(f"strategy  {m['strategy']}  ({m['runtime']})\nparams    {json.dumps(m['params'])}")
    print(f"source    {src['name']} ({src['task']}) from {src['source']}\n          sha256 {src['sha256']}")
    print(f"versions  {', '.join(f'{k} {v}' for k, v in m['versions'].items())}\ncreated   {m.get('created')}")
    for name, meta in m["files"].items():
        print(f"file      {name}: {meta['bytes'] / 1e6:.2f} MB")
    layers = m.get("record", {}).get("layers", {})
    print(f"layers    {len(layers)} quantized, {len(m.get('kept', []))} kept in FP32: {', '.join(m.get('kept', [])) or '-'}")
    for name, rec in layers.items():
        print(f"  {name}: {rec.get('kind')}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .datasets import LABEL_THRESHOLD, SPLITS, fetch_movie_reviews, movie_reviews

    print("downloading the vadersentiment 3.3.2 sdist with pip ...", file=sys.stderr)
    path = fetch_movie_reviews(Path(args.out) if args.out else None)
    counts = ", ".join(f"{s} {len(movie_reviews(s, path))}" for s in SPLITS)
    print(f"{path}: snippets with |score| >= {LABEL_THRESHOLD}: {counts}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from .finetune import TrainConfig, finetune_sentiment, qat_sentiment
    from .models import sentiment_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else sentiment_model_dir()
    cfg = TrainConfig(epochs=args.epochs or (1 if args.qat else 2), batch_size=args.batch_size, seed=args.seed,
                      max_train=args.max_train,
                      lr=args.lr if args.lr is not None else (1e-5 if args.qat else 5e-5),
                      head_lr=1e-4 if args.qat else 1e-3,
                      label_weight=args.label_weight if args.label_weight is not None else (0.0 if args.qat else 1.0))
    if args.qat:
        print(f"quantization-aware training of {out} ...", file=sys.stderr)
        record = qat_sentiment(out, cfg, ProgressBars())
        where = out / "variants" / "qat-int8"
    else:
        print(f"fine-tuning MiniLM on the movie-review snippets -> {out} ...", file=sys.stderr)
        record = finetune_sentiment(out, cfg, ProgressBars())
        where = out
    t = record["training"]
    agreement = f", agreement with FP32 {t['best_dev_agreement']:.4f}" if t.get("best_dev_agreement") else ""
    print(f"kept step {t['best_step']} of {t['steps']} by {t['selected_by']}: dev accuracy "
          f"{t['best_dev_accuracy']:.4f}{agreement} "
          f"({'stopped early, ' if t['stopped_early'] else ''}{t['seconds']:.0f} s) -> {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quantization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    task_choices = [n for t in map(get_task, task_names()) for n in (t.name, *t.aliases)]

    sub.add_parser("strategies", help="list every strategy with its parameters and defaults")

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", "-m", required=True, help=MODEL_HELP)
        p.add_argument("--task", choices=task_choices, help="task of a non-built-in model")

    def strategy_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="strategy parameter (repeatable); `strategies` lists them")
        p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                       help="keep matching layers in FP32 (glob on layer names, repeatable)")
        p.add_argument("--auto-target", type=float, help="keep the most sensitive layers in FP32 until the "
                       "task's fidelity (mean cosine / top-1 agreement) reaches this value")
        p.add_argument("--calibration", metavar="FILE", help="calibration texts, one per line (default: built-in 128)")

    q = sub.add_parser("quantize", help="quantize a model and save the variant as an artifact directory")
    model_args(q)
    q.add_argument("--strategy", "-s", required=True, help="strategy name (see `strategies`)")
    strategy_args(q)
    q.add_argument("--out", "-o", required=True, help="directory to write the artifact to")

    r = sub.add_parser("report", help="measure storage, per-layer error, time and fidelity of strategies")
    model_args(r)
    r.add_argument("--strategy", "-s", action="append", default=[], help="strategy to report on (repeatable)")
    r.add_argument("--artifact", action="append", default=[], help="saved artifact to report on (repeatable)")
    strategy_args(r)
    r.add_argument("--texts", metavar="FILE", help="fidelity texts, one per line (default: built-in 240)")
    r.add_argument("--json", metavar="FILE", help="also write the full report as JSON ('-' for stdout only)")
    r.add_argument("--layers", type=int, default=8, help="how many worst layers to show (default 8)")
    r.add_argument("--no-layers", action="store_true", help="skip the per-layer error measurement")

    i = sub.add_parser("inspect", help="show a saved artifact's manifest")
    i.add_argument("directory")
    i.add_argument("--verify", metavar="MODEL", help="also check files, versions and that MODEL is its source")
    i.add_argument("--task", choices=task_choices, help="task of a non-built-in --verify model")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    d = sub.add_parser("data", help="fetch and split the labelled movie-review snippets (vadersentiment sdist)")
    d.add_argument("--out", help="file to write (default: the packaged quantization/data/movie_reviews.tsv.gz)")

    f = sub.add_parser("finetune", help="fine-tune MiniLM + a 2-class head on the movie reviews (or, with --qat, "
                                        "quantization-aware training of that model)")
    f.add_argument("--out", help="model directory (default: models/sentiment, the built-in source `sentiment`)")
    f.add_argument("--qat", action="store_true", help="fine-tune the model in --out with fake int8 and save the "
                                                      "converted int8 model as its qat-int8 variant")
    f.add_argument("--epochs", type=int, help="passes over the training split (default 2; 1 with --qat)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, help="encoder learning rate (default 5e-5; 1e-5 with --qat)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--label-weight", type=float,
                   help="weight of the labels' loss (default 1; 0 with --qat: QAT distils the FP32 model only, "
                        "since its aim is the FP32 model's accuracy, not a new fit to the training labels)")
    f.add_argument("--max-train", type=int, help="train on this many snippets only (quick runs)")
    f.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"strategies": cmd_strategies, "quantize": cmd_quantize, "report": cmd_report,
               "inspect": cmd_inspect, "data": cmd_data, "finetune": cmd_finetune}[args.command]
    try:
        return handler(args)
    except (QuantizationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
