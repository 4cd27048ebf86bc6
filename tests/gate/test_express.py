"""The express lane (supervisor/gate/express.py): which requests take it, and that what a
client sees through it is what the general path gives: the same answers, in order, the
same limits. The adversarial suite (test_adversarial.py) runs every case with the lane on
and off besides."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import httpx
import pytest

from supervisor.gate import Gate
from supervisor.gate.http11 import Limits, Stream
from tests.gate.fakes import Timeline, Upstream, raw_gate
from tests.gate.rawnet import RawUpstream, Seen, ok, read_all, responses


def _gate(raw: RawUpstream, upstream: Upstream, timeline: Timeline, **kw: Any) -> Gate:
    return raw_gate(raw.url, upstream, timeline, **kw)


@pytest.fixture
def gate(raw: RawUpstream, upstream: Upstream, timeline: Timeline) -> Iterator[Gate]:
    g = _gate(raw, upstream, timeline)
    yield g
    g.stop()


def _warm(gate: Gate) -> None:
    """One request by the general path: it leaves a pooled upstream connection."""
    httpx.get(f"http://127.0.0.1:{gate.port}/warm-up", timeout=10).raise_for_status()


def _connect(gate: Gate) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gate.port), timeout=10)


def _read_answers(
    sock: socket.socket, count: int, timeout: float = 10.0
) -> list[tuple[int, bytes]]:
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        got = responses(data)
        if len(got) >= count and not got[-1][1].endswith(b"<truncated>"):
            return got
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return responses(data)


def test_plain_requests_take_the_express_lane_with_the_same_rewriting(
    gate: Gate, raw: RawUpstream
) -> None:
    _warm(gate)
    before = gate.stats().express_total
    with httpx.Client(base_url=f"http://127.0.0.1:{gate.port}", timeout=10) as client:
        answers = [client.get(f"/api/tags?n={i}") for i in range(10)]
        # httpx writes a head and its body apart: the lane waits for the body.
        posted = client.post("/api/show", content=b'{"model": "qwen3:8b"}')
    stats = gate.stats()

    assert [a.content for a in answers] == [b"answer to /api/tags?n=%d" % i for i in range(10)]
    assert posted.content == b"answer to /api/show"
    assert stats.express_total - before == 11
    [show] = raw.requests_to(b"/api/show")
    assert show.body == b'{"model": "qwen3:8b"}'
    names = [name.lower() for name, _ in show.headers]
    assert names.count(b"host") == 1
    assert dict((n.lower(), v) for n, v in show.headers)[b"host"] == raw.url[7:].encode()
    assert b"connection" not in names  # hop-by-hop: dropped
    assert dict((n.lower(), v) for n, v in show.headers)[b"content-length"] == b"21"


def test_a_load_of_a_resident_model_takes_the_lane_and_counts_as_busy(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    upstream.resident.add("qwen3:8b")  # resident: nothing to wait for
    release = threading.Event()
    holds: list[bool] = []

    def script(seen: Seen, sock: socket.socket) -> bytes:
        if seen.target == b"/api/generate" and holds:
            release.wait(10)
        return ok(b"answer to " + seen.target)

    raw.script = script
    gate = _gate(raw, upstream, timeline)
    try:
        _warm(gate)
        client = httpx.Client(base_url=f"http://127.0.0.1:{gate.port}", timeout=10)
        body = b'{"model": "qwen3:8b", "prompt": "x", "stream": false}'
        # The first load goes by h11: the gate reads /api/ps and learns it is resident.
        assert client.post("/api/generate", content=body).status_code == 200
        raw.seen.clear()
        holds.append(True)
        before = gate.stats().express_total
        answer: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answer.append(client.post("/api/generate", content=body))
        )
        sender.start()
        deadline = time.monotonic() + 5
        while not raw.requests_to(b"/api/generate") and time.monotonic() < deadline:
            time.sleep(0.01)
        busy_while_answered = gate.busy_models()
        release.set()
        sender.join(10)
        deadline = time.monotonic() + 5  # its answer is sent before the count drops
        while gate.busy_models() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy_after = gate.busy_models()
        express = gate.stats().express_total - before
        client.close()
    finally:
        release.set()
        gate.stop()

    assert answer[0].content == b"answer to /api/generate"
    assert express == 1
    assert busy_while_answered == frozenset({"qwen3:8b"})
    assert busy_after == frozenset()


def test_a_body_slower_than_the_lanes_wait_goes_by_h11(gate: Gate, raw: RawUpstream) -> None:
    _warm(gate)
    before = gate.stats().express_total
    with _connect(gate) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        time.sleep(0.3)  # past the lane's 50 ms
        sock.sendall(b"cde")
        [(status, body)] = _read_answers(sock, 1)

    assert (status, body) == (200, b"answer to /echo")
    assert [s.body for s in raw.requests_to(b"/echo")] == [b"abcde"]
    assert gate.stats().express_total == before


def test_a_request_sent_during_an_express_answer_is_answered_after_it(
    gate: Gate, raw: RawUpstream
) -> None:
    def script(seen: Seen, sock: socket.socket) -> bytes:
        if seen.target == b"/slow":
            time.sleep(0.5)
        return ok(b"answer to " + seen.target)

    _warm(gate)
    raw.script = script
    with _connect(gate) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)  # a read of its own, while /slow is being answered
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _read_answers(sock, 2)

    assert got == [(200, b"answer to /slow"), (200, b"answer to /fast")]


def test_pipelined_requests_in_one_read_go_by_h11_in_order(gate: Gate, raw: RawUpstream) -> None:
    _warm(gate)
    before = gate.stats().express_total
    with _connect(gate) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _read_answers(sock, 2)

    assert got == [(200, b"answer to /a"), (200, b"answer to /b")]
    assert gate.stats().express_total == before


def test_a_connection_busy_with_express_requests_is_not_idle(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    gate = _gate(raw, upstream, timeline, limits=Limits(idle_client_s=0.5))
    try:
        _warm(gate)
        with _connect(gate) as sock:
            got = []
            for i in range(8):  # 1.2 s of requests, each 0.15 s apart
                sock.sendall(b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                got += _read_answers(sock, 1)
                time.sleep(0.15)
            time.sleep(1.0)  # now idle past the limit
            closed_after_idle = read_all(sock, timeout=3) == b""
    finally:
        gate.stop()

    assert got == [(200, b"answer to /r%d" % i) for i in range(8)]
    assert closed_after_idle


def test_a_get_whose_pooled_connection_closes_unanswered_is_sent_again(
    gate: Gate, raw: RawUpstream
) -> None:
    closed_once: list[int] = []

    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target == b"/again" and not closed_once:
            closed_once.append(seen.conn)
            return None  # closes the pooled connection without an answer
        return ok(b"answer to " + seen.target)

    _warm(gate)
    raw.script = script
    r = httpx.get(f"http://127.0.0.1:{gate.port}/again", timeout=10)

    assert r.status_code == 200 and r.content == b"answer to /again"
    conns = [s.conn for s in raw.requests_to(b"/again")]
    assert len(conns) == 2 and conns[0] != conns[1]  # again, on a fresh connection


def test_a_post_whose_pooled_connection_closes_unanswered_is_a_502_sent_once(
    gate: Gate, raw: RawUpstream
) -> None:
    raw.script = lambda seen, sock: None if seen.target == b"/api/show" else ok()
    _warm(gate)
    with httpx.Client(base_url=f"http://127.0.0.1:{gate.port}", timeout=10) as client:
        r = client.post("/api/show", content=b"{}")
        after = client.get("/api/tags")  # the same client connection goes on

    assert r.status_code == 502
    assert r.json()["error"].startswith("vram-supervisor gate: could not reach Ollama")
    assert len(raw.requests_to(b"/api/show")) == 1
    assert after.status_code == 200


def test_an_answer_delimited_by_close_reaches_the_client_whole_and_chunked(
    gate: Gate, raw: RawUpstream
) -> None:
    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target == b"/until-close":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nevery byte")
            return None  # and close
        return ok(b"answer to " + seen.target)

    _warm(gate)
    raw.script = script
    with _connect(gate) as sock:
        sock.sendall(b"GET /until-close HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _read_answers(sock, 2)

    assert got == [(200, b"every byte"), (200, b"answer to /next")]


def test_a_client_that_reads_nothing_is_cut_after_the_send_limit(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    big = b"x" * (32 * 1024 * 1024)
    upstream_cut: list[str] = []

    def script(seen: Seen, sock: socket.socket) -> bytes | None:
        if seen.target != b"/big":
            return ok()
        try:
            sock.sendall(ok(big))
        except OSError as exc:  # the gate closed this connection mid-answer
            upstream_cut.append(type(exc).__name__)
        return None

    raw.script = script
    gate = _gate(raw, upstream, timeline, limits=Limits(send_timeout_s=0.5))
    try:
        _warm(gate)
        sock = _connect(gate)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.0)  # reads nothing, past the limit
        received = 0
        sock.settimeout(5)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        others = httpx.get(f"http://127.0.0.1:{gate.port}/api/tags", timeout=10)
    finally:
        gate.stop()

    assert received < len(big)  # cut, not buffered whole for a client that did not read
    assert others.status_code == 200
    deadline = time.monotonic() + 5
    while not upstream_cut and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream_cut  # its upstream connection was closed too


def test_the_express_lane_can_be_turned_off(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    gate = _gate(raw, upstream, timeline, express_lane=False)
    try:
        _warm(gate)
        with httpx.Client(base_url=f"http://127.0.0.1:{gate.port}", timeout=10) as client:
            answers = [client.get(f"/r{i}").content for i in range(5)]
        stats = gate.stats()
    finally:
        gate.stop()

    assert answers == [b"answer to /r%d" % i for i in range(5)]
    assert stats.express_total == 0 and stats.requests_total == 6


# --------------------------------------------------------------------------- review cases


def test_a_connection_paused_for_a_slow_reader_is_read_again_when_pooled(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    big = b"x" * (8 * 1024 * 1024)
    raw.script = lambda seen, sock: ok(big if seen.target == b"/big" else b"answer to after")
    gate = _gate(raw, upstream, timeline, limits=Limits(max_idle_upstream=1))
    try:
        _warm(gate)
        with _connect(gate) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.5)  # the gate fills the client's buffers and pauses its upstream
            got = 0
            while got < len(big):  # slowly: the gate pauses its upstream meanwhile
                chunk = sock.recv(16384)
                if not chunk:
                    break
                got += len(chunk)
                time.sleep(0.0005)
        # The one pooled connection is the one that was paused.
        after = httpx.get(f"http://127.0.0.1:{gate.port}/after", timeout=5)
    finally:
        gate.stop()

    assert got >= len(big)
    assert after.content == b"answer to after"


class _Transport:
    """Enough of an asyncio transport to drive an express exchange by hand."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.is_paused = False
        self.is_closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.is_closed

    def pause_reading(self) -> None:
        self.is_paused = True

    def resume_reading(self) -> None:
        self.is_paused = False

    def close(self) -> None:
        self.is_closed = True

    abort = close


def test_an_answer_for_a_client_still_behind_on_the_last_one_waits_for_it() -> None:
    """The client had not read its last answer when the next request came: the upstream is
    not read for it either, and the send limit runs from the start (not the whole answer
    buffered for a client that reads nothing)."""
    from supervisor.gate import express
    from supervisor.gate.relay import Connection, Origin, Pool

    async def run() -> tuple[_Transport, _Transport, list[express.Ended]]:
        limits = Limits(send_timeout_s=0.05)
        client, upstream = Stream(limits.buffer_bytes), Stream(limits.buffer_bytes)
        client_t, upstream_t = _Transport(), _Transport()
        client.connection_made(client_t)  # type: ignore[arg-type]
        upstream.connection_made(upstream_t)  # type: ignore[arg-type]
        client.pause_writing()  # behind on its last answer
        req = express.RequestReader(limits).feed(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(req, express.Request)
        origin = Origin.parse("http://127.0.0.1:9")
        conn = Connection(origin, upstream, h11.Connection(h11.CLIENT))
        ended: list[express.Ended] = []
        exchange = express.Exchange(
            client=client, conn=conn, req=req, pool=Pool(), limits=limits, on_end=ended.append
        )
        exchange.start()
        assert upstream_t.is_paused  # nothing read for a client that reads nothing
        await asyncio.sleep(0.2)
        return client_t, upstream_t, ended

    client_t, upstream_t, ended = asyncio.run(run())

    assert client_t.is_closed and upstream_t.is_closed  # cut after the send limit
    assert len(ended) == 1 and ended[0].answered


@pytest.mark.parametrize(
    "answer",
    [
        # A status under 100 whose "body" is a second answer: never passed on raw.
        b"HTTP/1.1 099 x\r\nContent-Length: 45\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        # Codings in two fields: gzip would be dropped unsaid.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        # A head far over the limit.
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (200 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok",
        # Switching protocols, with the Upgrade header llhttp stops at.
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["status-099", "split-codings", "huge-head", "101-upgrade"],
)
def test_answers_the_h11_path_refuses_are_a_502_in_the_lane_too(
    gate: Gate, raw: RawUpstream, answer: bytes
) -> None:
    _warm(gate)
    raw.script = lambda seen, sock: answer if seen.target == b"/odd" else ok()
    errors: list[str] = []
    gate._loop.set_exception_handler(lambda loop, ctx: errors.append(str(ctx)))  # type: ignore[union-attr]
    before = gate.stats().express_total
    r = httpx.get(f"http://127.0.0.1:{gate.port}/odd", timeout=10)

    assert gate.stats().express_total == before + 1
    assert r.status_code == 502
    assert b"forged" not in r.content
    assert errors == []  # nothing escaped a protocol callback


def test_an_upstream_slower_than_its_limit_gets_a_get_once(
    raw: RawUpstream, upstream: Upstream, timeline: Timeline
) -> None:
    def script(seen: Seen, sock: socket.socket) -> bytes:
        if seen.target == b"/slow":
            time.sleep(1.0)
        return ok(b"answer to " + seen.target)

    raw.script = script
    gate = _gate(raw, upstream, timeline, limits=Limits(upstream_idle_s=0.3))
    try:
        _warm(gate)
        r = httpx.get(f"http://127.0.0.1:{gate.port}/slow", timeout=10)
    finally:
        gate.stop()

    assert r.status_code == 502
    assert len(raw.requests_to(b"/slow")) == 1  # not sent again: it was not a stale one


@pytest.mark.parametrize("reads", [True, False], ids=["client-catches-up", "client-stalls"])
def test_the_lane_ends_when_the_client_has_taken_its_answer_in(reads: bool) -> None:
    """As the h11 path waits for its last write to drain: the exchange ends (and the next
    request on the connection is read) only once the client took the answer in, and a
    client that does not is cut at the send limit; the upstream connection is pooled
    either way, never closed under another request."""
    from supervisor.gate import express
    from supervisor.gate.relay import Connection, Origin, Pool

    async def run() -> tuple[list[express.Ended], list[express.Ended], bool, bool, int]:
        limits = Limits(send_timeout_s=0.05)
        client, upstream = Stream(limits.buffer_bytes), Stream(limits.buffer_bytes)
        client_t, upstream_t = _Transport(), _Transport()
        client.connection_made(client_t)  # type: ignore[arg-type]
        upstream.connection_made(upstream_t)  # type: ignore[arg-type]
        req = express.RequestReader(limits).feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(req, express.Request)
        pool = Pool(limits=limits)
        origin = Origin.parse("http://127.0.0.1:9")
        conn = Connection(origin, upstream, h11.Connection(h11.CLIENT))
        ended: list[express.Ended] = []
        exchange = express.Exchange(
            client=client, conn=conn, req=req, pool=pool, limits=limits, on_end=ended.append
        )
        exchange.start()
        client_t.write = lambda data: client.pause_writing()  # type: ignore[method-assign]
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        before = list(ended)
        if reads:
            client.resume_writing()
        await asyncio.sleep(0.2)
        return before, ended, client_t.is_closed, upstream_t.is_closed, len(pool._idle[origin])

    before, ended, client_closed, upstream_closed, pooled = asyncio.run(run())

    assert before == []  # not ended while the answer sits unread
    assert len(ended) == 1
    assert ended[0].is_complete is reads
    assert client_closed is not reads  # cut at the send limit only when it never read
    assert not upstream_closed and pooled == 1
