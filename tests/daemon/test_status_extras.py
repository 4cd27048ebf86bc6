"""What the daemon adds to /status and /metrics for the status page and the alerts: the
gate's state in the snapshot, and whether the Docker events stream is open."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.gate.stats import GateStats
from supervisor.metrics import Metrics
from supervisor.snapshot import gate_json
from tests.daemon.conftest import World


def test_snapshot_shows_the_gate_only_when_it_runs(world: World) -> None:
    daemon = world.daemon()
    daemon.run_once()
    assert daemon.snapshot()["gate"] is None
    stats = GateStats(requests_total=3, waits_total=1, wait_seconds_total=2.5)
    daemon.gate_status = lambda: gate_json(stats, host="127.0.0.1", port=11435, wait_s=30.0)
    gate = daemon.snapshot()["gate"]
    assert gate["port"] == 11435 and gate["requests_total"] == 3
    assert gate["wait_seconds_total"] == 2.5 and gate["upstream_errors_total"] == 0

    def broken() -> dict[str, Any]:
        raise RuntimeError("gate gone")

    daemon.gate_status = broken
    assert daemon.snapshot()["gate"] == {"error": "gate gone"}


def test_docker_events_connected_is_exported_only_when_docker_is_used(world: World) -> None:
    def connected(metrics: Metrics) -> list[float]:
        text = generate_latest(metrics.registry).decode()
        return [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "vram_supervisor_docker_events_connected"
        ]

    with_docker = Metrics(CollectorRegistry())
    world.daemon(metrics=with_docker)
    assert connected(with_docker) == [1.0]
    world.events.connected = False
    assert connected(with_docker) == [0.0]
    fixed_urls = Metrics(CollectorRegistry())
    world.daemon(metrics=fixed_urls, with_docker=False)
    assert connected(fixed_urls) == []
