"""One Settings object: environment variables (QUANTSERVE_*) over a YAML file of models over defaults.

A bad config stops start-up with one sentence naming the field and what to write there
(:func:`load_settings` raises :class:`ConfigError`; ``python -m service`` prints it and exits 2).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from quantization.tasks import Task, get_task, task_names

ENV_PREFIX = "QUANTSERVE_"
NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class ConfigError(Exception):
    """The configuration is invalid; the message says which field and what to write."""


def _unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; {', '.join(dupes)} appears more than once")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


AUTO = "auto"


class VariantConfig(_Strict):
    name: str = Field(pattern=NAME, description="variant name used in requests, e.g. fp32 or int8")
    strategy: str = Field(description="a quantization strategy (python -m quantization strategies lists them), or "
                                      "auto: the fastest int8 candidate on this CPU within the model's fidelity_bound")
    params: dict[str, Any] = Field(default_factory=dict, description="strategy parameters")
    artifact: str | None = Field(None, description="directory of a saved artifact to load instead of quantizing")
    compile: bool = Field(False, description="run the variant through torch.compile (TorchInductor): fuses the int8 "
                                             "layers' quantize/dequantize passes with their neighbours; needs g++, "
                                             "compiles at start-up (about a minute per model on 2 cores, then cached)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from quantization.strategies import strategy_names

        names = strategy_names()
        if value not in names and value != AUTO:
            raise ValueError(f"unknown strategy {value!r}; write one of: {', '.join(names)}, or auto")
        return value

    @model_validator(mode="after")
    def _compilable(self) -> "VariantConfig":
        if self.compile and self.strategy != AUTO:
            from quantization.runtimes import get_runtime
            from quantization.strategies import get_strategy

            runtime = get_strategy(self.strategy).runtime
            if not get_runtime(runtime).compilable:
                raise ValueError(f"variant {self.name!r} asks for compile: true, but {self.strategy} runs on "
                                 f"{runtime}, which torch.compile does not apply to; remove compile")
        return self

    @model_validator(mode="after")
    def _auto_params(self) -> "VariantConfig":
        if self.strategy != AUTO:
            return self
        from quantization.strategies import get_strategy, parse_params

        extra = sorted(set(self.params) - {"candidates"})
        if extra:
            raise ValueError(f"strategy auto takes only params.candidates (a list of {{strategy, params}}); remove "
                             f"{', '.join(extra)}")
        for i, c in enumerate(self.params.get("candidates") or []):
            if not isinstance(c, dict) or set(c) - {"strategy", "params"} or "strategy" not in c:
                raise ValueError(f"params.candidates.{i}: write {{strategy: NAME, params: {{...}}}}")
            if c["strategy"] in ("fp32", AUTO):
                raise ValueError(f"params.candidates.{i}: {c['strategy']} is not a quantized candidate")
            try:
                parse_params(get_strategy(c["strategy"]), c.get("params") or {})
            except Exception as exc:  # noqa: BLE001 - the library's own sentence
                raise ValueError(f"params.candidates.{i}: {exc}") from None
        return self


class RoutingConfig(_Strict):
    default: str | None = Field(None, description="variant that serves unpinned requests (default: the first)")
    split: dict[str, float] | None = Field(
        None, description="weighted A/B split {variant: weight}; sticky per X-Request-Key when the client sends one")
    shadow: float = Field(0.0, ge=0.0, le=1.0, description="fraction of requests also run on the shadow variant")
    shadow_variant: str | None = Field(
        None, description="variant shadow traffic runs on (default: the FP32 baseline, or for the baseline itself, "
                          "the first other variant)")

    @field_validator("split")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
                raise ValueError("split needs non-negative weights with a positive sum, e.g. {fp32: 0.5, int8: 0.5}")
        return value


class ModelConfig(_Strict):
    name: str = Field(pattern=NAME)
    task: str = Field(description="what the model does: embed, classify or translate (quantization.tasks)")
    source: str = Field(description="minilm, intent, bergamot-en-pt, bergamot-pt-en, a local model directory, "
                                    "or a hub id (needs network)")
    variants: list[VariantConfig] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    max_input_tokens: int = Field(256, ge=8, le=8192, description="tokens per input; longer inputs are truncated or "
                                                                     "refused, as limits.truncation or the request says")
    optional: bool = Field(False, description="serve this model only when its source is on this machine (e.g. "
                                              "`sentiment`, made by `python -m quantization finetune`); otherwise "
                                              "leave it out and start without it")
    fidelity_bound: dict[str, float] | None = Field(
        None, description="what a quantized variant must keep on the probe set (and in shadow traffic) to be the "
                          "default, e.g. {mean_cosine: 0.995, min_cosine: 0.98}; lower bounds, except degenerate "
                          "(share of translations that repeat or run away), an upper bound. Default: the task's "
                          "default_bound (quantization.tasks)")
    languages: str | None = Field(None, pattern=r"^[a-z]{2,3}-[a-z]{2,3}$",
                                  description="translate only: the language pair, e.g. en-pt (built-in Bergamot "
                                              "models know their own)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        try:
            return get_task(value).name
        except KeyError as exc:
            raise ValueError(str(exc)) from None

    @property
    def task_kind(self) -> type[Task]:
        """The library's description of this model's task."""
        return get_task(self.task)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        names = [v.name for v in self.variants]
        _unique(names, "variant")
        compiled = [v.name for v in self.variants if v.compile]
        if not self.task_kind.compilable and compiled:
            able = ", ".join(t for t in task_names() if get_task(t).compilable)
            raise ValueError(f"variant {compiled[0]!r} asks for compile: true, which applies to {able} models "
                             f"only; remove it")
        r = self.routing
        for field, value in (("default", r.default), ("shadow_variant", r.shadow_variant)):
            if value is not None and value not in names:
                raise ValueError(f"routing.{field} is {value!r}; write one of the variants: {', '.join(names)}")
        allowed = self.task_kind.bound_metrics
        wrong = sorted(set(self.fidelity_bound or {}) - set(allowed))
        if wrong:
            raise ValueError(f"fidelity_bound names {', '.join(wrong)}; a {self.task} model's bounds are: "
                             f"{', '.join(allowed)}")
        unknown = sorted(set(r.split or {}) - set(names))
        if unknown:
            raise ValueError(f"routing.split names {', '.join(unknown)}; write only variants: {', '.join(names)}")
        return self

    @property
    def default_variant(self) -> str:
        return self.routing.default or self.variants[0].name

    @property
    def bound(self) -> dict[str, float]:
        """The fidelity bound quantized variants are gated on (the config's, over the task's default)."""
        return {**self.task_kind.default_bound, **(self.fidelity_bound or {})}

    @property
    def baseline(self) -> str | None:
        """The FP32 variant that fidelity is measured against, if the model has one."""
        return next((v.name for v in self.variants if v.strategy == "fp32"), None)


class BatchingConfig(_Strict):
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="how long a request that arrives while "
                               "others are in flight waits for company, while company keeps coming (a fifth of it "
                               "without an arrival ends the wait); one after a quiet spell runs at once")
    max_batch_tokens: int = Field(8192, ge=16)
    max_queue: int = Field(1024, ge=1, description="inputs waiting per variant before requests get 429")
    shadow_budget: float = Field(0.02, ge=0.0, le=1.0, description="the most of the model thread's time shadow "
                                 "traffic may take (a fraction); shadow samples beyond it are dropped and counted "
                                 "in shadow_shed_total, so shadowing never costs served traffic more than this")


# Hard ceilings of the request schemas; the configured limits sit at or below them (/openapi.json states those).
MAX_INPUTS_CEILING = 2048
MAX_CHARS_CEILING = 100_000
COMPARE_MAX_INPUTS = 32  # /v1/compare runs every variant: fewer inputs per request


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(2_000_000, ge=1024, le=64_000_000, description="larger request bodies get 413")
    max_inputs: int = Field(256, ge=1, le=MAX_INPUTS_CEILING, description="texts per request")
    max_chars: int = Field(20_000, ge=1, le=MAX_CHARS_CEILING, description="characters per text")
    truncation: Literal["truncate", "error"] = Field(
        "truncate", description="inputs over a model's max_input_tokens: cut to the limit, or refuse with 422 "
                                "(a request may choose with its own 'truncation' field)")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline of one request; a client may lower "
                                                                       "it with the X-Request-Timeout header (seconds)")
    max_decode_work: int = Field(65_536, ge=1, description="translate: inputs x beam_size x max_new_tokens per request "
                                 "(the model's defaults where the request omits them); more gets 422. The default "
                                 "admits 16 inputs at beam 8 and 512 new tokens")


def _comma_separated(value: Any) -> Any:
    if isinstance(value, str):  # QUANTSERVE_AUTH__API_KEYS=key1,key2
        keys = [k.strip() for k in value.split(",") if k.strip()]
        if not keys:  # set, but to nothing usable: refuse rather than serve without keys
            raise ValueError(f"holds no key ({value!r}); give one or more keys separated by commas, or unset it "
                             f"to serve without keys")
        return keys
    return value


_KEY = re.compile(r"^[\x21-\x7e]{1,4096}$")  # what a client can send after "Bearer ": printable, no spaces


def _usable(keys: list[str], where: str) -> list[str]:
    for i, key in enumerate(keys):
        if not _KEY.match(key):
            raise ValueError(f"{where}: key {i + 1} is not usable (keys are 1 to 4096 printable ASCII characters "
                             f"without spaces); fix or remove it")
    return keys


class AuthConfig(_Strict):
    api_keys: Annotated[list[SecretStr], NoDecode, BeforeValidator(_comma_separated)] = Field(
        default_factory=list, description="Bearer keys; set through QUANTSERVE_AUTH__API_KEYS=k1,k2 rather than YAML")
    api_keys_file: Path | None = Field(None, description="file with one key per line (# comments); adds to api_keys")
    public_paths: list[str] = Field(["/livez", "/readyz", "/metrics"],
                                    description="paths answered without a key when keys are set")

    def keys(self) -> list[str]:
        """Every configured key (the file is read once, at start-up)."""
        return self.listed_keys() + self.file_keys()

    def listed_keys(self) -> list[str]:
        return _usable([k.get_secret_value().strip() for k in self.api_keys], "api_keys")

    def file_keys(self) -> list[str]:
        if self.api_keys_file is None:
            return []
        lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
        return _usable([line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")],
                       f"api_keys_file {self.api_keys_file}")

    @model_validator(mode="after")
    def _usable_keys(self) -> "AuthConfig":
        """Auth fails closed: a key setting that yields no usable key stops start-up."""
        try:
            from_file = self.file_keys()
        except OSError as exc:
            raise ValueError(f"api_keys_file {self.api_keys_file} cannot be read ({exc.strerror}); "
                             f"give an existing file with one key per line") from None
        self.listed_keys()
        if self.api_keys_file is not None and not from_file:
            raise ValueError(f"api_keys_file {self.api_keys_file} holds no key; write one key per line")
        return self


class CorsConfig(_Strict):
    allow_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; empty: CORS off")
    allow_headers: list[str] = Field(["Authorization", "Content-Type", "X-Request-ID", "X-Variant",
                                      "X-Request-Key", "X-Request-Timeout"])


class ConnectionsConfig(_Strict):
    """What one connection may take (service/connections.py)."""

    guard: bool = Field(True, description="enforce these limits (they extend uvicorn's HTTP protocol; off: "
                                          "uvicorn's own, unbounded)")
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="from a connection's opening (or a keep-alive "
                                    "request's first byte) to the end of the request's headers; slower: 408, or a "
                                    "close when nothing was sent")
    max_headers: int = Field(100, ge=8, le=10_000, description="headers per request; more: 431")
    max_header_bytes: int = Field(65_536, ge=1024, le=4_194_304, description="request line and headers, in bytes; "
                                  "more: 431")
    body_min_rate: int = Field(1024, ge=1, description="bytes per second a request body must average after "
                               "body_grace_s; slower: 408")
    body_grace_s: float = Field(5.0, gt=0, le=300, description="time a body may take before body_min_rate applies")
    drain_body_s: float = Field(5.0, gt=0, le=300, description="once the service drains, a body still arriving "
                                "after this is cut off, so a stalled client cannot hold the shutdown")


class SpeedupsConfig(_Strict):
    """Speed-ups that reach into torch or Python internals, each switchable alone (quantization.internals)."""

    compile: bool = Field(True, description="torch.compile for variants with compile: true (off: they run eager)")
    settled: bool = Field(True, description="call a warmed compiled variant's graphs without dynamo's guards")
    merge_pass: bool = Field(True, description="int8 layers reading one input share one GEMM in compiled graphs")
    aoti: bool = Field(True, description="optimize: background compiles into AOTInductor packages in a child process "
                                         "(off: those variants stay eager)")
    fbgemm: bool = Field(True, description="FBGEMM's int8 kernels (torch's deprecated quantized-tensor API)")
    gc_freeze: bool = Field(True, description="after start-up, hide the built models from Python's cyclic garbage "
                                              "collector (full collections otherwise stall requests ~0.5 s)")


class GateConfig(_Strict):
    action: Literal["fallback", "serve", "stop"] = Field(
        "fallback", description="a quantized variant slower than its FP32 baseline at its served shapes, or below its "
                                "model's fidelity_bound: fallback (listed as degraded; unpinned traffic goes to the "
                                "baseline), serve (listed as degraded, routing unchanged) or stop (start-up fails)")
    slower_than: float = Field(1.1, ge=1.0, le=10.0, description="a variant is slower when its time is above this "
                               "multiple of the baseline's (the margin covers timing noise)")
    min_shadow_inputs: int = Field(50, ge=1, description="shadow comparisons before live agreement can degrade a "
                                   "variant")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    config: Path | None = Field(None, description="YAML file with models (default: the built-in config)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    artifacts_dir: Path | None = Field(
        default_factory=lambda: user_cache_dir(),
        description="built variants, their kernel and auto choices per CPU, and compiled kernels are kept here and "
                    "reused on the next start (default: the user cache, $XDG_CACHE_HOME/quantserve or "
                    "~/.cache/quantserve; off or an empty value: build everything at every start)")
    probe_texts: int | None = Field(None, ge=1, le=240, description="built-in sentences used to measure start-up "
                                    "fidelity (default by task: 64 for embed and classify, 200 for translate)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    log_format: Literal["text", "json"] = Field("text", description="text: key=value lines; json: one object a line")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    keep_alive_s: float = Field(75.0, gt=0, le=3600, description="idle keep-alive connections are closed after "
                                "this; keep it above the idle timeout of clients and load balancers in front")
    drain_delay_s: float = Field(5.0, ge=0, le=300, description="after SIGTERM: /readyz answers 503 and new requests "
                                 "get 503 with Connection: close for this long before the listener closes, so load "
                                 "balancers notice first")
    grace_period_s: float = Field(30.0, ge=0, le=3600, description="after the drain delay: time for accepted requests "
                                                                    "to finish before the process exits")
    connections: ConnectionsConfig = Field(default_factory=ConnectionsConfig)
    optimize: Literal["background", "inline"] = Field(
        "background", description="variants with compile: true: background (each serves eagerly once built and "
                                  "measured; an AOTInductor package is built by a child process, checked and swapped "
                                  "in) or inline (compiled with torch.compile before the model serves and before "
                                  "/readyz turns 200)")
    on_variant_failure: Literal["stop", "mark_unavailable"] = Field(
        "stop", description="a variant that fails to build: stop start-up, or serve without it (reported in "
                            "/v1/models and /readyz; requests for it get 503)")
    gate: GateConfig = Field(default_factory=GateConfig)
    speedups: SpeedupsConfig = Field(default_factory=SpeedupsConfig)
    models: list[ModelConfig] = Field(min_length=1)

    @field_validator("artifacts_dir", mode="before")
    @classmethod
    def _artifacts_off(cls, value: Any) -> Any:
        # YAML reads `off` as false; QUANTSERVE_ARTIFACTS_DIR= (empty) arrives as ""
        return None if value is False or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")) \
            else value

    @model_validator(mode="after")
    def _unique_models(self) -> "Settings":
        from quantization.models import source_available

        _unique([m.name for m in self.models], "model")
        absent = [m for m in self.models if m.optional and not source_available(m.source)]
        if absent and len(absent) == len(self.models):
            raise ValueError(f"every model is optional and none is available ({', '.join(m.name for m in absent)}); "
                             "train or install one, or add a model that is")
        self.models = [m for m in self.models if m not in absent]
        self._absent_optional = [m.name for m in absent]
        return self

    _absent_optional: list[str] = PrivateAttr(default_factory=list)

    @property
    def absent_optional_models(self) -> list[str]:
        """Optional models left out because their source is not on this machine."""
        return list(self._absent_optional)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        # keyword arguments (the CLI) > environment > the YAML file (passed in as defaults by load_settings)
        return init_settings, env_settings

    def input_limit(self, task: str) -> int:
        """Inputs one request to a model of ``task`` may carry: limits.max_inputs, or the task's own ceiling."""
        return min(self.limits.max_inputs, get_task(task).max_inputs or MAX_INPUTS_CEILING)

    def char_limit(self, task: str) -> int:
        """Characters per input for a model of ``task``: limits.max_chars, or the task's own ceiling."""
        return min(self.limits.max_chars, get_task(task).max_chars or MAX_CHARS_CEILING)

    @model_validator(mode="after")
    def _servable(self) -> "Settings":
        """A request that passes validation must fit in its variant's queue, or it would get 429 for ever."""
        largest = max(self.input_limit(m.task) for m in self.models)  # compare's 32 is never above it
        if self.batching.max_queue < largest:
            raise ValueError(f"batching.max_queue is {self.batching.max_queue}, smaller than the largest request the "
                             f"endpoints admit ({largest} inputs, from limits.max_inputs and the tasks' own limits); "
                             f"raise max_queue to at least {largest} or lower limits.max_inputs")
        return self

    def probe_count(self, task: str) -> int:
        """How many probe sentences measure a model of ``task``: ``probe_texts`` if set, else the task's default."""
        return self.probe_texts or get_task(task).probe_count

    def model_names(self, task: str | None = None) -> list[str]:
        return [m.name for m in self.models if task is None or m.task == task]


def user_cache_dir() -> Path:
    """The platform's user cache for this service: $XDG_CACHE_HOME/quantserve or ~/.cache/quantserve (Linux),
    ~/Library/Caches/quantserve (macOS), %LOCALAPPDATA%\\quantserve (Windows); under the temporary directory
    where the user has no home."""
    try:
        if sys.platform == "darwin":
            base = Path.home() / "Library" / "Caches"
        elif os.name == "nt":
            base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # Path.home(): no HOME and no passwd entry (an arbitrary container user)
        base = Path(tempfile.gettempdir())
    return base / "quantserve"


def default_config_text() -> str:
    return resources.files("service").joinpath("default_config.yaml").read_text(encoding="utf-8")


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config`` (or $QUANTSERVE_CONFIG, or the built-in file), env vars and ``overrides``."""
    path = config or os.environ.get(f"{ENV_PREFIX}CONFIG")
    try:
        text = Path(path).read_text(encoding="utf-8") if path else default_config_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path} ({exc.strerror}); give an existing YAML file with "
                          f"--config or {ENV_PREFIX}CONFIG") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the config file {path or 'built-in'} must be a YAML mapping with a 'models' list")
    # The YAML's keys are plain defaults: an environment variable or a CLI option wins over them
    # (QUANTSERVE_AUTH__API_KEYS replaces auth.api_keys only; the sources are merged key by key).
    values = dict(data)
    for key in os.environ:
        if key.startswith(ENV_PREFIX) and key != f"{ENV_PREFIX}CONFIG":
            _drop(values, key[len(ENV_PREFIX):].lower().split("__"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if path:
        values["config"] = Path(path)
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None


def _drop(values: dict[str, Any], path: list[str]) -> None:
    """Remove ``path`` from nested ``values`` (copying the dicts it passes through)."""
    head, rest = path[0], path[1:]
    if head not in values:
        return
    if not rest:
        del values[head]
    elif isinstance(values[head], dict):
        values[head] = dict(values[head])
        _drop(values[head], rest)


def describe_validation_error(exc: ValidationError, path: Any = None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = re.sub(r"^Value error, ", "", err["msg"])
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "missing":
        msg = "required; add it"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"invalid config{f' in {path}' if path else ''}: {f'{where}: ' if where else ''}{msg}{more}"
