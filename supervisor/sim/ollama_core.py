"""Shared request handling of the fake Ollama: parsing, errors, loads and token streams.

`OllamaCore` holds what the native routes (`ollama.py`) and the OpenAI-compatible routes
(`ollama_openai.py`) both need. Errors are raised as `HttpError` and answered in the shape
of the route family (`{"error": "..."}` natively, `{"error": {"message", "type"}}` for
OpenAI). A client that leaves while its model loads aborts the load (`ClientGone`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from supervisor.sim.catalog import Catalog, DurationError, ModelSpec, parse_keep_alive
from supervisor.sim.gpu import SimGpu
from supervisor.sim.httpbase import BadJson, ClientGone, Exchange
from supervisor.sim.ollama_sched import LoadAborted, LoadFailed, OllamaConfig, Runner, Scheduler

# What the fake models say, one word per token.
_TEXT = "the quick brown fox jumps over the lazy dog while a small GPU hums along"
_WORDS = _TEXT.split()


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def go_time(wall_s: float) -> str:
    """RFC 3339 in local time, "Z" for UTC, as Go's JSON encoder writes a time.Time."""
    moment = datetime.fromtimestamp(0).astimezone() + timedelta(seconds=wall_s)
    text = moment.isoformat(timespec="microseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def now_iso() -> str:
    return go_time(time.time())


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for `text` (same input, same embedding)."""
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend(v / 2**31 for v in struct.unpack("<8i", digest))
        counter += 1
    norm = math.sqrt(sum(v * v for v in out[:dims])) or 1.0
    return [round(v / norm, 6) for v in out[:dims]]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def json_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()


class OllamaCore:
    def __init__(self, gpu: SimGpu, catalog: Catalog, config: OllamaConfig) -> None:
        self.gpu = gpu
        self.catalog = catalog
        self.config = config
        self.sched = Scheduler(gpu, config)

    def _body(self, ex: Exchange) -> dict[str, Any]:
        try:
            data = ex.json()
        except BadJson as exc:
            raise HttpError(400, str(exc)) from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise HttpError(400, "json: cannot unmarshal into request object")
        return data

    def _spec(self, body: dict[str, Any]) -> tuple[str, ModelSpec]:
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str) or not name:
            raise HttpError(400, "model is required")
        spec = self.catalog.model(name)
        if spec is None:
            raise HttpError(404, f"model '{name}' not found")
        return name, spec

    def _acquire(self, ex: Exchange, spec: ModelSpec, body: dict[str, Any]) -> Runner:
        options = body.get("options") or {}
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except DurationError as exc:
            raise HttpError(400, str(exc)) from exc
        try:
            return self.sched.acquire(
                spec,
                keep_alive_s=keep_alive,
                num_ctx=options.get("num_ctx"),
                num_gpu=options.get("num_gpu"),
                gone=ex.client_gone,
            )
        except LoadAborted as exc:
            raise ClientGone("client connection closed before the model finished loading") from exc
        except LoadFailed as exc:
            raise HttpError(500, str(exc)) from exc

    def _wrap(self, ex: Exchange, fn: Callable[[], None], openai: bool = False) -> None:
        try:
            fn()
        except HttpError as err:
            if openai:
                kind = {400: "invalid_request_error", 404: "not_found_error"}.get(
                    err.status, "api_error"
                )
                payload = {"message": err.message, "type": kind, "param": None, "code": None}
                ex.send_json(err.status, {"error": payload})
            else:
                ex.send_json(err.status, {"error": err.message})

    def _timing(
        self, started: float, loaded: float, prompt_tokens: int, count: int
    ) -> dict[str, int]:
        scale = self.config.time_scale
        end = time.monotonic()
        return {
            "total_duration": int((end - started) / scale * 1e9),
            "load_duration": int((loaded - started) / scale * 1e9),
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 1_000_000 * max(1, prompt_tokens),
            "eval_count": count,
            "eval_duration": int((end - loaded) / scale * 1e9),
        }

    def _num_predict(self, body: dict[str, Any], key: str = "num_predict") -> tuple[int, bool]:
        options = body.get("options") or {}
        value = options.get(key, body.get(key))
        if isinstance(value, int) and value >= 0:
            return value, True
        return self.config.num_predict, False

    def _run_text(
        self,
        ex: Exchange,
        name: str,
        spec: ModelSpec,
        body: dict[str, Any],
        prompt_tokens: int,
        emit: Callable[[str, dict[str, Any] | None], None],
        limit: tuple[int, bool],
    ) -> None:
        """Load, generate and call `emit(token, None)` per token, then `emit("", final)`."""
        started = time.monotonic()
        runner = self._acquire(ex, spec, body)
        try:
            loaded = time.monotonic()
            count, explicit = limit
            for i in self.sched.tokens(runner, count):
                # Ollama cancels a generation whose client left; a non-streaming client is
                # only noticed by looking.
                if i % 8 == 7 and ex.client_gone():
                    raise ClientGone("client closed the connection during generation")
                emit(" " + _WORDS[i % len(_WORDS)] if i else _WORDS[0].capitalize(), None)
            final = self._timing(started, loaded, prompt_tokens, count)
            final["done_reason"] = "length" if explicit else "stop"  # type: ignore[assignment]
            emit("", final)
        finally:
            self.sched.done(runner)

    def _load_or_unload(self, ex: Exchange, spec: ModelSpec, body: dict[str, Any]) -> str:
        """The empty-prompt path: unload for keep_alive 0, else preload (api-facts 1.6)."""
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except DurationError as exc:
            raise HttpError(400, str(exc)) from exc
        if keep_alive == 0:
            self.sched.unload(spec)
            return "unload"
        runner = self._acquire(ex, spec, body)
        self.sched.done(runner)
        return "load"

    # ------------------------------------------------------------------ simple GETs
    def _stream_or_collect(
        self,
        ex: Exchange,
        body: dict[str, Any],
        make: Callable[[str, dict[str, Any] | None], dict[str, Any]],
    ) -> Callable[[str, dict[str, Any] | None], None]:
        streaming = body.get("stream", True) is not False
        parts: list[str] = []

        def emit(token: str, final: dict[str, Any] | None) -> None:
            if streaming:
                if not ex.answered:
                    ex.start_stream("application/x-ndjson")
                ex.write_chunk(json_line(make(token, final)))
                if final is not None:
                    ex.end_stream()
                return
            parts.append(token)
            if final is not None:
                ex.send_json(200, make("".join(parts), final))

        return emit

    def _embed_inputs(
        self, ex: Exchange, spec: ModelSpec, body: dict[str, Any], texts: list[str]
    ) -> tuple[list[list[float]], dict[str, int]]:
        started = time.monotonic()
        runner = self._acquire(ex, spec, body)
        try:
            loaded = time.monotonic()
            tokens = sum(len(t.split()) for t in texts)
            # Embedding is prompt processing only: about 20x faster per token than decoding.
            if tokens:
                with runner.slots:
                    self.sched.sleep(tokens * self.sched.seconds_per_token(runner) / 20)
            vectors = [_vector(t, spec.embedding_length) for t in texts]
            timing = self._timing(started, loaded, tokens, 0)
            return vectors, {
                k: timing[k] for k in ("total_duration", "load_duration", "prompt_eval_count")
            }
        finally:
            self.sched.done(runner)
