"""The OpenAI-compatible routes of the fake Ollama (`/v1/...`, api-facts 1.7).

They load models like the native routes but cannot set `keep_alive` (the server default
applies). Streaming answers are server-sent events, `data: {...}` per chunk, ending with
`data: [DONE]`.
"""

from __future__ import annotations

import time
from typing import Any

from supervisor.sim.catalog import ModelSpec
from supervisor.sim.httpbase import Exchange
from supervisor.sim.ollama_core import HttpError, OllamaCore, dumps


class OpenAIRoutes(OllamaCore):
    # ------------------------------------------------------------------ OpenAI compatible

    def _sse(self, ex: Exchange, obj: Any) -> None:
        if not ex.answered:
            ex.start_stream("text/event-stream")
        payload = "[DONE]" if obj is None else dumps(obj)
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
