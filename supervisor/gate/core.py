"""The Ollama gate: a reverse proxy in front of Ollama that makes room before a load.

Clients that talk to the gate instead of Ollama get the room made before Ollama decides a
model's GPU/CPU split. This module owns the listener, the client connections and the
thread; admission.py decides when a load request may go on; relay.py moves the bytes.
Policy:
- Only POSTs to the endpoints that can load a model (load_request.LOAD_PATHS) are looked
  into; everything else is relayed at once, untouched, and never waits for a load.
- A client that disconnects cancels its request, wherever it is: waiting for room,
  waiting for Ollama, or streaming (a load dies with its client, api-facts gotcha 4).
- No Ollama known, or Ollama unreachable: 502 with {"error": "..."}. A request the gate
  cannot parse: 400 (or 413/431/505) with {"error": "..."}, and the connection is closed.
- One asyncio loop on one thread serves every connection; blocking Ollama and RoomMaker
  calls run on a small thread pool owned by the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from loguru import logger

from supervisor.estimate import EstimateParams
from supervisor.gate.admission import Admission, model_key
from supervisor.gate.http11 import (
    HEAD_LIMIT,
    BadRequest,
    Request,
    header_value,
    read_body,
    read_request,
)
from supervisor.gate.load_request import LOAD_PATHS, parse_load_request
from supervisor.gate.relay import SMALL_BODY_BYTES, Origin, Pool, UpstreamError, relay
from supervisor.gate.stats import Counters, GateStats
from supervisor.ports import OllamaApi, RoomMaker

log = logger.bind(component="gate")

IDLE_CLIENT_S = 300.0  # a keep-alive client connection with no request is closed after this
MAX_LOAD_BODY_BYTES = 256 * 1024**2  # load bodies are read whole (images ride in them)
START_TIMEOUT_S = 10.0


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
        self._host = host
        self._port = port
        self._pool = Pool(connect_timeout_s=connect_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gate-calls")
        self._stats = Counters()
        self._admission = Admission(
            ollama=ollama,
            room=room,
            executor=self._executor,
            stats=self._stats,
            wait_s=wait_s,
            params=estimate_params or EstimateParams(),
            ps_ttl_s=ps_ttl_s,
            ps_max_stale_s=ps_max_stale_s,
            load_hold_max_s=load_hold_max_s,
        )
        # Loop-thread state.
        self._origins: dict[str, Origin] = {}
        self._clients: set[asyncio.Task[Any]] = set()
        self._is_upstream_down = False
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

    def forget_resident(self, model: str) -> None:
        """The supervisor is about to unload `model`: stop treating it as resident, so the
        next request for it gets room made first (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        key = model_key(model)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._admission.doom, key)

    def stats(self) -> GateStats:
        """A snapshot of the counters (safe from any thread)."""
        return GateStats(**dataclasses.asdict(self._stats))

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            self._start_error = self._start_error or exc
            raise
        finally:
            ready.set()  # never leave start() waiting
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
            self._admission.close()
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
        except Exception as exc:  # a bug: keep serving others, say what happened
            log.opt(exception=exc).error(f"Gate: unexpected error serving a client: {exc!r}")
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
            keep_alive = body is not None and req.keep_alive  # an unread body: close
            message = "vram-supervisor gate: no Ollama server is known now"
            _reply_error(writer, 502, message, keep_alive=keep_alive)
            return keep_alive
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

        def forward(on_head: Callable[[], None] | None) -> Awaitable[bool]:
            return self._forward(client, req, body, origin, on_head)

        return await self._admission.admit(load, forward)


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
