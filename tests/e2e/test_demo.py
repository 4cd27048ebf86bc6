"""`vram-supervisor demo` as a user runs it: a subprocess, no GPU, no Docker, no terminal.

The demo must exit 0 and its narration must state what happened, from its own readings:
the chat model fully on the GPU after the gate made room, the supervisor's heal line, the
summary. Timings are printed by the demo but never asserted (2-core CI machines).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.demo.scenario import big_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = big_model("2026")  # the demo runs the default profile (VRAM_* is cleared below)
BIG = re.escape(MODEL)


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    # Docker must not be needed: point it at nothing, so any use would fail loudly.
    env.update(PYTHONPATH=str(ROOT), DOCKER_HOST="unix:///nonexistent/vram-demo.sock")
    env.pop("NO_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_exits_zero_and_says_it_passed(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Demo passed." in demo.stdout
    assert "FAILED" not in demo.stdout


def test_demo_output_is_plain_when_not_a_terminal(demo: subprocess.CompletedProcess[str]) -> None:
    assert "\x1b[" not in demo.stdout
    assert demo.stdout.isascii()


def test_the_chat_model_lands_fully_on_the_gpu_through_the_gate(
    demo: subprocess.CompletedProcess[str],
) -> None:
    out = demo.stdout
    assert re.search(rf"supervisor \| Gate: making room for {BIG}", out), out
    assert re.search(r"supervisor \| Freed ComfyUI memory \(soft\)", out), out
    assert f"OK {MODEL} is fully on the GPU" in out
    # The figure comes from /api/ps: size_vram equals size.
    assert re.search(rf"{BIG}: ([\d.]+ GiB) of \1 on the GPU = 100%", out), out


def test_a_spilled_model_is_healed(demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    spilled = re.search(rf"{BIG}: [\d.]+ GiB of [\d.]+ GiB on the GPU = (\d+)%, the other", out)
    assert spilled and int(spilled.group(1)) < 100, out
    healed = re.search(rf"supervisor \| Healed Ollama model {BIG}: (\d+)% -> 100% on GPU", out)
    assert healed, out
    # The demo's own reading and the supervisor's agree on where it started.
    assert healed.group(1) == spilled.group(1)
    assert f"OK {MODEL} healed: {spilled.group(1)}% -> 100% on the GPU." in out


def test_the_summary_reports_frees_heals_placement_and_time(
    demo: subprocess.CompletedProcess[str],
) -> None:
    summary = demo.stdout.split("\nSummary\n", 1)[-1]
    assert re.search(r"ComfyUI frees, by stage: +\d+ hard, \d+ soft", summary), summary
    assert re.search(rf"Heals: +1 \({BIG} \d+% -> 100%\)", summary), summary
    assert re.search(rf"Ollama +{BIG} +[\d.]+ GiB of [\d.]+ GiB on the GPU = 100%", summary)
    assert re.search(r"Elapsed: +[\d.]+ s", summary), summary


def test_the_demo_never_touches_docker(demo: subprocess.CompletedProcess[str]) -> None:
    said = [line for line in demo.stdout.splitlines() if "supervisor |" in line]
    assert said and not [line for line in said if "docker" in line.lower()], said
    assert "docker" not in demo.stderr.lower()
