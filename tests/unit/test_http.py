"""/healthz, /status and /metrics on a real socket (127.0.0.1, ephemeral port)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from supervisor.http import RESERVED_HEALTH, StatusServer, status_page
from supervisor.metrics import Metrics
from supervisor.model import (
    ComfyObservation,
    ComfyQueue,
    FreeComfy,
    FreeResult,
    FreeStage,
    GpuMemory,
    HealOllama,
    Observation,
    OllamaModel,
    OllamaObservation,
    Outcome,
    RestartComfy,
    Role,
    ServiceSpec,
    ServiceStatus,
    UnloadOllama,
    VramSource,
)
from supervisor.units import GIB


class Switch:
    def __init__(self) -> None:
        self.ok = True

    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.ok, {"ok": self.ok, "docker": "ok", "vram_source": "nvml"}


@pytest.fixture
def served() -> Iterator[tuple[StatusServer, Switch, Metrics]]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    switch = Switch()
    server = StatusServer(
        "127.0.0.1",
        0,
        health=switch.health,
        snapshot=lambda: {"gpus": [], "recent_actions": []},
        registry=registry,
    )
    server.start()
    yield server, switch, metrics
    server.close()


def get(server: StatusServer, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_is_200_when_healthy_and_503_when_not(served: Any) -> None:
    server, switch, _ = served
    code, body = get(server, "/healthz")
    assert code == 200 and json.loads(body)["ok"] is True
    switch.ok = False
    code, body = get(server, "/healthz")
    assert code == 503 and json.loads(body)["docker"] == "ok"


def test_status_is_the_snapshot(served: Any) -> None:
    server, _, _ = served
    code, body = get(server, "/status")
    assert code == 200 and json.loads(body) == {"gpus": [], "recent_actions": []}


def test_unknown_path_is_404(served: Any) -> None:
    code, body = get(served[0], "/nope")
    assert code == 404 and "/metrics" in body


def observation() -> Observation:
    comfy = ServiceSpec(Role.COMFYUI, "comfyui", "http://c:8188", "id-c")
    ollama = ServiceSpec(Role.OLLAMA, "ollama", "http://o:11434", "id-o")
    return Observation(
        at=1.0,
        source=VramSource.NVML,
        gpus=(GpuMemory("GPU-1", 0, "RTX", 24 * GIB, 20 * GIB, 4 * GIB),),
        ollamas=(
            OllamaObservation(
                ServiceStatus(ollama, True, is_reachable=True),
                (OllamaModel("llama3.2:latest", 4 * GIB, 3 * GIB),),
                3 * GIB,
            ),
        ),
        comfyuis=(
            ComfyObservation(
                ServiceStatus(comfy, True, is_reachable=True), ComfyQueue(1, 2), None, 11 * GIB
            ),
        ),
    )


def test_metrics_names_and_values(served: Any) -> None:
    server, _, metrics = served
    free = FreeComfy("comfyui/comfyui", FreeStage.SOFT, "x")
    metrics.record_outcome(
        Outcome(free, at=10.0, ok=True, result=FreeResult.FREED, duration_s=1.5), trigger_at=9.0
    )
    metrics.record_outcome(Outcome(free, 10.0, ok=True, dry_run=True))  # nothing sent
    metrics.record_outcome(Outcome(RestartComfy("comfyui/comfyui", "x"), 1.0, ok=True))
    metrics.record_outcome(Outcome(HealOllama("ollama/ollama", "m", "x"), 1.0, ok=False))
    metrics.record_outcome(Outcome(UnloadOllama("ollama/ollama", "m", "x"), 1.0, ok=True))
    metrics.docker_event()
    metrics.set_docker_reconnects(2)
    metrics.set_docker_reconnects(3)
    metrics.observed(observation(), wall_time=1700000000.0)
    code, text = get(server, "/metrics")
    assert code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(metric: str, /, **labels: str) -> float:
        return samples[(metric, tuple(sorted(labels.items())))]

    assert value("vram_supervisor_frees_total", stage="soft", result="freed") == 1
    assert value("vram_supervisor_restarts_total") == 1
    assert value("vram_supervisor_heals_total", result="failed") == 1
    assert value("vram_supervisor_ollama_unloads_total") == 1
    assert value("vram_supervisor_gpu_memory_used_bytes", gpu="GPU-1") == 20 * GIB
    assert value("vram_supervisor_gpu_memory_total_bytes", gpu="GPU-1") == 24 * GIB
    assert value("vram_supervisor_container_vram_bytes", role="comfyui", name="comfyui") == (
        11 * GIB
    )
    assert value("vram_supervisor_container_vram_bytes", role="ollama", name="ollama") == 3 * GIB
    assert value("vram_supervisor_ollama_model_gpu_ratio", model="llama3.2:latest") == 0.75
    assert value("vram_supervisor_comfyui_queue_length", name="comfyui") == 3
    assert value("vram_supervisor_docker_events_total") == 1
    assert value("vram_supervisor_docker_reconnects_total") == 3
    # From the triggering observation (t=9) to the verified free (t=10+1.5): 2.5 s.
    assert value("vram_supervisor_free_duration_seconds_bucket", le="2.0") == 0
    assert value("vram_supervisor_free_duration_seconds_bucket", le="3.0") == 1
    assert value("vram_supervisor_free_duration_seconds_sum") == 2.5
    assert value("vram_supervisor_last_pass_timestamp_seconds") == 1.7e9


def test_each_server_uses_its_own_registry() -> None:
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())  # a second one would clash on the global registry


def test_port_in_use_fails_at_construction() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            StatusServer(
                "127.0.0.1",
                holder.getsockname()[1],
                health=Switch().health,
                snapshot=dict,
                registry=CollectorRegistry(),
            )
    finally:
        holder.close()


def test_the_status_page_is_served_on_slash_and_ui(served: Any) -> None:
    server = served[0]
    pages = []
    for path in ("/", "/ui", "/ui/", "/?refresh=1"):
        url = f"http://127.0.0.1:{server.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            pages.append(response.read().decode())
    assert len(set(pages)) == 1
    page = pages[0]
    assert "<title>vram-supervisor</title>" in page
    assert "fetch(statusUrl()" in page


def test_the_status_page_loads_nothing_from_elsewhere() -> None:
    """Works offline: no external script, style, font or image, and the page's own
    Content-Security-Policy forbids them; service text never goes through innerHTML."""
    page = status_page().decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(", page)
    assert "default-src 'none'; connect-src 'self'" in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert "document.write" not in page


# --------------------------------------------------------------------------- bounds


def _server(**kw: Any) -> StatusServer:
    kw.setdefault("snapshot", lambda: {"gpus": []})
    server = StatusServer(
        "127.0.0.1", 0, health=Switch().health, registry=CollectorRegistry(), **kw
    )
    server.start()
    return server


def test_a_silent_client_is_dropped_after_the_timeout() -> None:
    server = _server(timeout_s=0.3)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            started = time.monotonic()
            while sock.recv(100):  # closed by the server (perhaps after a 408)
                pass
            assert time.monotonic() - started < 3
    finally:
        server.close()


def _trickle(server: StatusServer, n: int, stop: threading.Event) -> list[socket.socket]:
    """n clients sending a request head one byte every 0.1 s (well under the timeout)."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(n)]
    head = b"GET /status HTTP/1.1\r\nX-Slow: " + b"a" * 10_000

    def send() -> None:
        for i in range(len(head)):
            if stop.wait(0.1):
                return
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(head[i : i + 1])

    threading.Thread(target=send, daemon=True).start()
    return socks


def _dropped(sock: socket.socket) -> bool:
    """The server closed it (EOF or reset), reading whatever it sent first."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_healthz_answers_while_trickling_clients_hold_every_slot() -> None:
    """Clients trickling a request head byte by byte take every slot: /healthz still
    answers (its reserved slots), other paths get 503, and the tricklers are dropped once
    the head deadline passes, however often they send."""
    server = _server(max_connections=3, timeout_s=1.5)
    stop = threading.Event()
    socks = _trickle(server, 3, stop)
    try:
        deadline = time.monotonic() + 10
        while get(server, "/status")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server holds all three (accepted in its own time)
        assert get(server, "/status")[0] == 503
        assert get(server, "/healthz")[0] == 200
        started = time.monotonic()
        assert all(_dropped(sock) for sock in socks)
        # Dropped while still trickling (the whole head would take 1000 s): the head
        # deadline, not a read timeout, which every byte restarts.
        assert time.monotonic() - started < 20
        deadline = time.monotonic() + 10
        while get(server, "/status")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # a slot is free once its thread has ended, just after the drop
        assert get(server, "/status")[0] == 200  # the slots came back
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        server.close()


def test_connections_beyond_the_bound_get_503_without_a_thread() -> None:
    server = _server(max_connections=2, timeout_s=5)
    n = 2 + RESERVED_HEALTH  # every slot, the /healthz ones too
    holders = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(n)]
    try:
        time.sleep(0.2)
        threads = threading.active_count()
        extra = [get(server, "/healthz")[0] for _ in range(5)]
        assert extra == [503] * 5
        assert threading.active_count() <= threads
    finally:
        for sock in holders:
            sock.close()
    try:
        deadline = time.monotonic() + 5
        while get(server, "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(server, "/healthz")[0] == 200  # slots come back when clients leave
    finally:
        server.close()


def test_a_client_leaving_early_is_no_traceback(capfd: Any) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")

    def slow_snapshot() -> dict[str, Any]:
        time.sleep(0.3)  # the client is gone by the time the answer is written
        return {"gpus": [], "big": "x" * 1_000_000}

    server = _server(snapshot=slow_snapshot)
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.close()  # a reset: the server's write fails
        time.sleep(1.0)
        assert get(server, "/healthz")[0] == 200
    finally:
        server.close()
        logger.remove(sink)

    assert lines == []
    assert "Traceback" not in capfd.readouterr().err


def test_a_failing_snapshot_is_a_500_with_its_traceback_and_the_server_goes_on() -> None:
    """A bug behind /status (anything, not only the adapters' errors) answers 500 with
    the error, is logged at ERROR with its traceback, and the server keeps answering."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR", format="{message}")
    calls: list[int] = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a snapshot bug")
        return {"gpus": []}

    server = _server(snapshot=snapshot)
    try:
        code, body = get(server, "/status")
        assert code == 500 and "a snapshot bug" in json.loads(body)["error"]
        code, body = get(server, "/status")
        assert code == 200 and json.loads(body) == {"gpus": []}
        assert get(server, "/healthz")[0] == 200
    finally:
        server.close()
        logger.remove(sink)
    assert any("HTTP /status failed" in line and "Traceback" in line for line in lines), lines
