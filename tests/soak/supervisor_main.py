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


def main() -> int:
    clock_file = os.environ.get("SOAK_CLOCK_FILE")
    if clock_file:
        time.time = _stepped_time
        threading.Thread(target=_follow, args=(Path(clock_file),), daemon=True).start()
    # Imports the package: after the clock hook, on purpose.
    from tests.bench.scaled_supervisor import run_scaled

    return run_scaled("SOAK_TIME_SCALE")


if __name__ == "__main__":
    raise SystemExit(main())
