"""The llama-swap + ComfyUI workload (`python -m tests.bench.run --workload llama-swap`).

The same seeded events as the Ollama workload (workload.py): the chats go to the fake
llama-swap's `/v1/chat/completions` instead of Ollama, one llama-swap model per Ollama
model of the workload (the same GGUF shapes, each upstream with a 4096 context), in
llama-swap's default group (one model runs at a time: a chat for another model waits for
the swap). The image jobs go to the fake ComfyUI as before. All on the simulated 24 GiB
GPU.

Modes (a subset of the Ollama workload's; the others do not apply):
- `none`: no supervisor;
- `supervisor`: `python -m supervisor run` with `VRAM_SERVICES=llama-swap=...,comfyui=...`,
  default settings, time settings scaled (supervisor_proc.py);
- `isolated`: the bound, each service on a GPU of its own.
The gate modes are left out: the gate fronts Ollama only (a llama-swap load is not held
for room). The starting design (`seed`) read only Ollama's /api/ps.

Figures, from the simulator's own records (the real API reports none of them): an
upstream "loads fully on GPU" when `--fit` placed all of it in VRAM (llama-server's fit
otherwise shrinks the context or puts weights in system RAM, slower); tokens count where
their upstream sat. "Cut off" counts requests the upstream dropped because it was
unloaded under them: an unload by the supervisor while a request runs would show here.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.sim import SimHost
from supervisor.sim.llama_server import LlamaChild
from supervisor.sim.llama_swap import parse_swap_config
from tests.bench.supervisor_proc import Supervisor, free_port, scaled_settings, start_supervisor
from tests.bench.workload import (
    GIB,
    GPU_TOTAL_GIB,
    MODELS,
    ChatEvent,
    Driver,
    Event,
    ImageEvent,
    answer_without_nagle,
    catalog,
    median,
    percentile,
)

SWAP_MODES: dict[str, str] = {
    "none": "no supervisor",
    "supervisor": "vram-supervisor",
    "gate": "vram-supervisor + model gate + image gate",
    "isolated": "bound: a GPU per service",
}
CTX = 4096
_UNLOADED = re.compile(r"^Unloaded model \S+ on ")
_REFUSED = re.compile(r"^Not unloading model \S+ on .*serving a request")


@dataclass
class SwapResult:
    """One mode's figures (of one run, or pooled over several: counts added, latencies
    pooled before percentiles)."""

    mode: str
    label: str
    profile: str = "2026"
    runs: int = 1
    chats_sent: int = 0  # over all runs once pooled
    chats_ok: int = 0
    chats_unfinished: int = 0
    chat_latencies_s: list[float] = field(default_factory=list)
    loads: int = 0  # upstreams that finished loading
    loads_full: int = 0  # of them, wholly in VRAM
    loads_ctx_shrunk: int = 0  # of them, with the context cut by --fit
    tokens: int = 0
    tokens_full: int = 0
    cut_off: int = 0
    images_sent: int = 0
    images_done: int = 0
    images_lowvram: int = 0
    image_latencies_s: list[float] = field(default_factory=list)
    comfy_frees: int = 0
    comfy_freed_gib: float = 0.0
    model_unloads: int = 0  # the supervisor's verified unloads of llama-swap models
    unloads_refused_busy: int = 0  # unloads it did not send: the model served a request
    safety_skips: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pool_into(out: Any, results: list[Any]) -> Any:
    """Pool runs of one mode into `out` (its `runs` 0): counts and lists added, errors
    merged; `mode`, `label` and `profile` are out's."""
    for r in results:
        for name, value in asdict(r).items():
            if name in ("mode", "label", "profile"):
                continue
            if name == "errors":
                out.errors = sorted(set(out.errors) | set(value))
            else:
                setattr(out, name, getattr(out, name) + value)
    return out


def pool_swap(results: list[SwapResult]) -> SwapResult:
    first = results[0]
    pooled: SwapResult = pool_into(SwapResult(first.mode, first.label, first.profile, 0), results)
    return pooled


def swap_config() -> Any:
    """llama-swap's config: one model per workload model, named as in the workload."""
    return parse_swap_config(
        {"models": {m.name: {"model": m.name, "ctx_size": CTX} for m in MODELS}}
    )


class Upstreams:
    """Every upstream the fake llama-swap starts, with its placement once loaded."""

    def __init__(self, host: SimHost) -> None:
        fake = host.fake_llama_swap
        assert fake is not None
        self._lock = threading.Lock()
        self.children: list[LlamaChild] = []
        self.placed: dict[int, tuple[int, int, int]] = {}  # id -> (need, on GPU, n_ctx)
        start = fake._begin_start

        def recording(proc: Any) -> None:
            start(proc)
            child: LlamaChild = proc.child
            with self._lock:
                self.children.append(child)
            threading.Thread(target=self._placement, args=(child,), daemon=True).start()

        fake._begin_start = recording  # type: ignore[method-assign]

    def _placement(self, child: LlamaChild) -> None:
        if child.wait_state("loaded", "failed", "stopping", "stopped") == "loaded":
            with self._lock:
                self.placed[id(child)] = (child.need_bytes, child.gpu_bytes, child.n_ctx)

    def fill(self, result: SwapResult) -> None:
        with self._lock:
            for child in self.children:
                result.cut_off += child.stats.cut_off
                placed = self.placed.get(id(child))
                if placed is None:
                    continue
                need, on_gpu, n_ctx = placed
                full = on_gpu >= need
                result.loads += 1
                result.loads_full += int(full)
                result.loads_ctx_shrunk += int(n_ctx < CTX)
                result.tokens += child.stats.predicted_tokens
                result.tokens_full += child.stats.predicted_tokens if full else 0


def run_swap_mode(
    mode: str,
    events: list[Event],
    duration_s: float,
    time_scale: float,
    *,
    drain_s: float = 240.0,
    log_path: Path | None = None,
    profile: str = "2026",
) -> SwapResult:
    if mode not in SWAP_MODES:
        raise ValueError(f"unknown llama-swap mode {mode!r}; known: {', '.join(SWAP_MODES)}")
    result = SwapResult(mode, SWAP_MODES[mode], profile)
    answer_without_nagle()
    isolated = mode == "isolated"
    common: dict[str, Any] = {
        "gpu_total_gib": GPU_TOTAL_GIB,
        "time_scale": time_scale,
        "catalog": catalog(),
        "profile": profile,
        "start_ollama": False,
    }
    with (
        SimHost(**common, start_comfyui=not isolated, llama_swap=swap_config()) as host,
        SimHost(**common, start_comfyui=isolated) as comfy_host,
    ):
        upstreams = Upstreams(host)
        comfyui_url = comfy_host.comfyui_url if isolated else host.comfyui_url
        chat_url, image_url = host.llama_swap_url, comfyui_url
        sup: Supervisor | None = None
        if mode in ("supervisor", "gate"):
            settings = scaled_settings(time_scale)
            settings["VRAM_SERVICES"] = f"llama-swap={host.llama_swap_url},comfyui={comfyui_url}"
            model_gate_port = free_port()
            if mode == "gate":
                settings["VRAM_MODEL_GATES"] = f"llama-swap={model_gate_port}"
            sup = start_supervisor(
                ollama_url=None,
                comfyui_url=None,
                settings=settings,
                time_scale=time_scale,
                image_gate=mode == "gate",
            )
            if mode == "gate":
                # Clients use the gates: chats the model gate, image jobs the image gate.
                chat_url = f"http://127.0.0.1:{model_gate_port}"
                image_url = f"http://127.0.0.1:{sup.image_gate_port}"
                _wait_answers(f"{chat_url}/health")
        driver = Driver(chat_url, image_url, time_scale, drain_s=drain_s, chat_api="openai")
        try:
            side = driver.run(events, duration_s)
            comfy = driver._client.get(f"{comfyui_url}/sim/stats").json()
        finally:
            driver.close()
            if sup is not None:
                sup.stop()
        chats = [r for r in side.chats if r.ok]
        result.chats_sent = sum(1 for e in events if isinstance(e, ChatEvent))
        result.chats_ok = len(chats)
        result.chats_unfinished = side.unfinished_chats
        result.errors = sorted({r.error for r in side.chats if not r.ok})[:5]
        result.chat_latencies_s = [round(r.latency_s, 3) for r in chats]
        result.images_sent = sum(1 for e in events if isinstance(e, ImageEvent))
        result.wall_s = side.wall_s
        result.images_done = int(comfy["jobs_done"])
        result.images_lowvram = int(comfy["jobs_lowvram"])
        result.image_latencies_s = [float(x) for x in comfy["latencies_s"]]
        result.comfy_frees = int(comfy["frees_requested"])
        result.comfy_freed_gib = round(int(comfy["freed_bytes"]) / GIB, 1)
        upstreams.fill(result)
        if sup is not None:
            messages = sup.messages()
            result.model_unloads = sum(1 for m in messages if _UNLOADED.match(m))
            result.unloads_refused_busy = sum(1 for m in messages if _REFUSED.match(m))
            result.safety_skips = sup.count("(safety limit)")
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_text("\n".join(messages) + "\n")
    return result


def _wait_answers(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")
        time.sleep(0.1)


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.0f} %)" if whole else "-"


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a:.1f} / {b:.1f}"


def _ratio(a: float | None, bound: float | None) -> str:
    return "-" if a is None or not bound else f"{a / bound:.2f}x"


def swap_table(groups: list[SwapResult]) -> str:
    """Markdown: one column per mode (pooled runs)."""
    bound = next((g for g in groups if g.mode == "isolated"), None)

    def lat(values: list[float]) -> tuple[float | None, float | None]:
        return median(values), percentile(values, 95)

    b_chat = lat(bound.chat_latencies_s) if bound else (None, None)
    b_img = lat(bound.image_latencies_s) if bound else (None, None)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Any) -> None:
        rows.append((name, [cell(g) for g in groups]))

    row("upstream loads fully on GPU", lambda g: _pct(g.loads_full, g.loads))
    row("tokens generated fully on GPU", lambda g: _pct(g.tokens_full, g.tokens))
    row("chat latency p50 / p95 (s)", lambda g: _pair(*lat(g.chat_latencies_s)))
    row(
        "... as a ratio to the bound",
        lambda g: " / ".join(
            _ratio(v, b) for v, b in zip(lat(g.chat_latencies_s), b_chat, strict=True)
        ),
    )
    row("image jobs done (of them low-VRAM)", lambda g: f"{g.images_done} ({g.images_lowvram})")
    row("image latency p50 / p95 (s)", lambda g: _pair(*lat(g.image_latencies_s)))
    row(
        "... as a ratio to the bound",
        lambda g: " / ".join(
            _ratio(v, b) for v, b in zip(lat(g.image_latencies_s), b_img, strict=True)
        ),
    )
    row(
        "ComfyUI /free calls received, per run",
        lambda g: f"{g.comfy_frees / g.runs:.1f} ({g.comfy_freed_gib:.0f} GiB freed)",
    )
    row(
        "llama-swap models unloaded by the supervisor (not sent: busy)",
        lambda g: (
            f"{g.model_unloads} ({g.unloads_refused_busy})"
            if g.mode in ("supervisor", "gate")
            else "-"
        ),
    )
    row("requests cut off by an unload", lambda g: str(g.cut_off))
    row(
        "chats answered / sent (unfinished)",
        lambda g: f"{g.chats_ok}/{g.chats_sent} ({g.chats_unfinished})",
    )
    head = "| | " + " | ".join(g.label for g in groups) + " |"
    sep = "| --- |" + " --- |" * len(groups)
    body = ["| " + name + " | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join([head, sep, *body])
