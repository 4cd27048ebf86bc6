"""Client for llama-swap (tenants.md §2).

Policy:
- `served()`: `GET /running` lists every process that is not stopped, with `state`
  starting, ready or stopping (v180 listed only ready ones, with `model` and `state`: both
  shapes are read). Busy is not read here: llama-swap has no in-flight figure, and a
  request through it (`/upstream/...`) is use that would keep a model from its TTL.
- `busy(model)`, read only just before an unload: the model must be `ready` in
  `/running` (a request to `/upstream/` of a stopped model would load it), then its
  upstream's `/slots` (llama-server) through `GET /upstream/{model}/slots`: busy when a
  slot is processing. An upstream without `/slots` (vLLM, whisper ...) or any failure:
  None, so the model is never unloaded (an unload cuts its requests off).
- `unload(model)`: `POST /api/models/unload/{model}`, which blocks until the process
  stopped; 404 (unknown model, no local server) means there is nothing to unload.
- Every failure raises `ServiceError("llama-swap at <url>", ...)` (`clients._http`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from supervisor.clients._http import Retry, ServiceClient, items, model_ids, obj, text
from supervisor.clients.llama_server import parse_slots
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState

# An unload waits for the process to stop: its unloadTimeout (10 s by default) and more.
UNLOAD_TIMEOUT_S = 30.0


class LlamaSwapClient(ServiceClient):
    """One llama-swap at `base_url` (implements `ports.ModelServerApi`). Thread-safe."""

    SERVICE = "llama-swap"

    def served(self) -> ServedState:
        running = self._http.json("GET", "/running", _running, retry=Retry.TRANSIENT)
        models = tuple(ServedModel(name, state) for name, state in running)
        return ServedState(models, can_unload=True, mode="", busy=None)

    def models(self) -> tuple[str, ...]:
        # Every model of its configuration, running or not (`status` says which).
        return tuple(self._http.json("GET", "/v1/models", model_ids, retry=Retry.TRANSIENT))

    def busy(self, model: str) -> bool | None:
        running = dict(self._http.json("GET", "/running", _running, retry=Retry.TRANSIENT))
        if running.get(model) != "ready":
            return None
        try:
            slots = self._http.json(
                "GET", f"/upstream/{quote(model, safe='/:')}/slots", parse_slots, retry=Retry.NEVER
            )
        except ServiceError:
            return None
        return any(slots)

    def wake(self, model: str) -> None:
        # It wakes by itself on a request (or never sleeps): nothing to call.
        raise self._http.error(f"{self.SERVICE} has no wake call (it wakes on a request)")

    def unload(self, model: str) -> None:
        try:
            self._http.request(
                "POST",
                f"/api/models/unload/{quote(model, safe='/:')}",
                retry=Retry.CONNECT,
                timeout=httpx.Timeout(self._http.timeout_s, read=UNLOAD_TIMEOUT_S),
            )
        except ServiceError as exc:
            if "HTTP 404" in str(exc):
                return  # not found / no local server: nothing is loaded under that name
            raise


def _running(data: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, entry in enumerate(items(obj(data, "/running").get("running"), "/running.running")):
        entry = obj(entry, f"/running.running[{i}]")
        name = text(entry.get("model"), f"/running.running[{i}].model")
        state = text(entry.get("state"), f"/running.running[{i}].state")
        out.append((name, state))
    return out
