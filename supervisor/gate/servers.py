"""The gate in front of a model server of the registry's other kinds (llama-swap,
llama-server, vLLM ...): make room before a load, as the Ollama gate does for Ollama.

Enabled per role with VRAM_MODEL_GATES (`role=port` pairs); each gate stands in front of
every running server of its role (discovered containers and fixed URLs), bound to
VRAM_GATE_HOST. Policy:
- Routing: a load request goes to the server of the role that lists its model
  (`ModelServerApi.models()`: every model it would serve, loaded or not; each server's
  list is reused for MODELS_TTL_S), the first in order when several do; when none lists
  it (or none can be read), to the first server, which answers as it would directly.
  Everything else (requests that name no model) goes to the first server. With one
  server of the role nothing is read for routing.
- The model list (`GET /v1/models`, `GET /models`: LIST_ROUTES) with several servers is
  answered by the gate: it asks every server (the client's headers, its query, at once,
  each within LIST_TIMEOUT_S and LIST_MAX_BYTES) and answers
  `{"object": "list", "data": [...]}` with every entry of those that answered 200 with
  an OpenAI list, in server order, an id listed twice kept once (the first server's
  entry). A server that fails is left out (logged at debug); when none answers, the
  request goes to the first server, which answers as it would directly.
- The requests that make the server load a model are its kind's `ModelRoutes`: POST
  routes whose JSON body (or multipart form) names the model in `model`. Those bodies are
  read whole (with the Ollama gate's limits); everything else is relayed at once,
  untouched (GET routes that name a model in the query are not gated).
- A request for a model the server does not list as loaded (`served()`, cached for
  SERVED_TTL_S) is held while the RoomMaker frees the idle job servers on the server's
  GPUs (ComfyUI with its soft free, the other job servers with theirs), for at most
  VRAM_GATE_WAIT; then it is forwarded, with or without the room. These servers' APIs do
  not say what a model needs before it loads, so no estimate is made: the room is what
  the idle job servers hold. A request is never refused or changed; when the server
  cannot be read it goes on at once.
- A model that sleeps (a kind that sleeps and must be woken, `ServedState.can_wake`:
  vLLM queues requests while asleep and never wakes by itself) is woken by the gate after
  the room is made, before the request is forwarded (`ModelServerApi.wake`); a wake that
  fails is logged and the request goes on (the server answers it as it would directly).
- Held loads go one at a time (the next once the previous one's answer has begun);
  requests for loaded models never wait behind them.
- The models with a request in flight through the gate are serving one: the supervisor
  never unloads them (`in_flight`, read by the Actor before an unload), which closes the
  race of a busy check that a request just arriving does not show yet.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import httpx
from loguru import logger

from supervisor.clients._http import shared_tls
from supervisor.errors import ServiceError
from supervisor.gate.admission import Forward, make_room_within
from supervisor.gate.core import Proxy
from supervisor.gate.http11 import REQUEST_DROP, Fields, Limits, connection_tokens, header_value
from supervisor.gate.load_request import LoadRequest, parse_load_request
from supervisor.gate.relay import Exchange
from supervisor.gate.stats import Counters, InFlight
from supervisor.ports import ModelServerApi
from supervisor.tenants import ModelRoutes

log = logger.bind(component="gate")

SERVED_TTL_S = 0.5  # how long a read of the server's models is reused
MODELS_TTL_S = 5.0  # how long a server's list of the models it serves is reused (routing)
LIST_ROUTES = frozenset({b"/v1/models", b"/models"})  # answered with every server's models
LIST_TIMEOUT_S = 5.0  # each server's list, whole, within this
LIST_MAX_BYTES = 8 * 1024 * 1024  # a longer list is left out
# Not sent on to the servers when the gate asks them for their lists itself.
_LIST_DROP = REQUEST_DROP | {b"accept-encoding"}

# A server the gate can forward to: (service key, base URL, client).
Server = tuple[str, str, ModelServerApi]


class ServerRoomMaker(Protocol):
    """What a model-server gate needs of its RoomMaker (room_server.JobRoomFreer)."""

    def make_room(self, server_key: str, *, reason: str, deadline_s: float) -> bool: ...


def _as_sent(model: str) -> str:
    return model


class ServerGate(Proxy):
    """`Proxy` in front of one model server of a registry kind; see the module doc."""

    own_routes = LIST_ROUTES

    def __init__(
        self,
        *,
        title: str,
        routes: ModelRoutes,
        servers: Callable[[], Sequence[Server]],
        room: ServerRoomMaker,
        host: str = "127.0.0.1",
        port: int,
        wait_s: float = 30.0,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        event_loop: str = "asyncio",
        express_lane: bool = True,
    ) -> None:
        self.upstream_name = title
        self._servers = servers  # () -> the running servers of the role now, in order
        super().__init__(
            upstream_url=lambda: s[0][1] if (s := self._servers()) else None,
            host=host,
            port=port,
            limits=limits,
            stats=Counters(),
            event_loop=event_loop,
            express_lane=express_lane,
        )
        self._routes = routes
        self._room = room
        self._wait_s = wait_s
        self._clock = clock
        # (at, key, loaded or loading models, sleeping models that must be woken)
        self._served: tuple[float, str, frozenset[str], frozenset[str]] | None = None
        # (server key, model) -> requests in flight through this gate: serving a request.
        self._in_flight: InFlight[tuple[str, str]] = InFlight()
        # server key -> (at, the models it serves): routing (executor threads)
        self._lists: dict[str, tuple[float, frozenset[str]]] = {}
        self._list_reads: dict[str, threading.Lock] = {}  # one reader per server
        self._one_at_a_time: asyncio.Lock | None = None

    def stats(self) -> Any:
        return self._stats

    def in_flight(self) -> frozenset[tuple[str, str]]:
        """(server key, model) of the requests in flight through the gate now: those
        models serve a request and must not be unloaded (safe from any thread)."""
        return self._in_flight.keys()

    def _reads_body(self, method: bytes, route: bytes) -> bool:
        where = self._routes.names_model(method.decode("latin-1"), route.decode("latin-1"))
        return where in ("body", "form")

    def _parse(self, route: bytes, fields: Fields, body: bytes) -> object | None:
        content_type = header_value(fields, b"content-type")
        return parse_load_request(
            route, content_type, body, self._limits.json_values, normalise=_as_sent
        )

    async def _admit(self, request: object, forward: Forward) -> bool:
        assert isinstance(request, LoadRequest)
        servers = self._servers()
        if not servers:
            return await forward(None)
        target = servers[0]
        if len(servers) > 1:
            loop = asyncio.get_running_loop()
            target = await loop.run_in_executor(
                self._executor, self._owner, tuple(servers), request.model
            )
        with self._in_flight.holding((target[0], request.model)):
            return await self._admit_to(target, request, forward)

    async def _admit_to(self, target: Server, request: LoadRequest, forward: Forward) -> bool:
        loop = asyncio.get_running_loop()
        key, url, api = target
        read = await loop.run_in_executor(self._executor, self._loaded, key, api)
        if read is None or request.model in read[0]:
            return await forward(None, url)
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        lock = self._one_at_a_time
        await lock.acquire()
        is_released = False

        def release() -> None:
            # The next held load goes once this one's answer has begun (the server has the
            # model, or said why not): not after the whole answer, which may be minutes.
            nonlocal is_released
            if not is_released:
                is_released = True
                lock.release()

        try:
            read = await loop.run_in_executor(self._executor, self._loaded, key, api, True)
            if read is not None and request.model not in read[0]:
                reason = f"gate: load of {request.model} on {key}"
                log.info(f"Gate: {request.model} is not loaded on {key}; making room first")

                async def call(fn: Callable[[], bool]) -> bool:
                    return await loop.run_in_executor(self._executor, fn)

                await make_room_within(
                    call,
                    lambda: self._room.make_room(key, reason=reason, deadline_s=self._wait_s),
                    self._wait_s,
                    self._stats,
                    request.model,
                    self._clock,
                )
                self._served = None
                if request.model in read[1]:
                    await loop.run_in_executor(self._executor, self._wake, key, api, request.model)
            return await forward(release, url)
        finally:
            release()

    async def _own_answer(self, ex: Exchange) -> bytes | None:
        """With several servers, the union of their model lists (see the module doc)."""
        servers = self._servers()
        if len(servers) < 2:
            return None
        tokens = connection_tokens(ex.fields)
        headers = [
            (name, value)
            for low, name, value in ex.fields
            if low not in _LIST_DROP and low not in tokens
        ]
        path = ex.path.decode("latin-1")
        async with httpx.AsyncClient(verify=shared_tls(), timeout=LIST_TIMEOUT_S) as client:
            lists = await asyncio.gather(
                *(_model_list(client, key, url, path, headers) for key, url, _ in servers)
            )
        entries: list[dict[str, Any]] = []
        seen: set[str] = set()
        for listed in lists:
            for entry in listed or ():
                if entry["id"] not in seen:
                    seen.add(entry["id"])
                    entries.append(entry)
        if all(listed is None for listed in lists):
            return None
        return json.dumps({"object": "list", "data": entries}).encode()

    def _owner(self, servers: tuple[Server, ...], model: str) -> Server:
        """The first server that lists `model` among those it serves; else the first."""
        for gone in set(self._lists) - {key for key, _, _ in servers}:
            self._lists.pop(gone, None)
        for server in servers:
            if model in self._serves(server):
                return server
        log.debug(f"Gate: no {self.upstream_name} lists {model}; sending it to the first")
        return servers[0]

    def _serves(self, server: Server) -> frozenset[str]:
        """What `server` lists, read at most once per MODELS_TTL_S and by one request at a
        time (the others use what is known: a server that hangs holds one thread, not
        all). A failed read keeps the last good list (a llama-server loading its model
        answers 503 meanwhile: its model is still its own)."""
        key, _, api = server
        cached = self._lists.get(key)
        if cached is not None and self._clock() - cached[0] < MODELS_TTL_S:
            return cached[1]
        reading = self._list_reads.setdefault(key, threading.Lock())
        if not reading.acquire(blocking=False):
            return cached[1] if cached is not None else frozenset()
        try:
            try:
                names = frozenset(api.models())
            except ServiceError as exc:
                log.debug(f"Gate: cannot list the models of {key}: {exc}")
                names = cached[1] if cached is not None else frozenset()
            self._lists[key] = (self._clock(), names)  # after the read: it may be slow
            return names
        finally:
            reading.release()

    def _loaded(
        self, key: str, api: ModelServerApi, fresh: bool = False
    ) -> tuple[frozenset[str], frozenset[str]] | None:
        """The models the server has loaded or is loading, and those asleep that the
        supervisor must wake (None: it cannot be read)."""
        cached = self._served
        now = self._clock()
        if not fresh and cached is not None and cached[1] == key and now - cached[0] < SERVED_TTL_S:
            return cached[2], cached[3]
        try:
            state = api.served()
        except ServiceError as exc:
            log.debug(f"Gate: cannot read {key}: {exc}")
            return None
        loaded = frozenset(m.name for m in state.models if m.is_resident)
        asleep = frozenset(m.name for m in state.models if m.state == "sleeping" and state.can_wake)
        self._served = (now, key, loaded, asleep)
        return loaded, asleep

    def _wake(self, key: str, api: ModelServerApi, model: str) -> None:
        try:
            api.wake(model)
            log.info(f"Gate: woke {model} on {key} after making room")
        except ServiceError as exc:
            log.warning(f"Gate: could not wake {model} on {key}: {exc}; forwarding anyway")


async def _model_list(
    client: httpx.AsyncClient, key: str, url: str, path: str, headers: list[tuple[bytes, bytes]]
) -> list[dict[str, Any]] | None:
    """The entries of one server's OpenAI model list (`data`, each with a string `id`);
    None when it does not answer one in time (logged at debug)."""
    try:
        async with asyncio.timeout(LIST_TIMEOUT_S):
            async with client.stream("GET", url.rstrip("/") + path, headers=headers) as r:
                if r.status_code != 200:
                    raise ValueError(f"HTTP {r.status_code}")
                body = bytearray()
                async for piece in r.aiter_bytes():
                    body += piece
                    if len(body) > LIST_MAX_BYTES:
                        raise ValueError(f"a list over {LIST_MAX_BYTES} bytes")
        data = json.loads(body)
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
        ):
            raise ValueError("not an OpenAI model list")
        return entries
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:  # JSONDecodeError too
        log.debug(f"Gate: left the models of {key} out of the list: {exc or type(exc).__name__}")
        return None
