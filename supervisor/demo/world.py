"""The demo's world: a simulated GPU host, the real supervisor against it, and readings.

`World` starts `SimHost` (24 GiB GPU, fake Ollama, fake ComfyUI on ephemeral 127.0.0.1
ports) and the real supervisor in this process: the same `Daemon`, Ollama/ComfyUI clients,
policy, actions and gate as `vram-supervisor run`, with both fixed URLs, so Docker is
neither needed nor touched. NVML is deliberately not used: on a machine with a real GPU it
would read that card, not the simulated one; the supervisor reads VRAM from the services'
APIs instead (its documented fallback). Every figure the demo prints comes from the
`Reading`s here (Ollama's /api/ps, the simulated GPU's /sim/gpu, ComfyUI's /history) or
from the supervisor's own snapshot and log.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from types import TracebackType
from typing import Any

import httpx

from supervisor.assembly import Assembly
from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.sim import SimHost, ollama_config, sim_profile

# Simulated seconds -> real seconds. 0.5 keeps the whole story under about 20 s while a
# render still takes long enough to watch.
TIME_SCALE = 0.5
GPU_GIB = 24.0
CHECK_INTERVAL_S = 1.0


class DemoFailure(Exception):
    """A step did not turn out as the story says: reported plainly, exit 1."""


@dataclasses.dataclass(frozen=True)
class Placement:
    name: str
    size: int
    size_vram: int

    @property
    def percent(self) -> int:
        return round(100 * self.size_vram / self.size) if self.size else 0


@dataclasses.dataclass(frozen=True)
class GpuView:
    name: str
    total: int
    used: int
    ollama: int
    comfyui: int

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


class World:
    def __init__(self) -> None:
        # Models stay loaded for the whole demo unless someone unloads them: Ollama's
        # default keep-alive (5 min) would otherwise be 90 s at this time scale.
        profile = sim_profile(os.environ)  # VRAM_SIM_PROFILE: 2026 unless it says 2025
        self.host = SimHost(
            gpu_total_gib=GPU_GIB,
            time_scale=TIME_SCALE,
            profile=profile,
            ollama=ollama_config(profile, keep_alive_s=3600.0),
        )
        self.http = httpx.Client(timeout=httpx.Timeout(10.0, read=120.0))
        self.daemon: Daemon | None = None
        self.gate: Any = None
        self.assembly: Assembly | None = None

    # ------------------------------------------------------------------ lifecycle

    def start_host(self) -> None:
        self.host.start()

    def start_supervisor(self) -> None:
        settings = Settings(
            ollama_url=self.host.ollama_url,
            comfyui_url=self.host.comfyui_url,
            check_interval_s=CHECK_INTERVAL_S,
            verify_timeout_s=8.0,
            request_timeout_s=5.0,
            http_port=None,  # no /metrics endpoint: nothing to collide with 9105
            gate_host="127.0.0.1",
            gate_port=0,  # any free port; the gate reports the one it got
            gate_wait_s=20.0,
        )
        # What `vram-supervisor run` assembles for two fixed URLs, minus NVML (see the
        # docstring) and the status server.
        self.assembly = Assembly(settings, nvml=False)
        self.assembly.start()
        self.daemon = self.assembly.daemon
        self.gate = self.assembly.gate

    def close(self) -> None:
        if self.assembly is not None:
            self.assembly.stop(loop_grace_s=3.0)
        self.http.close()
        self.host.stop()

    def __enter__(self) -> World:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def gate_url(self) -> str:
        if self.gate is None:
            raise DemoFailure("the supervisor's Ollama gate did not start")
        return f"http://127.0.0.1:{self.gate.port}"

    # ------------------------------------------------------------------ readings

    def _get(self, url: str) -> Any:
        try:
            response = self.http.get(url)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DemoFailure(f"could not read {url}: {exc}") from exc

    def _post(self, url: str, body: dict[str, Any]) -> Any:
        try:
            response = self.http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise DemoFailure(f"POST {url} failed: {exc}") from exc
        if response.status_code != 200:
            raise DemoFailure(f"POST {url} answered {response.status_code}: {response.text}")
        return response.json()

    def ps(self) -> dict[str, Placement]:
        """Ollama's /api/ps: every loaded model with its size and the part on the GPU."""
        models = self._get(f"{self.host.ollama_url}/api/ps")["models"]
        return {
            m["name"]: Placement(m["name"], int(m["size"]), int(m["size_vram"])) for m in models
        }

    def gpu(self) -> GpuView:
        """The simulated card as NVML would see it: who holds how much."""
        data = self._get(f"{self.host.ollama_url}/sim/gpu")
        by: dict[str, int] = {"ollama": 0, "comfyui": 0}
        for alloc in data["allocations"]:
            kind = str(alloc["owner"]).split(":", 1)[0]
            by[kind] = by.get(kind, 0) + int(alloc["bytes"])
        return GpuView(
            data["name"], int(data["total_bytes"]), int(data["used_bytes"]), by["ollama"],
            by["comfyui"],
        )  # fmt: skip

    def supervisor_view(self) -> dict[str, Any]:
        """The daemon's own snapshot (what `vram-supervisor status` shows)."""
        assert self.daemon is not None
        return self.daemon.snapshot()

    def wait_next_pass(self, timeout_s: float = 10.0) -> None:
        """Until the supervisor has finished a pass that started after now."""
        assert self.daemon is not None
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            done = self.daemon.last_pass_at
            if done is not None and done > start:
                return
            time.sleep(0.05)
        raise DemoFailure(f"the supervisor did not finish a pass within {timeout_s:g} s")

    # ------------------------------------------------------------------ actions

    def render(self, checkpoint: str, timeout_s: float = 60.0) -> tuple[str, float]:
        """Queue a text-to-image workflow on ComfyUI and wait for its image: (file, s)."""
        prompt_id = str(uuid.uuid4())
        workflow = {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn"}},
            "3": {"class_type": "KSampler", "inputs": {"steps": 20, "seed": 42}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}},
        }
        started = time.monotonic()
        self._post(f"{self.host.comfyui_url}/prompt", {"prompt": workflow, "prompt_id": prompt_id})
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            entry = self._get(f"{self.host.comfyui_url}/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"]["completed"]:
                images = [i["filename"] for o in entry["outputs"].values() for i in o["images"]]
                return (images[0] if images else "an image"), time.monotonic() - started
            if entry:
                raise DemoFailure(f"ComfyUI reported the render as {entry['status']['status_str']}")
            time.sleep(0.05)
        raise DemoFailure(f"ComfyUI did not finish the render within {timeout_s:g} s")

    def chat(self, base_url: str, model: str, tokens: int = 32) -> dict[str, Any]:
        """One non-streaming chat; the answer carries Ollama's timing fields."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "stream": False,
            "options": {"num_predict": tokens},
        }
        answer: dict[str, Any] = self._post(f"{base_url}/api/chat", body)
        return answer

    def load(self, base_url: str, model: str) -> None:
        """Load a model without a prompt (what `ollama run` does before the first line)."""
        self._post(f"{base_url}/api/generate", {"model": model, "stream": False})

    def unload(self, model: str, timeout_s: float = 15.0) -> None:
        """keep_alive 0, then wait until Ollama has really given its VRAM back."""
        self._post(f"{self.host.ollama_url}/api/generate", {"model": model, "keep_alive": 0})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if model not in self.ps() and self.gpu().ollama == 0:
                return
            time.sleep(0.05)
        raise DemoFailure(f"Ollama did not unload {model} within {timeout_s:g} s")


def tokens_per_s(answer: dict[str, Any]) -> float | None:
    """Ollama's own speed figure: eval_count / eval_duration (simulated time)."""
    count, duration = answer.get("eval_count"), answer.get("eval_duration")
    if not isinstance(count, int) or not isinstance(duration, int) or duration <= 0:
        return None
    return count / (duration / 1e9)


def loaded_fresh(answer: dict[str, Any]) -> bool:
    """True when the request had to load the model (it was not resident)."""
    duration = answer.get("load_duration")
    return isinstance(duration, int) and duration > 50_000_000  # 50 ms simulated
