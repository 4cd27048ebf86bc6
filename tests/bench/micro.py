"""Micro-benchmarks: the gate's overhead, the supervisor's idle cost, Docker event reaction.

- Gate overhead: small non-streaming generate requests for a resident model, straight to the
  fake Ollama and through the gate of a running supervisor, alternating one by one so drift
  hits both alike; plus time to the first streamed byte. The fake Ollama runs at a tiny
  time scale, so the upstream costs almost nothing and the difference is the proxy's. Also
  the supervisor process's CPU time (utime + stime) per request through the gate, over the
  non-streaming requests (the gate's thread, plus the supervisor's own slow loop, which is
  a small share of it at default settings). `settings` (e.g. VRAM_GATE_LOOP) go to that
  supervisor; `python -m tests.bench.gate_loop` compares the gate's event loops with it.
- Idle cost: a supervisor at default settings (and one with the gate on) watching an idle
  simulated host; CPU from /proc/<pid>/stat (utime + stime) over a window, RSS from
  /proc/<pid>/status (VmRSS).
- Docker event reaction: only when a Docker engine answers (DOCKER_HOST, else the private
  test engine's socket) and has the offline base image. A labelled fake ComfyUI container
  is started and stopped a few times; the time from `docker start` to the supervisor's
  "Discovered ..." line is measured. That supervisor runs with VRAM_DRY_RUN=true: the
  engine may hold other labelled services (other tests), which it must not act on.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.sim import SimHost
from tests.bench.supervisor_proc import ROOT, start_supervisor
from tests.bench.workload import (
    GPU_TOTAL_GIB,
    answer_without_nagle,
    catalog,
    median,
    percentile,
)

RESIDENT_MODEL = "llama3.1:8b"
PRIVATE_ENGINE_SOCK = "/tmp/vram-supervisor-dockerd/docker.sock"
BASE_IMAGE = "vram-supervisor-base:bookworm"
DOCKER_BENCH_PORT = 18900  # 18900-18919: free in tests/integration/conftest.py's table
DOCKER_BENCH_LABEL = "vram-supervisor-bench.run"
DEFAULT_CHECK_INTERVAL_S = 5.0


@dataclass
class MicroResult:
    gate_requests: int = 0
    direct_p50_ms: float | None = None
    direct_p99_ms: float | None = None
    gate_p50_ms: float | None = None
    gate_p99_ms: float | None = None
    gate_cpu_us: float | None = None  # supervisor CPU per request through the gate
    gate_loop: str = ""  # the event loop the gate said it runs on
    stream_requests: int = 0
    ttfb_direct_p50_ms: float | None = None
    ttfb_gate_p50_ms: float | None = None
    ttfb_direct_p99_ms: float | None = None
    ttfb_gate_p99_ms: float | None = None
    idle_window_s: float = 0.0
    idle_cpu_pct: float | None = None
    idle_rss_mib: float | None = None
    idle_gate_cpu_pct: float | None = None
    idle_gate_rss_mib: float | None = None
    docker: str = "not measured"
    docker_reaction_ms: list[float] = field(default_factory=list)
    docker_reaction_after_start_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ms(values: list[float], q: float | None) -> float | None:
    value = median(values) if q is None else percentile(values, q)
    return None if value is None else round(value * 1000, 3)


# --------------------------------------------------------------------------- gate overhead


def gate_overhead(
    result: MicroResult,
    requests: int = 2000,
    streams: int = 300,
    settings: dict[str, str] | None = None,
) -> None:
    with SimHost(gpu_total_gib=GPU_TOTAL_GIB, time_scale=0.001, catalog=catalog()) as host:
        sup = start_supervisor(
            ollama_url=host.ollama_url,
            comfyui_url=host.comfyui_url,
            gate=True,
            settings=settings,
        )
        try:
            listening = [m for m in sup.messages() if "Ollama gate listening on" in m]
            result.gate_loop = listening[0].rpartition("(")[2].rstrip(")") if listening else ""
            bases = {"direct": host.ollama_url, "gate": sup.gate_url}
            with httpx.Client(timeout=30.0) as client:
                preload = {"model": RESIDENT_MODEL, "keep_alive": -1, "stream": False}
                client.post(f"{host.ollama_url}/api/generate", json=preload).raise_for_status()
                body = {
                    "model": RESIDENT_MODEL,
                    "prompt": "hi",
                    "stream": False,
                    "options": {"num_predict": 1},
                }
                times: dict[str, list[float]] = {"direct": [], "gate": []}
                ticks = 0
                for i in range(100 + requests):  # the first 100 of each warm up
                    if i == 100:
                        ticks = _cpu_ticks(sup.pid)
                    for name in ("direct", "gate") if i % 2 else ("gate", "direct"):
                        t0 = time.perf_counter()
                        r = client.post(f"{bases[name]}/api/generate", json=body)
                        took = time.perf_counter() - t0
                        r.raise_for_status()
                        if i >= 100:
                            times[name].append(took)
                cpu_s = (_cpu_ticks(sup.pid) - ticks) / os.sysconf("SC_CLK_TCK")
                stream_body = {**body, "stream": True, "options": {"num_predict": 8}}
                firsts: dict[str, list[float]] = {"direct": [], "gate": []}
                for i in range(20 + streams):
                    for name in ("direct", "gate") if i % 2 else ("gate", "direct"):
                        t0 = time.perf_counter()
                        first: float | None = None
                        url = f"{bases[name]}/api/generate"
                        with client.stream("POST", url, json=stream_body) as r:
                            for _ in r.iter_raw():
                                if first is None:
                                    first = time.perf_counter() - t0
                        if i >= 20 and first is not None:
                            firsts[name].append(first)
        finally:
            sup.stop()
    result.gate_requests = requests
    result.direct_p50_ms, result.direct_p99_ms = (
        _ms(times["direct"], None),
        _ms(times["direct"], 99),
    )
    result.gate_p50_ms, result.gate_p99_ms = _ms(times["gate"], None), _ms(times["gate"], 99)
    result.gate_cpu_us = round(cpu_s / requests * 1e6, 1)
    result.stream_requests = streams
    result.ttfb_direct_p50_ms = _ms(firsts["direct"], None)
    result.ttfb_gate_p50_ms = _ms(firsts["gate"], None)
    result.ttfb_direct_p99_ms = _ms(firsts["direct"], 99)
    result.ttfb_gate_p99_ms = _ms(firsts["gate"], 99)


# --------------------------------------------------------------------------- idle cost


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" of comm: fields[0] is state (field 3), so utime (14) and stime (15)
    # are at indexes 11 and 12.
    return int(fields[11]) + int(fields[12])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def idle_cost(result: MicroResult, window_s: float = 30.0, warmup_s: float = 5.0) -> None:
    with SimHost(gpu_total_gib=GPU_TOTAL_GIB, time_scale=1.0, catalog=catalog()) as host:
        plain = start_supervisor(ollama_url=host.ollama_url, comfyui_url=host.comfyui_url)
        gated = start_supervisor(
            ollama_url=host.ollama_url, comfyui_url=host.comfyui_url, gate=True
        )
        try:
            time.sleep(warmup_s)
            hz = os.sysconf("SC_CLK_TCK")
            before = {p.pid: _cpu_ticks(p.pid) for p in (plain, gated)}
            t0 = time.monotonic()
            time.sleep(window_s)
            elapsed = time.monotonic() - t0
            pct = {
                pid: 100.0 * (_cpu_ticks(pid) - ticks) / hz / elapsed
                for pid, ticks in before.items()
            }
            result.idle_window_s = round(elapsed, 1)
            result.idle_cpu_pct = round(pct[plain.pid], 2)
            result.idle_gate_cpu_pct = round(pct[gated.pid], 2)
            result.idle_rss_mib = round(_rss_mib(plain.pid), 1)
            result.idle_gate_rss_mib = round(_rss_mib(gated.pid), 1)
        finally:
            plain.stop()
            gated.stop()


# --------------------------------------------------------------------------- Docker events


def _docker_host() -> str | None:
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    if Path(PRIVATE_ENGINE_SOCK).exists():
        return f"unix://{PRIVATE_ENGINE_SOCK}"
    return None


def _wait_answers(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).is_success:
                return
        time.sleep(0.05)


def docker_reaction(result: MicroResult, rounds: int = 5, log_path: Path | None = None) -> None:
    docker_host = _docker_host()
    if docker_host is None:
        result.docker = "no Docker engine (no DOCKER_HOST, no private test engine socket)"
        return
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        result.docker = "the docker SDK is not installed"
        return
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=20)
        client.ping()
    except DockerException as exc:
        result.docker = f"no Docker engine answers at {docker_host} ({exc})"
        return
    try:
        client.images.get(BASE_IMAGE)
    except ImageNotFound:
        result.docker = f"engine up, but no {BASE_IMAGE} image (tests/lib/base-image.sh)"
        client.close()
        return
    name = f"vs-bench-{uuid.uuid4().hex[:6]}-comfyui"
    url = f"http://127.0.0.1:{DOCKER_BENCH_PORT}"
    sup = start_supervisor(
        ollama_url=None,
        comfyui_url=None,
        settings={"VRAM_DRY_RUN": "true"},
        docker_host=docker_host,
    )
    container = None
    try:
        container = client.containers.create(
            BASE_IMAGE,
            ["python3", "-m", "supervisor.sim", "comfyui", "--port", str(DOCKER_BENCH_PORT)],
            name=name,
            labels={
                "vram-supervisor.role": "comfyui",
                "vram-supervisor.url": url,
                DOCKER_BENCH_LABEL: name,
            },
            network_mode="host",
            init=True,
            volumes={str(ROOT): {"bind": "/src", "mode": "ro"}},
            environment={"PYTHONPATH": "/src", "PYTHONDONTWRITEBYTECODE": "1"},
            stop_signal="SIGTERM",
        )
        # Let the supervisor's first passes (and the create event) settle.
        time.sleep(DEFAULT_CHECK_INTERVAL_S / 2)
        missed = 0
        for _ in range(rounds):
            t0 = time.monotonic()
            container.start()
            started = time.monotonic()
            try:
                seen = sup.wait_for(f"Discovered comfyui container {name}", 30.0, after=t0)
                result.docker_reaction_ms.append(round((seen - t0) * 1000, 1))
                result.docker_reaction_after_start_ms.append(round((seen - started) * 1000, 1))
            except RuntimeError:
                missed += 1
            _wait_answers(f"{url}/sim/stats", 15.0)  # stop a service that is up, as in life
            t1 = time.monotonic()
            container.stop(timeout=5)
            with contextlib.suppress(RuntimeError):
                sup.wait_for(f"Lost comfyui container {name}", 30.0, after=t1)
        result.docker = f"engine at {docker_host}" + (
            f"; {missed} of {rounds} starts not seen within 30 s" if missed else ""
        )
    finally:
        if container is not None:
            with contextlib.suppress(DockerException):
                container.remove(force=True)
        sup.stop()
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("\n".join(sup.timed_messages()) + "\n")
        client.close()


def run_micro(
    requests: int = 2000, idle_window_s: float = 30.0, log_dir: Path | None = None
) -> MicroResult:
    answer_without_nagle()
    result = MicroResult()
    gate_overhead(result, requests=requests)
    idle_cost(result, window_s=idle_window_s)
    docker_reaction(result, log_path=log_dir / "supervisor-docker.log" if log_dir else None)
    return result
