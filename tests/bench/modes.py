"""One benchmark run per mode: the same seeded workload on a fresh simulated host.

Modes:
- `none`:       no supervisor at all;
- `seed`:       the starting design (seed_design.py), in this process;
- `supervisor`: `python -m supervisor run` with default settings (heal on, no gate), its
                time settings scaled by the simulator's time scale (supervisor_proc.py,
                scaled_supervisor.py);
- `gate`:       the same plus VRAM_GATE_PORT, and the chat clients talk to the gate;
- `gate-ollama`: the gate again, with VRAM_PRIORITY=ollama (a busy ComfyUI may be freed
                too: the flags wait for its prompt), to show what the priority changes.
- `isolated`:   the bound every mode is measured against: no supervisor, and each service
                on a simulated GPU of its own (no sharing at all).
- `gate-image`: the gate plus the image gate (VRAM_COMFYUI_GATE_PORT), and the image
                clients talk to the image gate: idle Ollama models are unloaded before a
                job that is short of room.

Every mode runs against one generation of the simulated services (`profile`: "2026",
Ollama >= 0.30 with llama-server runners, or "2025", Ollama 0.12; sim/profiles.py).

`run_mode` returns a `ModeResult`: what the clients saw, the simulator's counters
(/sim/stats) and the supervisor's (its log and /metrics). Spill time is read when the
schedule ends, so every mode is measured over the same simulated window; every other
figure after the drain, when the last answers are in.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from supervisor.sim import SimHost
from tests.bench.seed_design import SeedDesign
from tests.bench.supervisor_proc import Supervisor, scaled_settings, start_supervisor
from tests.bench.workload import (
    GIB,
    GPU_TOTAL_GIB,
    ChatEvent,
    ClientSide,
    Driver,
    Event,
    ImageEvent,
    answer_without_nagle,
    catalog,
    median,
    models_folder,
    percentile,
    sim_stats,
)

MODES: dict[str, str] = {
    "none": "no supervisor",
    "seed": "starting design",
    "supervisor": "vram-supervisor (heal)",
    "gate": "vram-supervisor + gate",
    # A fifth, for the reading: the gate may then free a ComfyUI that has work.
    "gate-ollama": "(extra) gate + VRAM_PRIORITY=ollama",
    # The bound: the same workload with each service on a GPU of its own.
    "isolated": "bound: a GPU per service",
    "gate-image": "(extra) gate + image gate",
}
_GATED = ("gate", "gate-ollama", "gate-image")

_HEALED = re.compile(r"^Healed Ollama model \S+: (\d+)% -> (\d+)% on GPU")
_HEAL_NO_HELP = re.compile(r"^Heal of Ollama model \S+ did not help")
# The gate's estimate for a load it held (with or without making room).
_GATE_NEED = re.compile(r"^Gate: (?:making room for )?(\S+?):? needs about ([\d.]+) GiB")


@dataclass(frozen=True)
class EstimateCheck:
    """The gate's estimate for the first load of a model in a run, against what the
    simulator's runner really took (RAM + VRAM, /api/ps `size`)."""

    model: str
    estimated_bytes: int
    real_bytes: int

    @property
    def error_bytes(self) -> int:
        return self.estimated_bytes - self.real_bytes

    @property
    def error_pct(self) -> float:
        return 100.0 * self.error_bytes / self.real_bytes if self.real_bytes else 0.0


@dataclass
class ModeResult:
    """One mode's figures: of one run, or of several pooled by `pool()` (`runs` > 1), where
    counts are totals over the runs and latencies are pooled before taking percentiles."""

    mode: str
    label: str
    profile: str = "2026"
    runs: int = 1
    chats_sent: int = 0
    chats_ok: int = 0
    chats_failed: int = 0
    chats_unfinished: int = 0
    sim_requests: int = 0  # requests the fake Ollama served (chats, heal preloads)
    loads: int = 0
    loads_full: int = 0
    heal_reloads: int = 0
    heal_reloads_full: int = 0
    tokens: int = 0
    tokens_full: int = 0
    eval_tokens: int = 0  # what the answers say they generated
    eval_s: float = 0.0  # and in how long (simulated decode time)
    chat_latencies_s: list[float] = field(default_factory=list)
    images_sent: int = 0
    images_done: int = 0
    images_lowvram: int = 0
    # The low-VRAM jobs by what held the room when the job loaded (`lowvram_cause`).
    images_lowvram_idle_llm: int = 0
    images_lowvram_busy_llm: int = 0
    images_lowvram_other: int = 0
    lowvram_traces: list[dict[str, Any]] = field(default_factory=list)
    image_latencies_s: list[float] = field(default_factory=list)
    comfy_frees: int = 0  # /free requests ComfyUI received
    comfy_freed_gib: float = 0.0
    spilled_s: float = 0.0  # simulated seconds with a spilled model loaded, in the window
    restarts: int = 0
    heals_ok: int = 0
    heals_failed: int = 0
    ollama_unloads: int = 0
    safety_skips: int = 0
    gate_waits: int = 0
    image_gate_waits: int = 0  # of gate_waits, those of the image gate
    gate_forwarded_anyway: int = 0
    seed_rate_limited: int = 0
    errors: list[str] = field(default_factory=list)
    estimates: list[EstimateCheck] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def client_loads(self) -> int:
        return self.loads - self.heal_reloads

    @property
    def client_loads_full(self) -> int:
        return self.loads_full - self.heal_reloads_full

    @staticmethod
    def share(part: int, whole: int) -> float | None:
        return 100.0 * part / whole if whole else None

    @property
    def loads_full_pct(self) -> float | None:
        return self.share(self.loads_full, self.loads)

    @property
    def client_loads_full_pct(self) -> float | None:
        return self.share(self.client_loads_full, self.client_loads)

    @property
    def tokens_full_pct(self) -> float | None:
        return self.share(self.tokens_full, self.tokens)

    @property
    def tok_per_s(self) -> float | None:
        return self.eval_tokens / self.eval_s if self.eval_s > 0 else None

    @property
    def chat_p50_s(self) -> float | None:
        return median(self.chat_latencies_s)

    @property
    def chat_p95_s(self) -> float | None:
        return percentile(self.chat_latencies_s, 95)

    @property
    def image_p50_s(self) -> float | None:
        return median(self.image_latencies_s)

    @property
    def image_p95_s(self) -> float | None:
        return percentile(self.image_latencies_s, 95)

    def per_run(self, value: float) -> float:
        return value / self.runs

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in _DERIVED:
            data[name] = getattr(self, name)
        return data


_DERIVED = (
    "client_loads",
    "client_loads_full",
    "loads_full_pct",
    "client_loads_full_pct",
    "tokens_full_pct",
    "tok_per_s",
    "chat_p50_s",
    "chat_p95_s",
    "image_p50_s",
    "image_p95_s",
)


def pool(results: list[ModeResult]) -> ModeResult:
    """Several runs of one mode as one: counts and times added, lists joined."""
    if not results or len({r.mode for r in results}) != 1:
        raise ValueError("pool() takes one or more results of the same mode")
    out = ModeResult(results[0].mode, results[0].label, results[0].profile, runs=0)
    for r in results:
        for f in fields(ModeResult):
            if f.name in ("mode", "label", "profile"):
                continue
            mine, theirs = getattr(out, f.name), getattr(r, f.name)
            if f.name == "errors":
                setattr(out, f.name, sorted(set(mine) | set(theirs)))
            else:
                setattr(out, f.name, mine + theirs)
    return out


def run_mode(
    mode: str,
    events: list[Event],
    duration_s: float,
    time_scale: float,
    *,
    drain_s: float = 240.0,
    log_path: Path | None = None,
    profile: str = "2026",
) -> ModeResult:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    result = ModeResult(mode, MODES[mode], profile)
    answer_without_nagle()
    isolated = mode == "isolated"
    common: dict[str, Any] = {
        "gpu_total_gib": GPU_TOTAL_GIB,
        "time_scale": time_scale,
        "catalog": catalog(),
        "profile": profile,
    }
    with (
        SimHost(**common, start_comfyui=not isolated) as host,
        # The bound: ComfyUI on a GPU of its own (otherwise a second, idle host).
        SimHost(**common, start_ollama=False, start_comfyui=isolated) as comfy_host,
        # The image gate reads the checkpoints' sizes from ComfyUI's models folder.
        models_folder() as models,
    ):
        seed: SeedDesign | None = None
        sup: Supervisor | None = None
        client_url = host.ollama_url
        comfyui_url = comfy_host.comfyui_url if isolated else host.comfyui_url
        image_url = comfyui_url
        if mode == "seed":
            seed = SeedDesign(host.ollama_url, comfyui_url, time_scale=time_scale).start()
        elif mode == "supervisor" or mode in _GATED:
            settings = scaled_settings(time_scale)
            if mode == "gate-ollama":
                settings["VRAM_PRIORITY"] = "ollama"
            if mode == "gate-image":
                settings["VRAM_COMFYUI_MODELS"] = models
            sup = start_supervisor(
                ollama_url=host.ollama_url,
                comfyui_url=comfyui_url,
                settings=settings,
                gate=mode in _GATED,
                image_gate=mode == "gate-image",
                time_scale=time_scale,
            )
            if mode in _GATED:
                client_url = sup.gate_url
            if mode == "gate-image":
                image_url = sup.image_gate_url
        window: dict[str, Any] = {}

        def end_of_schedule() -> None:
            window.update(sim_stats(host.ollama_url, comfyui_url)[0]["totals"])

        driver = Driver(
            client_url,
            image_url,
            time_scale,
            drain_s=drain_s,
            on_end_of_schedule=end_of_schedule,
        )
        try:
            side = driver.run(events, duration_s)
            ollama, comfy = sim_stats(host.ollama_url, comfyui_url)
            metrics = sup.metrics() if sup is not None else {}
        finally:
            driver.close()
            if seed is not None:
                seed.stop()
            if sup is not None:
                sup.stop()
        _fill_clients(result, events, side)
        _fill_sim(result, ollama, comfy, window)
        if seed is not None:
            result.seed_rate_limited = seed.stats.rate_limited
        if sup is not None:
            _fill_supervisor(result, sup, metrics)
            result.estimates = _first_estimates(sup.messages(), ollama)
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_text("\n".join(sup.messages()) + "\n")
    return result


def _first_estimates(messages: list[str], ollama: dict[str, Any]) -> list[EstimateCheck]:
    """The gate's estimate for each model's first gated load, with the simulator's size
    of that model's first load."""
    checks: list[EstimateCheck] = []
    for message in messages:
        match = _GATE_NEED.match(message)
        if match is None or any(c.model == match.group(1) for c in checks):
            continue
        real = ollama["models"].get(match.group(1), {}).get("first_size_bytes")
        if real:
            checks.append(EstimateCheck(match.group(1), int(float(match.group(2)) * GIB), real))
    return checks


def _fill_clients(result: ModeResult, events: list[Event], side: ClientSide) -> None:
    chats = [r for r in side.chats if r.ok]
    result.chats_sent = sum(1 for e in events if isinstance(e, ChatEvent))
    result.chats_ok = len(chats)
    result.chats_failed = len(side.chats) - len(chats)
    result.chats_unfinished = side.unfinished_chats
    result.errors = sorted({r.error for r in side.chats if not r.ok})[:5]
    result.eval_s = sum(r.eval_s for r in chats)
    result.eval_tokens = sum(r.eval_count for r in chats)
    result.chat_latencies_s = [round(r.latency_s, 3) for r in chats]
    result.images_sent = sum(1 for e in events if isinstance(e, ImageEvent))
    result.wall_s = side.wall_s


def _fill_sim(
    result: ModeResult, ollama: dict[str, Any], comfy: dict[str, Any], window: dict[str, Any]
) -> None:
    totals = ollama["totals"]
    result.sim_requests = int(totals["requests"])
    result.loads = int(totals["loads"])
    result.loads_full = int(totals["loads_full_gpu"])
    result.tokens = int(totals["tokens"])
    result.tokens_full = int(totals["tokens_full_gpu"])
    result.spilled_s = float(window.get("spilled_s", totals["spilled_s"]))
    result.images_done = int(comfy["jobs_done"])
    result.images_lowvram = int(comfy["jobs_lowvram"])
    result.lowvram_traces = list(comfy.get("lowvram_jobs", []))
    for trace in result.lowvram_traces:
        cause = lowvram_cause(trace)
        result.images_lowvram_idle_llm += cause == "idle LLM"
        result.images_lowvram_busy_llm += cause == "busy LLM"
        result.images_lowvram_other += cause == "other"
    result.image_latencies_s = [float(x) for x in comfy["latencies_s"]]
    result.comfy_frees = int(comfy["frees_requested"])
    result.comfy_freed_gib = round(int(comfy["freed_bytes"]) / GIB, 1)


def lowvram_cause(trace: dict[str, Any]) -> str:
    """Why a job loaded its weights only in part, from the simulator's trace at its load:
    "idle LLM" when the idle LLM models on the GPU then held at least the part that did not
    fit (unloading them would have let it load fully: the image gate's case), "busy LLM"
    when that took models serving a request too (the gate must not unload them), "other"
    otherwise (ComfyUI's own memory, the reserve, a checkpoint larger than the card)."""
    short = int(trace["short_bytes"])
    idle = sum(int(m["vram_bytes"]) for m in trace["llm"] if not m["busy"])
    busy = sum(int(m["vram_bytes"]) for m in trace["llm"] if m["busy"])
    if idle >= short:
        return "idle LLM"
    if busy > 0 and idle + busy >= short:
        return "busy LLM"
    return "other"


def _fill_supervisor(result: ModeResult, sup: Supervisor, metrics: dict[str, float]) -> None:
    for message in sup.messages():
        healed = _HEALED.match(message)
        if healed:
            result.heal_reloads += 1
            result.heal_reloads_full += int(healed.group(2) == "100")
        elif _HEAL_NO_HELP.match(message):
            result.heal_reloads += 1
    result.restarts = sup.count("Restarted ComfyUI container")
    result.safety_skips = sup.count("(safety limit)")
    result.gate_waits = sup.count("Gate: making room for")
    result.image_gate_waits = sup.count("Gate: making room for a ComfyUI job")
    result.gate_forwarded_anyway = sup.count("without enough free VRAM after")

    def total(prefix: str, **labels: str) -> int:
        return int(
            sum(
                v
                for k, v in metrics.items()
                if k.split("{")[0] == prefix and all(f"{a}={b}" in k for a, b in labels.items())
            )
        )

    result.heals_ok = total("vram_supervisor_heals_total", result="ok")
    result.heals_failed = total("vram_supervisor_heals_total", result="failed")
    result.ollama_unloads = total("vram_supervisor_ollama_unloads_total")
    result.restarts = max(result.restarts, total("vram_supervisor_restarts_total"))
