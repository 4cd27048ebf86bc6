"""Client for llama.cpp's `llama-server` (tenants.md §1), router or single-model mode.

Policy:
- The mode is read on every `served()` from `GET /props`: a router answers
  `role: "router"`. Router: `GET /models` lists every model with `status.value`
  (unloaded, loading, loaded, sleeping, downloading); for each running one,
  `GET /slots?model=` says whether a slot is processing (GET requests do not count as use
  for the router's LRU, so reading them changes nothing). Single-model: `GET /v1/models`
  names the model, `/props` says whether it sleeps, `/slots` whether it is busy, and
  `/health` 503 means it is still loading. A server started with `--no-slots` answers
  501: busy is then unknown (None), and an unknown model is never unloaded.
- `unload(model)`: `POST /models/unload {"model": ...}` (router only). It returns before
  the child has exited: the caller verifies by reading again. "model is not running" is
  no error (it is gone). Sent once: retried only when the connection was never made.
- Every failure raises `ServiceError("llama-server at <url>", ...)` (`clients._http`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from supervisor.clients._http import Retry, ServiceClient, ShapeError, items, obj, text
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState


class LlamaServerClient(ServiceClient):
    """One llama-server at `base_url` (implements `ports.ModelServerApi`). Thread-safe."""

    SERVICE = "llama-server"

    def served(self) -> ServedState:
        props = self._http.json("GET", "/props", _props, retry=Retry.TRANSIENT)
        if props.get("role") == "router":
            return self._router()
        return self._single(props)

    def busy(self, model: str) -> bool | None:
        props = self._http.json("GET", "/props", _props, retry=Retry.TRANSIENT)
        path = "/slots" if props.get("role") != "router" else f"/slots?model={quote(model)}"
        return self._slots_busy(path)

    def unload(self, model: str) -> None:
        try:
            self._http.request("POST", "/models/unload", body={"model": model}, retry=Retry.CONNECT)
        except ServiceError as exc:
            if "HTTP 400" in str(exc) and "not running" in str(exc):
                return  # already unloaded (or unloading): what was asked for
            raise

    # ------------------------------------------------------------------ reads

    def _router(self) -> ServedState:
        entries = self._http.json("GET", "/models", _model_list, retry=Retry.TRANSIENT)
        models: list[ServedModel] = []
        for name, state, size in entries:
            busy: bool | None = None
            if state in ("loaded", "sleeping"):
                busy = self._slots_busy(f"/slots?model={quote(name)}")
            models.append(ServedModel(name, state, busy, size))
        any_busy = any(m.busy for m in models) or (
            None if any(m.busy is None and m.is_resident for m in models) else False
        )
        return ServedState(tuple(models), can_unload=True, mode="router", busy=any_busy)

    def _single(self, props: dict[str, Any]) -> ServedState:
        names = self._http.json("GET", "/v1/models", _model_ids, retry=Retry.TRANSIENT)
        name = names[0] if names else str(props.get("model_path") or "model")
        loading = self._loading()
        state = "loading" if loading else "sleeping" if props.get("is_sleeping") else "loaded"
        busy = None if loading else self._slots_busy("/slots")
        return ServedState(
            (ServedModel(name, state, busy),), can_unload=False, mode="single-model", busy=busy
        )

    def _loading(self) -> bool:
        try:
            self._http.request("GET", "/health", retry=Retry.TRANSIENT)
        except ServiceError as exc:
            if "HTTP 503" in str(exc):
                return True
            raise
        return False

    def _slots_busy(self, path: str) -> bool | None:
        """Any slot processing; None when slots are off (501) or not answered."""
        try:
            slots = self._http.json("GET", path, parse_slots, retry=Retry.TRANSIENT)
        except ServiceError:
            return None
        return any(slots)


def _props(data: Any) -> dict[str, Any]:
    return obj(data, "/props")


def _model_list(data: Any) -> list[tuple[str, str, int | None]]:
    out: list[tuple[str, str, int | None]] = []
    for i, entry in enumerate(items(obj(data, "/models").get("data"), "/models data")):
        where = f"/models data[{i}]"
        entry = obj(entry, where)
        name = text(entry.get("id"), f"{where}.id")
        status = entry.get("status")
        state = status.get("value") if isinstance(status, dict) else None
        if not isinstance(state, str):
            raise ShapeError(f"{where}.status.value is missing")
        if isinstance(status, dict) and status.get("failed"):
            state = "failed"
        meta = entry.get("meta")
        size = meta.get("size") if isinstance(meta, dict) else None
        out.append((name, state, size if isinstance(size, int) and size > 0 else None))
    return out


def _model_ids(data: Any) -> list[str]:
    entries = items(obj(data, "/v1/models").get("data"), "/v1/models data")
    return [text(obj(e, "/v1/models entry").get("id"), "/v1/models id") for e in entries]


def parse_slots(data: Any) -> list[bool]:
    """`GET /slots`: each slot's `is_processing` (llama-swap reads its upstreams' too)."""
    out: list[bool] = []
    for i, slot in enumerate(items(data, "/slots")):
        flag = obj(slot, f"/slots[{i}]").get("is_processing")
        if not isinstance(flag, bool):
            raise ShapeError(f"/slots[{i}].is_processing is missing")
        out.append(flag)
    return out
