"""The Ollama gate: a reverse proxy in front of Ollama that makes room before a load.

Ollama fixes a model's GPU/CPU split when it loads it, from the VRAM free at that moment
(api-facts §1.8), so freeing ComfyUI after the load is too late. Clients that talk to the
gate instead of Ollama get the room made first. Policy:
- A request to an endpoint that can load a model (load_request.LOAD_PATHS) for a model not
  in Ollama's /api/ps is gated: estimate the VRAM it needs (estimate.py), ask the
  RoomMaker for it unless the free VRAM already covers it, then forward. The RoomMaker
  gets `wait_s` seconds; after that the request goes on anyway, with the log line
  "Gate: forwarding <model> without enough free VRAM after <s> s". The gate never refuses
  a request and never changes one.
- Gated loads go one at a time (Ollama loads one at a time anyway), and the next one
  waits until the previous model is loaded (its answer's head arrived, or it shows in
  /api/ps), so it measures free VRAM with that model in place. Requests for resident
  models, and everything else, never wait behind a gated load.
- /api/ps is cached for `ps_ttl_s`; a request that finds the cache older refreshes it in
  the background and uses the old answer, unless that is older than `ps_max_stale_s`
  (after an idle spell a model may have expired) or does not list the model (it may have
  loaded since), in which case it waits for a fresh one. If /api/ps cannot be read, nothing
  is gated: the request goes through and Ollama answers it.
- Everything is relayed by http11.py: byte for byte, streamed, no read timeout; a client
  that disconnects closes the upstream request (a load dies with its client, gotcha 4).
  No Ollama known, or Ollama unreachable: 502 with {"error": "..."}.
- Ollama and RoomMaker calls are blocking; they run on a small thread pool owned by the
  gate. The proxy itself is one asyncio loop on one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

from loguru import logger

from supervisor.clients.ollama import normalise_model_name
from supervisor.estimate import Estimate, EstimateParams, SeenSize, estimate_need, uses_seen_as_is
from supervisor.gate.http11 import (
    HEAD_LIMIT,
    SMALL_BODY_BYTES,
    BadRequest,
    Origin,
    Pool,
    Request,
    UpstreamError,
    header_value,
    read_body,
    read_request,
    relay,
)
from supervisor.gate.load_request import LOAD_PATHS, LoadRequest, parse_load_request
from supervisor.model import OllamaModel
from supervisor.ports import OllamaApi, RoomMaker

log = logger.bind(component="gate")

T = TypeVar("T")

IDLE_CLIENT_S = 300.0  # a keep-alive client connection with no request is closed after this
MAX_LOAD_BODY_BYTES = 256 * 1024**2  # load bodies are read whole (images ride in them)
PS_WAIT_S = 3.0  # longest a request waits for a fresh /api/ps before going on without
LOAD_POLL_S = 0.5  # how often a gated load checks /api/ps for its model
MAKE_ROOM_GRACE_S = 2.0  # beyond wait_s, in case a RoomMaker overruns its deadline
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GateStats:
    """Counters since start, for /metrics."""

    requests_total: int = 0  # every request the gate read
    gated_total: int = 0  # load requests for a model not resident
    waits_total: int = 0  # make_room calls
    wait_seconds_total: float = 0.0  # time spent in make_room
    forwarded_anyway_total: int = 0  # make_room did not get the room in time
    upstream_errors_total: int = 0  # answered 502


@dataclass
class _Counters:
    requests_total: int = 0
    gated_total: int = 0
    waits_total: int = 0
    wait_seconds_total: float = 0.0
    forwarded_anyway_total: int = 0
    upstream_errors_total: int = 0


class _ClientReader(asyncio.StreamReader):
    """A StreamReader that says when the client closes or breaks the connection, so a
    request being served can be cancelled without a second reader on the socket."""

    on_eof: Callable[[], None] | None = None

    def feed_eof(self) -> None:
        super().feed_eof()
        if self.on_eof is not None:
            self.on_eof()

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        if self.on_eof is not None:
            self.on_eof()


class _Client:
    """One client connection. `in_exchange`: a request is being served, so a disconnect
    must cancel it."""

    __slots__ = ("in_exchange", "is_gone", "reader", "task", "writer")

    def __init__(
        self, reader: _ClientReader, writer: asyncio.StreamWriter, task: asyncio.Task[Any]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.task = task
        self.in_exchange = False
        self.is_gone = False
        reader.on_eof = self._on_eof

    def _on_eof(self) -> None:
        # Data still buffered is a pipelined request: the client wants its answer.
        if self.in_exchange and not self.is_gone and self.reader.at_eof():
            self.is_gone = True
            self.task.cancel()


class Gate:
    """The gate on `host:port` (port 0: any free port, see `.port` after `start()`).

    `upstream_url` is Ollama's base URL, or a callable that returns the current one (None:
    not known now) and is called for every request, so it must be cheap and thread-safe.
    """

    def __init__(
        self,
        *,
        upstream_url: str | Callable[[], str | None],
        ollama: OllamaApi,
        room: RoomMaker,
        host: str = "127.0.0.1",
        port: int,
        wait_s: float = 30.0,
        estimate_params: EstimateParams | None = None,
        ps_ttl_s: float = 0.5,
        ps_max_stale_s: float = 2.0,
        connect_timeout_s: float = 10.0,
        load_hold_max_s: float = 300.0,
    ) -> None:
        self._upstream: Callable[[], str | None] = (
            upstream_url if callable(upstream_url) else functools.partial(str, upstream_url)
        )
        self._ollama = ollama
        self._room = room
        self._host = host
        self._port = port
        self._wait_s = wait_s
        self._params = estimate_params or EstimateParams()
        self._ps_ttl_s = ps_ttl_s
        self._ps_max_stale_s = max(ps_max_stale_s, ps_ttl_s)
        self._load_hold_max_s = load_hold_max_s
        self._pool = Pool(connect_timeout_s=connect_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gate-calls")
        self._origins: dict[str, Origin] = {}
        # Loop-thread state.
        self._ps_models: dict[str, OllamaModel] | None = None
        self._ps_at = -math.inf
        self._ps_task: asyncio.Task[None] | None = None
        self._seen: dict[str, SeenSize] = {}
        self._load_lock = asyncio.Lock()
        self._clients: set[asyncio.Task[Any]] = set()
        self._is_upstream_down = False
        self._stats = _Counters()
        # Thread handling.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, when 0 was asked for)."""
        return self._port

    def start(self) -> None:
        """Listen in a background thread; returns once listening. OSError when the
        address cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("the gate was already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="vram-gate", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise OSError(f"the gate did not start listening within {START_TIMEOUT_S:g} s")
        if self._start_error is not None:
            raise self._start_error
        log.info(f"Ollama gate listening on {self._host}:{self._port}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening and close every connection (in-flight requests are cut)."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    close = stop  # the name cli uses for everything it shuts down

    def stats(self) -> GateStats:
        """A snapshot of the counters (safe from any thread)."""
        return GateStats(**dataclasses.asdict(self._stats))

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:
            reader = _ClientReader(limit=HEAD_LIMIT, loop=loop)
            return asyncio.StreamReaderProtocol(reader, self._on_client, loop=loop)

        try:
            server = await loop.create_server(
                protocol, self._host, self._port, reuse_address=True, backlog=512
            )
        except OSError as exc:
            self._start_error = exc
            ready.set()
            return
        self._port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            if self._ps_task is not None:
                self._ps_task.cancel()
            self._pool.close()

    # ------------------------------------------------------------------ connections

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and isinstance(reader, _ClientReader)
        client = _Client(reader, writer, task)
        self._clients.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_CLIENT_S):
                        req = await read_request(reader)
                except BadRequest as exc:
                    _reply_error(writer, exc.status, exc.message, keep_alive=False)
                    await writer.drain()
                    break
                if req is None:
                    break
                self._stats.requests_total += 1
                if not await self._exchange(client, req):
                    break
        except (OSError, EOFError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            pass  # the client went away or spoke garbage mid-body: just close
        except UpstreamError:
            pass  # the answer broke mid-way: closing tells the client it is truncated
        except asyncio.CancelledError:
            pass  # the gate stops
        finally:
            writer.close()
            self._clients.discard(task)

    async def _exchange(self, client: _Client, req: Request) -> bool:
        """Serve one request; True when the connection may carry another."""
        reader, writer = client.reader, client.writer
        is_load = req.method == b"POST" and req.path in LOAD_PATHS
        if req.expects_continue and req.has_body:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None = None  # None: streamed from the client while forwarding
        try:
            if is_load:
                body = await read_body(reader, req, MAX_LOAD_BODY_BYTES)
            elif not req.has_body:
                body = b""
            elif not req.is_chunked and (req.content_length or 0) <= SMALL_BODY_BYTES:
                body = await reader.readexactly(req.content_length or 0)
        except BadRequest as exc:
            _reply_error(writer, exc.status, exc.message, keep_alive=False)
            return False
        origin = self._origin()
        if origin is None:
            self._stats.upstream_errors_total += 1
            _reply_error(writer, 502, "vram-supervisor gate: no Ollama server is known now")
            return body is not None and req.keep_alive
        client.in_exchange = True
        try:
            if is_load:
                assert body is not None
                return await self._load(client, req, body, origin)
            return await self._forward(client, req, body, origin)
        except asyncio.CancelledError:
            if client.is_gone:
                client.task.uncancel()
                return False
            raise
        finally:
            client.in_exchange = False

    def _origin(self) -> Origin | None:
        url = self._upstream()
        if not url:
            return None
        origin = self._origins.get(url)
        if origin is None:
            try:
                origin = Origin.parse(url)
            except ValueError as exc:
                log.warning(f"Gate: the Ollama URL {url!r} is not usable: {exc}")
                return None
            self._origins[url] = origin
        return origin

    async def _forward(
        self,
        client: _Client,
        req: Request,
        body: bytes | None,
        origin: Origin,
        on_head: Callable[[], None] | None = None,
    ) -> bool:
        try:
            keep_alive = await relay(
                pool=self._pool,
                origin=origin,
                req=req,
                body=body,
                client_reader=client.reader,
                client_writer=client.writer,
                on_head=on_head,
            )
        except UpstreamError as exc:
            if exc.is_answered:
                raise
            self._stats.upstream_errors_total += 1
            method, path = req.method.decode("latin-1"), req.path.decode("latin-1")
            if not self._is_upstream_down:
                self._is_upstream_down = True
                log.warning(f"Gate: Ollama did not answer {method} {path}: {exc}")
            else:
                log.debug(f"Gate: Ollama did not answer {method} {path}: {exc}")
            keep_alive = body is not None and req.keep_alive
            _reply_error(client.writer, 502, f"vram-supervisor gate: {exc}", keep_alive=keep_alive)
            await client.writer.drain()
            return keep_alive
        if self._is_upstream_down:
            self._is_upstream_down = False
            log.info(f"Gate: Ollama at {origin.url} answers again")
        return keep_alive

    # ------------------------------------------------------------------ gating

    async def _load(self, client: _Client, req: Request, body: bytes, origin: Origin) -> bool:
        load = parse_load_request(req.path, header_value(req.headers, b"content-type"), body)
        if load is None or not load.needs_room:
            return await self._forward(client, req, body, origin)
        key = load.model.casefold()
        if await self._is_resident(key) is not False:
            return await self._forward(client, req, body, origin)
        await self._load_lock.acquire()
        release = _once(self._load_lock.release)
        holder: asyncio.Task[None] | None = None
        try:
            if await self._is_resident(key, is_fresh=True) is not False:
                release()  # a load queued before this one brought it in
                return await self._forward(client, req, body, origin)
            self._stats.gated_total += 1
            await self._make_room_for(load, key)
            head_seen = asyncio.Event()
            holder = asyncio.get_running_loop().create_task(
                self._hold_until_loaded(key, head_seen, release)
            )
            return await self._forward(client, req, body, origin, on_head=head_seen.set)
        finally:
            release()
            if holder is not None:
                holder.cancel()

    async def _hold_until_loaded(
        self, key: str, head_seen: asyncio.Event, release: Callable[[], None]
    ) -> None:
        """Keep the next gated load waiting until this model is in: its answer's head came
        (a streamed answer starts after the load), or /api/ps lists it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_hold_max_s
        try:
            while loop.time() < deadline:
                try:
                    async with asyncio.timeout(LOAD_POLL_S):
                        await head_seen.wait()
                    return
                except TimeoutError:
                    pass
                await self._refresh_ps()
                if self._ps_models is not None and key in self._ps_models:
                    return
        finally:
            release()

    async def _make_room_for(self, load: LoadRequest, key: str) -> None:
        model = load.model
        estimate = await self._estimate(load, key)
        if estimate is None:
            log.info(
                f"Gate: no VRAM estimate for {model} (not installed, or Ollama did not say);"
                " forwarding it as is"
            )
            return
        free = await self._call_or_none(self._room.free_bytes)
        if free is not None and free >= estimate.need_bytes:
            log.debug(f"Gate: {model} needs about {_gib(estimate.need_bytes)}; {_gib(free)} free")
            return
        log.info(
            f"Gate: making room for {model}: needs about {_gib(estimate.need_bytes)}"
            f" ({_basis(estimate)}), {_gib(free) if free is not None else 'unknown'} free"
        )
        self._stats.waits_total += 1
        started = time.monotonic()
        make_room = functools.partial(
            self._room.make_room,
            estimate.need_bytes,
            reason=f"gate: load of {model}",
            deadline_s=self._wait_s,
        )
        try:
            async with asyncio.timeout(self._wait_s + MAKE_ROOM_GRACE_S):
                is_room = await self._call(make_room)
        except TimeoutError:
            is_room = False
        except Exception as exc:
            log.warning(f"Gate: making room for {model} failed: {exc}")
            is_room = False
        waited_s = time.monotonic() - started
        self._stats.wait_seconds_total += waited_s
        if not is_room:
            self._stats.forwarded_anyway_total += 1
            log.warning(f"Gate: forwarding {model} without enough free VRAM after {waited_s:.1f} s")

    async def _estimate(self, load: LoadRequest, key: str) -> Estimate | None:
        seen = self._seen.get(key)
        if uses_seen_as_is(seen, load.num_ctx):
            return estimate_need(
                weights_bytes=None,
                facts=None,
                request_num_ctx=load.num_ctx,
                seen=seen,
                params=self._params,
            )
        show = self._call_or_none(self._ollama.show, load.model)
        tags = self._call_or_none(self._ollama.tags) if seen is None else _none()
        facts, tagged = await asyncio.gather(show, tags)
        weights = None
        for entry in tagged or ():
            if normalise_model_name(entry.name).casefold() == key:
                weights = entry.size_bytes
                break
        return estimate_need(
            weights_bytes=weights,
            facts=facts,
            request_num_ctx=load.num_ctx,
            seen=seen,
            params=self._params,
        )

    # ------------------------------------------------------------------ /api/ps cache

    async def _is_resident(self, key: str, *, is_fresh: bool = False) -> bool | None:
        """Whether Ollama has the model loaded; None when /api/ps cannot be read."""
        age_s = time.monotonic() - self._ps_at
        if is_fresh or age_s > self._ps_max_stale_s:
            await self._refresh_ps()
        elif age_s > self._ps_ttl_s:
            self._refresh_soon()
            if self._ps_models is not None and key in self._ps_models:
                return True  # stale but recent: never make a resident request wait
            await self._refresh_ps()
        models = self._ps_models
        return None if models is None else key in models

    def _refresh_soon(self) -> asyncio.Task[None]:
        if self._ps_task is None or self._ps_task.done():
            self._ps_task = asyncio.get_running_loop().create_task(self._read_ps())
        return self._ps_task

    async def _refresh_ps(self) -> None:
        try:
            async with asyncio.timeout(PS_WAIT_S):
                # Shielded: a waiter that gives up must not cancel the shared read.
                await asyncio.shield(self._refresh_soon())
        except TimeoutError:
            pass

    async def _read_ps(self) -> None:
        try:
            models = await self._call(self._ollama.ps)
        except Exception as exc:
            if self._ps_models is not None:
                log.debug(f"Gate: cannot read Ollama's /api/ps, not gating for now: {exc}")
            self._ps_models = None
        else:
            resident: dict[str, OllamaModel] = {}
            for entry in models:
                key = normalise_model_name(entry.name).casefold()
                resident[key] = entry
                if entry.size_bytes > 0:
                    self._seen[key] = SeenSize(entry.size_bytes, entry.context_length)
            self._ps_models = resident
        finally:
            self._ps_at = time.monotonic()

    # ------------------------------------------------------------------ blocking calls

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call_or_none(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return await self._call(fn, *args)
        except Exception as exc:
            log.debug(f"Gate: {getattr(fn, '__name__', fn)} failed: {exc}")
            return None


async def _none() -> None:
    return None


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, callable many times, effective once (the load slot has several releasers)."""
    is_done = False

    def call() -> None:
        nonlocal is_done
        if not is_done:
            is_done = True
            fn()

    return call


def _reply_error(
    writer: asyncio.StreamWriter, status: int, message: str, *, keep_alive: bool = True
) -> None:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n" + ("" if keep_alive else "Connection: close\r\n")
    )
    writer.write(head.encode() + b"\r\n" + body)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _basis(estimate: Estimate) -> str:
    if estimate.basis == "formula":
        return (
            f"weights {_gib(estimate.weights_bytes or 0)} + KV {_gib(estimate.kv_bytes or 0)}"
            f" at {estimate.num_ctx} ctx + overhead {_gib(estimate.overhead_bytes)}"
        )
    if estimate.basis == "seen+kv":
        return f"its last /api/ps size with the KV cache rescaled to {estimate.num_ctx} ctx"
    return "its last /api/ps size"
