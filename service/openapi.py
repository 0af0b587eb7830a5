"""The OpenAPI document as this process serves it: the configured limits, and the bearer scheme when keys are on.

The request models hold the widest limits any configuration may set (the hard ceilings), so they can
be declared once at import; this rewrites the served document to the limits this process applies,
so a client (or a schema-driven tester) that keeps to the document is never refused for a limit.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .config import COMPARE_MAX_INPUTS, Settings

BEARER = "bearer"


def _inputs_limits(settings: Settings) -> dict[str, tuple[int, int]]:
    """(max inputs, max characters per input) per request schema, as check_limits applies them."""
    def of(task: str) -> tuple[int, int]:
        return settings.input_limit(task), settings.char_limit(task)

    configured = [of(m.task) for m in settings.models]
    # /v1/compare takes any model: the tightest limits of the configured ones
    compare = (min([COMPARE_MAX_INPUTS] + [n for n, _ in configured]), min(c for _, c in configured))
    return {"EmbedRequest": of("embed"), "ClassifyRequest": of("classify"), "OpenAIEmbeddingsRequest": of("embed"),
            "CompareRequest": compare, "TranslateRequest": of("translate")}


def _cap(node: Any, items: int, chars: int) -> None:
    """Lower every maxItems under ``node`` to ``items`` and every maxLength to ``chars``."""
    if isinstance(node, dict):
        if "maxItems" in node:
            node["maxItems"] = min(node["maxItems"], items)
        if "maxLength" in node:
            node["maxLength"] = min(node["maxLength"], chars)
        for value in node.values():
            _cap(value, items, chars)
    elif isinstance(node, list):
        for value in node:
            _cap(value, items, chars)


def customize(app: FastAPI, settings: Settings, public_paths: list[str], bearer: bool) -> None:
    """Serve the document with the configured limits and, when keys are on, the bearer scheme
    (every operation but ``public_paths`` asks for it, so /docs can authorize)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.get("components", {}).get("schemas", {})
        for name, (items, chars) in _inputs_limits(settings).items():
            inputs = schemas.get(name, {}).get("properties", {})
            for field in ("inputs", "input"):
                if field in inputs:
                    _cap(inputs[field], items, chars)
        if bearer:
            schema.setdefault("components", {})["securitySchemes"] = {BEARER: {
                "type": "http", "scheme": "bearer",
                "description": "an API key from QUANTSERVE_AUTH__API_KEYS or auth.api_keys_file"}}
            schema["security"] = [{BEARER: []}]
            for path, operations in schema.get("paths", {}).items():
                if path in public_paths:
                    for op in operations.values():
                        op["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
