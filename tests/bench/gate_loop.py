"""The gate's overhead on each event loop (VRAM_GATE_LOOP): `micro.gate_overhead` run
alternately on asyncio's loop and on uvloop, a fresh supervisor each round, so drift on a
shared machine hits both alike. Prints every round and the medians; asserts nothing.

    flock -o /tmp/vram-bench.lock nice .venv/bin/python -m tests.bench.gate_loop --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from tests.bench.micro import MicroResult, gate_overhead
from tests.bench.workload import answer_without_nagle, median

LOOPS = ("asyncio", "uvloop")

Measure = tuple[str, str, Callable[[MicroResult], float | None]]
MEASURES: list[Measure] = [
    ("direct p50", "ms", lambda m: m.direct_p50_ms),
    ("gate p50", "ms", lambda m: m.gate_p50_ms),
    ("added at p50", "ms", lambda m: _diff(m.gate_p50_ms, m.direct_p50_ms)),
    ("added at p99", "ms", lambda m: _diff(m.gate_p99_ms, m.direct_p99_ms)),
    (
        "stream first byte, added at p50",
        "ms",
        lambda m: _diff(m.ttfb_gate_p50_ms, m.ttfb_direct_p50_ms),
    ),
    (
        "stream first byte, added at p99",
        "ms",
        lambda m: _diff(m.ttfb_gate_p99_ms, m.ttfb_direct_p99_ms),
    ),
    ("supervisor CPU per gate request", "µs", lambda m: m.gate_cpu_us),
]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table(results: dict[str, list[MicroResult]]) -> str:
    rows = [
        "| measure (median of the rounds; the rounds in brackets) | " + " | ".join(LOOPS) + " |",
        "| --- |" + " --- |" * len(LOOPS),
    ]
    for title, unit, get in MEASURES:
        cells = []
        for loop in LOOPS:
            values = [v for v in (get(m) for m in results[loop]) if v is not None]
            mid = median(values)
            digits = 0 if unit == "µs" else 2
            rounds = ", ".join(f"{v:.{digits}f}" for v in values)
            cells.append("n/a" if mid is None else f"{mid:.{digits}f} {unit} ({rounds})")
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per loop")
    parser.add_argument("--requests", type=int, default=2000, help="non-streaming, per round")
    parser.add_argument("--streams", type=int, default=300, help="streamed, per round")
    args = parser.parse_args(argv)
    answer_without_nagle()
    results: dict[str, list[MicroResult]] = {loop: [] for loop in LOOPS}
    for i in range(args.rounds):
        order = LOOPS if i % 2 == 0 else LOOPS[::-1]
        for loop in order:
            result = MicroResult()
            gate_overhead(
                result,
                requests=args.requests,
                streams=args.streams,
                settings={"VRAM_GATE_LOOP": loop},
            )
            if result.gate_loop != loop:
                raise RuntimeError(f"asked for {loop}, the gate runs on {result.gate_loop!r}")
            results[loop].append(result)
            print(
                f"round {i + 1} {loop}: "
                + json.dumps(
                    {
                        k: v
                        for k, v in result.to_json().items()
                        if k.endswith(("p50_ms", "p99_ms")) or k == "gate_cpu_us"
                    }
                ),
                flush=True,
            )
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(table(results))


if __name__ == "__main__":
    main()
