"""POST /v1/embed, /v1/embeddings (OpenAI-compatible), /v1/classify, /v1/compare."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter

from ..errors import InvalidInput, UnknownModel
from ..schemas import (ClassifyRequest, ClassifyResponse, CompareRequest, CompareResponse, EmbedRequest,
                       EmbedResponse, OpenAIEmbeddingsRequest, OpenAIEmbeddingsResponse, error_responses)
from ..serving import Serving
from .deps import ServingDep
from .endpoint import inference_endpoint

router = APIRouter(prefix="/v1", responses=error_responses(400, 404, 413, 415, 422, 429, 504))


@inference_endpoint(router, "/embed", EmbedRequest, EmbedResponse, summary="Sentence embeddings from one variant")
async def embed(serving: Serving, req: EmbedRequest, x_variant: str | None,
                       x_request_key: str | None) -> tuple[EmbedResponse, str]:
    served, variant = serving.resolve(req.model, "embed", req.variant or x_variant, x_request_key)
    out = await serving.infer(served, variant, req.inputs, "embed", truncation=req.truncation)
    return EmbedResponse(model=served.name, variant=variant.name, dimension=int(out.outputs[0].numel()),
                         results=served.task.results(out.outputs, normalize=req.normalize),
                         usage={"input_tokens": out.tokens, "truncated": out.truncated},
                         queue_seconds=out.batch.queue_seconds,
                         inference_seconds=out.batch.inference_seconds), variant.name


@inference_endpoint(router, "/embeddings", OpenAIEmbeddingsRequest, OpenAIEmbeddingsResponse,
                    summary="OpenAI-compatible embeddings (the official openai client works unchanged)")
async def embeddings(serving: Serving, req: OpenAIEmbeddingsRequest, x_variant: str | None,
                            x_request_key: str | None) -> tuple[OpenAIEmbeddingsResponse, str]:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    served, variant = serving.resolve(req.model, "embed", x_variant, x_request_key)
    out = await serving.infer(served, variant, texts, "embeddings", field="input")
    dim = int(out.outputs[0].numel())
    if req.dimensions is not None and req.dimensions != dim:
        raise InvalidInput(f"dimensions: model {served.name!r} has {dim} dimensions and cannot shorten them; "
                           f"omit dimensions or pass {dim}")
    data = []
    for i, vec in enumerate(out.outputs):
        values = served.task.embedding(vec, normalize=True)
        if req.encoding_format == "base64":
            values = base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": values})
    return OpenAIEmbeddingsResponse(data=data, model=served.name,
                                    usage={"prompt_tokens": out.tokens, "total_tokens": out.tokens}), variant.name


@inference_endpoint(router, "/classify", ClassifyRequest, ClassifyResponse,
                    summary="Labels with probabilities from one variant")
async def classify(serving: Serving, req: ClassifyRequest, x_variant: str | None,
                          x_request_key: str | None) -> tuple[ClassifyResponse, str]:
    served, variant = serving.resolve(req.model, "classify", req.variant or x_variant, x_request_key)
    out = await serving.infer(served, variant, req.inputs, "classify", truncation=req.truncation)
    return ClassifyResponse(model=served.name, variant=variant.name,
                            results=served.task.results(out.outputs, top_k=req.top_k),
                            usage={"input_tokens": out.tokens, "truncated": out.truncated},
                            queue_seconds=out.batch.queue_seconds,
                            inference_seconds=out.batch.inference_seconds), variant.name


@router.post("/compare", response_model=CompareResponse,
             summary="The same inputs through every variant of a model, side by side with FP32 agreement")
async def compare(req: CompareRequest, serving: ServingDep) -> CompareResponse:
    configured = {m.name: m.task for m in serving.catalog.settings.models}
    if req.model not in configured:
        raise UnknownModel(f"no model named {req.model!r}; available: {', '.join(configured)}",
                           available=list(configured))
    task = configured[req.model]
    served, _ = serving.resolve(req.model, task, None, None)
    names = list(served.variants)
    runs = await asyncio.gather(*(serving.infer(served, served.variants[n], req.inputs, "compare", shadow=False,
                                                truncation=req.truncation) for n in names))
    by_name = dict(zip(names, runs))
    baseline = served.config.baseline
    reference = by_name[baseline].outputs if baseline else None
    variants = []
    for name, run in by_name.items():
        agreement = per_input = None
        if reference is not None:
            agreement = served.task.compare_outputs(reference, run.outputs)
            per_input = [served.task.agreement(r, o) for r, o in zip(reference, run.outputs)]
        variants.append({"variant": name, "strategy": served.variants[name].config.strategy,
                         "latency_seconds": run.batch.queue_seconds + run.batch.inference_seconds,
                         "queue_seconds": run.batch.queue_seconds, "inference_seconds": run.batch.inference_seconds,
                         "results": served.task.results(run.outputs, top_k=3),
                         "agreement": agreement, "per_input_agreement": per_input})
    return CompareResponse(model=served.name, task=task, baseline=baseline, variants=variants)
