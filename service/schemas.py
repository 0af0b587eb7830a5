"""Request and response bodies (pydantic): what the OpenAPI docs at /docs show.

Every response that answers a list of inputs carries one entry per input, in input order, under
``results``, each with its ``index``; the same shape for embed, classify and compare.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from quantization.tasks.translate import Translate

from .config import COMPARE_MAX_INPUTS, MAX_CHARS_CEILING, MAX_INPUTS_CEILING


# The schema holds the hard ceilings; the configured limits (GET /v1/models, "limits") are checked per request.
Text = Annotated[str, StringConstraints(max_length=MAX_CHARS_CEILING)]
Inputs = Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS_CEILING,
                                     description="1 or more texts, within the configured limits.max_inputs and "
                                                 "limits.max_chars (default 256 and 20000; see GET /v1/models)")]
Truncation = Annotated[Literal["truncate", "error"] | None, Field(
    None, description="inputs over the model's max_input_tokens: cut them (truncate) or refuse the request (error); "
                      "default: the server's limits.truncation")]


def _integral(value: Any) -> Any:
    """JSON Schema's "integer" includes 3.0: take it as 3 (strict mode still refuses 3.5, "3" and true).
    Applied with field_validator(mode="before"), so the fields' schemas keep their bounds."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class _Request(BaseModel):
    # strict: the types the schema states, no coercion (0 is not false, "3" is not 3); strict strings also
    # refuse lone UTF-16 surrogates ("\ud800" in JSON), which no tokenizer can take
    model_config = ConfigDict(extra="forbid", strict=True)


class Usage(BaseModel):
    input_tokens: int = Field(description="tokens the model read, after truncation")
    truncated: list[int] = Field(default_factory=list, description="indices of inputs cut to max_input_tokens")


class Timing(BaseModel):
    queue_seconds: float = Field(description="time waiting for a batch")
    inference_seconds: float = Field(description="time in the batched model calls that carried this request")


class EmbedRequest(_Request):
    model: str | None = Field(None, description="embedding model (default: the first configured)")
    inputs: Inputs
    variant: str | None = Field(None, description="pin a variant (also: X-Variant header)")
    truncation: Truncation
    normalize: bool = Field(True, description="L2-normalise the vectors")


class EmbedResult(BaseModel):
    index: int
    embedding: list[float]


class EmbedResponse(Timing):
    model: str
    variant: str
    dimension: int
    results: list[EmbedResult]
    usage: Usage


class ClassifyRequest(_Request):
    model: str | None = Field(None, description="classification model (default: the first configured)")
    inputs: Inputs
    top_k: int = Field(1, ge=1, le=1000, description="labels to return per input, best first")
    _integral_top_k = field_validator("top_k", mode="before")(_integral)
    variant: str | None = Field(None, description="pin a variant (also: X-Variant header)")
    truncation: Truncation


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassifyResponse(Timing):
    model: str
    variant: str
    results: list[ClassifyResult]
    usage: Usage


class CompareRequest(_Request):
    model: str = Field(description="the model whose variants to compare")
    inputs: Annotated[list[Text], Field(min_length=1, max_length=COMPARE_MAX_INPUTS,
                                        description=f"1 to {COMPARE_MAX_INPUTS} texts, within the model's limits")]
    truncation: Truncation


class VariantComparison(Timing):
    variant: str
    strategy: str
    latency_seconds: float = Field(description="queue + inference time of this variant for these inputs")
    results: list[dict[str, Any]] = Field(description="per input: embedding or labels, as /v1/embed or /v1/classify")
    agreement: dict[str, float] | None = Field(
        description="against the FP32 baseline: mean/min cosine (embed) or top-1 agreement and mean |dp| (classify)")
    per_input_agreement: list[float] | None = Field(description="cosine or 1/0 top-1 match, per input")


class CompareResponse(BaseModel):
    model: str
    task: str
    baseline: str | None
    variants: list[VariantComparison]


class OpenAIEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # clients send fields (user, ...) that change nothing here

    input: Text | Inputs
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="must equal the model's dimension if given")
    _integral_dimensions = field_validator("dimensions", mode="before")(_integral)
    user: str | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str | None = Field(None, description="also in the X-Request-ID header and in every log line")
    fields: list[FieldError] | None = None
    available: list[str] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries: these statuses answer with the uniform error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


# Any route may answer these: a missing key (when keys are set), a bug, shutting down or not ready.
COMMON_ERRORS = error_responses(401, 500, 503)


# -- translate ------------------------------------------------------------------------------------
MAX_TRANSLATE_INPUTS = Translate.max_inputs
MAX_TRANSLATE_CHARS = Translate.max_chars
Lang = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain text, not only whitespace")
    return text


# the schema states "not only whitespace" as a pattern (JSON Schema's patterns search); _not_blank checks it
TranslateText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TRANSLATE_CHARS),
                          Field(json_schema_extra={"pattern": r"\S"}),
                          AfterValidator(_not_blank)]


class TranslateRequest(_Request):
    model: str | None = Field(None, description="translation model, e.g. en-pt (default: chosen by the languages, "
                                                "else the first configured)")
    inputs: Annotated[list[TranslateText], Field(
        min_length=1, max_length=MAX_TRANSLATE_INPUTS,
        description=f"1 to {MAX_TRANSLATE_INPUTS} non-blank texts of at most {MAX_TRANSLATE_CHARS} characters; "
                    "texts longer than the model's max_input_tokens are truncated (the result says so)")]
    source_lang: Lang | None = Field(None, description="e.g. en")
    target_lang: Lang | None = Field(None, description="e.g. pt")
    variant: str | None = Field(None, description="pin a variant (also: X-Variant header)")
    beam_size: int | None = Field(None, ge=1, le=8, description="beam width (default: the model's, 1 for Bergamot)")
    max_new_tokens: int | None = Field(None, ge=1, le=512, description="cap on generated tokens per input; output "
                                                                        "is also capped at 2.5 x the input's tokens")
    _integral_decoding = field_validator("beam_size", "max_new_tokens", mode="before")(_integral)
    truncation: Truncation


class TranslateResult(BaseModel):
    index: int
    translation: str
    generated_tokens: int = Field(description="target tokens generated (without the end-of-sentence token)")
    truncated: bool = Field(description="the input was longer than max_input_tokens and was cut")


class TranslateUsage(Usage):
    generated_tokens: int


class TranslateResponse(Timing):
    model: str
    variant: str
    source_lang: str | None
    target_lang: str | None
    results: list[TranslateResult]
    usage: TranslateUsage
