"""The vLLM + ComfyUI workload (`python -m tests.bench.run --workload vllm`).

The same seeded events as the Ollama workload (workload.py), with every chat sent to one
fake vLLM (`supervisor/sim/vllm.py`, the new engine with sleep mode on) serving one model,
`--gpu-memory-utilization 0.5` (it reserves half the simulated 24 GiB card at start and
holds it), and the image jobs to the fake ComfyUI on the same GPU.

Modes:
- `none`: no supervisor: vLLM holds its 12 GiB for good, ComfyUI gets the rest;
- `supervisor`: `python -m supervisor run` with `VRAM_SERVICES=vllm=...,comfyui=...`:
  an idle vLLM is put to sleep when ComfyUI has work and the GPU is over the threshold,
  and woken (after making room) when requests wait for it;
- `isolated`: the bound, each service on a GPU of its own.

Figures from the fakes' own records: chats and image latencies, image jobs in low-VRAM
mode, vLLM's sleeps and wakes, requests it aborted (a sleep in `abort` mode would show
here) and whether it died (a wake without room, or the old engine's crash).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.sim import SimHost
from supervisor.sim.vllm import FakeVllm, VllmConfig
from tests.bench.llama_swap import _pair, _ratio, pool_into
from tests.bench.supervisor_proc import Supervisor, scaled_settings, start_supervisor
from tests.bench.workload import (
    GPU_TOTAL_GIB,
    ChatEvent,
    Driver,
    Event,
    ImageEvent,
    answer_without_nagle,
    catalog,
    median,
    percentile,
)

VLLM_MODES: dict[str, str] = {
    "none": "no supervisor",
    "supervisor": "vram-supervisor (sleep mode)",
    "isolated": "bound: a GPU per service",
}
VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"
UTILIZATION = 0.5


@dataclass
class VllmResult:
    mode: str
    label: str
    runs: int = 1
    chats_sent: int = 0
    chats_ok: int = 0
    chats_unfinished: int = 0
    chat_latencies_s: list[float] = field(default_factory=list)
    images_sent: int = 0
    images_done: int = 0
    images_lowvram: int = 0
    image_latencies_s: list[float] = field(default_factory=list)
    comfy_frees: int = 0
    sleeps: int = 0
    wakes: int = 0
    aborted: int = 0
    deaths: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pool_vllm(results: list[VllmResult]) -> VllmResult:
    pooled: VllmResult = pool_into(VllmResult(results[0].mode, results[0].label, 0), results)
    return pooled


def run_vllm_mode(
    mode: str,
    events: list[Event],
    duration_s: float,
    time_scale: float,
    *,
    drain_s: float = 240.0,
    log_path: Path | None = None,
    profile: str = "2026",
) -> VllmResult:
    if mode not in VLLM_MODES:
        raise ValueError(f"unknown vLLM mode {mode!r}; known: {', '.join(VLLM_MODES)}")
    result = VllmResult(mode, VLLM_MODES[mode])
    answer_without_nagle()
    isolated = mode == "isolated"
    # Every chat to the one model vLLM serves.
    chats = [
        dataclasses.replace(e, model=VLLM_MODEL) if isinstance(e, ChatEvent) else e for e in events
    ]
    common: dict[str, Any] = {
        "gpu_total_gib": GPU_TOTAL_GIB,
        "time_scale": time_scale,
        "catalog": catalog(),
        "profile": profile,
        "start_ollama": False,
    }
    with (
        SimHost(**common, start_comfyui=not isolated) as host,
        SimHost(**common, start_comfyui=isolated) as comfy_host,
    ):
        config = VllmConfig(
            model=VLLM_MODEL,
            gpu_memory_utilization=UTILIZATION,
            enable_sleep_mode=True,
            dev_mode=True,
            time_scale=time_scale,
        )
        vllm = FakeVllm(host.gpu, config)
        server = vllm.serve()
        vllm_url = server.url
        comfyui_url = comfy_host.comfyui_url if isolated else host.comfyui_url
        sup: Supervisor | None = None
        if mode == "supervisor":
            settings = scaled_settings(time_scale)
            settings["VRAM_SERVICES"] = f"vllm={vllm_url},comfyui={comfyui_url}"
            sup = start_supervisor(
                ollama_url=None, comfyui_url=None, settings=settings, time_scale=time_scale
            )
        driver = Driver(vllm_url, comfyui_url, time_scale, drain_s=drain_s, chat_api="openai")
        try:
            side = driver.run(chats, duration_s)
            comfy = driver._client.get(f"{comfyui_url}/sim/stats").json()
            stats = httpx.get(f"{vllm_url}/sim/stats", timeout=10).json()
        finally:
            driver.close()
            if sup is not None:
                sup.stop()
            server.stop()
            vllm.close()
        ok = [r for r in side.chats if r.ok]
        result.chats_sent = sum(1 for e in chats if isinstance(e, ChatEvent))
        result.chats_ok = len(ok)
        result.chats_unfinished = side.unfinished_chats
        result.errors = sorted({r.error for r in side.chats if not r.ok})[:5]
        result.chat_latencies_s = [round(r.latency_s, 3) for r in ok]
        result.images_sent = sum(1 for e in chats if isinstance(e, ImageEvent))
        result.images_done = int(comfy["jobs_done"])
        result.images_lowvram = int(comfy["jobs_lowvram"])
        result.image_latencies_s = [float(x) for x in comfy["latencies_s"]]
        result.comfy_frees = int(comfy["frees_requested"])
        result.sleeps, result.wakes = int(stats["sleeps"]), int(stats["wakes"])
        result.aborted = int(stats["aborted"])
        result.deaths = int(bool(stats["death"]))
        result.wall_s = side.wall_s
        if sup is not None and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("\n".join(sup.messages()) + "\n")
    return result


def vllm_table(groups: list[VllmResult]) -> str:
    """Markdown: one column per mode (pooled runs)."""
    bound = next((g for g in groups if g.mode == "isolated"), None)

    def lat(values: list[float]) -> tuple[float | None, float | None]:
        return median(values), percentile(values, 95)

    b_chat = lat(bound.chat_latencies_s) if bound else (None, None)
    b_img = lat(bound.image_latencies_s) if bound else (None, None)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Any) -> None:
        rows.append((name, [cell(g) for g in groups]))

    def ratios(values: list[float], bound_pair: tuple[float | None, float | None]) -> str:
        return " / ".join(_ratio(v, b) for v, b in zip(lat(values), bound_pair, strict=True))

    row("chat latency p50 / p95 (s)", lambda g: _pair(*lat(g.chat_latencies_s)))
    row("... as a ratio to the bound", lambda g: ratios(g.chat_latencies_s, b_chat))
    row("image jobs done (of them low-VRAM)", lambda g: f"{g.images_done} ({g.images_lowvram})")
    row("image latency p50 / p95 (s)", lambda g: _pair(*lat(g.image_latencies_s)))
    row("... as a ratio to the bound", lambda g: ratios(g.image_latencies_s, b_img))
    row("ComfyUI /free calls received, per run", lambda g: f"{g.comfy_frees / g.runs:.1f}")
    row("vLLM sleeps / wakes", lambda g: f"{g.sleeps} / {g.wakes}")
    row("requests vLLM aborted / vLLM deaths", lambda g: f"{g.aborted} / {g.deaths}")
    row(
        "chats answered / sent (unfinished)",
        lambda g: f"{g.chats_ok}/{g.chats_sent} ({g.chats_unfinished})",
    )
    head = "| | " + " | ".join(g.label for g in groups) + " |"
    sep = "| --- |" + " --- |" * len(groups)
    body = ["| " + name + " | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join([head, sep, *body])
