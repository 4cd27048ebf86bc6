"""The gate in front of a model server of another kind (gate/servers.py), with an
in-process server state and RoomMaker around a real upstream (the simulator's
llama-server): a load of a model that is not loaded makes room first, one at a time; a
loaded model goes straight on; a sleeping model that must be woken is woken after the room
is made; a server that cannot be read does not hold anything."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from supervisor.clients.llama_server import LlamaServerClient
from supervisor.errors import ServiceError
from supervisor.gate.servers import ServerGate
from supervisor.model import ServedModel, ServedState
from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB, open_gpu
from supervisor.sim.llama_server import FakeLlamaServer, LlamaServerConfig
from supervisor.tenants import kind_of
from tests.gate.rawnet import RawUpstream, Seen


class Server:
    """A model server's state as the gate reads it (`ports.ModelServerApi`)."""

    def __init__(self, state: str | None, *, can_wake: bool = False) -> None:
        self.state = state  # None: unreadable
        self.can_wake = can_wake
        self.events: list[str] = []
        self.lock = threading.Lock()

    def served(self) -> ServedState:
        if self.state is None:
            raise ServiceError("llama-swap", "refused")
        models = (ServedModel("m", self.state),) if self.state != "none" else ()
        return ServedState(models, can_unload=True, can_wake=self.can_wake)

    def models(self) -> tuple[str, ...]:
        raise AssertionError("one server of the role: nothing is read for routing")

    def busy(self, model: str) -> bool | None:
        return False

    def unload(self, model: str) -> None:
        raise AssertionError("the gate never unloads")

    def wake(self, model: str) -> None:
        with self.lock:
            self.events.append(f"wake {model}")
        self.state = "loaded"

    def close(self) -> None:
        pass


class Room:
    def __init__(self, server: Server, seconds: float = 0.0) -> None:
        self.server, self.seconds = server, seconds
        self.calls: list[str] = []

    def make_room(self, server_key: str, *, reason: str, deadline_s: float) -> bool:
        with self.server.lock:
            self.server.events.append(f"room {reason}")
        self.calls.append(server_key)
        time.sleep(self.seconds)
        return True


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with SimHost(time_scale=0.01, llama_server=LlamaServerConfig(model="llama3.2:latest")) as h:
        yield h.llama_server_url


def gate_for(upstream: str, server: Server, room: Room) -> ServerGate:
    kind = kind_of("llama-swap")
    gate = ServerGate(
        title=kind.title,
        routes=kind.routes,
        servers=lambda: [("llama-swap/swap", upstream, server)],  # type: ignore[list-item]
        room=room,
        port=0,
        wait_s=5.0,
    )
    gate.start()
    return gate


def chat(gate: ServerGate, model: str = "m") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"http://127.0.0.1:{gate.port}/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize(
    ("state", "can_wake", "events"),
    [
        ("none", False, ["room gate: load of m on llama-swap/swap"]),
        ("loaded", False, []),
        ("starting", False, []),  # already loading: making room now would be too late
        ("sleeping", True, ["room gate: load of m on llama-swap/swap", "wake m"]),
        ("sleeping", False, ["room gate: load of m on llama-swap/swap"]),  # wakes itself
        (None, False, []),  # unreadable: never held
    ],
)
def test_what_the_gate_does_before_a_load(
    upstream: str, state: str | None, can_wake: bool, events: list[str]
) -> None:
    server = Server(state, can_wake=can_wake)
    gate = gate_for(upstream, server, Room(server))
    try:
        assert chat(gate).status_code == 200
    finally:
        gate.stop()
    assert server.events == events


def test_requests_that_load_nothing_pass_untouched(upstream: str) -> None:
    server = Server("none")
    room = Room(server)
    gate = gate_for(upstream, server, room)
    try:
        assert httpx.get(f"http://127.0.0.1:{gate.port}/health", timeout=10).status_code == 200
        models = httpx.get(f"http://127.0.0.1:{gate.port}/v1/models", timeout=10)
        assert models.status_code == 200 and models.json()["data"]
    finally:
        gate.stop()
    assert room.calls == []


def test_held_loads_go_one_at_a_time(upstream: str) -> None:
    server = Server("none")
    room = Room(server, seconds=0.3)
    gate = gate_for(upstream, server, room)
    try:
        with_threads = [threading.Thread(target=chat, args=(gate,)) for _ in range(3)]
        started = time.monotonic()
        for t in with_threads:
            t.start()
        for t in with_threads:
            t.join(30)
        took = time.monotonic() - started
    finally:
        gate.stop()
    # Each held load re-reads the server after the previous one: still not loaded here,
    # so each makes room in turn (never two at once).
    assert len(room.calls) == 3 and took >= 0.9


# --------------------------------------------------------------------------- routing


@pytest.fixture(scope="module")
def two_servers() -> Iterator[list[tuple[str, str, LlamaServerClient, FakeLlamaServer]]]:
    """Two single-model llama-servers (the common one-container-per-model set-up) on one
    simulated GPU: llama3.2 and llama3.1:8b."""
    gpu = open_gpu(None, 24 * GIB)
    made = []
    for name, model in (("small", "llama3.2:latest"), ("big", "llama3.1:8b")):
        fake = FakeLlamaServer(gpu, config=LlamaServerConfig(model=model, time_scale=0.01))
        server = fake.serve()
        made.append(
            (f"llama-server/{name}", server.url, LlamaServerClient(server.url), fake, server)
        )
    for _, _, _, fake, _ in made:
        assert fake.single is not None
        fake.single.wait_state("loaded", timeout_s=30)
    yield [(key, url, client, fake) for key, url, client, fake, _ in made]
    for _, _, client, fake, server in made:
        client.close()
        server.stop()
        fake.close()


def requests_of(fake: FakeLlamaServer) -> int:
    assert fake.single is not None
    return fake.single.stats.requests


@pytest.mark.parametrize(
    ("model", "answered_by"),
    [
        ("llama3.1:8b", 1),  # the second server lists it
        ("llama3.2:latest", 0),
        ("nobody-has-it", 0),  # no server lists it: the first answers, as it would directly
    ],
)
def test_a_load_goes_to_the_server_that_serves_its_model(
    two_servers: list[tuple[str, str, LlamaServerClient, FakeLlamaServer]],
    model: str,
    answered_by: int,
) -> None:
    servers = [(key, url, client) for key, url, client, _ in two_servers]
    fakes = [fake for *_, fake in two_servers]
    room_calls: list[str] = []

    class Room:
        def make_room(self, server_key: str, *, reason: str, deadline_s: float) -> bool:
            room_calls.append(server_key)
            return True

    kind = kind_of("llama-server")
    gate = ServerGate(
        title=kind.title, routes=kind.routes, servers=lambda: servers, room=Room(), port=0
    )
    gate.start()
    before = [requests_of(f) for f in fakes]
    try:
        assert chat(gate, model).status_code == 200
    finally:
        gate.stop()
    after = [requests_of(f) for f in fakes]
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        1 if i == answered_by else 0 for i in range(2)
    ]
    if model != "nobody-has-it":
        assert room_calls == []  # both single models are loaded: nothing to make room for


def test_routing_survives_a_server_whose_list_cannot_be_read(
    two_servers: list[tuple[str, str, LlamaServerClient, FakeLlamaServer]],
) -> None:
    """A server that does not answer its model list is passed over, not fatal."""
    key, url, client, fake = two_servers[1]
    dead = LlamaServerClient("http://127.0.0.1:9")  # nothing listens on the discard port
    servers = [("llama-server/dead", "http://127.0.0.1:9", dead), (key, url, client)]

    class Room:
        def make_room(self, server_key: str, *, reason: str, deadline_s: float) -> bool:
            return True

    kind = kind_of("llama-server")
    gate = ServerGate(
        title=kind.title, routes=kind.routes, servers=lambda: servers, room=Room(), port=0
    )
    gate.start()
    before = requests_of(fake)
    try:
        assert chat(gate, "llama3.1:8b").status_code == 200
    finally:
        gate.stop()
        dead.close()
    assert requests_of(fake) == before + 1


def list_gate(servers: list[tuple[str, str, LlamaServerClient]]) -> ServerGate:
    kind = kind_of("llama-server")
    gate = ServerGate(
        title=kind.title,
        routes=kind.routes,
        servers=lambda: servers,
        room=Room(Server("none")),
        port=0,
    )
    gate.start()
    return gate


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_the_model_list_through_the_gate_has_every_servers_models(
    two_servers: list[tuple[str, str, LlamaServerClient, FakeLlamaServer]], path: str
) -> None:
    """A client that asks the gate which models there are (Open WebUI's model picker)
    sees every server's, in server order, an id listed twice once; before, only the first
    server's list came back, and the second server's model could not be picked."""
    servers = [(key, url, client) for key, url, client, _ in two_servers]
    gate = list_gate([*servers, servers[0]])  # the first one again: its model once
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}{path}", timeout=30)
    finally:
        gate.stop()
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    listed = r.json()
    assert listed["object"] == "list"
    assert [e["id"] for e in listed["data"]] == ["llama3.2:latest", "llama3.1:8b"]
    assert all(e["object"] == "model" for e in listed["data"])  # each server's entry as is


def test_the_model_list_leaves_out_a_server_that_does_not_answer(
    two_servers: list[tuple[str, str, LlamaServerClient, FakeLlamaServer]],
) -> None:
    key, url, client, _ = two_servers[1]
    dead = LlamaServerClient("http://127.0.0.1:9")  # nothing listens on the discard port
    gate = list_gate([("llama-server/dead", "http://127.0.0.1:9", dead), (key, url, client)])
    try:
        with httpx.Client(timeout=30) as http:
            r = http.get(f"http://127.0.0.1:{gate.port}/v1/models")
            again = http.get(f"http://127.0.0.1:{gate.port}/v1/models")  # same connection
    finally:
        gate.stop()
        dead.close()
    assert r.status_code == 200 and [e["id"] for e in r.json()["data"]] == ["llama3.1:8b"]
    assert again.status_code == 200


def test_with_no_server_answering_the_first_ones_answer_is_passed_on() -> None:
    dead = [
        (f"llama-server/dead{i}", f"http://127.0.0.1:{port}", LlamaServerClient("http://x"))
        for i, port in enumerate((9, 7))
    ]
    gate = list_gate(dead)
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}/v1/models", timeout=30)
    finally:
        gate.stop()
        for _, _, client in dead:
            client.close()
    assert r.status_code == 502  # what the first server's address gives, as before


def _json_ok(data: object) -> bytes:
    body = json.dumps(data).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


def test_the_model_list_is_asked_with_the_clients_credentials_and_query() -> None:
    """Servers started with an API key answer their list only to a client that shows it:
    the gate asks each with the client's headers (its own Host), and the query goes on
    (`?reload=1` re-scans a router's sources). An answer that is no model list is left out."""

    def lists(entries: list[dict[str, str]]) -> Any:
        def script(seen: Seen, sock: object) -> bytes:
            if (b"authorization", b"Bearer k") not in [(n.lower(), v) for n, v in seen.headers]:
                return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
            return _json_ok({"object": "list", "data": entries})

        return script

    a = RawUpstream(script=lists([{"id": "a", "object": "model", "owned_by": "llamacpp"}]))
    b = RawUpstream(script=lists([{"id": "b", "object": "model", "name": "B"}]))
    odd = RawUpstream(script=lambda seen, sock: _json_ok({"models": ["c"]}))
    servers = [(f"llama-server/{u.port}", u.url, LlamaServerClient(u.url)) for u in (a, b, odd)]
    gate = list_gate(servers)
    try:
        url = f"http://127.0.0.1:{gate.port}/v1/models?reload=1"
        refused = httpx.get(url, timeout=30)
        r = httpx.get(url, headers={"Authorization": "Bearer k"}, timeout=30)
    finally:
        gate.stop()
        for up in (a, b, odd):
            up.close()
        for _, _, client in servers:
            client.close()
    assert refused.status_code == 401  # none would list: the first server's answer
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "owned_by": "llamacpp"},
            {"id": "b", "object": "model", "name": "B"},
        ],
    }
    for up in (a, b):
        assert {s.target for s in up.seen} == {b"/v1/models?reload=1"}
        hosts = {v for s in up.seen for n, v in s.headers if n.lower() == b"host"}
        assert hosts == {f"127.0.0.1:{up.port}".encode()}


class Listing:
    """A model server whose list of models can fail or hang (routing reads only that)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.fail = False
        self.hang: threading.Event | None = None
        self.reads = 0

    def models(self) -> tuple[str, ...]:
        self.reads += 1
        if self.hang is not None:
            self.hang.wait(10)
        if self.fail:
            raise ServiceError("llama-server", "HTTP 503: Loading model")
        return self.names


def routing_gate(servers: list[tuple[str, str, Listing]], clock: list[float]) -> ServerGate:
    kind = kind_of("llama-server")
    return ServerGate(
        title=kind.title,
        routes=kind.routes,
        servers=lambda: servers,  # type: ignore[arg-type,return-value]
        room=Room(Server("none")),
        port=0,
        clock=lambda: clock[0],
    )


def test_a_server_whose_list_fails_keeps_its_models() -> None:
    """A llama-server loading its model answers 503 to its list: its model stays its own
    (not sent to the first server, which would answer with another model)."""
    a, b = Listing(("small",)), Listing(("big",))
    servers = [
        ("llama-server/a", "http://127.0.0.1:1", a),
        ("llama-server/b", "http://127.0.0.1:2", b),
    ]
    clock = [0.0]
    gate = routing_gate(servers, clock)
    assert gate._owner(tuple(servers), "big")[0] == "llama-server/b"  # type: ignore[arg-type]
    b.fail = True
    clock[0] += 60  # the list is read again, and fails
    assert gate._owner(tuple(servers), "big")[0] == "llama-server/b"  # type: ignore[arg-type]
    assert b.reads == 2


def test_a_hanging_list_holds_one_reader_only() -> None:
    """While one request waits for a server's list, the others use what is known at once
    instead of each waiting (they would fill the gate's threads)."""
    a, b = Listing(("small",)), Listing(("big",))
    servers = [
        ("llama-server/a", "http://127.0.0.1:1", a),
        ("llama-server/b", "http://127.0.0.1:2", b),
    ]
    clock = [0.0]
    gate = routing_gate(servers, clock)
    assert gate._owner(tuple(servers), "big")[0] == "llama-server/b"  # type: ignore[arg-type]
    clock[0] += 60
    a.hang = threading.Event()
    slow = threading.Thread(target=gate._owner, args=(tuple(servers), "big"))
    slow.start()
    while a.reads < 2:
        time.sleep(0.01)
    started = time.monotonic()
    # a's list is being read: a second request goes on with a's last list, reads b's.
    assert gate._owner(tuple(servers), "big")[0] == "llama-server/b"  # type: ignore[arg-type]
    assert time.monotonic() - started < 1 and a.reads == 2
    a.hang.set()
    slow.join(10)
