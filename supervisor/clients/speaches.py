"""Client for speaches (tenants.md §7): loaded models, unload of an idle one.

Policy:
- `served()`: `GET /api/ps` -> `{"models": [ids]}`, each "loaded". speaches tells nothing
  about requests in flight, so busy is unknown (None) in the read.
- `busy(model)` returns False: the unload itself is the guard. speaches checks a model's
  reference count and unloads it under the same lock (`unload_model` holds the manager's
  lock, `SelfDisposingModel.unload` refuses with `ValueError` while `ref_count > 0`,
  answered as HTTP 409), so an unload can never cut a request off; a request that starts
  after the check made the model busy simply gets the 409. Returning None here would
  only mean never unloading a server that protects itself.
- `unload(model)`: `DELETE /api/ps/{model_id}`. Any 2xx is done (200 `{"message"}` today,
  204 in older versions); 404 means it is not loaded (its TTL may have unloaded it): not
  an error; 409 raises a ServiceError that says the model is in use. The unload runs
  `gc.collect()` but not `torch.cuda.empty_cache()`; how fast CTranslate2 gives the VRAM
  back is UNVERIFIED, and the caller verifies by reading the GPU.
- Never `POST /v1/models/{id}` (downloads) or `DELETE /v1/models/{id}` (deletes files).
- Every failure raises `ServiceError("speaches at <url>", ...)` (`clients._http`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from supervisor.clients._http import Retry, ServiceClient, error_text, items, obj, text
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState


class SpeachesClient(ServiceClient):
    """One speaches server at `base_url` (implements `ports.ModelServerApi`). Thread-safe."""

    SERVICE = "speaches"

    def served(self) -> ServedState:
        names = self._http.json("GET", "/api/ps", _loaded, retry=Retry.TRANSIENT)
        return ServedState(tuple(ServedModel(n, "loaded") for n in names), can_unload=True)

    def models(self) -> tuple[str, ...]:
        # Only the loaded ones: what else it could load (its model registry) is not read
        # (tenants.md gives no listing of installed models that is safe to call).
        return tuple(m.name for m in self.served().models)

    def busy(self, model: str) -> bool | None:
        return False  # the server refuses (409) to unload a model in use: see the module doc

    def wake(self, model: str) -> None:
        raise self._http.error(f"{self.SERVICE} has no wake call (it loads on a request)")

    def unload(self, model: str) -> None:
        path = f"/api/ps/{quote(model, safe='/')}"

        def in_use(response: httpx.Response) -> ServiceError | None:
            if response.status_code == 409:
                detail = error_text(response)
                return self._http.error(
                    f"model {model} is in use: the server refuses to unload it (HTTP 409"
                    + (f": {detail})" if detail else ")")
                )
            return None

        try:
            self._http.request("DELETE", path, retry=Retry.CONNECT, on_status=in_use)
        except ServiceError as exc:
            if "HTTP 404" in str(exc) and "in use" not in str(exc):
                return  # not loaded (its TTL may have unloaded it): what was asked for
            raise


def _loaded(data: Any) -> list[str]:
    entries = items(obj(data, "/api/ps").get("models"), "/api/ps models")
    return [text(name, f"/api/ps models[{i}]") for i, name in enumerate(entries)]
