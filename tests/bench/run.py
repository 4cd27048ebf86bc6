"""The benchmark command: `.venv/bin/python -m tests.bench.run` (from the repository root).

Runs one seeded mixed workload (chat requests over three Ollama models, ComfyUI image jobs)
on a simulated 24 GiB GPU in four modes, side by side: no supervisor, the starting design,
vram-supervisor with default settings (heal), and vram-supervisor with the gate; plus a
fifth for comparison, the gate with VRAM_PRIORITY=ollama, and the bound all are measured
against: each service on a GPU of its own. It does so under each generation of the
simulated services (`--profile 2025,2026`, the default; sim/profiles.py). Then the
micro-benchmarks (gate overhead, idle CPU and memory, Docker event reaction). Prints the
tables, writes docs/benchmarks.svg and the generated part of docs/benchmarks.md, and keeps
the raw results and the supervisors' logs under .cache/bench/.

`--workload llama-swap` runs the same events with the chats sent to a fake llama-swap
instead (tests/bench/llama_swap.py: modes none, supervisor, gate, isolated) and prints its
table; it never rewrites docs/.

Simulated time runs `--time-scale` times real time (0.05: 10 simulated minutes take 30 s);
the supervisor's time settings are scaled by the same factor (supervisor_proc.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from supervisor.sim import SimHost
from tests.bench.llama_swap import SWAP_MODES, pool_swap, run_swap_mode, swap_table
from tests.bench.micro import MicroResult, run_micro
from tests.bench.modes import MODES, ModeResult, run_mode
from tests.bench.report import (
    estimates_table,
    generations_table,
    micro_table,
    results_table,
    svg_chart,
    update_markdown,
)
from tests.bench.supervisor_proc import ROOT, TIME_SETTINGS_S, scaled_settings
from tests.bench.vllm_workload import VLLM_MODES, pool_vllm, run_vllm_mode, vllm_table
from tests.bench.workload import (
    CHAT_MEAN_GAP_S,
    GIB,
    GPU_TOTAL_GIB,
    IMAGE_MEAN_GAP_S,
    MODELS,
    STICKY,
    ChatEvent,
    Event,
    ImageEvent,
    make_workload,
)

DEFAULT_SEED = 1
DEFAULT_MINUTES = 10.0
DEFAULT_TIME_SCALE = 0.05
DEFAULT_REPEAT = 5
DEFAULT_PROFILES = ("2025", "2026")
COMMAND = ".venv/bin/python -m tests.bench.run"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU cores (`nproc`), {cpu}, Python {platform.python_version()}, "
        f"Linux {platform.release()}; load average at the start {load}"
    )


def revision() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "supervisor"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "an unknown revision"
    if not sha:
        return "an unknown revision"
    return f"commit {sha}" + (" with uncommitted changes in supervisor/" if dirty else "")


def describe_workload(events: Sequence[Event], minutes: float, seed: int) -> str:
    chats = Counter(e.model for e in events if isinstance(e, ChatEvent))
    images = Counter(e.checkpoint for e in events if isinstance(e, ImageEvent))
    sizes = ", ".join(f"{m.name} {m.runner_bytes(4096, 1) / GIB:.1f} GiB" for m in MODELS)
    sizes_2026 = ", ".join(
        f"{m.name} {m.runner_bytes(32768, 1) / GIB:.1f} GiB"
        f"{f' (trained context {m.context_length})' if m.context_length < 32768 else ''}"
        for m in MODELS
    )
    return (
        f"Seed {seed}, {minutes:g} simulated minutes, a {GPU_TOTAL_GIB:g} GiB simulated GPU. "
        f"{sum(chats.values())} chat requests (mean gap {CHAT_MEAN_GAP_S:g} s, same model as "
        f"the previous chat with probability {STICKY:g}; 64-320 tokens each): "
        + ", ".join(f"{n} x {m}" for m, n in sorted(chats.items()))
        + f". Loaded sizes at num_ctx 4096 (the 2025 default): {sizes}; at 32768 (the 2026 "
        f"default on a 24 GiB card, capped at the trained context): {sizes_2026}. "
        f"{sum(images.values())} image jobs (mean gap {IMAGE_MEAN_GAP_S:g} s, 20-30 steps): "
        + ", ".join(f"{n} x {c}" for c, n in sorted(images.items()))
        + ". Ollama keeps a model 5 simulated minutes after its last request (the default)."
    )


def scaling_note(time_scale: float) -> str:
    scaled = scaled_settings(time_scale)
    pairs = ", ".join(f"{k}={scaled[k]} ({v:g} s simulated)" for k, v in TIME_SETTINGS_S.items())
    return (
        f"Time scale {time_scale:g}: one simulated second lasts {time_scale:g} s. The fakes "
        f"scale every duration (loads, tokens, image steps, keep-alive) by it, and the "
        f"supervisor's time settings are scaled by the same factor: {pairs}. The starting "
        f"design polls every 5 simulated seconds with its 30 s limit in simulated time. Of "
        f"the supervisor's built-in constants, only the safety limit (6 actions per service "
        f"per minute) is scaled, to {math.ceil(6 / time_scale)} per real minute, i.e. 6 per "
        f"simulated minute (tests/bench/scaled_supervisor.py); unscaled, it would be "
        f"{1 / time_scale:g}x tighter than on a real host and decide the result. The others "
        f"stay real seconds (verification polls every 0.25 s after two quicker looks, a "
        f"re-check 0.5 s after a change, the gate's 0.5 s /api/ps cache and hold poll, its "
        f"0.25 s poll of a busy ComfyUI's queue), so "
        f"in simulated time the supervisor reacts {1 / time_scale:g}x slower than it would "
        f"on a real host: this handicaps it, never helps it."
    )


def generated_markdown(
    by_profile: dict[str, list[list[ModeResult]]],
    micro: MicroResult | None,
    *,
    events: Sequence[Event],
    minutes: float,
    seed: int,
    time_scale: float,
    runtime_s: float,
    argv: Sequence[str],
) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = COMMAND + ("" if not argv else " " + " ".join(argv))
    parts = [
        f"Generated by `{command}` on {when} at {revision()}; the command took {runtime_s:.0f} s.",
        "",
        f"Machine: {machine()}.",
        "",
        "### Workload",
        describe_workload(events, minutes, seed),
        "",
        scaling_note(time_scale),
    ]
    if by_profile:
        runs = len(next(iter(by_profile.values()))[0])
        parts += [
            "",
            "### The two generations side by side",
            "Ratios are to the bound of the same generation (each service on a GPU of its "
            "own, no supervisor): 1.00x is as fast as without sharing.",
            "",
            generations_table(by_profile),
            "",
            "The gate's estimate for the first load of each model in a run (the log line "
            '"Gate: ... needs about"), against what the simulated runner really took '
            "(RAM + VRAM, the first load's /api/ps `size`); positive: an overestimate.",
            "",
            estimates_table(by_profile),
        ]
        for profile, groups in by_profile.items():
            parts += [
                "",
                f"### Mixed workload, the modes side by side: {profile_title(profile)}",
                f"Each mode ran {runs} times on the same seed; in each round all modes ran at "
                "the same time, each on its own simulated host with its own supervisor "
                "process. Counts are totals over the runs, latencies are pooled before taking "
                'percentiles, and the rows marked "in each run" show how much a run can differ '
                "from the next (the supervisor reacts to timing, so it does not repeat "
                "exactly).",
                "",
                results_table(groups),
            ]
            if profile == "2026":
                parts += ["", "![Benchmark chart, 2026 pair](benchmarks.svg)"]
    if micro is not None:
        parts += ["", "### Micro-benchmarks", micro_table(micro)]
    return "\n".join(parts)


PROFILE_TITLES = {
    "2025": "2025 pair (Ollama 0.12)",
    "2026": "2026 pair (Ollama 0.33 with llama-server runners)",
}


def comfy_mode(profile: str) -> str:
    """Which ComfyUI the simulator plays under `profile`, read from its configuration (so
    the text stays true whatever the simulator's ComfyUI does with the profile)."""
    configs = {}
    for name in PROFILE_TITLES:
        host = SimHost(profile=name, start_ollama=False, start_comfyui=False)
        configs[name] = dataclasses.asdict(host.comfyui_config)
        host.stop()
    mine = configs[profile]
    differs = {k: v for k, v in mine.items() if any(c.get(k) != v for c in configs.values())}
    if not differs:
        return "ComfyUI: the same fake in both profiles (0.3.64 behaviour, no Dynamic VRAM)"
    return "ComfyUI: " + ", ".join(f"{k}={v}" for k, v in sorted(differs.items()))


def profile_title(profile: str) -> str:
    return f"{PROFILE_TITLES[profile]}; {comfy_mode(profile)}"


def run_modes(
    modes: Sequence[str],
    events: list[Event],
    duration_s: float,
    time_scale: float,
    repeat: int,
    results_dir: Path,
    profile: str = "2026",
) -> list[list[ModeResult]]:
    """`repeat` rounds; in each, every mode runs at once (own simulated host, own
    supervisor process), so background load on the machine hits all modes alike."""
    groups: dict[str, list[ModeResult]] = {m: [] for m in modes}
    for round_no in range(1, repeat + 1):
        print(
            f"\n== {profile} round {round_no}/{repeat}: {', '.join(modes)} at once ...",
            flush=True,
        )
        with ThreadPoolExecutor(max_workers=max(1, len(modes))) as pool:
            futures = {
                m: pool.submit(
                    run_mode,
                    m,
                    events,
                    duration_s,
                    time_scale,
                    log_path=results_dir / f"supervisor-{profile}-{m}-{round_no}.log",
                    profile=profile,
                )
                for m in modes
            }
            for m, future in futures.items():
                result = future.result()
                groups[m].append(result)
                print(
                    f"   {m}: loads full {_short(result.loads_full_pct)} %, tokens full "
                    f"{_short(result.tokens_full_pct)} %, {result.wall_s:.0f} s",
                    flush=True,
                )
    return [groups[m] for m in modes]


# The workloads whose chats go to another model server than Ollama: their modes, how one
# mode runs, how runs pool, their table and title.
SIDE_WORKLOADS: dict[str, tuple[dict[str, str], Any, Any, Any, str]] = {
    "llama-swap": (SWAP_MODES, run_swap_mode, pool_swap, swap_table, "llama-swap + ComfyUI"),
    "vllm": (VLLM_MODES, run_vllm_mode, pool_vllm, vllm_table, "vLLM + ComfyUI"),
}


def run_side_modes(
    workload: str,
    modes: Sequence[str],
    events: list[Event],
    duration_s: float,
    time_scale: float,
    repeat: int,
    results_dir: Path,
    profile: str,
) -> list[Any]:
    """A side workload (llama-swap, vLLM): like `run_modes`, every mode at once in each
    round."""
    _, run_mode, pool, _, _ = SIDE_WORKLOADS[workload]
    groups: dict[str, list[Any]] = {m: [] for m in modes}
    for round_no in range(1, repeat + 1):
        print(f"\n== {workload} {profile} round {round_no}/{repeat} ...", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, len(modes))) as executor:
            futures = {
                m: executor.submit(
                    run_mode,
                    m,
                    events,
                    duration_s,
                    time_scale,
                    log_path=results_dir / f"supervisor-{workload}-{profile}-{m}-{round_no}.log",
                    profile=profile,
                )
                for m in modes
            }
            for m, future in futures.items():
                result = future.result()
                groups[m].append(result)
                print(
                    f"   {m}: {result.chats_ok}/{result.chats_sent} chats, "
                    f"{result.images_done} images, {result.wall_s:.0f} s",
                    flush=True,
                )
    return [pool(groups[m]) for m in modes]


def main_side(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    workload = args.workload
    known, _, _, table, title = SIDE_WORKLOADS[workload]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else []
    modes = modes or list(known)
    unknown = [m for m in modes if m not in known]
    if unknown:
        parser.error(
            f"--workload {workload}: unknown mode(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(known)}"
        )
    # One generation (the ComfyUI side only differs): 2026 unless --profile names one.
    given = "--profile" in " ".join(args.argv)
    profile = args.profile.split(",")[0].strip() if given else "2026"
    if profile not in PROFILE_TITLES:
        parser.error(f"--profile {args.profile!r}: accepted: 2025 or 2026")
    started = time.monotonic()
    duration_s = args.minutes * 60
    events = make_workload(args.seed, duration_s)
    print(f"Machine: {machine()}")
    print(describe_workload(events, args.minutes, args.seed))
    print(scaling_note(args.time_scale), flush=True)
    pooled = run_side_modes(
        workload, modes, events, duration_s, args.time_scale, args.repeat, args.results, profile
    )
    runtime_s = time.monotonic() - started
    print(f"\n{title} ({comfy_mode(profile)}):\n" + table(pooled))
    args.results.mkdir(parents=True, exist_ok=True)
    raw = {
        "workload": workload,
        "seed": args.seed,
        "minutes": args.minutes,
        "time_scale": args.time_scale,
        "repeat": args.repeat,
        "runtime_s": runtime_s,
        "profile": profile,
        "modes": {r.mode: r.to_json() for r in pooled},
    }
    (args.results / f"results-{workload}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"\nRaw results in {args.results}; docs/ left alone. Runtime: {runtime_s:.0f} s")
    return 0


def _short(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="simulated")
    parser.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE)
    parser.add_argument(
        "--repeat", type=int, default=DEFAULT_REPEAT, help="runs of each mode (pooled)"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}"
    )
    parser.add_argument(
        "--profile",
        default=",".join(DEFAULT_PROFILES),
        help="simulated generations, comma-separated, of: 2025, 2026 (sim/profiles.py)",
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    parser.add_argument("--micro", action="store_true", help="only the micro-benchmarks")
    parser.add_argument("--requests", type=int, default=2000, help="gate overhead requests")
    parser.add_argument("--idle-window", type=float, default=30.0, help="idle CPU window (s)")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="where benchmarks.md/.svg go (default docs/, written only by a full run)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument(
        "--workload",
        choices=("ollama", "llama-swap", "vllm"),
        default="ollama",
        help="whose chats: Ollama's (default), a llama-swap's or a vLLM's (modes none, "
        "supervisor, gate (llama-swap only), "
        "isolated; prints its table, never rewrites docs/)",
    )
    args = parser.parse_args(args_list)
    args.argv = args_list
    if args.workload in SIDE_WORKLOADS:
        if "--modes" not in " ".join(args_list):
            args.modes = ""
        return main_side(args, parser)
    modes = [] if args.micro else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    if not profiles or any(p not in PROFILE_TITLES for p in profiles):
        parser.error(f"--profile {args.profile!r}: accepted: 2025, 2026 or both, comma-separated")

    started = time.monotonic()
    duration_s = args.minutes * 60
    events = make_workload(args.seed, duration_s)
    print(f"Machine: {machine()}")
    print(describe_workload(events, args.minutes, args.seed))
    print(scaling_note(args.time_scale), flush=True)
    by_profile: dict[str, list[list[ModeResult]]] = {}
    for profile in profiles if modes else []:
        by_profile[profile] = run_modes(
            modes, events, duration_s, args.time_scale, args.repeat, args.results, profile
        )
        print(f"\n{profile_title(profile)}:\n" + results_table(by_profile[profile]))
    if by_profile:
        print("\n" + generations_table(by_profile))
        print("\n" + estimates_table(by_profile))
    micro: MicroResult | None = None
    if not args.no_micro:
        print("\n== micro-benchmarks ...", flush=True)
        micro = run_micro(
            requests=args.requests, idle_window_s=args.idle_window, log_dir=args.results
        )
        print("\n" + micro_table(micro))
    runtime_s = time.monotonic() - started

    args.results.mkdir(parents=True, exist_ok=True)
    raw = {
        "seed": args.seed,
        "minutes": args.minutes,
        "time_scale": args.time_scale,
        "runtime_s": runtime_s,
        "profiles": {
            prof: {g[0].mode: [r.to_json() for r in g] for g in groups}
            for prof, groups in by_profile.items()
        },
        "micro": micro.to_json() if micro else None,
    }
    (args.results / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    full_run = (
        not args.micro
        and not args.no_micro
        and modes == list(MODES)
        and sorted(profiles) == sorted(DEFAULT_PROFILES)
    )
    if args.docs is None and not full_run:
        print(f"\nPartial run: docs/ left alone; raw results in {args.results}.")
        print(f"Runtime: {runtime_s:.0f} s")
        return 0
    args.docs = args.docs or ROOT / "docs"
    args.docs.mkdir(parents=True, exist_ok=True)
    chart = by_profile.get("2026") or next(iter(by_profile.values()), None)
    if chart:
        title = (
            f"Mixed workload, seed {args.seed}, {args.minutes:g} simulated minutes, "
            f"{chart[0][0].profile} pair"
        )
        (args.docs / "benchmarks.svg").write_text(svg_chart(chart, title))
    update_markdown(
        args.docs / "benchmarks.md",
        generated_markdown(
            by_profile,
            micro,
            events=events,
            minutes=args.minutes,
            seed=args.seed,
            time_scale=args.time_scale,
            runtime_s=runtime_s,
            argv=args_list,
        ),
    )
    print(f"\nWrote {args.docs / 'benchmarks.md'}; raw results in {args.results}.")
    print(f"Runtime: {runtime_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
