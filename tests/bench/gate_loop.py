"""The gate's overhead on each event loop (VRAM_GATE_LOOP), or with its express lane on
and off (`--compare express`, VRAM_GATE_EXPRESS): `micro.gate_overhead` run alternately
for each, a fresh supervisor each round, so drift on a shared machine hits both alike.
Prints every round and the medians; asserts nothing.

Then the floor under any proxy on that loop (`relay_floor`): a byte relay with no HTTP at
all (one upstream connection per client connection, bytes copied as they come, in
protocol callbacks) in this process, in front of the same fake Ollama, alternating with
direct requests: the loop's and the sockets' share of the gate's overhead.

`--parsers`: h11's CPU per proxied request, both of
the gate's halves (server: request in, answer out; client: request out, answer in) with
no I/O, against httptools parsing the same bytes: the most that replacing h11 with the
C parser could take off the gate's CPU per request.

    flock -o /tmp/vram-bench.lock nice .venv/bin/python -m tests.bench.gate_loop --rounds 3
    flock -o /tmp/vram-bench.lock .venv/bin/python -m tests.bench.gate_loop --compare express
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import threading
import time
from collections.abc import Callable

import httpx

from supervisor.gate.loop import loop_name, new_event_loop
from supervisor.sim import SimHost
from tests.bench.micro import RESIDENT_MODEL, MicroResult, gate_overhead
from tests.bench.workload import GPU_TOTAL_GIB, answer_without_nagle, catalog, median, percentile

LOOPS = ("asyncio", "uvloop")
# What a round compares: the gates' event loop (VRAM_GATE_LOOP), or the express lane on and
# off (VRAM_GATE_EXPRESS; express.py) on asyncio's loop.
VARIANTS: dict[str, dict[str, dict[str, str]]] = {
    "loop": {loop: {"VRAM_GATE_LOOP": loop} for loop in LOOPS},
    "express": {
        "h11 only": {"VRAM_GATE_EXPRESS": "false"},
        "express lane": {"VRAM_GATE_EXPRESS": "true"},
    },
}

Measure = tuple[str, str, Callable[[MicroResult], float | None]]
MEASURES: list[Measure] = [
    ("direct p50", "ms", lambda m: m.direct_p50_ms),
    ("gate p50", "ms", lambda m: m.gate_p50_ms),
    ("added at p50", "ms", lambda m: _diff(m.gate_p50_ms, m.direct_p50_ms)),
    ("added at p99", "ms", lambda m: _diff(m.gate_p99_ms, m.direct_p99_ms)),
    (
        "stream first byte, added at p50",
        "ms",
        lambda m: _diff(m.ttfb_gate_p50_ms, m.ttfb_direct_p50_ms),
    ),
    (
        "stream first byte, added at p99",
        "ms",
        lambda m: _diff(m.ttfb_gate_p99_ms, m.ttfb_direct_p99_ms),
    ),
    ("supervisor CPU per gate request", "µs", lambda m: m.gate_cpu_us),
]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table(results: dict[str, list[MicroResult]]) -> str:
    names = list(results)
    rows = [
        "| measure (median of the rounds; the rounds in brackets) | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for title, unit, get in MEASURES:
        cells = []
        for loop in names:
            values = [v for v in (get(m) for m in results[loop]) if v is not None]
            mid = median(values)
            digits = 0 if unit == "µs" else 2
            rounds = ", ".join(f"{v:.{digits}f}" for v in values)
            cells.append("n/a" if mid is None else f"{mid:.{digits}f} {unit} ({rounds})")
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- the floor


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    """One client connection of the byte relay, and its own upstream connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(
            lambda: _Upstream(self), self.host, self.port
        )
        assert self.upstream.transport is not None
        for data in self.pending:
            self.upstream.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None or self.upstream.transport is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


def relay_floor(choice: str, requests: int) -> dict[str, float | str | None]:
    """A byte relay on the loop `choice`: its thread's CPU per request (user + system) and
    the time it adds to a non-streaming generate at p50 and p99."""
    with SimHost(gpu_total_gib=GPU_TOTAL_GIB, time_scale=0.001, catalog=catalog()) as host:
        target = httpx.URL(host.ollama_url)
        assert target.port is not None
        loop = new_event_loop(choice)
        ready = threading.Event()
        stop: list[asyncio.Future[None]] = []
        ports: list[int] = []
        cpu: list[float] = []

        def run() -> None:
            async def serve() -> None:
                server = await loop.create_server(
                    lambda: _Client(target.host, target.port or 80), "127.0.0.1", 0
                )
                ports.append(server.sockets[0].getsockname()[1])
                stop.append(loop.create_future())
                ready.set()
                async with server:
                    started = time.thread_time()
                    await stop[0]
                    cpu.append(time.thread_time() - started)

            loop.run_until_complete(serve())
            loop.close()

        thread = threading.Thread(target=run, name="relay-floor", daemon=True)
        thread.start()
        ready.wait(10)
        name = loop_name(loop)
        bases = {"direct": host.ollama_url, "relay": f"http://127.0.0.1:{ports[0]}"}
        body = {
            "model": RESIDENT_MODEL,
            "prompt": "hi",
            "stream": False,
            "options": {"num_predict": 1},
        }
        times: dict[str, list[float]] = {"direct": [], "relay": []}
        with httpx.Client(timeout=30.0) as client:
            preload = {"model": RESIDENT_MODEL, "keep_alive": -1, "stream": False}
            client.post(f"{host.ollama_url}/api/generate", json=preload).raise_for_status()
            for i in range(requests):
                for which in ("direct", "relay") if i % 2 else ("relay", "direct"):
                    t0 = time.perf_counter()
                    client.post(f"{bases[which]}/api/generate", json=body).raise_for_status()
                    times[which].append(time.perf_counter() - t0)
        loop.call_soon_threadsafe(stop[0].set_result, None)
        thread.join(10)

    def added(q: float | None) -> float | None:
        get: Callable[[list[float]], float | None] = (
            median if q is None else lambda v: percentile(v, q)
        )
        a, b = get(times["relay"]), get(times["direct"])
        return None if a is None or b is None else round((a - b) * 1000, 3)

    return {
        "loop": name,
        "cpu_us": round(cpu[0] / requests * 1e6, 1) if cpu else None,
        "added_p50_ms": added(None),
        "added_p99_ms": added(99),
    }


# --------------------------------------------------------------------------- parsers

_BODY = b'{"model":"llama3.1:8b","prompt":"hi","stream":false,"options":{"num_predict":1}}'
_REQUEST = (
    b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:11435\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
    b"User-Agent: python-httpx/0.28.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)
_ANSWER_BODY = (
    b'{"model":"llama3.1:8b","created_at":"2026-12-07T00:00:00Z","response":"x","done":true}'
)
_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Date: Mon, 07 Dec 2026 18:00:00 GMT\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_ANSWER_BODY), _ANSWER_BODY)
)


def _h11_cycles(n: int) -> None:
    import h11

    server, client = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    length = b"%d" % len(_ANSWER_BODY)
    for _ in range(n):
        server.receive_data(_REQUEST)
        assert isinstance(server.next_event(), h11.Request)
        server.next_event()
        server.next_event()
        client.send(
            h11.Request(
                method=b"POST",
                target=b"/api/generate",
                headers=[(b"Host", b"127.0.0.1:11434"), (b"Content-Length", b"%d" % len(_BODY))],
                _parsed=True,
            )
        )
        client.send(h11.Data(data=_BODY))
        client.send(h11.EndOfMessage())
        client.receive_data(_ANSWER)
        client.next_event()
        client.next_event()
        assert isinstance(client.next_event(), h11.EndOfMessage)
        head = [(b"Content-Type", b"application/json"), (b"Content-Length", length)]
        server.send(h11.Response(status_code=200, headers=head, _parsed=True))
        server.send(h11.Data(data=_ANSWER_BODY))
        server.send(h11.EndOfMessage())
        server.start_next_cycle()
        client.start_next_cycle()


class _Parsed:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _httptools_cycles(n: int) -> None:
    import httptools

    for _ in range(n):
        request = _Parsed()
        httptools.HttpRequestParser(request).feed_data(_REQUEST)
        answer = _Parsed()
        httptools.HttpResponseParser(answer).feed_data(_ANSWER)
        assert request.done and answer.done


def parsers(n: int = 20000) -> dict[str, float]:
    """CPU per proxied request of each parser, best of three runs of `n` (µs)."""
    out: dict[str, float] = {}
    for name, cycles in (("h11", _h11_cycles), ("httptools", _httptools_cycles)):
        best = math.inf
        for _ in range(3):
            started = time.process_time()
            cycles(n)
            best = min(best, time.process_time() - started)
        out[name] = round(best / n * 1e6, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per loop")
    parser.add_argument("--requests", type=int, default=2000, help="non-streaming, per round")
    parser.add_argument("--streams", type=int, default=300, help="streamed, per round")
    parser.add_argument(
        "--floor-requests", type=int, default=1500, help="byte relay requests per loop (0: none)"
    )
    parser.add_argument(
        "--parsers", action="store_true", help="only h11 against httptools (needs httptools)"
    )
    parser.add_argument(
        "--compare",
        choices=sorted(VARIANTS),
        default="loop",
        help="loop: asyncio against uvloop; express: the express lane off and on",
    )
    args = parser.parse_args(argv)
    if args.parsers:
        print("CPU per proxied request, parsing and framing only (µs):", json.dumps(parsers()))
        return
    answer_without_nagle()
    variants = VARIANTS[args.compare]
    names = list(variants)
    results: dict[str, list[MicroResult]] = {name: [] for name in names}
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            result = MicroResult()
            settings = variants[name]
            gate_overhead(result, requests=args.requests, streams=args.streams, settings=settings)
            loop = settings.get("VRAM_GATE_LOOP", "asyncio")
            if result.gate_loop != loop:
                raise RuntimeError(f"asked for {loop}, the gate runs on {result.gate_loop!r}")
            results[name].append(result)
            print(
                f"round {i + 1} {name}: "
                + json.dumps(
                    {
                        k: v
                        for k, v in result.to_json().items()
                        if k.endswith(("p50_ms", "p99_ms")) or k == "gate_cpu_us"
                    }
                ),
                flush=True,
            )
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(table(results))
    if args.floor_requests:
        on = (*LOOPS, *LOOPS[::-1]) if args.compare == "loop" else ("asyncio", "asyncio")
        floors = [relay_floor(loop, args.floor_requests) for loop in on]
        print("\nbyte relay (no HTTP), the same requests:")
        for floor in floors:
            print(json.dumps(floor))


if __name__ == "__main__":
    main()
