"""`python -m supervisor run`, with the built-in limits that compressed time breaks scaled.

Run as `python -m tests.bench.scaled_supervisor` with BENCH_TIME_SCALE set (the simulator's
time scale). The daemon's safety limit allows MAX_ACTIONS_PER_SERVICE_PER_MIN actions per
service per *real* minute; at a time scale of 0.05 a real minute is 20 simulated minutes,
so the limit would be 20 times tighter in the benchmark than on a real host and would
decide the result. Its count is divided by the time scale here, which keeps it at 6 per
simulated minute. The gate's longest hold of a load behind the previous one
(`gate.core.LOAD_HOLD_MAX_S`, 300 s) is multiplied by it: unscaled it would hold a chat
for 300 real seconds, hours of simulated time, behind a load Ollama keeps pending (found
by the soak: chats held past their clients' timeout). The user-settable times come scaled
through the environment (supervisor_proc.scaled_settings); the other built-in real-time
constants (verification poll, settle, the gate's /api/ps cache) only make the supervisor
slower in simulated time and stay as they are.
"""

from __future__ import annotations

import math
import os
import sys

from supervisor import actions, cli
from supervisor.gate import core as gate_core


def run_scaled(variable: str) -> int:
    """`vram-supervisor run` with the safety limit divided by the time scale in `variable`."""
    scale = float(os.environ.get(variable, "1"))
    if not 0 < scale <= 1:
        print(f"{variable} must be in (0, 1], not {scale}", file=sys.stderr)
        return 2
    actions.MAX_ACTIONS_PER_SERVICE_PER_MIN = math.ceil(
        actions.MAX_ACTIONS_PER_SERVICE_PER_MIN / scale
    )
    gate_core.LOAD_HOLD_MAX_S *= scale
    return cli.main(["run"])


def main() -> int:
    return run_scaled("BENCH_TIME_SCALE")


if __name__ == "__main__":
    raise SystemExit(main())
