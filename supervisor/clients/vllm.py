"""Client for vLLM's OpenAI server (tenants.md §3): one model, put to sleep and woken.

Policy:
- `served()` reads only routes that neither run nor wake the model (`/health`,
  `/v1/models`, `/metrics` stay up while it sleeps, tenants.md §3):
  - the model: the first id of `GET /v1/models` (one model per server);
  - sleep mode: `GET /is_sleeping` (`{"is_sleeping": bool}`); 404 means the dev-mode sleep
    routes are absent (not started with `--enable-sleep-mode` and
    `VLLM_SERVER_DEV_MODE=1`): mode "no sleep mode", no unload, no wake;
  - whether requests arriving while asleep are queued: `GET /version`. Engines before
    0.24 (`QUEUES_WHILE_ASLEEP_SINCE`; the sheet gives "about 0.24", UNVERIFIED) sleep
    without a guard, and a request to a sleeping one crashes it (vLLM issue #15483).
    The supervisor does not stand between clients and vLLM, so such an engine, or one
    whose version cannot be read, is never put to sleep (`can_unload=False`, mode "sleep
    mode not used ..."); it can still be woken if something else put it to sleep;
  - requests: `GET /metrics` gauges `vllm:num_requests_running` and
    `vllm:num_requests_waiting`, summed over their samples (one per engine), parsed with
    `prometheus_client.parser`. Busy is running > 0; `waiting` is the waiting gauge (new
    engines count the requests they queue while asleep there). Metrics that cannot be
    read leave busy and waiting unknown (None) rather than failing the read.
  - the model's state: "sleeping" while `/is_sleeping` says so, else "loaded".
- `busy(model)`, read right before a sleep: fresh metrics, True while a request runs or
  waits; None when they cannot be read or the server serves another model (never slept).
- `unload(model)` = `POST /sleep?level=1&mode=wait` (200, empty body; it returns once the
  memory is given back). Level 1 keeps the weights in CPU RAM, so a plain `/wake_up`
  brings the model back (level 2 would need a weight reload the supervisor does not do).
  `mode=wait` drains a request that slipped in after the busy check instead of aborting it
  (the default `abort` cuts it off); engines that predate `mode` ignore the unknown query
  parameter (FastAPI reads only the ones it names). A model already asleep is not slept
  again. 404: no sleep mode, a ServiceError that says how to enable it.
- `wake(model)` = `POST /wake_up` (200, empty body, returns once the memory is back).
- Every failure raises `ServiceError("vLLM at <url>", ...)` (`clients._http`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from supervisor.clients._http import Retry, ServiceClient, ShapeError, model_ids, obj, text
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState

# Engines from this version on queue requests that arrive while asleep (tenants.md §3,
# "about 0.24": UNVERIFIED); older ones crash on them.
QUEUES_WHILE_ASLEEP_SINCE = (0, 24)
# A sleep copies the weights to CPU RAM, a wake copies them back: seconds for big models.
SLEEP_TIMEOUT_S = 120.0
SLEEP_PATH = "/sleep?level=1&mode=wait"
ENABLE_HINT = "start vLLM with --enable-sleep-mode and the environment VLLM_SERVER_DEV_MODE=1"

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@dataclass(frozen=True)
class Requests:
    running: int
    waiting: int


class VllmClient(ServiceClient):
    """One vLLM server at `base_url` (implements `ports.ModelServerApi`). Thread-safe."""

    SERVICE = "vLLM"

    def served(self) -> ServedState:
        names = self.models()
        if not names:
            raise self._http.error("GET /v1/models lists no model")
        sleeping = self._is_sleeping()
        requests = self._requests()
        busy = requests.running > 0 if requests is not None else None
        waiting = requests.waiting if requests is not None else None
        state = "sleeping" if sleeping else "loaded"
        models = (ServedModel(names[0], state, busy),)
        if sleeping is None:
            return ServedState(models, can_unload=False, mode="no sleep mode", busy=busy)
        version = self._version()
        queues = version is not None and _version_tuple(version) >= QUEUES_WHILE_ASLEEP_SINCE
        if queues:
            mode = "sleep mode"
        else:
            why = f"vLLM {version}" if version else "a vLLM whose version is unknown"
            mode = f"sleep mode not used: {why} crashes on a request while asleep"
        return ServedState(
            models, can_unload=queues, mode=mode, busy=busy, waiting=waiting, can_wake=True
        )

    def models(self) -> tuple[str, ...]:
        return tuple(self._http.json("GET", "/v1/models", model_ids, retry=Retry.TRANSIENT))

    def busy(self, model: str) -> bool | None:
        if model not in self.models():
            return None
        requests = self._requests()
        if requests is None:
            return None
        return requests.running > 0 or requests.waiting > 0

    def unload(self, model: str) -> None:
        sleeping = self._is_sleeping()
        if sleeping is None:
            raise self._http.error(f"it has no sleep mode: {ENABLE_HINT}")
        if sleeping:
            return  # already asleep: what was asked for
        self._post(SLEEP_PATH)

    def wake(self, model: str) -> None:
        self._post("/wake_up")

    # ------------------------------------------------------------------ reads

    def _post(self, path: str) -> None:
        def no_route(response: httpx.Response) -> ServiceError | None:
            if response.status_code == 404:
                return self._http.error(f"POST {path} returned HTTP 404: {ENABLE_HINT}")
            return None

        self._http.request(
            "POST",
            path,
            retry=Retry.CONNECT,
            timeout=httpx.Timeout(self._http.timeout_s, read=SLEEP_TIMEOUT_S),
            on_status=no_route,
        )

    def _is_sleeping(self) -> bool | None:
        """True/False; None when the sleep routes are absent (404)."""
        try:
            return self._http.json("GET", "/is_sleeping", _is_sleeping, retry=Retry.TRANSIENT)
        except ServiceError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def _version(self) -> str | None:
        try:
            return self._http.json("GET", "/version", _version, retry=Retry.TRANSIENT)
        except ServiceError:
            return None

    def _requests(self) -> Requests | None:
        try:
            response = self._http.request("GET", "/metrics", retry=Retry.TRANSIENT)
            return parse_requests(response.text)
        except (ServiceError, ShapeError):
            return None


def parse_requests(body: str) -> Requests:
    """The running and waiting gauges of a `/metrics` text (summed over engines)."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name in (RUNNING, WAITING):
                    found[sample.name] = found.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise ShapeError(f"/metrics is not Prometheus text: {exc}") from exc
    missing = [name for name in (RUNNING, WAITING) if name not in found]
    if missing:
        raise ShapeError(f"/metrics has no {', '.join(missing)}")
    return Requests(int(found[RUNNING]), int(found[WAITING]))


def _is_sleeping(data: Any) -> bool:
    flag = obj(data, "/is_sleeping").get("is_sleeping")
    if not isinstance(flag, bool):
        raise ShapeError("/is_sleeping.is_sleeping is not a boolean")
    return flag


def _version(data: Any) -> str:
    return text(obj(data, "/version").get("version"), "/version.version")


def _version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers: "0.24.1rc2.dev5+gabc" -> (0, 24, 1); unparsable -> (0,)."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)
