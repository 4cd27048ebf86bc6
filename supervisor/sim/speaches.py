"""A fake speaches server (tenants.md §7) on the shared `SimGpu`.

As the sheet (and speaches' `routers/misc.py`, `executors/shared/base_model_manager.py`)
says:
- `GET /api/ps` -> `{"models": [ids]}`: the loaded models.
- `POST /api/ps/{model_id}` loads one: 201; 409 "Model already loaded"; 404 for a model
  it does not support (here: not in `MODELS`).
- `DELETE /api/ps/{model_id}` unloads: 200 `{"message"}`; 409 while the model is in use
  (`ref_count > 0`: "Model X is still in use. self.ref_count=N"); 404 "Model not found".
  The reference count is checked and the model dropped under one lock, so the refusal
  is exact: no request is ever cut off.
- A request (`POST /v1/audio/transcriptions`, multipart field `model`;
  `POST /v1/audio/speech`, JSON `model`) loads its model on first use, holds a reference
  while it runs (`request_s` simulated seconds), and starts the TTL timer when the last
  reference goes: `STT_MODEL_TTL` / `TTS_MODEL_TTL` (300 s; -1 never; 0 at once).
- `GET /health` -> 200 `{"message": "OK"}`.
- An unload gives the model's memory back at once. speaches runs `gc.collect()` but not
  `torch.cuda.empty_cache()`; how fast CTranslate2 really returns VRAM is UNVERIFIED.
- A load that does not fit the GPU fails with 500 (a CUDA out-of-memory error).

`/sim/stats` (not a speaches route) tells tests what it holds and did.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from urllib.parse import unquote

from supervisor.sim.gpu import GIB, MIB, SimGpu, add_gpu_args, gpu_from_args
from supervisor.sim.httpbase import BadJson, Exchange, Route, SimServer

# What each model holds on the GPU when loaded (float16 CTranslate2 / ONNX; plausible
# figures, not measured).
MODELS: dict[str, int] = {
    "Systran/faster-whisper-large-v3": 3 * GIB + 512 * MIB,
    "Systran/faster-distil-whisper-large-v3": 1 * GIB + 640 * MIB,
    "Systran/faster-whisper-small": 640 * MIB,
    "speaches-ai/Kokoro-82M-v1.0-ONNX": 400 * MIB,
}
TTS_MODELS = frozenset({"speaches-ai/Kokoro-82M-v1.0-ONNX"})
_FORM_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]*\r\n)*?\r\n([^\r\n]*)\r\n')


@dataclass
class SpeachesConfig:
    stt_ttl_s: float = 300.0  # STT_MODEL_TTL
    tts_ttl_s: float = 300.0  # TTS_MODEL_TTL
    time_scale: float = 1.0
    request_s: float = 2.0  # one transcription or speech request, simulated seconds
    models: dict[str, int] = field(default_factory=lambda: dict(MODELS))


@dataclass
class _Loaded:
    ref_count: int = 0
    timer: threading.Timer | None = None


class FakeSpeaches:
    def __init__(self, gpu: SimGpu, config: SpeachesConfig, pid: int | None = None) -> None:
        self.gpu = gpu
        self.config = config
        self.pid = pid if pid is not None else os.getpid()
        self._lock = threading.RLock()
        self.loaded: dict[str, _Loaded] = {}
        self.unloads = 0
        self.refused = 0
        self.requests_done = 0

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(
            host, port, self.route, server_name="speaches", not_found=_not_found, verbose=verbose
        )
        server.start()
        return server

    def close(self) -> None:
        with self._lock:
            for entry in self.loaded.values():
                if entry.timer is not None:
                    entry.timer.cancel()
            self.loaded.clear()
        self.gpu.release_prefix("speaches:")

    def held_bytes(self) -> int:
        return sum(a.bytes for a in self.gpu.allocations() if a.owner.startswith("speaches:"))

    # ------------------------------------------------------------------ routing

    def route(self, method: str, path: str) -> Route | None:
        if path.startswith("/api/ps/") and method in ("POST", "DELETE"):
            return self.load_route if method == "POST" else self.unload_route
        return {
            ("GET", "/health"): lambda ex: ex.send_json(200, {"message": "OK"}),
            ("GET", "/api/ps"): self.ps,
            ("GET", "/sim/stats"): self.stats,
            ("POST", "/v1/audio/transcriptions"): self.transcribe,
            ("POST", "/v1/audio/speech"): self.speech,
        }.get((method, path))

    def ps(self, ex: Exchange) -> None:
        with self._lock:
            ex.send_json(200, {"models": list(self.loaded)})

    def stats(self, ex: Exchange) -> None:
        with self._lock:
            refs = {m: e.ref_count for m, e in self.loaded.items()}
        ex.send_json(
            200,
            {
                "held": self.held_bytes(),
                "ref_counts": refs,
                "unloads": self.unloads,
                "refused": self.refused,
                "requests_done": self.requests_done,
            },
        )

    # ------------------------------------------------------------------ load / unload

    def _load(self, model: str) -> str:
        """Under the lock: load `model` if needed; "" or an error text (OOM)."""
        if model in self.loaded:
            return ""
        if not self.gpu.allocate(f"speaches:{model}", self.pid, self.config.models[model]):
            return "CUDA failed with error out of memory"
        self.loaded[model] = _Loaded()
        return ""

    def load_route(self, ex: Exchange) -> None:
        model = unquote(ex.path[len("/api/ps/") :])
        with self._lock:
            if model in self.loaded:
                ex.send_text(409, "Model already loaded")
                return
            if model not in self.config.models:
                ex.send_text(404, f"Model {model} is not supported")
                return
            error = self._load(model)
            if error:
                ex.send_text(500, error)
                return
            self._arm_ttl(model)
        ex.send_empty(201)

    def unload_route(self, ex: Exchange) -> None:
        model = unquote(ex.path[len("/api/ps/") :])
        with self._lock:
            entry = self.loaded.get(model)
            if entry is None:
                ex.send_text(404, "Model not found")
                return
            if entry.ref_count > 0:
                self.refused += 1
                ex.send_text(
                    409, f"Model {model} is still in use. self.ref_count={entry.ref_count}"
                )
                return
            self._unload(model)
        ex.send_json(200, {"message": f"Model '{model}' unloaded"})

    def _unload(self, model: str) -> None:
        entry = self.loaded.pop(model)
        if entry.timer is not None:
            entry.timer.cancel()
        self.gpu.release(f"speaches:{model}")
        self.unloads += 1

    def _ttl(self, model: str) -> float:
        return self.config.tts_ttl_s if model in TTS_MODELS else self.config.stt_ttl_s

    def _arm_ttl(self, model: str) -> None:
        """Under the lock, once the last reference went: unload after the TTL."""
        ttl = self._ttl(model)
        if ttl < 0:
            return
        if ttl == 0:
            self._unload(model)
            return
        entry = self.loaded[model]
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = threading.Timer(ttl * self.config.time_scale, self._expire, (model, entry))
        entry.timer.daemon = True
        entry.timer.start()

    def _expire(self, model: str, entry: _Loaded) -> None:
        with self._lock:
            if self.loaded.get(model) is entry and entry.ref_count == 0:
                self._unload(model)

    # ------------------------------------------------------------------ requests

    def transcribe(self, ex: Exchange) -> None:
        match = _FORM_MODEL.search(ex.body)
        model = match.group(1).decode(errors="replace") if match else ""
        if self._use(ex, model):
            ex.send_json(200, {"text": "simulated transcription"})

    def speech(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson as exc:
            ex.send_json(422, {"detail": f"invalid JSON: {exc}"})
            return
        model = body.get("model") if isinstance(body, dict) else None
        if self._use(ex, model if isinstance(model, str) else ""):
            ex.send(200, b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav")

    def _use(self, ex: Exchange, model: str) -> bool:
        """Load `model` if needed and hold a reference while the request runs."""
        with self._lock:
            if model not in self.config.models:
                ex.send_json(404, {"detail": f"Model '{model}' is not supported"})
                return False
            error = self._load(model)
            if error:
                ex.send_json(500, {"detail": error})
                return False
            entry = self.loaded[model]
            entry.ref_count += 1
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        try:
            time.sleep(max(0.0, self.config.request_s * self.config.time_scale))
        finally:
            with self._lock:
                entry.ref_count -= 1
                self.requests_done += 1
                if entry.ref_count <= 0 and self.loaded.get(model) is entry:
                    self._arm_ttl(model)
        return True


def _not_found(ex: Exchange) -> None:
    ex.send_json(404, {"detail": "Not Found"})


# ---------------------------------------------------------------------- the process


def _ttl_env(name: str) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else 300.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m supervisor.sim speaches",
        description="A fake speaches server on the simulated GPU (supervisor/sim/speaches.py); "
        "reads STT_MODEL_TTL and TTS_MODEL_TTL like the real one.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--request-seconds", type=float, default=SpeachesConfig.request_s)
    add_gpu_args(p)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--verbose", action="store_true", help="access logs on stderr")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    try:
        config = SpeachesConfig(
            stt_ttl_s=_ttl_env("STT_MODEL_TTL"),
            tts_ttl_s=_ttl_env("TTS_MODEL_TTL"),
            time_scale=args.time_scale,
            request_s=args.request_seconds,
        )
    except ValueError as exc:
        print(f"STT_MODEL_TTL / TTS_MODEL_TTL must be numbers of seconds: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    gpu = gpu_from_args(args)
    fake = FakeSpeaches(gpu, config)
    server = fake.serve(args.host, args.port, verbose=args.verbose)
    print(f"sim: fake speaches listening on {server.url}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
        return 0
    finally:
        server.stop()
        fake.close()
        gpu.close()
