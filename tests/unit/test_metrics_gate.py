"""The gate's counters reach /metrics as Prometheus counters, read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.gate.stats import GateStats
from supervisor.metrics import Metrics


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vram_supervisor_gate_")
    }


def test_gate_counters_follow_the_gate_at_each_scrape() -> None:
    registry = CollectorRegistry()
    current = {"stats": GateStats()}
    Metrics(registry).watch_gate(lambda: current["stats"])
    assert _samples(registry)["vram_supervisor_gate_requests_total"] == 0

    current["stats"] = GateStats(
        requests_total=12,
        express_total=8,
        gated_total=3,
        waits_total=2,
        wait_seconds_total=4.5,
        forwarded_anyway_total=1,
        upstream_errors_total=1,
    )
    samples = _samples(registry)
    assert samples == {
        "vram_supervisor_gate_requests_total": 12,
        "vram_supervisor_gate_express_requests_total": 8,
        "vram_supervisor_gate_gated_requests_total": 3,
        "vram_supervisor_gate_waits_total": 2,
        "vram_supervisor_gate_wait_seconds_total": 4.5,
        "vram_supervisor_gate_forwarded_anyway_total": 1,
        "vram_supervisor_gate_upstream_errors_total": 1,
    }


def test_docker_events_connected_follows_the_stream_at_each_scrape() -> None:
    registry = CollectorRegistry()
    stream = {"open": False}
    Metrics(registry).watch_docker_events(lambda: stream["open"])

    def connected() -> float:
        text = generate_latest(registry).decode()
        [value] = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "vram_supervisor_docker_events_connected"
        ]
        return value

    assert connected() == 0
    stream["open"] = True
    assert connected() == 1


def test_image_gate_counters_are_their_own_family() -> None:
    from supervisor.gate.comfy import ComfyGateStats

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.watch_gate(lambda: GateStats(requests_total=5))
    metrics.watch_comfyui_gate(
        lambda: ComfyGateStats(requests_total=7, prompts_total=3, waits_total=1, websockets_total=2)
    )
    text = generate_latest(registry).decode()
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("vram_supervisor_comfyui_gate_")
    }
    assert samples == {
        "vram_supervisor_comfyui_gate_requests_total": 7,
        "vram_supervisor_comfyui_gate_express_requests_total": 0,
        "vram_supervisor_comfyui_gate_prompts_total": 3,
        "vram_supervisor_comfyui_gate_waits_total": 1,
        "vram_supervisor_comfyui_gate_wait_seconds_total": 0,
        "vram_supervisor_comfyui_gate_forwarded_anyway_total": 0,
        "vram_supervisor_comfyui_gate_upstream_errors_total": 0,
        "vram_supervisor_comfyui_gate_websockets_total": 2,
    }
    assert _samples(registry)["vram_supervisor_gate_requests_total"] == 5
