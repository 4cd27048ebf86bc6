"""The soak's Docker-backed form, short: one simulated hour (about 75 s of wall time).

The real supervisor process discovers labelled sim containers on the real engine while the
containers are recreated (same name, new id), renamed, stopped by the user and started
again, recreated without their role label, and bursts of short-lived containers make
hundreds of Docker events; chats go through the gate, image jobs to ComfyUI. It fails on any
target missed (tests/soak/report.py's `evaluate`: no supervisor crash, no unhandled
exception, no action storm, no ComfyUI restart, no action on an unlabelled container, no chat
lost or answered 5xx by the gate while Ollama was up, no growth of RSS, threads or open
descriptors), printing the whole report. The long form: `python -m tests.soak --docker`
(docs/soak.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.docker_soak import run_docker_soak
from tests.soak.faults import DOCKER_KINDS
from tests.soak.report import evaluate, markdown

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]


@pytest.mark.timeout(240)
def test_a_short_docker_soak_meets_every_target(
    docker_host: str, base_image: str, tmp_path: Path
) -> None:
    run = run_docker_soak(
        docker_host=docker_host,
        hours=1.0,
        time_scale=0.015,
        rate=1.0,
        seed=1,
        fault_gap_s=150.0,
        workdir=tmp_path,
        burst=40,
        # One fault at a time: not a container relabelled while a burst slows the engine.
        # That race is open (docs/soak.md, "Findings of the Docker-backed form": a free
        # reached a ComfyUI just recreated without its label, the supervisor's listing
        # being 1-2 s behind during a burst); `python -m tests.soak --docker` has it.
        overlap=False,
        sample_s=30.0,
        checkpoints=(("start", 0.3), ("middle", 0.65)),
        progress=lambda line: None,
    )
    fig = evaluate(run)
    report = markdown(run, fig)
    print(report)
    kinds = {(f.kind, f.target) for f in run.faults}
    assert {k for k, _ in kinds} == set(DOCKER_KINDS), "every kind of Docker fault"
    assert {("unlabel", "ollama"), ("unlabel", "comfyui")} <= kinds, "both unlabelled"
    assert run.docker_events >= 200, f"bursts of hundreds of events, not {run.docker_events}"
    assert len(run.chats) > 200, "a busy host"
    assert sum(1 for c in run.chats if c.outcome == "ok") > 100, "chats answered"
    assert not fig.failures, report
