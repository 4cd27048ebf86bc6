"""The gate relays like a wire: what is not a load passes untouched, streams arrive as
they are produced, a client that leaves cancels Ollama's work, and a dead Ollama is a 502."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from loguru import logger

from supervisor.gate import Gate
from tests.gate.fakes import GIB, Env, FakeOllamaApi, FakeRoom, Timeline, Upstream, make_env

DROP = {"date", "server", "connection", "keep-alive"}


def _same(direct: httpx.Response, gated: httpx.Response) -> None:
    assert gated.status_code == direct.status_code
    assert gated.content == direct.content

    def strip(r: httpx.Response) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in r.headers.multi_items() if k not in DROP)

    assert strip(gated) == strip(direct)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "llama3.2"}),
        ("POST", "/api/show", {"model": "nope"}),
        ("GET", "/status/404", None),
        ("GET", "/status/500", None),
        ("GET", "/status/503", None),
        ("GET", "/no/such/route", None),
        ("PUT", "/echo?x=1&y=%20z", {"a": 1}),
        ("DELETE", "/echo", {"model": "llama3.2"}),
        ("HEAD", "/echo", None),
    ],
)
def test_non_load_requests_pass_through_untouched(
    env: Env, method: str, path: str, body: object
) -> None:
    direct = httpx.request(method, f"{env.upstream.url}{path}", json=body, timeout=10)
    gated = httpx.request(method, f"{env.url}{path}", json=body, timeout=10)

    _same(direct, gated)
    assert env.room.calls == []
    first, second = env.upstream.requests[-2], env.upstream.requests[-1]
    assert (second.method, second.path, second.query, second.body) == (
        first.method,
        first.path,
        first.query,
        first.body,
    )


def test_request_headers_pass_but_hop_by_hop_ones_do_not(env: Env) -> None:
    headers = {
        "Authorization": "Bearer abc",
        "X-Client": "one",
        "User-Agent": "test-agent/1",
        "Origin": "http://example.test",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eA==",
    }
    httpx.post(f"{env.url}/echo?q=1", content=b"hello", headers=headers, timeout=10)

    rec = env.upstream.requests[-1]
    got = {k.lower(): v for k, v in rec.headers}
    assert got["authorization"] == "Bearer abc"
    assert got["x-client"] == "one"
    assert got["user-agent"] == "test-agent/1"
    assert got["origin"] == "http://example.test"
    assert got["host"] == env.upstream.url.removeprefix("http://")  # Ollama checks Host
    assert got["content-length"] == "5"
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in got
    assert (rec.query, rec.body) == ("q=1", b"hello")


def test_response_headers_and_repeated_headers_pass(env: Env) -> None:
    r = httpx.get(f"{env.url}/status/418", timeout=10)

    assert r.status_code == 418
    assert r.headers["x-why"] == "test"
    assert r.json() == {"error": "status 418"}


def _first_chunk_then_rest(env: Env, path: str, body: dict[str, object]) -> tuple[bytes, bytes]:
    env.upstream.hold = threading.Event()
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{env.url}{path}", json=body) as r,
    ):
        chunks = r.iter_raw()
        first = next(chunks)
        # The upstream is still holding its second chunk: the first came through alone.
        assert "stream_end" not in env.timeline.whats()
        assert env.timeline.whats().count("chunk") == 1
        env.upstream.hold.set()
        rest = b"".join(chunks)
    return first, rest


def test_ndjson_stream_arrives_chunk_by_chunk(env: Env) -> None:
    env.upstream.resident.add("llama3.2:latest")

    first, rest = _first_chunk_then_rest(env, "/api/generate", {"model": "llama3.2", "prompt": "x"})

    assert json.loads(first)["response"] == "t0"
    lines = rest.splitlines()
    assert [json.loads(x).get("response") for x in lines] == ["t1", "t2", None]


def test_sse_stream_arrives_chunk_by_chunk(env: Env) -> None:
    env.upstream.resident.add("llama3.2:latest")
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]}

    first, rest = _first_chunk_then_rest(env, "/v1/chat/completions", body)

    assert first.startswith(b"data: {") and first.endswith(b"\n\n")
    assert rest.endswith(b"data: [DONE]\n\n")


def test_a_gated_load_streams_too(env: Env) -> None:
    first, _ = _first_chunk_then_rest(env, "/api/chat", {"model": "qwen3:8b", "messages": []})

    assert json.loads(first)["model"] == "qwen3:8b"
    assert len(env.room.calls) == 1


def _raw_request(
    port: int, path: str, body: dict[str, object], version: str = "1.1"
) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_client_leaving_during_a_load_cancels_it_upstream(env: Env) -> None:
    env.upstream.load_s = 10.0
    sock = _raw_request(env.gate.port, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    deadline = time.monotonic() + 5
    while "load_start" not in env.timeline.whats() and time.monotonic() < deadline:
        time.sleep(0.01)

    sock.close()

    assert env.upstream.disconnected.wait(5), "Ollama never saw the client leave"
    assert env.upstream.disconnects == ["load llama3.2:latest"]
    assert "llama3.2:latest" not in env.upstream.resident
    # The load slot was given back: the next load goes ahead.
    env.upstream.load_s = 0.0
    r = httpx.post(
        f"{env.url}/api/generate",
        json={"model": "qwen3:8b", "prompt": "x", "stream": False},
        timeout=10,
    )
    assert r.status_code == 200


def test_client_leaving_mid_stream_cancels_the_stream_upstream(env: Env) -> None:
    env.upstream.resident.add("llama3.2:latest")
    env.upstream.hold = threading.Event()
    sock = _raw_request(env.gate.port, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    data = b""
    while b"t0" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended before its first chunk"
        data += chunk

    sock.close()

    assert env.upstream.disconnected.wait(5), "Ollama never saw the client leave"
    assert env.upstream.disconnects == ["stream llama3.2:latest"]


def test_client_leaving_while_room_is_made_sends_nothing_upstream(env: Env) -> None:
    env.room.block = threading.Event()
    sock = _raw_request(env.gate.port, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    deadline = time.monotonic() + 5
    while not env.room.calls and time.monotonic() < deadline:
        time.sleep(0.01)

    sock.close()

    # The load slot comes free although make_room is still busy: the next load gets to it.
    body = {"model": "qwen3:8b", "prompt": "x", "stream": False}
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(httpx.post, f"{env.url}/api/generate", json=body, timeout=20)
        deadline = time.monotonic() + 10
        while len(env.room.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(env.room.calls) == 2, "the abandoned load kept the slot"
        env.room.block.set()
        assert second.result(timeout=20).status_code == 200

    loads = [r for r in env.upstream.requests if r.path == "/api/generate"]
    assert [json.loads(r.body)["model"] for r in loads] == ["qwen3:8b"]


def test_http10_client_gets_a_plain_body_and_a_closed_connection(env: Env) -> None:
    env.upstream.resident.add("llama3.2:latest")
    sock = _raw_request(
        env.gate.port, "/api/generate", {"model": "llama3.2", "prompt": "x"}, version="1.0"
    )
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()

    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert [json.loads(x).get("response") for x in body.splitlines()] == ["t0", "t1", "t2", None]


def test_expect_100_continue_is_answered(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.gate.port), timeout=10)
    sock.sendall(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"hello")
    answer = sock.recv(65536)
    sock.close()

    assert answer.startswith(b"HTTP/1.1 200")
    assert env.upstream.requests[-1].body == b"hello"
    assert not any(k.lower() == "expect" for k, _ in env.upstream.requests[-1].headers)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /echo HTTP/2.0\r\n\r\n",
    ],
)
def test_malformed_requests_get_a_json_error_and_never_reach_ollama(
    env: Env, request_bytes: bytes
) -> None:
    sock = socket.create_connection(("127.0.0.1", env.gate.port), timeout=10)
    sock.sendall(request_bytes)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()

    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"505")
    assert "error" in json.loads(body)
    assert env.upstream.requests == []


def test_large_and_chunked_bodies_arrive_whole(env: Env) -> None:
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB: streamed, not buffered

    r1 = httpx.post(f"{env.url}/echo", content=big, timeout=20)
    r2 = httpx.post(f"{env.url}/echo", content=iter([b"ab", b"cd", b"ef"]), timeout=20)

    assert r1.status_code == 200 and r1.json()["body"].encode("latin-1") == big
    assert r2.json()["body"] == "abcdef"


def test_chunked_load_request_is_read_and_gated(env: Env) -> None:
    body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode()

    r = httpx.post(f"{env.url}/api/generate", content=iter([body[:10], body[10:]]), timeout=20)

    assert r.status_code == 200
    assert len(env.room.calls) == 1
    assert env.upstream.requests[-1].body == body


def test_upstream_connections_are_reused(env: Env) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            assert client.get(f"{env.url}/api/tags").status_code == 200

    assert env.upstream.connections <= 2


def test_upstream_dropping_idle_connections_is_survived(env: Env) -> None:
    env.upstream.close_after_each = True
    with httpx.Client(timeout=10) as client:
        codes = [client.get(f"{env.url}/api/tags").status_code for _ in range(10)]

    assert codes == [200] * 10


# --------------------------------------------------------------------------- 502


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


@pytest.fixture
def dead_gate(timeline: Timeline, upstream: Upstream, dead_url: str) -> Iterator[Gate]:
    api = FakeOllamaApi(upstream)
    api.fail = True  # Ollama is down: /api/ps cannot be read either
    gate = Gate(upstream_url=dead_url, ollama=api, room=FakeRoom(timeline), port=0)
    gate.start()
    yield gate
    gate.stop()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/tags", None),
        ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}),
        ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []}),
    ],
)
def test_upstream_down_is_a_502_with_a_json_error(
    dead_gate: Gate, method: str, path: str, body: object
) -> None:
    with httpx.Client(timeout=10) as client:
        r = client.request(method, f"http://127.0.0.1:{dead_gate.port}{path}", json=body)
        again = client.get(f"http://127.0.0.1:{dead_gate.port}/api/version")

    assert r.status_code == 502
    assert r.json() == {
        "error": "vram-supervisor gate: could not reach Ollama; the supervisor's log says why"
    }
    assert again.status_code == 502  # the connection to the gate stays usable
    assert dead_gate.stats().upstream_errors_total == 2


def test_a_502_names_no_internal_address_the_log_does(dead_gate: Gate, dead_url: str) -> None:
    """The client learns that Ollama could not be reached, not where the supervisor looks
    for it (an internal address and port); whoever reads the log sees both."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    try:
        r = httpx.get(f"http://127.0.0.1:{dead_gate.port}/api/tags", timeout=10)
    finally:
        logger.remove(sink)

    assert r.status_code == 502
    port = dead_url.rsplit(":", 1)[1]
    assert "127.0.0.1" not in r.text and port not in r.text
    assert any(f"cannot connect to {dead_url}" in line for line in lines), lines


def test_no_known_ollama_is_a_502(timeline: Timeline, upstream: Upstream) -> None:
    gate = Gate(
        upstream_url=lambda: None, ollama=FakeOllamaApi(upstream), room=FakeRoom(timeline), port=0
    )
    gate.start()
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags", timeout=10)
    finally:
        gate.stop()

    assert r.status_code == 502
    assert r.json() == {"error": "vram-supervisor gate: no Ollama server is known now"}


def test_the_upstream_can_change_between_requests(timeline: Timeline, upstream: Upstream) -> None:
    other = Upstream(Timeline())
    other.install("other:latest", size=GIB, runner_size=GIB)
    other.start()
    current = [upstream.url]
    env = make_env(timeline, upstream, upstream_url=lambda: current[0])
    env.gate.start()
    try:
        first = httpx.get(f"{env.url}/api/tags", timeout=10).json()
        current[0] = other.url
        second = httpx.get(f"{env.url}/api/tags", timeout=10).json()
    finally:
        env.gate.stop()
        other.stop()

    assert "llama3.2:latest" in [m["name"] for m in first["models"]]
    assert [m["name"] for m in second["models"]] == ["other:latest"]


def test_stop_releases_the_port(timeline: Timeline, upstream: Upstream) -> None:
    env = make_env(timeline, upstream)
    env.gate.start()
    port = env.gate.port
    env.gate.stop()

    again = make_env(timeline, upstream, port=port)
    again.gate.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=10).status_code == 200
    finally:
        again.gate.stop()


def test_a_busy_port_fails_start_with_oserror(
    env: Env, timeline: Timeline, upstream: Upstream
) -> None:
    clash = make_env(timeline, upstream, port=env.gate.port)
    with pytest.raises(OSError):
        clash.gate.start()
