"""Client for llama.cpp's `llama-server` (tenants.md §1), router or single-model mode.

Policy:
- Reads touch only endpoints that neither load, wake nor keep a model awake (`/props`,
  `/models`, `/v1/models`, `/health`; README "Sleeping on Idle"): `GET /slots` is not
  among them, and in router mode a GET with `?model=` of an unloaded model loads it. So
  `served()` reports busy as unknown, and `busy(model)` reads `/slots` only right before
  an unload, and only of a model `/models` lists as loaded.
- The mode is read on every `served()` from `GET /props`: a router answers
  `role: "router"`. Router: `GET /models` lists every model with `status.value`
  (unloaded, loading, loaded, sleeping, downloading; `failed` when it says so).
  Single-model: `GET /v1/models` names the model (it answers while loading), `/props`
  says whether it sleeps, and a 503 from `/props` or `/health` means it is still loading
  (a router answers `/props` as soon as it is up); it has no unload. A server started with
  `--no-slots` answers 501: busy is then unknown (None), and the model is never unloaded.
- `unload(model)`: `POST /models/unload {"model": ...}` (router only). It returns before
  the child has exited: the caller verifies by reading again. "model is not running" is
  no error (it is gone). Sent once: retried only when the connection was never made.
- Every failure raises `ServiceError("llama-server at <url>", ...)` (`clients._http`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from supervisor.clients._http import Retry, ServiceClient, ShapeError, items, model_ids, obj, text
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState


class LlamaServerClient(ServiceClient):
    """One llama-server at `base_url` (implements `ports.ModelServerApi`). Thread-safe."""

    SERVICE = "llama-server"

    def served(self) -> ServedState:
        props = self._props()
        if props is None:
            return self._single({}, loading=True)
        if props.get("role") == "router":
            return self._router()
        return self._single(props)

    def models(self) -> tuple[str, ...]:
        # A router's list has every model it can load; a single-model server's its one.
        return tuple(self._http.json("GET", "/v1/models", model_ids, retry=Retry.TRANSIENT))

    def busy(self, model: str) -> bool | None:
        props = self._props()
        if props is None:
            return None  # a single-model server still loading: no slots to read yet
        if props.get("role") != "router":
            return self._slots_busy("/slots")
        states = {name: state for name, state, _ in self._models()}
        if states.get(model) != "loaded":
            return None  # /slots?model= of a model that is not loaded would load it
        return self._slots_busy(f"/slots?model={quote(model)}")

    def wake(self, model: str) -> None:
        # It wakes by itself on a request (or never sleeps): nothing to call.
        raise self._http.error(f"{self.SERVICE} has no wake call (it wakes on a request)")

    def unload(self, model: str) -> None:
        try:
            self._http.request("POST", "/models/unload", body={"model": model}, retry=Retry.CONNECT)
        except ServiceError as exc:
            if "HTTP 400" in str(exc) and "not running" in str(exc):
                return  # already unloaded (or unloading): what was asked for
            raise

    # ------------------------------------------------------------------ reads

    def _props(self) -> dict[str, Any] | None:
        """`GET /props`; None when it answers 503 (a single-model server loading its model:
        its middleware answers 503 "Loading model" to everything but `/v1/models`)."""
        try:
            return self._http.json("GET", "/props", _props, retry=Retry.TRANSIENT)
        except ServiceError as exc:
            if "HTTP 503" in str(exc):
                return None
            raise

    def _models(self) -> list[tuple[str, str, int | None]]:
        return self._http.json("GET", "/models", _model_list, retry=Retry.TRANSIENT)

    def _router(self) -> ServedState:
        models = tuple(ServedModel(name, state, None, size) for name, state, size in self._models())
        return ServedState(models, can_unload=True, mode="router")

    def _single(self, props: dict[str, Any], *, loading: bool = False) -> ServedState:
        names = self.models()
        name = names[0] if names else str(props.get("model_path") or "model")
        loading = loading or self._loading()
        state = "loading" if loading else "sleeping" if props.get("is_sleeping") else "loaded"
        return ServedState((ServedModel(name, state),), can_unload=False, mode="single-model")

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


def parse_slots(data: Any) -> list[bool]:
    """`GET /slots`: each slot's `is_processing` (llama-swap reads its upstreams' too)."""
    out: list[bool] = []
    for i, slot in enumerate(items(data, "/slots")):
        flag = obj(slot, f"/slots[{i}]").get("is_processing")
        if not isinstance(flag, bool):
            raise ShapeError(f"/slots[{i}].is_processing is missing")
        out.append(flag)
    return out
