"""HTTP plumbing shared by the Ollama and ComfyUI clients.

Policy:
- Every failure becomes `ServiceError("<service> at <url>", "<what happened>")`, raised
  `from` the httpx/json exception: connection refused, timeouts, other transport errors,
  HTTP 4xx/5xx, a body that is not JSON, and JSON of the wrong shape (`ShapeError`, raised
  by the parsers in the client modules, is converted here too).
- Retries (tenacity, wait injectable) follow what a request does to the server:
  `Retry.TRANSIENT` (reads and idempotent writes) retries on connect errors, timeouts and
  dropped connections; `Retry.CONNECT` (writes that must not be repeated once delivered)
  retries only when the request provably never reached the server (no connection was
  made); `Retry.NEVER` does not retry. An HTTP error status or a bad body is an answer,
  never retried.
- A request that acts on a service is retried only while its target may still be acted
  on: the caller (the Actor) says so with `resend_guard`, checked before each attempt
  after the first. Between two attempts the container behind the URL may have been
  replaced by one that opted out (recreated without its label, at the same URL), and the
  retry would reach that one.
- Nothing here sleeps except tenacity's wait between attempts; nothing logs above DEBUG:
  the caller decides how loud a missing reading is.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum
from typing import Any, Self, TypeVar

import httpx
from loguru import logger
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.wait import WaitBaseT

from supervisor.errors import ServiceError

T = TypeVar("T")

# Short and capped: a retry exists to ride out a blip (a stale keep-alive connection, a
# container that is just starting), not to wait for a service that is down.
DEFAULT_RETRY_WAIT: WaitBaseT = wait_exponential(multiplier=0.25, min=0.25, max=2.0)

_TRANSIENT: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
# The request was never sent: repeating it cannot apply a change twice.
_NOT_SENT: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)


# The check `resend_guard` installs for the running context, i.e. this thread's code in
# the block (None: retries need no permission).
_RESEND_GUARD: ContextVar[Callable[[], str | None] | None] = ContextVar(
    "resend_guard", default=None
)


@contextmanager
def resend_guard(check: Callable[[], str | None]) -> Iterator[None]:
    """Within the block (this thread's; a thread started in it does not inherit it, an
    asyncio task would), a request about to be sent again after a failed
    attempt asks `check()` first: a reason (not None) stops it, and the request raises
    ServiceError("... failed (...) and was not sent again: <reason>"). The first attempt
    is sent unasked (the caller checked just before)."""
    token = _RESEND_GUARD.set(check)
    try:
        yield
    finally:
        _RESEND_GUARD.reset(token)


class _NotResent(Exception):
    """A retry the resend guard refused (never retried itself)."""

    def __init__(self, why: str, failure: BaseException) -> None:
        super().__init__(why)
        self.why, self.failure = why, failure


@functools.cache
def shared_tls() -> ssl.SSLContext:
    """One TLS context (httpx's default one) for every client of the process. httpx builds
    a context per client otherwise, with the whole CA bundle, even for an http:// URL:
    about 1 MiB of native memory each, which the allocator keeps after the client closes,
    so a supervisor that met many short-lived labelled containers (each gets a client)
    grew by tens of MiB (docs/soak.md). Contexts are safe to share between threads."""
    return httpx.create_ssl_context()


class Retry(Enum):
    TRANSIENT = "transient"
    CONNECT = "connect"
    NEVER = "never"


class ShapeError(ValueError):
    """The JSON parsed but does not look like what the API documents."""


class JsonHttp:
    """One base URL, one httpx.Client, the error and retry policy of the module doc."""

    def __init__(
        self,
        service: str,
        base_url: str,
        timeout_s: float,
        *,
        transport: httpx.BaseTransport | None,
        retry_wait: WaitBaseT | None,
        attempts: int,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.base_url = base_url.rstrip("/")
        self.service = f"{service} at {self.base_url}"
        self.timeout_s = timeout_s
        self._attempts = attempts
        self._wait: WaitBaseT = retry_wait if retry_wait is not None else DEFAULT_RETRY_WAIT
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, transport=transport, verify=shared_tls()
        )

    def close(self) -> None:
        self._client.close()

    def error(self, message: str) -> ServiceError:
        return ServiceError(self.service, message)

    # ------------------------------------------------------------------ requests

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        retry: Retry,
        timeout: httpx.Timeout | None = None,
        on_status: Callable[[httpx.Response], ServiceError | None] | None = None,
    ) -> httpx.Response:
        """Send one request (with retries per `retry`); return a 2xx response or raise.

        `on_status` may turn a specific error response into a clearer ServiceError (for
        example Ollama's 404 for a model that is not installed); None means "the generic
        message".
        """
        what = f"{method} {path}"
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = dict(body)
        if timeout is not None:
            kwargs["timeout"] = timeout

        failed: list[BaseException] = []

        def send() -> httpx.Response:
            guard = _RESEND_GUARD.get()
            if failed and guard is not None and (why := guard()) is not None:
                raise _NotResent(why, failed[-1])
            try:
                if self._client.is_closed:
                    # A client replaced by a newer one (its service was recreated) that a
                    # thread still held: httpx would raise RuntimeError, outside the
                    # contract.
                    raise httpx.ConnectError("the client was closed (the service was replaced)")
                return self._client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                failed.append(exc)
                raise

        try:
            response = self._retrying(retry, what)(send)
        except _NotResent as exc:
            last = exc.failure
            raise self.error(
                f"{what} failed ({type(last).__name__}: {last}) and was not sent again: {exc.why}"
            ) from last
        except httpx.TimeoutException as exc:
            seconds = _timeout_seconds(exc, timeout, self.timeout_s)
            raise self.error(
                f"{what} timed out after {seconds:g} s ({type(exc).__name__})"
            ) from exc
        except httpx.ConnectError as exc:
            raise self.error(f"{what}: cannot connect ({exc})") from exc
        except httpx.HTTPError as exc:
            raise self.error(f"{what} failed: {type(exc).__name__}: {exc}") from exc

        if response.is_success:
            return response
        if on_status is not None:
            special = on_status(response)
            if special is not None:
                raise special
        detail = error_text(response)
        raise self.error(
            f"{what} returned HTTP {response.status_code}" + (f": {detail}" if detail else "")
        )

    def json(
        self,
        method: str,
        path: str,
        parse: Callable[[Any], T],
        *,
        body: Mapping[str, Any] | None = None,
        retry: Retry,
        timeout: httpx.Timeout | None = None,
        on_status: Callable[[httpx.Response], ServiceError | None] | None = None,
    ) -> T:
        """`request`, then decode the body as JSON and hand it to `parse`."""
        response = self.request(
            method, path, body=body, retry=retry, timeout=timeout, on_status=on_status
        )
        what = f"{method} {path}"
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.error(
                f"{what} returned a body that is not JSON: {_snippet(response.text)!r}"
            ) from exc
        try:
            return parse(data)
        except ShapeError as exc:
            raise self.error(f"{what} returned JSON of an unexpected shape: {exc}") from exc

    def _retrying(self, retry: Retry, what: str) -> Retrying:
        retried = {Retry.TRANSIENT: _TRANSIENT, Retry.CONNECT: _NOT_SENT, Retry.NEVER: ()}[retry]
        attempts = self._attempts if retried else 1

        def log_retry(state: RetryCallState) -> None:
            outcome = state.outcome
            cause = outcome.exception() if outcome is not None else None
            logger.debug(
                "{} did not answer {} ({}); trying again (attempt {} of {})",
                self.service,
                what,
                type(cause).__name__,
                state.attempt_number + 1,
                attempts,
            )

        return Retrying(
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception_type(retried),
            before_sleep=log_retry,
            reraise=True,
        )


# ---------------------------------------------------------------------- shape helpers


class ServiceClient:
    """What both service clients share: one pooled `JsonHttp`, closing, `with` support.

    Subclasses set `SERVICE` ("ollama", "comfyui"); error bodies are read as text, or as the
    `error` field when they are JSON (both services answer errors that way)."""

    SERVICE = ""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 5.0,
        *,
        transport: httpx.BaseTransport | None = None,
        retry_wait: WaitBaseT | None = None,
        attempts: int = 2,
    ) -> None:
        self._http = JsonHttp(
            self.SERVICE,
            base_url,
            timeout_s,
            transport=transport,
            retry_wait=retry_wait,
            attempts=attempts,
        )
        self.base_url = self._http.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(f"{where} is {_kind(value)}, expected an object")
    return value


def items(value: Any, where: str, *, null_is_empty: bool = False) -> list[Any]:
    if value is None and null_is_empty:
        return []  # Go encodes a nil slice as null
    if not isinstance(value, list):
        raise ShapeError(f"{where} is {_kind(value)}, expected a list")
    return value


def field(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ShapeError(f"{where} has no {key!r}")
    return data[key]


def integer(value: Any, where: str) -> int:
    # bool is an int subclass in Python; `true` is never a byte count
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{where} is {_kind(value)}, expected an integer")
    return value


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ShapeError(f"{where} is {_kind(value)}, expected a string")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _snippet(body: str, limit: int = 200) -> str:
    body = body.strip()
    return body if len(body) <= limit else body[:limit] + "..."


def error_text(response: httpx.Response) -> str:
    """A short, single-line description of an error body: its JSON `error` field when it
    has one (both services answer errors that way), else the text."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return _snippet(data["error"])
    # The OpenAI shape (llama-server, vLLM): {"error": {"message": ..., "type": ...}}
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        if isinstance(message, str):
            return _snippet(message)
    return _snippet(" ".join(response.text.split()))


def _timeout_seconds(
    exc: httpx.TimeoutException, timeout: httpx.Timeout | None, default_s: float
) -> float:
    if timeout is None:
        return default_s
    limit = timeout.connect if isinstance(exc, httpx.ConnectTimeout) else timeout.read
    return limit if limit is not None else default_s


def model_ids(data: Any) -> list[str]:
    """`GET /v1/models` of an OpenAI-compatible server: the `id` of every entry."""
    entries = items(obj(data, "/v1/models").get("data"), "/v1/models data")
    return [text(obj(e, "/v1/models entry").get("id"), "/v1/models id") for e in entries]
