"""The real supervisor (`python -m supervisor run`) as a subprocess, for the benchmarks.

It gets both fixed URLs (no Docker), JSON logs on stderr (kept line by line with the time
each was read), /metrics on a free 127.0.0.1 port and, for the gate mode, the gate on
another. `scaled_settings(time_scale)` compresses every time setting the user can set by the
simulator's time scale, so the supervisor sees simulated time pass as fast as the fakes do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

# Defaults of the time settings, in (simulated) seconds; everything else keeps its default.
TIME_SETTINGS_S = {
    "VRAM_CHECK_INTERVAL": 5.0,
    "VRAM_MIN_FREE_INTERVAL": 30.0,
    "VRAM_VERIFY_TIMEOUT": 10.0,
    "VRAM_HEAL_COOLDOWN": 600.0,
    "VRAM_RESTART_COOLDOWN": 600.0,
    "VRAM_GATE_WAIT": 30.0,
}


def scaled_settings(time_scale: float) -> dict[str, str]:
    return {name: f"{value * time_scale:g}" for name, value in TIME_SETTINGS_S.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Supervisor:
    proc: subprocess.Popen[str]
    http_port: int
    gate_port: int | None
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    image_gate_port: int | None = None

    @property
    def gate_url(self) -> str:
        assert self.gate_port is not None
        return f"http://127.0.0.1:{self.gate_port}"

    @property
    def image_gate_url(self) -> str:
        assert self.image_gate_port is not None
        return f"http://127.0.0.1:{self.image_gate_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _follow(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"level": "RAW", "message": raw.rstrip("\n")}
            self.lines.append((time.monotonic(), entry))

    def messages(self) -> list[str]:
        return [str(entry.get("message", "")) for _, entry in list(self.lines)]

    def timed_messages(self) -> list[str]:
        """Messages prefixed with seconds since the first line (as read here)."""
        lines = list(self.lines)
        t0 = lines[0][0] if lines else 0.0
        return [f"{at - t0:9.3f} {entry.get('message', '')}" for at, entry in lines]

    def count(self, text: str) -> int:
        return sum(1 for m in self.messages() if text in m)

    def wait_for(self, text: str, timeout_s: float, after: float = 0.0) -> float:
        """Monotonic time at which the first line containing `text` (read after `after`)
        arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, entry in list(self.lines):
                if at >= after and text in str(entry.get("message", "")):
                    return at
            if self.proc.poll() is not None:
                break
            time.sleep(0.002)
        raise RuntimeError(f"no supervisor log line with {text!r}; log tail:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.messages()[-n:])

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited early:\n{self.tail()}")
            try:
                ok = httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).is_success
                # The gate answers 502 until the loop's first pass has found Ollama.
                if (
                    ok
                    and (
                        self.gate_port is None
                        or httpx.get(f"{self.gate_url}/api/version", timeout=1).is_success
                    )
                    and (
                        self.image_gate_port is None
                        or httpx.get(f"{self.image_gate_url}/queue", timeout=1).is_success
                    )
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the supervisor did not get ready:\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        """Counter samples by `name{label=value,...}` from /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=5)


def start_supervisor(
    *,
    ollama_url: str | None,
    comfyui_url: str | None,
    settings: dict[str, str] | None = None,
    gate: bool = False,
    image_gate: bool = False,
    docker_host: str | None = None,
    time_scale: float | None = None,
) -> Supervisor:
    """Start `python -m supervisor run`; waits until /healthz (and the gate) answer.

    With `time_scale`, the supervisor is started through scaled_supervisor.py, which also
    scales the daemon's per-minute safety limit (see there)."""
    http_port = free_port()
    gate_port = free_port() if gate else None
    image_gate_port = free_port() if image_gate else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST=docker_host or "unix:///nonexistent/vram-supervisor-bench.sock",
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(http_port),
        VRAM_LOG_FORMAT="json",
        **(settings or {}),
    )
    if ollama_url:
        env["VRAM_OLLAMA_URL"] = ollama_url
    if comfyui_url:
        env["VRAM_COMFYUI_URL"] = comfyui_url
    if gate_port is not None:
        env.update(VRAM_GATE_PORT=str(gate_port), VRAM_GATE_HOST="127.0.0.1")
    if image_gate_port is not None:
        env.update(VRAM_COMFYUI_GATE_PORT=str(image_gate_port), VRAM_GATE_HOST="127.0.0.1")
    command = [sys.executable, "-m", "supervisor", "run"]
    if time_scale is not None:
        command = [sys.executable, "-m", "tests.bench.scaled_supervisor"]
        env["BENCH_TIME_SCALE"] = f"{time_scale:g}"
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sup = Supervisor(proc, http_port, gate_port, image_gate_port=image_gate_port)
    threading.Thread(target=sup._follow, daemon=True, name="supervisor-log").start()
    try:
        sup.wait_ready()
    except BaseException:
        sup.stop()
        raise
    return sup
