"""`python -m supervisor run` as the soak starts it: the real CLI, plus two test hooks.

- The safety limit is scaled by SOAK_TIME_SCALE as in tests/bench/scaled_supervisor.py (6
  actions per service per *simulated* minute), or compressed time would make it 1/scale
  times tighter than on a real host.
- The wall clock can be stepped: SOAK_CLOCK_FILE names a file holding an offset in seconds,
  re-read every 50 ms, that `time.time()` adds (an NTP step, a VM resumed, a hand-set
  clock). `time.monotonic()` is left alone, as the kernel leaves it. It is installed before
  the package is imported, so every `time.time` the supervisor holds is the stepped one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

_real_time = time.time
_offset = 0.0


def _stepped_time() -> float:
    return _real_time() + _offset


def _follow(path: Path) -> None:
    global _offset
    while True:
        with contextlib.suppress(OSError, ValueError):
            _offset = float(path.read_text() or 0)
        time.sleep(0.05)


def _trace_memory(path: Path, after_s: float) -> None:
    """Diagnosis: where the memory that grew after `after_s` was allocated, written to
    `path` at exit (SOAK_TRACEMALLOC=path, SOAK_TRACEMALLOC_AFTER=seconds)."""
    import atexit
    import tracemalloc

    tracemalloc.start(12)
    first: list[tracemalloc.Snapshot] = []
    threading.Timer(after_s, lambda: first.append(tracemalloc.take_snapshot())).start()

    def dump() -> None:
        if not first:
            return
        diff = tracemalloc.take_snapshot().compare_to(first[0], "traceback")
        with path.open("w") as out:
            for stat in diff[:12]:
                out.write(f"{stat.size_diff / 1024:.0f} KiB in {stat.count_diff} blocks\n")
                out.write("\n".join(stat.traceback.format()[-12:]) + "\n\n")

    atexit.register(dump)


def main() -> int:
    if os.environ.get("SOAK_TRACEMALLOC"):
        after = float(os.environ.get("SOAK_TRACEMALLOC_AFTER", "20"))
        _trace_memory(Path(os.environ["SOAK_TRACEMALLOC"]), after)
    clock_file = os.environ.get("SOAK_CLOCK_FILE")
    if clock_file:
        time.time = _stepped_time
        threading.Thread(target=_follow, args=(Path(clock_file),), daemon=True).start()
    # Imports the package: after the clock hook, on purpose.
    from tests.bench.scaled_supervisor import run_scaled

    return run_scaled("SOAK_TIME_SCALE")


if __name__ == "__main__":
    raise SystemExit(main())
