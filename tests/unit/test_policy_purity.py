"""The policy stays pure: importing it pulls in no I/O library (checked in a fresh
interpreter, since this test process has them all loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("docker", "httpx", "pynvml", "requests", "loguru", "urllib3", "tenacity")

PROBE = """
import json, sys
import supervisor.policy
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("supervisor"))))
"""


def test_policy_imports_no_io_library() -> None:
    code = PROBE.format(forbidden=set(FORBIDDEN))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    io_modules, ours = (json.loads(line) for line in done.stdout.splitlines())
    assert io_modules == []
    # Only the pure layer below it: model and config (config imports errors).
    assert set(ours) <= {
        "supervisor",
        "supervisor.policy",
        "supervisor.model",
        "supervisor.config",
        "supervisor.errors",
    }, ours


def test_policy_source_never_reads_the_clock() -> None:
    source = (ROOT / "supervisor" / "policy.py").read_text()
    for forbidden in ("import time", "from time", "monotonic(", "datetime.now", "time.time"):
        assert forbidden not in source
