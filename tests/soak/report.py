"""The soak's figures, its targets, and the report (Markdown and an SVG chart, no plotting
library: the same hand-written SVG as the benchmark's chart)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from tests.soak.faults import (
    DOCKER_DOWN_KINDS,
    FOUND_LIMIT_S,
    KINDS,
    MOMENTARY_DOWN_KINDS,
    OLLAMA_DOWN_KINDS,
    Fault,
)
from tests.soak.host import Placement
from tests.soak.run import (
    CLIENT_TIMEOUT_S,
    GRACE_REAL_S,
    RSS_GROWTH_LIMIT,
    SAFETY_CAP_PER_MIN,
    SPILL_LIMIT_S,
    Chat,
    Sample,
    SoakRun,
    docker_socket_fds,
)

MIB = 1024 * 1024
COMFY_CTX = "comfyui:context"  # the fake ComfyUI's CUDA context on the simulated GPU
DOCKER_POOL_BOUND = 2 * 25 + 1  # docker.constants.DEFAULT_NUM_POOLS per client, the events


@dataclass
class Target:
    name: str
    value: str
    target: str
    met: bool


@dataclass
class Figures:
    targets: list[Target] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    resources: list[tuple[str, Sample, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # distinct ERROR/exception messages

    @property
    def failures(self) -> list[Target]:
        return [t for t in self.targets if not t.met]


def _windows(run: SoakRun, faults: Sequence[Fault], grace_s: float) -> list[tuple[float, float]]:
    return [
        (f.real_start, (f.real_end or f.real_start) + grace_s)
        for f in faults
        if f.real_start is not None
    ]


def _overlaps(a: float, b: float, windows: Sequence[tuple[float, float]]) -> bool:
    return any(a <= hi and lo <= b for lo, hi in windows)


def _max_per_window(times: Sequence[float], width: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# Why a load spilled to the CPU.
DURING_FAULT = "during a fault"
COMFY_BUSY = "ComfyUI busy"
MISSED_FREE = "missed free"
NOT_COMFY = "room not ComfyUI's"
SPILL_CAUSES = (DURING_FAULT, COMFY_BUSY, MISSED_FREE, NOT_COMFY)
# Simulated seconds before a placement in which a fault or a busy ComfyUI in the
# supervisor's log count for it: the gate's wait (VRAM_GATE_WAIT, 30 s) and Ollama's own
# evictions before it places the model (up to 5 s each).
SPILL_LEAD_S = 60.0
# Simulated seconds before a placement in which the supervisor's last decision about that
# load is looked for: the gate's wait for a busy ComfyUI (VRAM_GATE_WAIT) and Ollama's
# queue after the forward can take it past SPILL_LEAD_S (82 s in a 24-hour run).
DECISION_LOOKBACK_S = 180.0
# The supervisor's lines that say ComfyUI had work (under VRAM_PRIORITY=balanced a job is
# never interrupted, and a free waits for it).
BUSY_LINES = (
    "still has work at the deadline",
    "Gate: waiting for ComfyUI",
    "free takes effect when it ends",  # "ComfyUI <name> is running a prompt: the ..."
)
# What an idle ComfyUI must hold beyond its CUDA context for a free to be worth it (the
# supervisor's MIN_RECLAIMABLE_BYTES).
COMFY_RECLAIMABLE_BYTES = 256 * MIB


def decision_time(
    model: str, log: Sequence[tuple[float, str]], at: float, lead: float
) -> float | None:
    """When the supervisor last decided about a load of `model` before `at` (within `lead`):
    the gate judged its room or made room for it, or a heal freed ComfyUI for it or
    reloaded it. None: no such line."""
    marks = (
        f"Gate: {model} needs",
        f"Gate: making room for {model}",
        f"(heal {model})",
        f"Heal of Ollama model {model}",
    )
    found = None
    for t, message in log:
        if at - lead <= t <= at and any(m in message for m in marks):
            found = t
    return found


def classify_spill(
    p: Placement,
    fault_windows: Sequence[tuple[float, float]],
    busy_times: Sequence[float],
    lead: float,
    image_times: Sequence[float] = (),
    decided_at: float | None = None,
) -> str:
    """Why the load placed at `p` spilled (monotonic times; `lead` in real seconds):
    - DURING_FAULT: a fault was on within `lead` before it (with its grace);
    - COMFY_BUSY: ComfyUI had a job running or queued when Ollama placed the model, or
      the supervisor logged a busy ComfyUI within `lead` before it or since its last
      decision about this load (under VRAM_PRIORITY=balanced a job is never
      interrupted: the gate forwards after its wait), or an image job was handed to
      ComfyUI after the supervisor's decision about this load (`decided_at`: the gate's
      judgement of the room, a heal's free) and before the placement: it took the room
      back (the soak sends image jobs straight to ComfyUI, past any gate);
    - MISSED_FREE: ComfyUI was idle and held, beyond its CUDA context, enough that freeing
      it would have let the model fit: a free the supervisor should have sent;
    - NOT_COMFY: the room was held by others (Ollama's own unloaded memory still coming
      back, another process); freeing ComfyUI would not have been enough."""
    if _overlaps(p.t - lead, p.t, fault_windows):
        return DURING_FAULT
    since = p.t - lead if decided_at is None else min(p.t - lead, decided_at)
    if p.comfy_jobs > 0 or any(since <= t <= p.t for t in busy_times):
        return COMFY_BUSY
    if decided_at is not None and any(decided_at <= t <= p.t for t in image_times):
        return COMFY_BUSY
    comfy = sum(
        n for owner, n in p.holders.items() if owner.startswith("comfyui:") and owner != COMFY_CTX
    )
    if comfy >= COMFY_RECLAIMABLE_BYTES and p.granted + comfy >= p.need:
        return MISSED_FREE
    return NOT_COMFY


def describe_spill(p: Placement, sim_s: float) -> str:
    holders = ", ".join(f"{o} {n / 2**30:.2f} GiB" for o, n in sorted(p.holders.items()))
    return (
        f"{p.model} at {sim_s:.0f} s: {p.need / 2**30:.2f} GiB needed, "
        f"{p.granted / 2**30:.2f} GiB on the GPU; held: {holders or 'nothing'}"
    )


def spill_windows(
    samples: Sequence[Sample],
    fault_windows: Sequence[tuple[float, float]],
    busy_times: Sequence[float],
) -> dict[str, int]:
    """Without placements (the Docker-backed form: the fakes run in containers), partial
    loads counted per sample window: a window near a fault counts as DURING_FAULT, one with
    ComfyUI busy (or given a job) around it as COMFY_BUSY, the rest as MISSED_FREE."""
    counts = dict.fromkeys(SPILL_CAUSES, 0)
    for prev, cur in itertools.pairwise(samples):
        partial = (cur.loads - prev.loads) - (cur.loads_full - prev.loads_full)
        if partial <= 0:
            continue
        span = cur.t - prev.t
        if _overlaps(prev.t - span, cur.t, fault_windows):
            counts[DURING_FAULT] += partial
        elif any(prev.t - span <= t <= cur.t + span for t in busy_times):
            counts[COMFY_BUSY] += partial
        else:
            counts[MISSED_FREE] += partial
    return counts


def stuck_spills(
    samples: Sequence[Sample], fault_windows: Sequence[tuple[float, float]]
) -> list[str]:
    """Each spell of a model spilled for longer than SPILL_LIMIT_S of simulated time with
    nothing broken, once ("<model> at <simulated s>", where it passed the limit)."""
    stuck: list[str] = []
    clean_spill: dict[str, float] = {}
    counted: set[str] = set()  # models whose current spell is already listed
    for prev, cur in itertools.pairwise(samples):
        for name in set(prev.spilled) & set(cur.spilled):
            if not _overlaps(prev.t, cur.t, fault_windows):
                clean_spill[name] = clean_spill.get(name, 0.0) + (cur.sim_s - prev.sim_s)
                if clean_spill[name] > SPILL_LIMIT_S and name not in counted:
                    counted.add(name)
                    stuck.append(f"{name} at {cur.sim_s:.0f} s")
        for name in list(clean_spill):
            if name not in cur.spilled:
                del clean_spill[name]
                counted.discard(name)
    return stuck


def _target_or_fact(fig: Figures, run: SoakRun, target: Target) -> None:
    """Spills and heals are targets of the fixed-URL form; the Docker-backed form's faults
    (containers coming and going, recreated with nothing loaded) are about discovery, and
    there they are reported as figures."""
    if run.docker:
        fig.facts.append((f"{target.name} (a target of the fixed-URL form)", target.value))
    else:
        fig.targets.append(target)


def _daemon_restarts(fig: Figures, run: SoakRun, restarts: Sequence[Fault]) -> None:
    """Each restart must be come through: the supervisor showed Docker unreachable, then
    Docker ok (its events stream reconnected) and both services running and reachable
    again within FOUND_LIMIT_S of the engine answering, with /healthz 200 all along."""
    if run.daemon_restart_note:
        fig.facts.append(("daemon restart", run.daemon_restart_note))
        return

    def came_through(f: Fault) -> bool:
        p = f.params
        found = p.get("found_s")
        return (
            "error" not in p
            and found is not None
            and float(found) <= FOUND_LIMIT_S
            and not p.get("healthz_failed")
        )

    bad = [f for f in restarts if not came_through(f)]
    fig.targets.append(
        Target(
            "daemon restarts the supervisor came through (noticed Docker gone, /healthz 200 "
            "throughout, events reconnected, both services found running and reachable)",
            f"{len(restarts) - len(bad)} of {len(restarts)}",
            f"all, each found within {FOUND_LIMIT_S:g} s of the engine answering",
            not bad,
        )
    )
    fig.errors += [f"{f.describe()}"[:200] for f in bad[:3]]

    def seconds(key: str) -> str:
        values = [f.params.get(key) for f in restarts]
        return ", ".join("-" if v is None else f"{float(v):.1f}" for v in values) or "-"

    fig.facts.append(
        (
            "after each daemon restart, seconds from the engine answering until the "
            "supervisor's /status showed Docker ok / both services found again",
            f"{seconds('docker_ok_s')} / {seconds('found_s')} (the engine was down "
            f"{seconds('down_s')} s)",
        )
    )
    windows = _windows(run, restarts, GRACE_REAL_S)
    during = [c for c in run.chats if _overlaps(c.start, c.end, windows)]
    fig.facts.append(
        (
            "chats through the gate that overlapped a daemon restart: answered 200 / failed / lost",
            f"{sum(1 for c in during if c.outcome == 'ok')} / "
            f"{sum(1 for c in during if c.outcome not in ('ok', 'lost'))} / "
            f"{sum(1 for c in during if c.outcome == 'lost')}",
        )
    )


def _waited(run: SoakRun, waited: list[Chat]) -> str:
    """How many, and the simulated span of their starts."""
    if not waited:
        return "0"
    first = min(c.start for c in waited)
    last = max(c.start for c in waited)
    return f"{len(waited)} (sent between {_hms(run.sim(first))} and {_hms(run.sim(last))})"


def evaluate(run: SoakRun) -> Figures:
    fig = Figures()
    scale = run.time_scale
    all_faults = [f for f in run.faults if f.real_start is not None]
    down_kinds = (*OLLAMA_DOWN_KINDS, *DOCKER_DOWN_KINDS)
    ollama_down = _windows(
        run,
        [
            f
            for f in all_faults
            if f.kind in down_kinds and (f.target == "ollama" or f.kind == "daemon_restart")
        ],
        GRACE_REAL_S,
    )
    # A fault with a length, or one that took a service down while it was done (the
    # Docker-backed form's recreate and crash: the schedule waits until it is back).
    any_fault = _windows(
        run,
        [f for f in all_faults if f.duration_s > 0 or f.kind in MOMENTARY_DOWN_KINDS],
        GRACE_REAL_S,
    )

    # Supervisor process and log.
    log = [entry for _, entry in run.log]
    exceptions = [
        e
        for e in log
        if e.get("exception")
        or e.get("level") == "CRITICAL"
        or "Traceback" in str(e.get("message", ""))
    ]
    errors = [e for e in log if e.get("level") in ("ERROR", "CRITICAL")]
    fig.errors = sorted({str(e.get("message", ""))[:200] for e in exceptions + errors})[:10]
    fig.targets.append(
        Target(
            "supervisor crashes or restarts",
            str(len(run.supervisor_exits)),
            "0",
            not run.supervisor_exits,
        )
    )
    fig.targets.append(
        Target("unhandled exceptions in the log", str(len(exceptions)), "0", not exceptions)
    )

    # Action storms, counted where the requests arrive.
    width = 60 * scale
    for service, kinds, what in (
        ("comfyui", ("free",), "ComfyUI /free calls"),
        ("ollama", ("unload",), "Ollama unloads"),
    ):
        times = [t for t, k in run.mutations.get(service, []) if k in kinds]
        worst = _max_per_window(times, width)
        fig.targets.append(
            Target(
                f"most {what} in any simulated minute ({len(times)} in all)",
                str(worst),
                f"<= {SAFETY_CAP_PER_MIN} (safety cap)",
                worst <= SAFETY_CAP_PER_MIN,
            )
        )
    preloads = [t for t, k in run.mutations.get("ollama", []) if k == "preload"]
    fig.facts.append(
        (
            "Ollama preloads (heal reloads) received, most in a simulated minute",
            f"{len(preloads)}, {_max_per_window(preloads, width)}",
        )
    )
    restarts = sum(1 for e in log if "Restarted ComfyUI" in str(e.get("message", "")))
    fig.targets.append(
        Target(
            "ComfyUI restarts by the supervisor, during a running prompt or not"
            if run.docker
            else "ComfyUI restarts during a running prompt (fixed URLs: no container to restart)",
            str(restarts),
            "0",
            restarts == 0,
        )
    )
    if run.docker:
        unlabelled = run.unlabelled_actions
        fig.targets.append(
            Target(
                "actions on unlabelled containers (their proxy, their own counters, the log)",
                str(len(unlabelled)),
                "0",
                not unlabelled,
            )
        )
        fig.errors += unlabelled[:5]
        fig.facts.append(("Docker events of the bursts' containers", str(run.docker_events)))
        fig.facts.append(
            (
                "requests that reached an unlabelled container by its old URL (chats and "
                "reads, of anyone)",
                str(run.unlabelled_requests),
            )
        )
        _daemon_restarts(fig, run, [f for f in all_faults if f.kind == "daemon_restart"])
    else:
        fig.facts.append(
            ("actions on unlabelled containers", "n/a in the fixed-URL form (no Docker)")
        )

    # The gate.
    lost = [c for c in run.chats if c.outcome == "lost"]
    # A failed answer that Ollama itself gave (the proxy tags every answer it relays or
    # fabricates) is Ollama's; one without the tag is the gate's own.
    waited = [c for c in run.chats if c.outcome == "waited-for-ollama"]
    failed = [c for c in run.chats if c.outcome not in ("ok", "lost", "waited-for-ollama")]
    failed_up = [
        c for c in failed if not c.from_upstream and not _overlaps(c.start, c.end, ollama_down)
    ]
    by_gate_down = [
        c for c in failed if not c.from_upstream and _overlaps(c.start, c.end, ollama_down)
    ]
    by_ollama = [c for c in failed if c.from_upstream]
    by_ollama_up = [c for c in by_ollama if not _overlaps(c.start, c.end, ollama_down)]
    fig.targets.append(
        Target(
            f"chats through the gate lost (no answer at all), of {len(run.chats)}",
            str(len(lost)),
            "0",
            not lost,
        )
    )
    fig.targets.append(
        Target(
            "chats the gate itself answered 5xx (or garbage) while Ollama was up",
            str(len(failed_up)),
            "0",
            not failed_up,
        )
    )
    fig.facts.append(
        (
            "failed chats while Ollama was down, hung or broken: the gate's own 502s / "
            "Ollama's answers passed on",
            f"{len(by_gate_down)} / {len(by_ollama) - len(by_ollama_up)}",
        )
    )
    fig.facts.append(
        ("failed answers Ollama itself gave while no fault was on it", str(len(by_ollama_up)))
    )
    fig.facts.append(
        (
            f"chats Ollama had not begun to answer when their client gave up "
            f"({CLIENT_TIMEOUT_S:g} s; the gate had passed them on: Ollama's queue, e.g. "
            "behind a model at CPU speed)",
            _waited(run, waited),
        )
    )
    for c in (lost + failed_up + by_ollama_up)[:5]:
        fig.errors.append(f"chat at {run.sim(c.start):.0f} s: {c.outcome} {c.status} {c.detail}")

    # Frees that were needed and never sent. In the fixed-URL form every load's placement
    # is recorded with who held the GPU then (host.Placement), and each spilled load is
    # judged by that; the Docker-backed form judges by sample windows (spill_windows).
    busy_times = [
        t for t, e in run.log if any(line in str(e.get("message", "")) for line in BUSY_LINES)
    ]
    samples = run.samples
    if run.placements:
        # The loop's "not freeing ...: ComfyUI has work (1 running, ...)" as well.
        busy_times += [t for t, e in run.log if " has work (" in str(e.get("message", ""))]
        spills = [p for p in run.placements if p.spilled]
        lead = SPILL_LEAD_S * scale
        messages = [(t, str(e.get("message", ""))) for t, e in run.log]
        causes = [
            classify_spill(
                p,
                any_fault,
                busy_times,
                lead,
                run.image_times,
                decision_time(p.model, messages, p.t, DECISION_LOOKBACK_S * scale),
            )
            for p in spills
        ]
        counts = {c: causes.count(c) for c in SPILL_CAUSES}
        for p, cause in zip(spills, causes, strict=True):
            if cause == MISSED_FREE and len(fig.errors) < 10:
                fig.errors.append(f"missed free: {describe_spill(p, run.sim(p.t))}")
        fig.facts.append(
            (
                "Ollama loads placed fully on the GPU; spilled during faults / while ComfyUI "
                "had or had just been given a job / with the room held by other than an idle "
                "ComfyUI (Ollama's own memory coming back, another process)",
                f"{len(run.placements) - len(spills)}/{len(run.placements)}; "
                f"{counts[DURING_FAULT]} / {counts[COMFY_BUSY]} / {counts[NOT_COMFY]}",
            )
        )
    else:
        counts = spill_windows(samples, any_fault, busy_times + list(run.image_times))
        total_loads = samples[-1].loads if samples else 0
        total_full = samples[-1].loads_full if samples else 0
        fig.facts.append(
            (
                "Ollama loads fully on GPU; spilled during faults / while ComfyUI ran a job",
                f"{total_full}/{total_loads}; {counts[DURING_FAULT]} / {counts[COMFY_BUSY]}",
            )
        )
    _target_or_fact(
        fig,
        run,
        Target(
            "frees needed and never sent (loads spilled with nothing broken, ComfyUI idle "
            "and holding the room)",
            str(counts[MISSED_FREE]),
            "0",
            counts[MISSED_FREE] == 0,
        ),
    )

    # Heals that never converged: a model spilled for longer than SPILL_LIMIT_S of
    # simulated time with nothing broken.
    stuck = stuck_spills(samples, any_fault)
    _target_or_fact(
        fig,
        run,
        Target(
            f"heals that never converged (spilled > {SPILL_LIMIT_S:.0f} s with nothing broken)",
            str(len(stuck)) + (f": {', '.join(stuck[:3])}" if stuck else ""),
            "0",
            not stuck,
        ),
    )
    heals = {
        r: int(
            sum(
                v
                for k, v in run.metrics.items()
                if k.startswith("vram_supervisor_heals_total") and f"result={r}" in k
            )
        )
        for r in ("ok", "failed")
    }
    fig.facts.append(
        ("heals ok / failed (the supervisor's /metrics)", f"{heals['ok']} / {heals['failed']}")
    )

    # Resources, at the quiet checkpoints.
    during = [s for s in samples if s.sim_s <= run.hours * 3600]
    by_name = {name: (sample, inflight) for name, sample, inflight in run.checkpoints}
    empty = Sample(0, 0, 0, 0, 0, False, 0, 0, [], 0, 0)
    start, _, end = (by_name.get(n, (empty, 0))[0] for n in ("start", "middle", "end"))
    fig.resources = [(n, *by_name[n]) for n in ("start", "middle", "end") if n in by_name]
    complete = len(fig.resources) == 3
    growth = end.rss - start.rss
    fig.targets.append(
        Target(
            "RSS growth, start to end",
            f"{growth / MIB:+.1f} MiB",
            "< 5 MB",
            complete and growth < RSS_GROWTH_LIMIT,
        )
    )
    fig.targets.append(
        Target(
            "threads, start to end",
            f"{start.threads} -> {end.threads}",
            "no growth",
            complete and end.threads <= start.threads,
        )
    )
    if not run.docker:
        fig.targets.append(
            Target(
                "open file descriptors, start to end",
                f"{start.fds} -> {end.fds}",
                "no growth",
                complete and end.fds <= start.fds,
            )
        )
    else:
        # The Docker SDK keeps one idle connection per API path it asked lately (a pool
        # per URL, at most DEFAULT_NUM_POOLS = 25 per client, the oldest closed): counted
        # apart, against that bound; every other descriptor must not grow.
        others_start = start.fds - docker_socket_fds(start)
        others_end = end.fds - docker_socket_fds(end)
        fig.targets.append(
            Target(
                "open file descriptors but the Docker socket's, start to end",
                f"{others_start} -> {others_end}",
                "no growth",
                complete and others_end <= others_start,
            )
        )
        most = max((docker_socket_fds(s) for _, s, _ in fig.resources), default=0)
        fig.targets.append(
            Target(
                "connections to the Docker socket, start / middle / end",
                " / ".join(str(docker_socket_fds(s)) for _, s, _ in fig.resources),
                f"<= {DOCKER_POOL_BOUND} (the SDK's pools: 25 per client, 2 clients)",
                complete and most <= DOCKER_POOL_BOUND,
            )
        )
    unhealthy = [s for s in during if not s.healthy and not _overlaps(s.t - 1, s.t, any_fault)]
    fig.facts.append(
        (
            "samples where /healthz was not 200 with nothing broken (of all samples)",
            f"{len(unhealthy)} (of {len(during)})",
        )
    )
    ok = sum(1 for c in run.chats if c.outcome == "ok")
    fig.facts.append(("chats sent / answered 200", f"{len(run.chats)} / {ok}"))
    fig.facts.append(
        (
            "image jobs sent / refused (ComfyUI down) / done",
            f"{run.images_sent} / {run.images_refused} / {run.comfy_stats.get('jobs_done', '?')} "
            "(done: by the last ComfyUI process)",
        )
    )
    safety = sum(1 for e in log if "(safety limit)" in str(e.get("message", "")))
    fig.facts.append(("actions the supervisor's safety limit refused", str(safety)))
    fig.facts.append(
        (
            "supervisor log lines (WARNING / ERROR)",
            f"{len(log)} ({sum(1 for e in log if e.get('level') == 'WARNING')} / {len(errors)})",
        )
    )
    return fig


# --------------------------------------------------------------------------- text


def _hms(sim_s: float) -> str:
    s = int(sim_s)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def markdown(run: SoakRun, fig: Figures, *, header: str = "") -> str:
    wall = run.ended - run.started
    lines = [header] if header else []
    lines += [
        f"{run.hours:g} simulated hours in {wall / 60:.1f} min of wall time (time scale "
        f"{run.time_scale:g}), seed {run.seed}, the benchmark's mixed workload at {run.rate:g} "
        f"times its rate, {len(run.faults)} faults (mean gap {run.fault_gap_s:g} simulated s). "
        + (
            "Docker-backed: labelled sim containers on a real engine, discovered by the "
            "supervisor. "
            if run.docker
            else "Fixed URLs (no Docker). "
        )
        + "Supervisor settings: "
        + ", ".join(f"{k}={v}" for k, v in sorted(run.settings.items()))
        + ", the gate on, the safety limit scaled to 6 actions per simulated minute.",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {t.name} | {t.value} | {t.target} | {'yes' if t.met else '**NO**'} |"
        for t in fig.targets
    ]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in fig.facts]
    lines += [
        "",
        "| supervisor process, at a quiet moment | RSS | threads | open fds | chats in flight |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} (simulated {_hms(s.sim_s)}) | {s.rss / MIB:.1f} MiB | {s.threads} "
        f"| {s.fds} | {inflight} |"
        for name, s, inflight in fig.resources
    ]
    lines += [
        "",
        "Open descriptors by kind at the checkpoints: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(s.fd_kinds.items()))
            for name, s, _ in fig.resources
        )
        + ".",
    ]
    if fig.errors:
        lines += ["", "Errors seen:", ""] + [f"- `{e}`" for e in fig.errors]
    if run.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in run.notes[:10]]
    lines += ["", "Faults injected (simulated time from the start):", ""]
    lines += ["| at | fault | lasted (s) |", "| --- | --- | --- |"]
    lines += [f"| {_hms(f.at_s)} | {f.describe()} | {f.duration_s:.0f} |" for f in run.faults]
    counts = {k: sum(1 for f in run.faults if f.kind == k) for k in (run.kinds or KINDS)}
    lines += ["", "By kind: " + ", ".join(f"{k} {n}" for k, n in counts.items()) + "."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- SVG


def svg_chart(run: SoakRun, title: str) -> str:
    """Four panels over simulated hours (RSS, threads, open fds, chats), faults shaded."""
    samples = [s for s in run.samples if s.rss]
    width, panel_h, left, top = 900, 120, 70, 40
    panels = [
        ("RSS (MiB)", [s.rss / MIB for s in samples], "#1f77b4"),
        ("threads", [float(s.threads) for s in samples], "#2ca02c"),
        ("open fds", [float(s.fds) for s in samples], "#9467bd"),
        ("chats failed (cumulative)", [float(s.chats_failed) for s in samples], "#d62728"),
    ]
    height = top + len(panels) * (panel_h + 30) + 40
    span = max(run.hours * 3600, 1.0)
    plot_w = width - left - 20

    def x(sim_s: float) -> float:
        return left + plot_w * min(max(sim_s / span, 0.0), 1.0)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{escape(title)}</text>',
    ]
    for i, (label, values, colour) in enumerate(panels):
        y0 = top + i * (panel_h + 30)
        out.append(f'<text x="{left}" y="{y0 - 4}">{escape(label)}</text>')
        out.append(
            f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" '
            'fill="none" stroke="#999"/>'
        )
        for f in run.faults:
            if f.duration_s > 0:
                w = max(x(f.end_s) - x(f.at_s), 1)
                out.append(
                    f'<rect x="{x(f.at_s):.1f}" y="{y0}" width="{w:.1f}" '
                    f'height="{panel_h}" fill="#f4a582" opacity="0.35"><title>'
                    f"{escape(f.describe())}</title></rect>"
                )
            else:
                out.append(
                    f'<line x1="{x(f.at_s):.1f}" x2="{x(f.at_s):.1f}" y1="{y0}" '
                    f'y2="{y0 + panel_h}" stroke="#b2182b" stroke-dasharray="3,2"/>'
                )
        if not values:
            continue
        lo, hi = min(values), max(values)
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.1
        lo, hi = lo - pad, hi + pad
        step = max(1, len(values) // 600)
        points = " ".join(
            f"{x(s.sim_s):.1f},{y0 + panel_h - panel_h * (v - lo) / (hi - lo):.1f}"
            for s, v in list(zip(samples, values, strict=True))[::step]
        )
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.2"/>'
        )
        for v in (lo + pad, hi - pad):
            yy = y0 + panel_h - panel_h * (v - lo) / (hi - lo)
            out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    base = top + len(panels) * (panel_h + 30) - 10
    hours = int(run.hours)
    tick = max(1, hours // 12)
    for h in range(0, hours + 1, tick):
        out.append(f'<text x="{x(h * 3600):.1f}" y="{base}" text-anchor="middle">{h} h</text>')
    out.append(
        f'<text x="{left}" y="{base + 20}">simulated hours; shaded: a fault, dashed: a clock '
        f"step (hover for which)</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
