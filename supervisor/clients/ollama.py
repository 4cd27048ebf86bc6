"""Client for one Ollama server: what is loaded, what is installed, unload and preload.

Follows api-facts §1. Policy:
- Every failure (connect error, timeout, HTTP 4xx/5xx, a body that is not JSON, JSON of
  the wrong shape) raises `ServiceError("ollama at <url>", ...)` from its cause. A 404 for
  a model says the model is not installed.
- Reads (GET /api/version, /api/ps, /api/tags and POST /api/show, which changes nothing)
  are retried on connect errors and timeouts (`attempts` in all, tenacity wait injectable).
  `unload` is idempotent (unloading a model that is not loaded is a no-op), so it is retried
  the same way. `preload` is retried only when the connection was never made: a load dies
  with its client, and repeating a delivered load request would start a second multi-minute
  load behind the caller's back.
- Optional fields that old builds lack or that have an odd type (`context_length` before
  v0.9.7, `digest`, `expires_at`) become None/"" instead of failing the whole reading;
  required ones (`name`, `size`, `size_vram`) raise.
- `unload` returns when Ollama has accepted it; the VRAM comes back later (api-facts 1.3,
  gotcha 2). Callers verify with NVML or /api/ps.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import httpx

from supervisor.clients._http import (
    Retry,
    ServiceClient,
    ShapeError,
    error_text,
    field,
    integer,
    items,
    obj,
    text,
)
from supervisor.errors import ServiceError
from supervisor.model import OllamaModel
from supervisor.ports import ModelFacts, TaggedModel

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)


@functools.lru_cache(maxsize=1024)  # pure; the gate asks twice per request
def normalise_model_name(name: str) -> str:
    """The name as Ollama's /api/ps shows it: `model:tag`, `:latest` added when no tag.

    Mirrors Ollama's `Name.DisplayShortest` (api-facts 1.2, gotcha 5): the default host
    `registry.ollama.ai` and namespace `library` are dropped; any other namespace or host
    (with its port) is kept. Case is kept as given (Ollama compares names case-insensitively
    but displays them as stored). An empty string stays empty.
    """
    name = name.strip()
    if not name:
        return name
    # A ':' after the last '/' is a tag; one before it belongs to a host:port.
    if name.rfind(":") > name.rfind("/"):
        base, _, tag = name.rpartition(":")
        tag = tag or DEFAULT_TAG
    else:
        base, tag = name, DEFAULT_TAG
    parts = base.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else ""
    host = "/".join(parts[:-2])
    host = host.split("://", 1)[-1]
    if host.lower() == DEFAULT_HOST:
        host = ""
    if not host and namespace.lower() == DEFAULT_NAMESPACE:
        namespace = ""
    prefix = "".join(f"{part}/" for part in (host, namespace) if part)
    return f"{prefix}{model}:{tag}"


class OllamaClient(ServiceClient):
    """One Ollama server at `base_url` (implements `ports.OllamaApi`). Thread-safe."""

    SERVICE = "ollama"

    # ------------------------------------------------------------------ reads

    def version(self) -> str:
        """GET /api/version: the server's semver string."""
        return self._http.json("GET", "/api/version", _parse_version, retry=Retry.TRANSIENT)

    def ps(self) -> tuple[OllamaModel, ...]:
        """GET /api/ps: the models resident now (see api-facts 1.3 for what that means)."""
        return self._http.json("GET", "/api/ps", _parse_ps, retry=Retry.TRANSIENT)

    def tags(self) -> tuple[TaggedModel, ...]:
        """GET /api/tags: the installed models with their on-disk size."""
        return self._http.json("GET", "/api/tags", _parse_tags, retry=Retry.TRANSIENT)

    def show(self, model: str) -> ModelFacts:
        """POST /api/show: the GGUF facts that size a model's KV cache."""
        name = normalise_model_name(model)
        return self._http.json(
            "POST",
            "/api/show",
            lambda data: _parse_show(name, data),
            body={"model": name, "verbose": False},
            retry=Retry.TRANSIENT,
            on_status=self._not_installed(name),
        )

    # ------------------------------------------------------------------ writes

    def unload(self, model: str) -> None:
        """POST /api/generate with keep_alive 0. Returns at once; VRAM frees later."""
        name = normalise_model_name(model)
        self._http.json(
            "POST",
            "/api/generate",
            self._generate_answer,
            body={"model": name, "keep_alive": 0},
            retry=Retry.TRANSIENT,
            on_status=self._not_installed(name),
        )

    def preload(self, model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        """POST /api/generate with an empty prompt; blocks until the model is loaded.

        `timeout_s` is the read timeout: closing the request aborts the load (gotcha 4).
        `keep_alive` (seconds, negative = forever, or a Go duration such as "5m") is sent
        only when given: without it a new load gets OLLAMA_KEEP_ALIVE and a loaded model
        keeps its own; with it a loaded model's keep-alive is replaced, which also
        withdraws a pending keep_alive-0 unload (api-facts 1.6, 1.7).
        """
        name = normalise_model_name(model)
        body: dict[str, object] = {"model": name, "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        self._http.json(
            "POST",
            "/api/generate",
            self._generate_answer,
            body=body,
            retry=Retry.CONNECT,
            timeout=httpx.Timeout(self._http.timeout_s, read=timeout_s),
            on_status=self._not_installed(name),
        )

    # ------------------------------------------------------------------ helpers

    def _not_installed(self, name: str) -> Callable[[httpx.Response], ServiceError | None]:
        def check(response: httpx.Response) -> ServiceError | None:
            if response.status_code != httpx.codes.NOT_FOUND:
                return None
            detail = error_text(response)
            return self._http.error(
                f"model {name!r} is not installed (HTTP 404" + (f": {detail})" if detail else ")")
            )

        return check

    def _generate_answer(self, data: Any) -> None:
        answer = obj(data, "the body")
        # Defensive: an error object with a 200 status would otherwise pass for success.
        if isinstance(answer.get("error"), str):
            raise self._http.error(f"POST /api/generate answered with an error: {answer['error']}")


# ---------------------------------------------------------------------- parsers


def _parse_version(data: Any) -> str:
    body = obj(data, "the body")
    return text(field(body, "version", "the body"), "version")


def _model_name(entry: dict[str, Any], where: str) -> str:
    raw = entry.get("name") or entry.get("model")
    if raw is None:
        raise ShapeError(f"{where} has no 'name'")
    name = text(raw, f"{where}.name")
    if not name.strip():
        raise ShapeError(f"{where}.name is empty")
    return normalise_model_name(name)


def _parse_ps(data: Any) -> tuple[OllamaModel, ...]:
    body = obj(data, "the body")
    entries = items(field(body, "models", "the body"), "models", null_is_empty=True)
    models = []
    for i, raw in enumerate(entries):
        where = f"models[{i}]"
        entry = obj(raw, where)
        digest = entry.get("digest")
        context_length = entry.get("context_length")
        expires_at = entry.get("expires_at")
        models.append(
            OllamaModel(
                name=_model_name(entry, where),
                size_bytes=integer(field(entry, "size", where), f"{where}.size"),
                size_vram_bytes=integer(field(entry, "size_vram", where), f"{where}.size_vram"),
                digest=digest if isinstance(digest, str) else "",
                context_length=_optional_int(context_length),
                expires_at=expires_at if isinstance(expires_at, str) else None,
            )
        )
    return tuple(models)


def _parse_tags(data: Any) -> tuple[TaggedModel, ...]:
    body = obj(data, "the body")
    entries = items(field(body, "models", "the body"), "models", null_is_empty=True)
    tagged = []
    for i, raw in enumerate(entries):
        where = f"models[{i}]"
        entry = obj(raw, where)
        tagged.append(
            TaggedModel(
                name=_model_name(entry, where),
                size_bytes=integer(field(entry, "size", where), f"{where}.size"),
            )
        )
    return tuple(tagged)


def _parse_show(name: str, data: Any) -> ModelFacts:
    body = obj(data, "the body")
    raw_info = body.get("model_info")
    info = {} if raw_info is None else obj(raw_info, "model_info")
    arch = info.get("general.architecture")
    parameters = body.get("parameters")
    num_ctx = None
    if isinstance(parameters, str):
        found = _NUM_CTX.findall(parameters)
        num_ctx = int(found[-1]) if found else None  # the last PARAMETER line wins

    def kv(suffix: str) -> int | None:
        if not isinstance(arch, str) or not arch:
            return None
        return _kv_int(info.get(f"{arch}.{suffix}"))

    return ModelFacts(
        name=name,
        context_length=kv("context_length"),
        block_count=kv("block_count"),
        embedding_length=kv("embedding_length"),
        head_count=kv("attention.head_count"),
        head_count_kv=kv("attention.head_count_kv"),
        key_length=kv("attention.key_length"),
        value_length=kv("attention.value_length"),
        num_ctx=num_ctx,
    )


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kv_int(value: Any) -> int | None:
    """A GGUF KV value as one int. Some architectures store per-layer arrays (for example
    head_count_kv); the largest entry is the safe figure for a memory estimate. Arrays
    longer than 5 come back empty without verbose (api-facts 1.5): unknown."""
    if isinstance(value, list):
        numbers = [v for v in value if _optional_int(v) is not None]
        return max(numbers) if numbers else None
    return _optional_int(value)
