"""The benchmark's workload: a seeded mix of chat requests and image jobs, and its driver.

`make_workload(seed, duration_s)` draws the same events for every mode from one
`random.Random(seed)`: chat requests over three Ollama models of about 5, 10 and 17 GiB
(loaded size at num_ctx 4096) with exponential gaps (a Poisson process), and ComfyUI image
jobs (SDXL mostly, SD 1.5 and FLUX now and then) with gaps of their own. A chat stays with
the model of the previous chat with probability `STICKY`, as people do.

`Driver` plays the events against a client-facing Ollama URL (the fake Ollama, or the gate)
and the fake ComfyUI, each event at its simulated time (`at_s * time_scale` real seconds
after the start), every chat in its own thread, as independent clients would. It records
what each client saw; `collect()` reads the simulator's own counters (`/sim/stats`).

Everything here is in simulated seconds unless a name says `_real_s`.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.sim import Catalog, CheckpointSpec, ModelSpec, httpbase
from supervisor.sim.catalog import DEFAULT_CHECKPOINTS

GIB = 1024**3
GPU_TOTAL_GIB = 24.0

# Real models' sizes and GGUF shapes; loaded at num_ctx 4096 they take about 5.4, 9.7 and
# 17.0 GiB (weights + KV cache + compute graph), so the three never fit together and the big
# one never fits beside a loaded SDXL.
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama3.1:8b", 4_920_753_328, "llama", "8.0B", "Q4_K_M", 32, 131072, 4096, 32, 8),
    ModelSpec("qwen2.5:14b", 8_988_124_069, "qwen2", "14.8B", "Q4_K_M", 48, 32768, 5120, 40, 8),
    ModelSpec("gemma2:27b", 15_628_387_458, "gemma2", "27.2B", "Q4_K_M", 46, 8192, 4608, 32, 16),
)
MODEL_WEIGHTS = (0.45, 0.35, 0.20)
CHECKPOINTS: tuple[CheckpointSpec, ...] = DEFAULT_CHECKPOINTS  # SDXL, SD 1.5, FLUX fp8
CHECKPOINT_WEIGHTS = (0.70, 0.20, 0.10)

CHAT_MEAN_GAP_S = 10.0
IMAGE_MEAN_GAP_S = 40.0
STICKY = 0.6
NUM_PREDICT = (64, 320)
STEPS = (20, 30)


def catalog() -> Catalog:
    return Catalog(MODELS, CHECKPOINTS)


@contextmanager
def models_folder(checkpoints: tuple[CheckpointSpec, ...] = CHECKPOINTS) -> Iterator[str]:
    """ComfyUI's models folder as the image gate reads it (VRAM_COMFYUI_MODELS): each
    checkpoint a sparse file of its size under checkpoints/ (no disk used)."""
    with tempfile.TemporaryDirectory(prefix="bench-models-") as root:
        folder = Path(root) / "checkpoints"
        folder.mkdir()
        for spec in checkpoints:
            with (folder / spec.name).open("wb") as f:
                f.truncate(spec.size_bytes)
        yield root


def answer_without_nagle() -> None:
    """Kept for callers: the simulator's handler now sends with TCP_NODELAY itself, as
    Ollama (Go net/http) and ComfyUI (aiohttp) do. Without it each answer waited ~40 ms
    for the client's delayed ACK, almost a simulated second at a time scale of 0.05."""
    assert httpbase._Handler.disable_nagle_algorithm


@dataclass(frozen=True)
class ChatEvent:
    at_s: float
    model: str
    num_predict: int
    words: int


@dataclass(frozen=True)
class ImageEvent:
    at_s: float
    checkpoint: str
    steps: int


Event = ChatEvent | ImageEvent


def make_workload(
    seed: int,
    duration_s: float,
    *,
    chat_gap_s: float = CHAT_MEAN_GAP_S,
    image_gap_s: float = IMAGE_MEAN_GAP_S,
) -> list[Event]:
    """The events of one run, sorted by time; the same for a given seed and duration."""
    rng = random.Random(seed)
    events: list[Event] = []
    t, model = rng.expovariate(1 / chat_gap_s), ""
    while t < duration_s:
        if not model or rng.random() >= STICKY:
            model = rng.choices([m.name for m in MODELS], MODEL_WEIGHTS)[0]
        events.append(ChatEvent(round(t, 3), model, rng.randint(*NUM_PREDICT), rng.randint(5, 60)))
        t += rng.expovariate(1 / chat_gap_s)
    t = rng.expovariate(1 / image_gap_s)
    while t < duration_s:
        ckpt = rng.choices([c.name for c in CHECKPOINTS], CHECKPOINT_WEIGHTS)[0]
        events.append(ImageEvent(round(t, 3), ckpt, rng.randint(*STEPS)))
        t += rng.expovariate(1 / image_gap_s)
    events.sort(key=lambda e: e.at_s)
    return events


def image_prompt(event: ImageEvent) -> dict[str, Any]:
    """A plain text-to-image graph: checkpoint loader, sampler, save."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": event.checkpoint}},
        "3": {
            "class_type": "KSampler",
            "inputs": {"model": ["4", 0], "steps": event.steps, "seed": 1, "cfg": 7.0},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }


# --------------------------------------------------------------------------- results


@dataclass
class ChatResult:
    event: ChatEvent
    ok: bool
    latency_s: float  # simulated, request sent -> answer read
    eval_count: int = 0
    eval_s: float = 0.0  # simulated decode time (Ollama's eval_duration)
    load_s: float = 0.0  # simulated (Ollama's load_duration)
    error: str = ""


@dataclass
class ClientSide:
    chats: list[ChatResult] = field(default_factory=list)
    images_sent: int = 0
    images_refused: int = 0
    unfinished_chats: int = 0
    wall_s: float = 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ranked = sorted(values)
    k = max(0, min(len(ranked) - 1, round(q / 100 * len(ranked) + 0.5) - 1))
    return ranked[k]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- driver


class Driver:
    """Plays a workload in real time against `ollama_url` (what clients use) and ComfyUI.

    `chat_api="openai"`: chats go to `/v1/chat/completions` of `ollama_url` instead (a
    llama-swap or llama-server), with `max_tokens`; the answer's `usage.completion_tokens`
    is the eval count (these servers report no decode time: `eval_s` stays 0)."""

    def __init__(
        self,
        ollama_url: str,
        comfyui_url: str,
        time_scale: float,
        *,
        drain_s: float = 240.0,
        on_end_of_schedule: Callable[[], None] | None = None,
        chat_api: str = "ollama",
    ) -> None:
        if chat_api not in ("ollama", "openai"):
            raise ValueError(f"chat_api must be 'ollama' or 'openai', not {chat_api!r}")
        self.chat_api = chat_api
        self.ollama_url = ollama_url
        self.comfyui_url = comfyui_url
        self.scale = time_scale
        self.drain_s = drain_s
        self._on_end = on_end_of_schedule
        self._lock = threading.Lock()
        self._client = httpx.Client(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def close(self) -> None:
        self._client.close()

    def run(self, events: list[Event], duration_s: float) -> ClientSide:
        side = ClientSide()
        threads: list[threading.Thread] = []
        images: list[threading.Thread] = []
        start = time.monotonic()
        for event in events:
            delay = start + event.at_s * self.scale - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if isinstance(event, ChatEvent):
                t = threading.Thread(target=self._chat, args=(event, side), daemon=True)
                t.start()
                threads.append(t)
            else:
                # In a thread: a gate may hold a prompt while it makes room.
                t = threading.Thread(target=self._image, args=(event, side), daemon=True)
                t.start()
                images.append(t)
        left = start + duration_s * self.scale - time.monotonic()
        if left > 0:
            time.sleep(left)
        if self._on_end is not None:
            self._on_end()
        deadline = time.monotonic() + self.drain_s * self.scale
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for t in images:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            side.unfinished_chats = sum(1 for t in threads if t.is_alive())
        while time.monotonic() < deadline and self._comfy_busy():
            time.sleep(0.05)
        side.wall_s = time.monotonic() - start
        return side

    def _chat(self, event: ChatEvent, side: ClientSide) -> None:
        if self.chat_api == "openai":
            self._openai_chat(event, side)
            return
        body = {
            "model": event.model,
            "messages": [{"role": "user", "content": " ".join(["word"] * event.words)}],
            "stream": False,
            "options": {"num_predict": event.num_predict},
        }
        sent = time.monotonic()
        try:
            r = self._client.post(f"{self.ollama_url}/api/chat", json=body)
            took = (time.monotonic() - sent) / self.scale
            if r.status_code != 200:
                result = ChatResult(event, False, took, error=f"HTTP {r.status_code}: {r.text}")
            else:
                data = r.json()
                result = ChatResult(
                    event,
                    True,
                    took,
                    eval_count=int(data.get("eval_count", 0)),
                    eval_s=int(data.get("eval_duration", 0)) / 1e9,
                    load_s=int(data.get("load_duration", 0)) / 1e9,
                )
        except httpx.HTTPError as exc:
            took = (time.monotonic() - sent) / self.scale
            result = ChatResult(event, False, took, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            side.chats.append(result)

    def _openai_chat(self, event: ChatEvent, side: ClientSide) -> None:
        body = {
            "model": event.model,
            "messages": [{"role": "user", "content": " ".join(["word"] * event.words)}],
            "max_tokens": event.num_predict,
        }
        sent = time.monotonic()
        try:
            r = self._client.post(f"{self.ollama_url}/v1/chat/completions", json=body)
            took = (time.monotonic() - sent) / self.scale
            if r.status_code != 200:
                result = ChatResult(
                    event, False, took, error=f"HTTP {r.status_code}: {r.text[:200]}"
                )
            else:
                usage = r.json().get("usage") or {}
                result = ChatResult(
                    event, True, took, eval_count=int(usage.get("completion_tokens", 0))
                )
        except httpx.HTTPError as exc:
            took = (time.monotonic() - sent) / self.scale
            result = ChatResult(event, False, took, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            side.chats.append(result)

    def _image(self, event: ImageEvent, side: ClientSide) -> None:
        try:
            r = self._client.post(
                f"{self.comfyui_url}/prompt", json={"prompt": image_prompt(event)}
            )
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        with self._lock:
            side.images_sent += 1
            side.images_refused += int(not ok)

    def _comfy_busy(self) -> bool:
        try:
            q = self._client.get(f"{self.comfyui_url}/queue").json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(q.get("queue_running") or q.get("queue_pending"))


def sim_stats(ollama_url: str, comfyui_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The simulator's own counters: (fake Ollama /sim/stats, fake ComfyUI /sim/stats)."""
    with httpx.Client(timeout=10.0) as c:
        return c.get(f"{ollama_url}/sim/stats").json(), c.get(f"{comfyui_url}/sim/stats").json()
