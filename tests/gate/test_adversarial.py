"""The gate tried as an attacker would (RFC 9112 §6 and the misbehaving upstream): no input
may desynchronise a connection, leak bytes between clients, or stop the gate serving
others. Raw sockets against the gate in front of a scripted raw upstream (rawnet.py),
which parses like Go's net/http does (a bare LF ends a line)."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from supervisor.gate import Gate
from supervisor.gate.http11 import Limits
from tests.gate.fakes import Env, Timeline, Upstream, make_env, raw_gate
from tests.gate.rawnet import RawUpstream, Seen, exchange, ok, read_all, responses


def _gate(raw: RawUpstream, upstream: Upstream, timeline: Timeline, **kw: Any) -> Gate:
    return raw_gate(raw.url, upstream, timeline, **kw)


@pytest.fixture(params=[True, False], ids=["express", "h11-only"])
def lane(request: pytest.FixtureRequest) -> bool:
    """Every case runs with the express lane on (plain requests on a pooled connection take
    it; the rest, and a client's first request, go by h11) and off (all by h11)."""
    return bool(request.param)


@pytest.fixture
def gate(raw: RawUpstream, upstream: Upstream, timeline: Timeline, lane: bool) -> Iterator[Gate]:
    g = _gate(raw, upstream, timeline, express_lane=lane)
    if lane:
        # A pooled upstream connection, so the case's own requests may take the express
        # lane (it serves only on a connection already open).
        httpx.get(f"http://127.0.0.1:{g.port}/warm-up", timeout=10).raise_for_status()
        raw.seen.clear()
    yield g
    g.stop()


def _status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12])


def _others_still_served(gate: Gate, raw: RawUpstream) -> None:
    """A second client on a fresh connection gets its own answer (not bytes meant for or
    smuggled by somebody else), twice, so a pooled upstream connection is used too."""
    for _ in range(2):
        r = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags?me=2", timeout=10)
        assert r.status_code == 200
        assert r.content == b"answer to /api/tags?me=2"


# --------------------------------------------------------------------------- smuggling


def test_bare_lf_in_a_header_value_smuggles_nothing(gate: Gate, raw: RawUpstream) -> None:
    # One request to a lenient proxy, two to Go: "X-A: a\nTransfer-Encoding: chunked".
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    request = (
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nX-A: a\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )

    answer = exchange(gate.port, request)

    assert _status(answer) == 400
    assert raw.requests_to(b"/smuggled") == []
    assert raw.seen == [] and raw.garbage == []
    _others_still_served(gate, raw)
    assert raw.requests_to(b"/smuggled") == []


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 0x5\r\n",
        b"Content-Length: 5 5\r\n",
        "Content-Length: \u0665\r\n".encode(),  # an Arabic-Indic five
        b"Content-Length: 99999999999999999999999\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
        b"X-A: a\x00b\r\n",
        b"X-A: a\rb\r\n",
        b"Host: y\r\n",  # a second Host
    ],
)
def test_ambiguous_framing_is_refused_and_reaches_no_one(
    gate: Gate, raw: RawUpstream, head: bytes
) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\n"
        + head
        + b"\r\nhello"
        + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )

    answer = exchange(gate.port, request)

    assert _status(answer) in (400, 501)
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert raw.seen == []
    _others_still_served(gate, raw)


def test_codings_before_chunked_are_501(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(
        gate.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    assert _status(answer) == 501
    assert raw.seen == []


def test_missing_host_is_refused(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(gate.port, b"GET /api/tags HTTP/1.1\r\n\r\n")
    assert _status(answer) == 400
    assert raw.seen == []


def test_obs_fold_never_becomes_a_header_of_its_own(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(
        gate.port,
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n",
    )

    status = _status(answer)
    if status == 200:  # unfolded into one value (RFC 9112 §5.2 allows either)
        (seen,) = raw.seen
        names = [name.lower() for name, _ in seen.headers]
        assert b"transfer-encoding" not in names
        assert (
            dict((k.lower(), v) for k, v in seen.headers)[b"x-a"] == b"a Transfer-Encoding: chunked"
        )
    else:
        assert status == 400 and raw.seen == []
    _others_still_served(gate, raw)


def test_bare_lf_line_endings_are_read_as_one_request(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(gate.port, b"GET /api/tags HTTP/1.1\nHost: x\nConnection: close\n\n")

    assert responses(answer) == [(200, b"answer to /api/tags")]
    assert [s.target for s in raw.seen] == [b"/api/tags"]


@pytest.mark.parametrize(
    "chunked",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"1" * 40 + b"\r\nhello\r\n0\r\n\r\n",
        b"5 ;\x00\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_invalid_chunk_sizes_are_refused(gate: Gate, raw: RawUpstream, chunked: bytes) -> None:
    for path in (b"/echo", b"/api/generate"):
        request = b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % path
        answer = exchange(gate.port, request + chunked)
        assert _status(answer) == 400
    assert all(s.body in (b"",) for s in raw.seen)  # nothing whole reached the upstream
    _others_still_served(gate, raw)


def test_chunk_extensions_are_accepted_and_dropped(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(
        gate.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b'\r\n3;name="v;x"\r\nabc\r\n2;e\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n',
    )

    assert _status(answer) == 200
    assert [s.body for s in raw.seen] == [b"abcde"]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 100_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n", 431),
    ],
)
def test_oversized_heads_are_refused(
    gate: Gate, raw: RawUpstream, request_bytes: bytes, status: int
) -> None:
    answer = exchange(gate.port, request_bytes)
    assert _status(answer) == status
    assert raw.seen == []


def test_pipelined_requests_get_their_own_answers_in_order(gate: Gate, raw: RawUpstream) -> None:
    request = (
        b"GET /api/tags?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /api/tags?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )

    answer = exchange(gate.port, request)

    assert responses(answer) == [
        (200, b"answer to /api/tags?n=1"),
        (200, b"answer to /echo?n=2"),
        (200, b"answer to /api/tags?n=3"),
    ]
    assert [s.body for s in raw.seen] == [b"", b"abc", b""]


def test_http10_gets_no_100_continue_and_needs_no_host(gate: Gate, raw: RawUpstream) -> None:
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # no "100 Continue" to an HTTP/1.0 client
        sock.sendall(b"hello")
        answer = read_all(sock)

    assert _status(answer) == 200
    assert b"100 Continue" not in answer
    assert [s.body for s in raw.seen] == [b"hello"]


def test_connect_is_refused(gate: Gate, raw: RawUpstream) -> None:
    before = raw.connections  # the warm-up's, with the express lane
    answer = exchange(gate.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert _status(answer) == 501
    assert raw.seen == [] and raw.connections == before


def test_upgrade_is_not_forwarded(gate: Gate, raw: RawUpstream) -> None:
    answer = exchange(
        gate.port,
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
        b"Upgrade: websocket\r\n\r\n",
    )
    assert responses(answer) == [(200, b"answer to /api/tags")]
    (seen,) = raw.seen
    assert b"upgrade" not in [k.lower() for k, _ in seen.headers]


def test_an_upstream_switching_protocols_is_a_502(gate: Gate, raw: RawUpstream) -> None:
    raw.script = lambda seen, sock: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nRAW"
    answer = exchange(
        gate.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    )
    assert _status(answer) == 502
    assert b"RAW" not in answer


def test_absolute_form_is_gated_and_gets_the_upstreams_host(
    timeline: Timeline, upstream: Upstream, lane: bool
) -> None:
    env = make_env(timeline, upstream, express_lane=lane)
    env.gate.start()
    try:
        body = json.dumps({"model": "qwen3:8b", "prompt": "x", "stream": False}).encode()
        answer = exchange(
            env.gate.port,
            b"POST http://evil.example/api/generate HTTP/1.1\r\nHost: evil.example\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        )
    finally:
        env.gate.stop()

    assert _status(answer) == 200
    assert len(env.room.calls) == 1, "the absolute-form load went by ungated"
    (rec,) = [r for r in upstream.requests if r.path == "/api/generate"]
    assert dict((k.lower(), v) for k, v in rec.headers)["host"] == upstream.url.split("//")[1]


# --------------------------------------------------------------------------- load bodies


def test_a_huge_json_body_is_refused_and_others_are_served(env: Env) -> None:
    body = b'{"model": "llama3.2", "x": [' + b"{}," * 10_000_000 + b"{}]}"  # 30 MB
    results: dict[str, Any] = {}

    def send() -> None:
        results["answer"] = exchange(
            env.gate.port,
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
            timeout=60,
        )

    sender = threading.Thread(target=send)
    sender.start()
    served = [httpx.get(f"{env.url}/api/tags", timeout=10).status_code for _ in range(5)]
    sender.join(60)

    assert served == [200] * 5
    assert _status(results["answer"]) == 413
    assert "/api/chat" not in env.upstream.paths()
    assert env.room.calls == []


def test_a_body_over_the_limit_is_refused_before_it_is_read(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.gate.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        answer = read_all(sock)
    assert _status(answer) == 413
    assert env.upstream.requests == []


def test_deeply_nested_json_is_a_400_not_a_dropped_request(env: Env) -> None:
    body = b'{"model": "llama3.2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    answer = exchange(
        env.gate.port,
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert _status(answer) == 400
    assert b"nested" in answer
    assert "/api/chat" not in env.upstream.paths()


def test_load_bodies_held_at_once_are_bounded(
    timeline: Timeline, upstream: Upstream, lane: bool
) -> None:
    limits = Limits(load_body_bytes=1024, load_bodies_total_bytes=1500)
    env = make_env(timeline, upstream, limits=limits, express_lane=lane)
    env.gate.start()
    try:
        holder = socket.create_connection(("127.0.0.1", env.gate.port), timeout=10)
        holder.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(1.0)  # the gate holds 1000 bytes for it now
        answer = exchange(
            env.gate.port,
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b" " * 1000,
        )
        holder.close()
        time.sleep(0.3)
        body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode()
        after = httpx.post(f"{env.url}/api/generate", content=body, timeout=10)
    finally:
        env.gate.stop()

    assert _status(answer) == 503
    assert after.status_code == 200, "the abandoned body kept its share of the budget"


# --------------------------------------------------------------------------- slow clients


def test_slow_clients_cannot_hold_the_gate(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline, lane: bool
) -> None:
    limits = Limits(max_clients=4, head_timeout_s=2.0, idle_client_s=3.0, body_idle_s=0.5)
    gate = _gate(raw, upstream, timeline, limits=limits, express_lane=lane)
    try:
        slow = [socket.create_connection(("127.0.0.1", gate.port), timeout=5) for _ in range(4)]
        for sock in slow:
            sock.sendall(b"GET /api/tags HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.2)
        refused = exchange(gate.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        cut = [read_all(sock) for sock in slow]  # closed after head_timeout_s
        for sock in slow:
            sock.close()
        time.sleep(0.2)
        body_stall = exchange(
            gate.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        )
        r = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags", timeout=5)
    finally:
        gate.stop()

    assert _status(refused) == 503
    assert all(_status(data) == 408 for data in cut)
    assert _status(body_stall) == 408
    assert r.status_code == 200


def test_many_connections_at_the_descriptor_limit_do_not_stop_the_gate(tmp_path: Any) -> None:
    """In a child process with 64 descriptors: 200 connections come and go, then the gate
    still answers, and it wrote no flood of tracebacks."""
    import subprocess
    import sys

    script = tmp_path / "gate_at_limit.py"
    script.write_text(_AT_LIMIT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "served 200"
    assert proc.stderr.count("Traceback") == 0
    assert len(proc.stderr) < 20_000


_AT_LIMIT = """
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
sys.path.insert(0, %r)
import httpx
from supervisor.gate import Gate
from tests.gate.fakes import FakeOllamaApi, FakeRoom, Timeline, Upstream
from tests.gate.rawnet import RawUpstream
raw = RawUpstream()
up = Upstream(Timeline())
gate = Gate(upstream_url=raw.url, ollama=FakeOllamaApi(up), room=FakeRoom(Timeline()), port=0)
gate.start()
socks = []
for _ in range(200):
    try:
        socks.append(socket.create_connection(("127.0.0.1", gate.port), timeout=2))
    except OSError:
        break
time.sleep(1.0)
for s in socks:
    s.close()
time.sleep(1.5)
r = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags", timeout=10)
print("served", r.status_code)
gate.stop()
"""
_AT_LIMIT = _AT_LIMIT % str(__import__("pathlib").Path(__file__).resolve().parents[2])


# --------------------------------------------------------------------------- log injection


def test_client_strings_reach_the_log_quoted_and_bounded(env: Env) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    dead = Gate(upstream_url=dead_url, ollama=env.api, room=env.room, port=0)
    dead.start()
    try:
        for model in ("llama3.2\n2026-12-07 | ERROR | forged line", "m" * 1_000_000):
            body = json.dumps({"model": model, "prompt": "x", "stream": False}).encode()
            httpx.post(f"{env.url}/api/generate", content=body, timeout=20)
        # A 502 logs the method and the path (h11 lets no control character into it).
        path = b"/api/tags?" + b"r" * 10_000
        exchange(dead.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        dead.stop()
        logger.remove(sink)

    assert any("did not answer 'GET' '/api/tags?rrr" in line for line in lines), lines
    for line in lines:
        assert line.count("\n") <= 1, line[:300]  # the sink's own newline only
        assert len(line) < 2000


# --------------------------------------------------------------------------- upstream


def _answer_then(extra: bytes, delay_s: float = 0.0) -> Any:
    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target.startswith(b"/evil"):
            if delay_s:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")
                time.sleep(delay_s)
                return extra
            return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine" + extra
        return ok(b"answer to " + seen.target)

    return script


STOLEN = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTOLEN"


@pytest.mark.parametrize("delay_s", [0.0, 0.3])
def test_an_answer_longer_than_declared_never_reaches_the_next_client(
    gate: Gate, raw: RawUpstream, delay_s: float
) -> None:
    raw.script = _answer_then(STOLEN, delay_s)
    with httpx.Client(timeout=10) as client:
        assert client.get(f"http://127.0.0.1:{gate.port}/evil").content == b"mine"
    time.sleep(delay_s + 0.2)
    _others_still_served(gate, raw)


def test_bytes_after_the_last_chunk_arriving_later_never_reach_the_next_client(
    gate: Gate, raw: RawUpstream
) -> None:
    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target != b"/evil":
            return ok(b"answer to " + seen.target)
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nmine\r\n0\r\n\r\n")
        time.sleep(0.3)  # the gate has pooled the connection by now
        return STOLEN

    raw.script = script
    assert httpx.get(f"http://127.0.0.1:{gate.port}/evil", timeout=10).content == b"mine"
    time.sleep(0.5)
    _others_still_served(gate, raw)


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + STOLEN),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nSTOLEN"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\nSTOLEN"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTOLEN"),
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n" + STOLEN,
        ),
    ],
)
def test_bytes_beyond_an_answers_end_never_reach_the_next_client(
    gate: Gate, raw: RawUpstream, method: str, answer: bytes
) -> None:
    raw.script = lambda seen, sock: (
        answer if seen.target == b"/evil" else ok(b"answer to " + seen.target)
    )
    with httpx.Client(timeout=10) as client:
        r = client.request(method, f"http://127.0.0.1:{gate.port}/evil")
        assert b"STOLEN" not in r.content
    time.sleep(0.2)
    _others_still_served(gate, raw)


def test_an_answer_with_both_framings_is_a_502(gate: Gate, raw: RawUpstream) -> None:
    raw.script = lambda seen, sock: (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
        if seen.target == b"/evil"
        else ok(b"answer to " + seen.target)
    )
    r = httpx.get(f"http://127.0.0.1:{gate.port}/evil", timeout=10)
    assert r.status_code == 502
    _others_still_served(gate, raw)


def test_connection_content_length_keeps_the_gates_framing(gate: Gate, raw: RawUpstream) -> None:
    raw.script = lambda seen, sock: (
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
    )
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_all(sock, wait_close=False)
    assert responses(data) == [(200, b"hello"), (200, b"hello")]


def test_an_upstream_closing_mid_body_truncates_only_that_answer(
    gate: Gate, raw: RawUpstream
) -> None:
    raw.script = lambda seen, sock: (
        (sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"), None)[1]
        if seen.target == b"/evil"
        else ok(b"answer to " + seen.target)
    )
    answer = exchange(gate.port, b"GET /evil HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses(answer) == [(200, b"only ten b<truncated>")]
    _others_still_served(gate, raw)


def test_an_upstream_that_never_answers_holds_only_its_own_client(
    gate: Gate, raw: RawUpstream
) -> None:
    left = threading.Event()

    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target != b"/silent":
            return ok(b"answer to " + seen.target)
        sock.settimeout(20)
        if sock.recv(1) == b"":  # say nothing; see whether the gate hangs up
            left.set()
        return None

    raw.script = script
    waiting = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
    waiting.sendall(b"GET /silent HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    _others_still_served(gate, raw)

    waiting.close()  # the client gives up: the gate drops its upstream connection

    assert left.wait(10), "the upstream connection outlived its client"


def test_an_upstream_silent_past_its_limit_is_a_502(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline, lane: bool
) -> None:
    release = threading.Event()
    raw.script = lambda seen, sock: (release.wait(10), None)[1]
    gate = _gate(raw, upstream, timeline, limits=Limits(upstream_idle_s=0.5), express_lane=lane)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags", timeout=10)
    finally:
        logger.remove(sink)
        release.set()
        gate.stop()
    assert r.status_code == 502
    assert "could not reach Ollama" in r.json()["error"]  # the cause is for the log only
    assert any("sent nothing for 0.5 s" in line for line in lines), lines


def test_interim_answers_reach_http11_clients_only(gate: Gate, raw: RawUpstream) -> None:
    raw.script = lambda seen, sock: (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + ok(b"final")
    )
    new = exchange(gate.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    old = exchange(gate.port, b"GET /x HTTP/1.0\r\n\r\n")

    assert new.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert responses(new.partition(b"\r\n\r\n")[2]) == [(200, b"final")]
    assert old.startswith(b"HTTP/1.1 200 ")
    assert responses(old) == [(200, b"final")]


def test_a_post_is_never_sent_twice(gate: Gate, raw: RawUpstream) -> None:
    # The second request on the pooled connection finds it dead after the upstream read
    # it: a POST must not be retried (it may have run), a GET may be.
    warm: set[int] = set()

    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target == b"/first":
            warm.add(seen.conn)
            return ok(b"first")
        if seen.conn in warm:
            warm.discard(seen.conn)
            return None  # read, then the connection dies without an answer
        return ok(b"answer to " + seen.target)

    raw.script = script
    with httpx.Client(timeout=10) as client:
        assert client.get(f"http://127.0.0.1:{gate.port}/first").content == b"first"
        post = client.post(f"http://127.0.0.1:{gate.port}/api/pull", content=b"{}")
        assert client.get(f"http://127.0.0.1:{gate.port}/first").content == b"first"
        get = client.get(f"http://127.0.0.1:{gate.port}/api/tags")

    assert post.status_code == 502
    assert len(raw.requests_to(b"/api/pull")) == 1
    assert get.status_code == 200  # an idempotent request is retried on a fresh connection
    assert len(raw.requests_to(b"/api/tags")) == 2


# --------------------------------------------------------------------------- pooled upstreams


def _close_wait_to(port: int) -> int:
    """This host's sockets in CLOSE_WAIT whose peer is 127.0.0.1:port (/proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "08" and remote == f"0100007F:{port:04X}":
            count += 1
    return count


def test_a_pooled_connection_the_upstream_closes_is_closed_at_once(
    gate: Gate, raw: RawUpstream
) -> None:
    """Ollama closing an idle keep-alive connection (its idle timeout, a restart): the gate
    closes its side at once, not when the garbage collector breaks the transport/protocol
    cycle. Else each such connection keeps a descriptor in CLOSE_WAIT."""
    with httpx.Client() as client:
        for i in range(3):
            assert client.get(f"http://127.0.0.1:{gate.port}/api/tags?n={i}").status_code == 200
    time.sleep(0.2)
    assert raw.connections >= 1
    gc.disable()  # the leak is hidden by a collection
    try:
        for sock in list(raw._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        while _close_wait_to(raw.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _close_wait_to(raw.port) == 0
    finally:
        gc.enable()
    _others_still_served(gate, raw)
