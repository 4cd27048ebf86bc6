"""A fake Ollama server: the HTTP API of api-facts 1.1-1.7 over the simulated scheduler.

Native endpoints stream NDJSON (one JSON object per line, flushed per token); the OpenAI
endpoints stream server-sent events ending in `data: [DONE]`. Response durations
(`total_duration`, `eval_duration`, ...) are simulated nanoseconds, so `eval_count /
eval_duration` is the simulated token rate whatever `time_scale` is.

`/sim/...` routes are the simulator's own (stats, GPU view); Ollama has nothing there.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from supervisor.sim.catalog import Catalog, DurationError, ModelSpec, parse_keep_alive
from supervisor.sim.gpu import SimGpu
from supervisor.sim.httpbase import BadJson, ClientGone, Exchange, Route, SimServer
from supervisor.sim.ollama_sched import LoadAborted, OllamaConfig, Runner, Scheduler

# Go's time.Now().Add(math.MaxInt64 ns): where an infinite keep-alive lands (api-facts 1.2).
_FOREVER_S = (2**63 - 1) / 1e9
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "small",
    "GPU",
    "hums",
    "along",
]


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


def _now_iso() -> str:
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


class FakeOllama:
    """Routes and request handling; one instance per simulated Ollama server."""

    def __init__(self, gpu: SimGpu, catalog: Catalog, config: OllamaConfig) -> None:
        self.gpu = gpu
        self.catalog = catalog
        self.config = config
        self.sched = Scheduler(gpu, config)
        get: dict[str, Route] = {
            "/": self.root,
            "/api/version": self.version,
            "/api/tags": self.tags,
            "/api/ps": self.ps,
            "/v1/models": self.v1_models,
            "/sim/stats": self.sim_stats,
            "/sim/gpu": self.sim_gpu,
        }
        post: dict[str, Route] = {
            "/api/show": self.show,
            "/api/generate": self.generate,
            "/api/chat": self.chat,
            "/api/embed": self.embed,
            "/api/embeddings": self.embeddings,
            "/v1/chat/completions": self.v1_chat,
            "/v1/completions": self.v1_completions,
            "/v1/embeddings": self.v1_embeddings,
            "/sim/reset": self.sim_reset,
        }
        self._routes: dict[str, dict[str, Route]] = {"GET": get, "POST": post}
        self._routes["HEAD"] = {p: get[p] for p in ("/", "/api/version", "/api/tags")}

    def route(self, method: str, path: str) -> Route | None:
        found = self._routes.get(method, {}).get(path)
        if found is None and method == "GET" and path.startswith("/v1/models/"):
            return self.v1_model
        return found

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(host, port, self.route, server_name="ollama", verbose=verbose)
        server.start()
        return server

    def close(self) -> None:
        self.sched.close()

    # ------------------------------------------------------------------ helpers

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

    def root(self, ex: Exchange) -> None:
        ex.send_text(200, "Ollama is running")

    def version(self, ex: Exchange) -> None:
        ex.send_json(200, {"version": self.config.version})

    def _tag(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "name": spec.name,
            "model": spec.name,
            "modified_at": go_time(1.7e9),
            "size": spec.size_bytes,
            "digest": spec.digest,
            "details": spec.details(),
        }

    def tags(self, ex: Exchange) -> None:
        ex.send_json(200, {"models": [self._tag(m) for m in self.catalog.models]})

    def ps(self, ex: Exchange) -> None:
        now = time.time()
        rows = []
        for r in self.sched.loaded():
            if r.keep_alive_s == math.inf:
                expires = now + _FOREVER_S
            elif r.expires_wall is None:
                expires = now + self.sched.real_s(r.keep_alive_s)
            else:
                expires = r.expires_wall
            rows.append((expires, r))
        rows.sort(key=lambda pair: pair[0], reverse=True)
        models = [
            {
                "name": r.name,
                "model": r.name,
                "size": r.size_bytes,
                "digest": r.spec.digest,
                "details": r.spec.details(),
                "expires_at": go_time(expires),
                "size_vram": r.size_vram,
                "context_length": r.num_ctx,
            }
            for expires, r in rows
        ]
        ex.send_json(200, {"models": models})

    def show(self, ex: Exchange) -> None:
        def run() -> None:
            _, spec = self._spec(self._body(ex))
            ex.send_json(
                200,
                {
                    "license": "",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "modelfile": f'# Modelfile generated by "ollama show"\nFROM {spec.name}\n',
                    "details": spec.details(),
                    "model_info": spec.model_info(),
                    "tensors": [],
                    "capabilities": list(spec.capabilities),
                    "modified_at": go_time(1.7e9),
                },
            )

        self._wrap(ex, run)

    # ------------------------------------------------------------------ native generation

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

    def generate(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._body(ex)
            name, spec = self._spec(body)
            if spec.is_embedding:
                raise HttpError(400, f'"{name}" does not support generate')
            prompt = body.get("prompt") or ""
            if not prompt:
                reason = self._load_or_unload(ex, spec, body)
                ex.send_json(
                    200,
                    {
                        "model": name,
                        "created_at": _now_iso(),
                        "response": "",
                        "done": True,
                        "done_reason": reason,
                    },
                )
                return

            def make(text: str, final: dict[str, Any] | None) -> dict[str, Any]:
                out = {
                    "model": name,
                    "created_at": _now_iso(),
                    "response": text,
                    "done": final is not None,
                }
                return {**out, **(final or {})}

            emit = self._stream_or_collect(ex, body, make)
            limit = self._num_predict(body)
            self._run_text(ex, name, spec, body, len(str(prompt).split()), emit, limit)

        self._wrap(ex, run)

    def chat(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._body(ex)
            name, spec = self._spec(body)
            if spec.is_embedding:
                raise HttpError(400, f'"{name}" does not support chat')
            messages = body.get("messages") or []
            if not messages:
                reason = self._load_or_unload(ex, spec, body)
                ex.send_json(
                    200,
                    {
                        "model": name,
                        "created_at": _now_iso(),
                        "message": {"role": "assistant", "content": ""},
                        "done": True,
                        "done_reason": reason,
                    },
                )
                return

            def make(text: str, final: dict[str, Any] | None) -> dict[str, Any]:
                out = {
                    "model": name,
                    "created_at": _now_iso(),
                    "message": {"role": "assistant", "content": text},
                    "done": final is not None,
                }
                return {**out, **(final or {})}

            emit = self._stream_or_collect(ex, body, make)
            words = sum(
                len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict)
            )
            self._run_text(ex, name, spec, body, words, emit, self._num_predict(body))

        self._wrap(ex, run)

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

    def embed(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._body(ex)
            name, spec = self._spec(body)
            raw = body.get("input")
            texts = [raw] if isinstance(raw, str) and raw else [str(t) for t in raw or []]
            vectors, timing = self._embed_inputs(ex, spec, body, texts)
            ex.send_json(200, {"model": name, "embeddings": vectors, **timing})

        self._wrap(ex, run)

    def embeddings(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._body(ex)
            _, spec = self._spec(body)
            prompt = str(body.get("prompt") or "")
            vectors, _ = self._embed_inputs(ex, spec, body, [prompt] if prompt else [])
            ex.send_json(200, {"embedding": vectors[0] if vectors else []})

        self._wrap(ex, run)

    # ------------------------------------------------------------------ OpenAI compatible

    def _sse(self, ex: Exchange, obj: Any) -> None:
        if not ex.answered:
            ex.start_stream("text/event-stream")
        payload = "[DONE]" if obj is None else _dumps(obj)
        ex.write_chunk(f"data: {payload}\n\n".encode())

    def _v1_text(self, ex: Exchange, chat: bool) -> None:
        def run() -> None:
            body = self._body(ex)
            name, spec = self._spec(body)
            body.pop("keep_alive", None)  # the OpenAI shape has no keep_alive: default applies
            streaming = bool(body.get("stream", False))
            kind = "chat.completion" if chat else "text_completion"
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{int(time.time() * 1000) % 1000}"
            created = int(time.time())
            if chat:
                msgs = body.get("messages") or []
                words = sum(
                    len(str(m.get("content", "")).split()) for m in msgs if isinstance(m, dict)
                )
            else:
                words = len(str(body.get("prompt") or "").split())
            limit = self._num_predict(body, "max_tokens")
            parts: list[str] = []

            def choice(text: str, finish: str | None) -> dict[str, Any]:
                if not chat:
                    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
                key = "delta" if streaming else "message"
                return {
                    "index": 0,
                    key: {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }

            def emit(token: str, final: dict[str, Any] | None) -> None:
                base = {
                    "id": ident,
                    "object": kind + (".chunk" if streaming and chat else ""),
                    "created": created,
                    "model": name,
                    "system_fingerprint": "fp_ollama",
                }
                if streaming:
                    if final is None:
                        self._sse(ex, {**base, "choices": [choice(token, None)]})
                        return
                    self._sse(ex, {**base, "choices": [choice("", final["done_reason"])]})
                    self._sse(ex, None)
                    ex.end_stream()
                    return
                parts.append(token)
                if final is not None:
                    usage = {
                        "prompt_tokens": words,
                        "completion_tokens": final["eval_count"],
                        "total_tokens": words + final["eval_count"],
                    }
                    ex.send_json(
                        200,
                        {
                            **base,
                            "choices": [choice("".join(parts), final["done_reason"])],
                            "usage": usage,
                        },
                    )

            if (chat and not body.get("messages")) or (not chat and not body.get("prompt")):
                runner = self._acquire(ex, spec, body)  # empty input: a load, as ChatHandler does
                self.sched.done(runner)
                emit("", {"done_reason": "stop", "eval_count": 0})
                return
            self._run_text(ex, name, spec, body, words, emit, limit)

        self._wrap(ex, run, openai=True)

    def v1_chat(self, ex: Exchange) -> None:
        self._v1_text(ex, chat=True)

    def v1_completions(self, ex: Exchange) -> None:
        self._v1_text(ex, chat=False)

    def v1_embeddings(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._body(ex)
            name, spec = self._spec(body)
            body.pop("keep_alive", None)
            raw = body.get("input")
            texts = [raw] if isinstance(raw, str) else [str(t) for t in raw or []]
            if not texts:
                raise HttpError(400, "invalid input")
            vectors, timing = self._embed_inputs(ex, spec, body, texts)
            data = [
                {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
            ]
            tokens = timing["prompt_eval_count"]
            ex.send_json(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )

        self._wrap(ex, run, openai=True)

    def _v1_entry(self, spec: ModelSpec) -> dict[str, Any]:
        return {"id": spec.name, "object": "model", "created": 1_700_000_000, "owned_by": "library"}

    def v1_models(self, ex: Exchange) -> None:
        ex.send_json(
            200, {"object": "list", "data": [self._v1_entry(m) for m in self.catalog.models]}
        )

    def v1_model(self, ex: Exchange) -> None:
        def run() -> None:
            _, spec = self._spec({"model": ex.path.removeprefix("/v1/models/")})
            ex.send_json(200, self._v1_entry(spec))

        self._wrap(ex, run, openai=True)

    # ------------------------------------------------------------------ /sim

    def sim_stats(self, ex: Exchange) -> None:
        stats = self.sched.stats_json()
        stats["loaded"] = [
            {
                "name": r.name,
                "size": r.size_bytes,
                "size_vram": r.size_vram,
                "refcount": r.refcount,
                "loading": r.loading,
            }
            for r in self.sched.loaded()
        ]
        ex.send_json(200, stats)

    def sim_gpu(self, ex: Exchange) -> None:
        ex.send_json(200, self.gpu.snapshot().to_json())

    def sim_reset(self, ex: Exchange) -> None:
        self.sched.reset_stats()
        ex.send_json(200, {"reset": True})


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def json_line(obj: Any) -> bytes:
    return (_dumps(obj) + "\n").encode()
