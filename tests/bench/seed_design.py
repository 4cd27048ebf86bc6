"""The starting design (the single `vram_manager.py` script), reproduced for comparison.

What it did, and so what this does (landscape.md, docs/migration.md):
- every 5 s: GET Ollama's /api/ps and read GPU memory use (the script ran nvidia-smi; here
  the simulated GPU's /sim/gpu, which reports the same device-wide used/total);
- when a model name appears in /api/ps that the previous poll did not list, or use is at or
  above 75 %, free ComfyUI: at or above 85 % with the "aggressive" payload
  `{"free_memory": true, "unload_models": true}`, else with the "soft" payload
  `{"free_memory": true, "unload_models": false}` (which ComfyUI treats as the hard call:
  `unload_models` defaults to `free_memory`, api-facts 2.3);
- at most one free per 30 s; a free that the rate limit holds back is dropped, not queued;
- no verification that VRAM came back, no healing of spilled models, no gate, no restart.
A failed request is logged and the poll goes on (the script exited; exiting here would only
make the comparison pointless).

Times are simulated seconds; `time_scale` turns them into real ones, as the simulator does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

SOFT_PAYLOAD = {"free_memory": True, "unload_models": False}
AGGRESSIVE_PAYLOAD = {"free_memory": True, "unload_models": True}


@dataclass
class SeedStats:
    polls: int = 0
    new_model_triggers: int = 0
    threshold_triggers: int = 0
    frees_soft: int = 0
    frees_aggressive: int = 0
    rate_limited: int = 0
    errors: int = 0

    @property
    def frees(self) -> int:
        return self.frees_soft + self.frees_aggressive


class SeedDesign:
    def __init__(
        self,
        ollama_url: str,
        comfyui_url: str,
        *,
        time_scale: float,
        interval_s: float = 5.0,
        threshold_percent: float = 75.0,
        aggressive_percent: float = 85.0,
        min_free_interval_s: float = 30.0,
    ) -> None:
        self.ollama_url = ollama_url
        self.comfyui_url = comfyui_url
        self.scale = time_scale
        self.interval_s = interval_s
        self.threshold = threshold_percent
        self.aggressive = aggressive_percent
        self.min_free_interval_s = min_free_interval_s
        self.stats = SeedStats()
        self._known: set[str] = set()
        self._last_free: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="seed-design", daemon=True)
        self._client = httpx.Client(timeout=5.0)

    def start(self) -> SeedDesign:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()

    def _now(self) -> float:
        return time.monotonic() / self.scale

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s * self.scale):
            try:
                self.check()
            except (httpx.HTTPError, ValueError, KeyError):
                self.stats.errors += 1

    def check(self) -> None:
        """One poll of the script."""
        self.stats.polls += 1
        models = self._client.get(f"{self.ollama_url}/api/ps").json()["models"]
        current = {m["name"] for m in models}
        new = current - self._known
        self._known = current
        gpu = self._client.get(f"{self.ollama_url}/sim/gpu").json()
        used_percent = 100 * gpu["used_bytes"] / gpu["total_bytes"]
        if not new and used_percent < self.threshold:
            return
        if new:
            self.stats.new_model_triggers += 1
        else:
            self.stats.threshold_triggers += 1
        now = self._now()
        if self._last_free is not None and now - self._last_free < self.min_free_interval_s:
            self.stats.rate_limited += 1
            return
        aggressive = used_percent >= self.aggressive
        payload = AGGRESSIVE_PAYLOAD if aggressive else SOFT_PAYLOAD
        self._client.post(f"{self.comfyui_url}/free", json=payload)
        self._last_free = now
        if aggressive:
            self.stats.frees_aggressive += 1
        else:
            self.stats.frees_soft += 1
