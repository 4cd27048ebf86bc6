"""The gates' proxy (`Proxy`) and the Ollama gate (`Gate`), which makes room before a load.

Clients that talk to the gate instead of Ollama get the room made before Ollama decides a
model's GPU/CPU split. `Proxy` owns the listener, the client connections and the thread,
and leaves to its subclass which requests it reads whole and when they may go on (the
image gate in front of ComfyUI is comfy.py); admission.py decides when a load request may
go on; relay.py moves the bytes, tunnel.py a WebSocket's; h11 (through http11.py) reads
and writes HTTP/1.1. Plain requests that need no waiting take the express lane instead
(express.py: httptools, in protocol callbacks; `_express`), unless VRAM_GATE_EXPRESS is
off.
Policy (the Ollama gate's; the image gate keeps the same limits and errors):
- Only POSTs to the endpoints that can load a model (load_request.LOAD_PATHS) are looked
  into; everything else is relayed at once, untouched, and never waits for a load.
- A client that disconnects cancels its request, wherever it is: waiting for room,
  waiting for Ollama, or streaming (a load dies with its client, api-facts gotcha 4).
- No Ollama known, or Ollama unreachable: 502 with {"error": "..."}; the error names the
  service, never its address (the upstream URL and the cause go to the log only). A request the gate
  refuses: 400, 405, 413, 431, 501, 503 or 505 with {"error": "..."}, and the connection
  is closed.
- Every buffer, wait and the number of connections is bounded (http11.Limits,
  docs/gate.md "Limits"). Client-supplied strings reach the log quoted and truncated.
- One event loop on one thread serves every connection (asyncio's, or uvloop:
  VRAM_GATE_LOOP, loop.py); blocking Ollama and RoomMaker calls run on a
  small thread pool owned by the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import h11
from loguru import logger

from supervisor.estimate import EstimateParams
from supervisor.gate import express
from supervisor.gate.admission import Admission, Forward, model_key
from supervisor.gate.http11 import (
    Fields,
    Limits,
    Refused,
    Stream,
    error_body,
    error_headers,
    fields_of,
    has_both_framings,
    header_value,
    quoted,
    raw_error,
    request_path,
    status_hint,
)
from supervisor.gate.load_request import LOAD_PATHS, LoadRequest, parse_load_request
from supervisor.gate.loop import loop_name, new_event_loop
from supervisor.gate.relay import ClientGone, Exchange, Origin, Pool, UpstreamError, relay
from supervisor.gate.stats import Counters, GateStats, InFlight
from supervisor.gate.tunnel import WS_IDLE_S, is_upgrade, tunnel
from supervisor.ports import OllamaApi, RoomMaker

log = logger.bind(component="gate")

START_TIMEOUT_S = 10.0
# The longest the express lane waits for the rest of a request whose start came (its body
# in a second write, as httpx sends it); then the general path reads it.
EXPRESS_WAIT_S = 0.05
LOOP_ERROR_LOG_EVERY_S = 10.0  # the same asyncio error is logged at most this often


# Threads for the gate's blocking calls (the services' APIs, the RoomMaker), all started
# with the gate.
CALL_THREADS = 4


class _Client:
    """One client connection and the task serving it. `in_exchange`: a request is being
    served, so a disconnect must cancel it; `express`: the express lane serves one."""

    __slots__ = ("express", "in_exchange", "is_gone", "lane", "partial", "stream", "task", "wait")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.task: asyncio.Task[Any] | None = None  # set as soon as it is made
        self.in_exchange = False
        self.is_gone = False
        self.express: express.Exchange | None = None
        self.lane: Callable[[bytes], bool] | None = None  # the express lane's entry
        # The start of a request the express lane waits to see whole, and the timer after
        # which it leaves it to the general path.
        self.partial: express.RequestReader | None = None
        self.wait: asyncio.TimerHandle | None = None
        stream.on_lost = self._on_lost

    def take_partial(self) -> express.RequestReader | None:
        """The start of a request the express lane waited for, no longer waited for."""
        partial, self.partial = self.partial, None
        if self.wait is not None:
            self.wait.cancel()
            self.wait = None
        self.stream.hold = False
        return partial

    def leave_partial(self) -> None:
        """Hand the start of a request the express lane waited for to the general path."""
        partial = self.take_partial()
        if partial is not None:
            self.stream.give_back(partial.raw)
        self.stream.wake()

    def _on_lost(self) -> None:
        if self.partial is not None:
            self.take_partial()  # the rest will never come
            self.stream.wake()
        if self.express is not None:
            self.express.client_gone()
        elif self.in_exchange and not self.is_gone and self.task is not None:
            self.is_gone = True
            self.task.cancel()


class Proxy:
    """A reverse proxy on `host:port` (port 0: any free port, see `.port` after
    `start()`) in front of one upstream server; the subclass decides which requests it
    reads whole (`_reads_body`), what it finds in them (`_parse`) and when they may go on
    (`_admit`). Everything else is relayed at once, untouched.

    `upstream_url` is the upstream's base URL, or a callable that returns the current one
    (None: not known now) and is called for every request, so it must be cheap and
    thread-safe.
    """

    upstream_name = "the upstream"  # for logs and error answers
    allows_upgrade = False  # relay `Upgrade: websocket` requests (tunnel.py)
    # GET routes (no query) the subclass may answer itself (`_own_answer`).
    own_routes: frozenset[bytes] = frozenset()

    def __init__(
        self,
        *,
        upstream_url: str | Callable[[], str | None],
        host: str = "127.0.0.1",
        port: int,
        connect_timeout_s: float = 10.0,
        limits: Limits | None = None,
        stats: Any = None,
        ws_idle_s: float = WS_IDLE_S,
        event_loop: str = "asyncio",
        express_lane: bool = True,
    ) -> None:
        self._upstream: Callable[[], str | None] = (
            upstream_url if callable(upstream_url) else functools.partial(str, upstream_url)
        )
        self._host = host
        self._port = port
        self._ws_idle_s = ws_idle_s
        self._event_loop = event_loop  # loop.LOOPS: which event loop the thread runs
        self._express_lane = express_lane  # serve plain requests in callbacks (express.py)
        self._loop_name = ""
        self._limits = limits or Limits()
        self._pool = Pool(limits=self._limits, connect_timeout_s=connect_timeout_s)
        self._executor = ThreadPoolExecutor(
            max_workers=CALL_THREADS, thread_name_prefix="gate-calls"
        )
        # Any counters with requests_total and upstream_errors_total (loop thread only).
        self._stats: Any = stats if stats is not None else Counters()
        # Loop-thread state.
        self._origins: dict[str, Origin] = {}
        self._clients: set[asyncio.Task[Any]] = set()
        self._is_upstream_down = False
        self._load_bytes_held = 0
        self._loop_errors: dict[str, float] = {}
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
        self._start_call_threads()
        where = f"{self._host}:{self._port}"
        log.info(f"{self.upstream_name} gate listening on {where} ({self._loop_name})")

    def _start_call_threads(self) -> None:
        """Start every thread of the blocking-call pool now: a pool starts them one by one
        as calls overlap, so the process's thread count would creep up over days to the
        bound (not a leak, but indistinguishable from one for whoever watches it)."""
        barrier = threading.Barrier(CALL_THREADS + 1)
        for _ in range(CALL_THREADS):
            self._executor.submit(barrier.wait, START_TIMEOUT_S)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(START_TIMEOUT_S)

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

    def is_serving(self) -> bool:
        """Whether it started and still listens (safe from any thread)."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and self._start_error is None
            and self._stopping is not None
            and not self._stopping.is_set()
        )

    # ------------------------------------------------------------------ hooks

    def _reads_body(self, method: bytes, route: bytes) -> bool:
        """Whether the gate reads this request's body whole to look inside it."""
        return False

    def _parse(self, route: bytes, fields: Fields, body: bytes) -> object | None:
        """What `_admit` needs from a body read whole; None: relay it at once."""
        return None

    async def _admit(self, request: object, forward: Forward) -> bool:
        """Forward (`forward(on_head)`) when the request may go on; returns its result."""
        return await forward(None)

    def _admit_now(self, request: object) -> Callable[[], None] | None:
        """For the express lane: when `request` (what `_parse` found) may go on at once
        without waiting for anything, a callable to call when its answer has ended; None:
        it takes the general path (`_admit`)."""
        return None

    async def _own_answer(self, ex: Exchange) -> bytes | None:
        """The JSON body of a 200 the gate answers itself for a GET of `own_routes`
        (with no body); None: forward the request as any other."""
        return None

    def _on_stop(self) -> None:
        """Called on the loop thread when the proxy stops."""

    def _run(self, ready: threading.Event) -> None:
        loop = new_event_loop(self._event_loop)
        self._loop_name = loop_name(loop)
        loop.set_exception_handler(self._on_loop_error)
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

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own errors (accept failing at the descriptor limit, ...): one line, no
        traceback, at most once per LOOP_ERROR_LOG_EVERY_S for the same message."""
        message = str(context.get("message", "asyncio error"))
        exc = context.get("exception")
        text = f"{message}: {exc!r}" if exc is not None else message
        now = time.monotonic()
        if now - self._loop_errors.get(text, -LOOP_ERROR_LOG_EVERY_S) >= LOOP_ERROR_LOG_EVERY_S:
            self._loop_errors[text] = now
            log.warning(f"Gate: {text}")

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        gate = self

        class ClientStream(Stream):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                gate._accept(self)

        try:
            server = await loop.create_server(
                lambda: ClientStream(self._limits.buffer_bytes),
                self._host,
                self._port,
                reuse_address=True,
                backlog=512,
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
            self._on_stop()
            self._pool.close()

    # ------------------------------------------------------------------ connections

    def _accept(self, stream: Stream) -> None:
        if len(self._clients) >= self._limits.max_clients:
            message = f"vram-supervisor gate: over {self._limits.max_clients} connections"
            with contextlib.suppress(OSError):
                stream.write(raw_error(503, message))
            stream.close()
            return
        client = _Client(stream)
        if self._express_lane:
            # From the first byte: the task that serves the connection may start after
            # its first request arrived.
            client.lane = stream.on_data = functools.partial(self._express, client)
        task = asyncio.get_running_loop().create_task(self._on_client(client))
        client.task = task
        self._clients.add(task)

    async def _on_client(self, client: _Client) -> None:
        stream, task = client.stream, client.task
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.head_bytes)
        try:
            while True:
                try:
                    event = await self._read_head(conn, client)
                except h11.RemoteProtocolError as exc:
                    self._refuse(conn, stream, status_hint(exc), f"malformed request: {exc}")
                    break
                if not isinstance(event, h11.Request):
                    break  # closed between requests, or timed out
                if _head_size(event) > self._limits.head_bytes:
                    # h11 bounds a head that arrives in pieces; this, one that came whole.
                    self._refuse(conn, stream, 431, "request head too large")
                    break
                self._stats.requests_total += 1
                if not await self._exchange(client, conn, event):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (OSError, ClientGone, TimeoutError, h11.ProtocolError):
            pass  # the client went away or broke its request mid-way: just close
        except UpstreamError:
            pass  # the answer broke mid-way: closing tells the client it is truncated
        except asyncio.CancelledError:
            pass  # the gate stops
        except Exception as exc:  # noqa: BLE001 - a bug: keep serving others, say what happened
            log.opt(exception=exc).error(f"Gate: unexpected error serving a client: {exc!r}")
        finally:
            stream.close()
            self._clients.discard(task)

    async def _read_head(self, conn: h11.Connection, client: _Client) -> object:
        """The next request head: a connection idle for `idle_client_s` is closed, and a
        head must arrive whole within `head_timeout_s` of its first byte (slow clients
        cannot hold a connection forever). Meanwhile, requests that arrive whole and plain
        go by the express lane (`_express`) without waking this task."""
        loop = asyncio.get_running_loop()
        limits = self._limits
        stream = client.stream
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            timeout = limits.idle_client_s
            if deadline is not None:
                timeout = max(0.0, deadline - loop.time())
            elif (
                client.lane is not None
                and not stream.hold  # (the lane is serving or waiting for a request)
                and conn.their_state is h11.IDLE
                and not conn.trailing_data[0]
            ):
                stream.on_data = client.lane
            try:
                data = await stream.read(timeout)
            except TimeoutError:
                if deadline is not None:
                    self._refuse(conn, stream, 408, "the request head did not arrive in time")
                return None
            finally:
                stream.on_data = None
            if deadline is None:
                deadline = loop.time() + limits.head_timeout_s
            conn.receive_data(data)

    def _express(self, client: _Client, data: bytes) -> bool:
        """Take `data` for the express lane: serve it (express.py) when it is one whole,
        plain request that may go on at once and an idle upstream connection is at hand,
        or wait up to EXPRESS_WAIT_S for the rest of what may be one. False: the general
        path reads it (nothing was done with it)."""
        partial, client.partial = client.partial, None
        reader = partial or express.RequestReader(self._limits)
        req = reader.feed(data)
        if isinstance(req, express.Incomplete):
            client.partial = reader
            client.stream.hold = True  # the end, or an idle limit, waits for it too
            if client.wait is None:  # counted from its first byte
                loop = asyncio.get_running_loop()
                client.wait = loop.call_later(EXPRESS_WAIT_S, client.leave_partial)
            return True
        if partial is not None:
            client.take_partial()  # no longer waited for
        if req is not None and self._express_serve(client, req):
            return True
        if partial is None:
            return False
        client.partial = reader  # and the general path takes it whole
        client.leave_partial()
        return True

    def _express_serve(self, client: _Client, req: express.Request) -> bool:
        stream = client.stream
        if stream.is_eof or client.express is not None:
            return False
        own = self.own_routes
        if own and req.method == b"GET" and req.route in own:
            return False
        origin = self._origin()
        if origin is None or not self._pool.has_idle(origin):
            return False
        load: object | None = None
        if self._reads_body(req.method, req.route):
            try:
                load = self._parse(req.route, req.fields, req.body)
            except Exception:  # noqa: BLE001 - the general path answers (or logs) it
                return False
        on_end: Callable[[], None] | None = None
        if load is not None:
            on_end = self._admit_now(load)
            if on_end is None:
                return False
        conn = self._pool.take_idle(origin)
        if conn is None:  # every idle one had closed
            if on_end is not None:
                on_end()
            return False
        self._stats.requests_total += 1
        self._stats.express_total += 1
        stream.on_data = None
        stream.hold = True  # what follows waits for this answer
        ended = functools.partial(self._express_ended, client, req, conn.origin, on_end)
        client.express = express.Exchange(
            client=stream, conn=conn, req=req, pool=self._pool, limits=self._limits, on_end=ended
        )
        client.express.start()
        return True

    def _express_ended(
        self,
        client: _Client,
        req: express.Request,
        origin: Origin,
        on_end: Callable[[], None] | None,
        ended: express.Ended,
    ) -> None:
        client.express = None
        if on_end is not None:
            on_end()
        stream = client.stream
        if ended.give_back:
            # A pooled connection the upstream had closed: the general path sends it again
            # (an idempotent request whose answer had not begun).
            self._stats.requests_total -= 1  # counted again there
            self._stats.express_total -= 1
            stream.give_back(req.raw)
        elif ended.failure is not None and not ended.answered:
            self._stats.upstream_errors_total += 1
            what = f"{quoted(req.method, 16)} {quoted(req.target)}"
            self._upstream_failed(
                f"{self.upstream_name} did not answer {what}: {origin.url} {ended.failure}"
            )
            answer = raw_error(502, f"vram-supervisor gate: {self._unreachable()}", close=False)
            with contextlib.suppress(ConnectionError):
                stream.write(answer)
        elif ended.is_complete:
            self._upstream_answered(origin)
        stream.touched_at = asyncio.get_running_loop().time()
        stream.hold = False
        if stream.buffered or stream.is_eof:
            stream.wake()  # the general path reads what came meanwhile, or the end
        else:
            stream.on_data = client.lane

    def _refuse(self, conn: h11.Connection, stream: Stream, status: int, message: str) -> None:
        """Answer an error the gate decided itself; the connection is closed after it."""
        text = f"vram-supervisor gate: {message}"
        with contextlib.suppress(OSError, h11.ProtocolError):
            if conn.our_state is h11.SEND_RESPONSE:
                body = error_body(text)
                head = h11.Response(
                    status_code=status,
                    headers=error_headers(body, close=True),
                    reason=HTTPStatus(status).phrase.encode(),
                )
                stream.write(conn.send(head) + conn.send(h11.Data(data=body)))
                stream.write(conn.send(h11.EndOfMessage()))
            else:
                stream.write(raw_error(status, text))

    async def _exchange(self, client: _Client, conn: h11.Connection, req: h11.Request) -> bool:
        """Serve one request; True when the connection may carry another."""
        stream = client.stream
        try:
            if req.http_version not in (b"1.0", b"1.1"):
                raise Refused(505, "only HTTP/1.1 and HTTP/1.0 are supported")
            fields = fields_of(req.headers)
            if has_both_framings(fields):
                raise Refused(400, "Content-Length and Transfer-Encoding together")
            path = request_path(req)
        except Refused as exc:
            self._refuse(conn, stream, exc.status, exc.message)
            return False
        ex = Exchange(
            client=conn, stream=stream, req=req, path=path, fields=fields, limits=self._limits
        )
        route = path.split(b"?", 1)[0]
        is_load = self._reads_body(req.method, route)
        held = 0
        client.in_exchange = True
        try:
            try:
                body: bytes | None = None
                load: object | None = None
                if is_load:
                    body, held = await self._read_load_body(ex)
                    load = self._parse(route, fields, body)
                else:
                    body = await self._body_if_arrived(ex)
            except h11.RemoteProtocolError as exc:
                self._refuse(conn, stream, status_hint(exc), f"malformed request body: {exc}")
                return False
            origin = self._origin()
            if origin is None:
                self._stats.upstream_errors_total += 1
                return await self._reply_502(ex, f"no {self.upstream_name} server is known now")
            if self.allows_upgrade and is_upgrade(req, fields):
                if body is None or ex.pending:
                    raise Refused(400, "an Upgrade request with a body")
                return await self._tunnel(ex, origin)
            if load is None:
                own = self.own_routes
                if own and body == b"" and req.method == b"GET" and route in own:
                    answer = await self._own_answer(ex)
                    if answer is not None:
                        return await self._reply_json(ex, 200, answer)
                return await self._forward(ex, body, origin)

            async def forward(
                on_head: Callable[[], None] | None, upstream_url: str | None = None
            ) -> bool:
                target = origin if upstream_url is None else self._origin_at(upstream_url)
                if target is None:  # `_origin_at` logged the URL and why
                    self._stats.upstream_errors_total += 1
                    return await self._reply_502(ex, self._unreachable())
                return await self._forward(ex, body, target, on_head)

            return await self._admit(load, forward)
        except Refused as exc:  # also from a request body that broke while streamed
            self._refuse(conn, stream, exc.status, exc.message)
            return False
        except asyncio.CancelledError:
            if client.is_gone:
                assert client.task is not None  # it was cancelled through it
                client.task.uncancel()
                return False
            raise
        finally:
            client.in_exchange = False
            self._load_bytes_held -= held

    async def _body_if_arrived(self, ex: Exchange) -> bytes | None:
        """The request body when it came whole with its head (b"" when there is none);
        None when it is still arriving (it is then streamed to the upstream)."""
        conn = ex.client
        pieces: list[bytes] = []
        while True:
            event = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(pieces)
            if isinstance(event, h11.Data):
                pieces.append(bytes(event.data))
                continue
            if pieces:  # part of it is here: hand it back to h11 to stream in order
                ex.pending = pieces
            if conn.they_are_waiting_for_100_continue:
                await ex.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            return None

    async def _read_load_body(self, ex: Exchange) -> tuple[bytes, int]:
        """The whole body of a load request and the bytes it holds of the load budget.
        Refused: over `load_body_bytes` (413), or all load bodies held at once would pass
        `load_bodies_total_bytes` (503)."""
        limits = self._limits
        declared = header_value(ex.fields, b"content-length")
        size = int(declared) if declared is not None else 0
        too_big = Refused(
            413, f"a load request's body is limited to {limits.load_body_bytes} bytes"
        )
        if size > limits.load_body_bytes:
            raise too_big
        held = 0

        def hold(n: int) -> None:
            nonlocal held
            if self._load_bytes_held + n > limits.load_bodies_total_bytes:
                raise Refused(503, "too many large load requests at once; retry shortly")
            self._load_bytes_held += n
            held += n

        try:
            hold(size)
            if ex.client.they_are_waiting_for_100_continue:
                await ex.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            pieces: list[bytes] = []
            total = 0
            while True:
                event = await ex.next_body_event()
                if isinstance(event, h11.EndOfMessage):
                    return b"".join(pieces), held
                assert isinstance(event, h11.Data)
                total += len(event.data)
                if total > limits.load_body_bytes:
                    raise too_big
                if total > held:
                    hold(total - held)
                pieces.append(bytes(event.data))
        except BaseException:
            self._load_bytes_held -= held
            raise

    def _origin(self) -> Origin | None:
        url = self._upstream()
        return self._origin_at(url) if url else None

    def _origin_at(self, url: str) -> Origin | None:
        origin = self._origins.get(url)
        if origin is None:
            try:
                origin = Origin.parse(url)
            except ValueError as exc:
                log.warning(f"Gate: the {self.upstream_name} URL {url!r} is not usable: {exc}")
                return None
            self._origins[url] = origin
        return origin

    def _unreachable(self) -> str:
        """The 502's error when the upstream could not be reached or broke: the client
        learns which service, never its internal address (that, and the cause, are in
        the supervisor's log)."""
        return f"could not reach {self.upstream_name}; the supervisor's log says why"

    async def _reply_502(self, ex: Exchange, message: str) -> bool:
        """502 with the error; True when the connection may go on (the whole request was
        read). `message` reaches the client: no internal address in it."""
        return await self._reply_json(ex, 502, error_body(f"vram-supervisor gate: {message}"))

    async def _reply_json(self, ex: Exchange, status: int, body: bytes) -> bool:
        """An answer of the gate's own with a JSON body; True when the connection may go
        on (the whole request was read)."""
        keep_alive = ex.client.their_state is h11.DONE and ex.req.http_version == b"1.1"
        headers = error_headers(body, close=not keep_alive)
        reason = HTTPStatus(status).phrase.encode()
        await ex.send(h11.Response(status_code=status, headers=headers, reason=reason))
        await ex.send(h11.Data(data=body))
        await ex.send(h11.EndOfMessage())
        return keep_alive

    async def _forward(
        self,
        ex: Exchange,
        body: bytes | None,
        origin: Origin,
        on_head: Callable[[], None] | None = None,
    ) -> bool:
        try:
            await relay(pool=self._pool, origin=origin, ex=ex, body=body, on_head=on_head)
        except UpstreamError as exc:
            if exc.is_answered:
                raise
            self._stats.upstream_errors_total += 1
            what = f"{quoted(ex.req.method, 16)} {quoted(ex.path)}"
            self._upstream_failed(f"{self.upstream_name} did not answer {what}: {exc}")
            return await self._reply_502(ex, self._unreachable())
        self._upstream_answered(origin)
        return True

    def _upstream_failed(self, message: str) -> None:
        if not self._is_upstream_down:
            self._is_upstream_down = True
            log.warning(f"Gate: {message}")
        else:
            log.debug(f"Gate: {message}")

    def _upstream_answered(self, origin: Origin) -> None:
        if self._is_upstream_down:
            self._is_upstream_down = False
            log.info(f"Gate: {self.upstream_name} at {origin.url} answers again")

    async def _tunnel(self, ex: Exchange, origin: Origin) -> bool:
        """Relay an `Upgrade: websocket` request; after a 101 the connection is a byte
        tunnel until either side closes. False: the connection is done."""
        try:
            await tunnel(
                pool=self._pool,
                origin=origin,
                ex=ex,
                idle_s=self._ws_idle_s,
                on_open=self._on_tunnel,
            )
        except UpstreamError as exc:
            if exc.is_answered:
                raise
            self._stats.upstream_errors_total += 1
            what = f"the WebSocket {quoted(ex.path)}"
            self._upstream_failed(f"{self.upstream_name} did not answer {what}: {exc}")
            await self._reply_502(ex, self._unreachable())
            return False
        self._upstream_answered(origin)
        return False

    def _on_tunnel(self) -> None:
        """A WebSocket tunnel opened (loop thread)."""


# The longest a gated load waits for the previous one to be in (admission.py), as Ollama
# gives a load (OLLAMA_LOAD_TIMEOUT); read when a gate is built, so a benchmark in
# compressed time can scale it (tests/bench/scaled_supervisor.py).
LOAD_HOLD_MAX_S = 300.0


class Gate(Proxy):
    """The Ollama gate: `Proxy` in front of Ollama that makes room before a load."""

    upstream_name = "Ollama"

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
        load_hold_max_s: float | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        event_loop: str = "asyncio",
        express_lane: bool = True,
    ) -> None:
        super().__init__(
            upstream_url=upstream_url,
            host=host,
            port=port,
            connect_timeout_s=connect_timeout_s,
            limits=limits,
            event_loop=event_loop,
            express_lane=express_lane,
        )
        self._admission = Admission(
            ollama=ollama,
            room=room,
            executor=self._executor,
            stats=self._stats,
            wait_s=wait_s,
            params=estimate_params or EstimateParams(),
            ps_ttl_s=ps_ttl_s,
            ps_max_stale_s=ps_max_stale_s,
            load_hold_max_s=LOAD_HOLD_MAX_S if load_hold_max_s is None else load_hold_max_s,
            clock=clock,
        )
        # Models with a load request in flight through this gate: serving a request.
        self._in_flight: InFlight[str] = InFlight()

    def forget_resident(self, model: str) -> None:
        """The supervisor is about to unload `model`: stop treating it as resident, so the
        next request for it gets room made first (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        key = model_key(model)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._admission.doom, key)

    def busy_models(self) -> frozenset[str]:
        """Models (`model_key`) with a request in flight through the gate now: they are
        serving a request (safe from any thread)."""
        return self._in_flight.keys()

    def stats(self) -> GateStats:
        """A snapshot of the counters (safe from any thread)."""
        return GateStats(**dataclasses.asdict(self._stats))

    def _reads_body(self, method: bytes, route: bytes) -> bool:
        return method == b"POST" and route in LOAD_PATHS

    def _parse(self, route: bytes, fields: Fields, body: bytes) -> object | None:
        content_type = header_value(fields, b"content-type")
        return parse_load_request(route, content_type, body, self._limits.json_values)

    async def _admit(self, request: object, forward: Forward) -> bool:
        assert isinstance(request, LoadRequest)
        key = model_key(request.model)
        self._in_flight.add(key)  # not `holding()`: a generator per request costs more
        try:
            if not request.needs_room:
                return await forward(None)
            return await self._admission.admit(request, forward)
        finally:
            self._in_flight.discard(key)

    def _admit_now(self, request: object) -> Callable[[], None] | None:
        assert isinstance(request, LoadRequest)
        key = model_key(request.model)
        if request.needs_room and not self._admission.admits_now(key):
            return None
        self._in_flight.add(key)
        return functools.partial(self._in_flight.discard, key)

    def _on_stop(self) -> None:
        self._admission.close()


def _head_size(req: h11.Request) -> int:
    """About how many bytes the request head took (its line and header fields)."""
    size = len(req.method) + len(req.target) + 12
    for name, value in req.headers.raw_items():
        size += len(name) + len(value) + 4
    return size
