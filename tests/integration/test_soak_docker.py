"""The soak's Docker-backed form, short: two simulated hours (about two minutes of wall time).

The real supervisor process discovers labelled sim containers on the real engine while the
containers are recreated (same name, new id), renamed, stopped by the user and started
again, recreated without their role label, bursts of short-lived containers make hundreds
of Docker events, and the Docker daemon restarts once (on tests/lib/dockerd.sh's private
engine only, which tests/run and CI use; elsewhere the report says it was not run); and,
as in the fixed-URL form, a service's process crashes (its restart policy brings the
container back), hangs, answers garbage, 500s or slowly, NVML fails and loses the GPU, a
process outside every tenant takes VRAM, and the supervisor's wall clock steps. Chats go
through the gate, image jobs to ComfyUI. It fails on any target missed
(tests/soak/report.py's `evaluate`: no supervisor crash, no unhandled exception, no action
storm, no ComfyUI restart, no action on an unlabelled container, no chat lost or answered
5xx by the gate while Ollama was up, the daemon restart come through (Docker unreachable
noticed, /healthz 200 throughout, events reconnected, both services found again within
30 s), no growth of RSS, threads or open descriptors from before the restart to the end),
printing the whole report. The engine is up again afterwards, even on failure. The long
form: `python -m tests.soak --docker` (docs/soak.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.namespaced_engine import engine_answers, engine_is_ours
from tests.soak.docker_soak import run_docker_soak
from tests.soak.faults import DAEMON_RESTART_NOT_RUN, KINDS
from tests.soak.report import evaluate, markdown

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]


@pytest.mark.timeout(360)
def test_a_short_docker_soak_meets_every_target(
    docker_host: str, base_image: str, tmp_path: Path
) -> None:
    run = run_docker_soak(
        docker_host=docker_host,
        hours=2.0,
        time_scale=0.015,
        rate=1.0,
        seed=1,  # every kind, both containers unlabelled, the restart after "start"
        fault_gap_s=60.0,
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
    assert {k for k, _ in kinds} == set(run.kinds), "every kind of fault"
    assert set(KINDS) <= set(run.kinds), "the fixed-URL form's kinds too"
    if engine_is_ours(docker_host):
        restarts = [f for f in run.faults if f.kind == "daemon_restart"]
        assert len(restarts) == 1 and restarts[0].real_start is not None, report
        start = next(s for name, s, _ in run.checkpoints if name == "start")
        assert start.t < restarts[0].real_start, "the resource figures span the restart"
        assert any(t.name.startswith("daemon restarts") for t in fig.targets), report
        assert engine_answers(docker_host), "the engine is up again"
    else:  # never restarted, and the report says so
        assert "daemon_restart" not in run.kinds
        assert f"| daemon restart | {DAEMON_RESTART_NOT_RUN} |" in report
    assert {("unlabel", "ollama"), ("unlabel", "comfyui")} <= kinds, "both unlabelled"
    assert ("crash", "ollama") in kinds, "the gate's upstream crashed"
    assert run.docker_events >= 200, f"bursts of hundreds of events, not {run.docker_events}"
    assert len(run.chats) > 200, "a busy host"
    assert sum(1 for c in run.chats if c.outcome == "ok") > 100, "chats answered"
    assert not fig.failures, report
