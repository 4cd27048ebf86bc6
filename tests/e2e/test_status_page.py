"""The status page (`/` and `/ui`) in a real headless Chromium.

1. Against the simulated host with the real supervisor (fixed URLs, gate on, no Docker):
   ComfyUI is freed for an Ollama load, then holds VRAM again. Chromium loads the page,
   which fetches /status itself; every figure it shows (GPU bar per tenant, tenants, models
   with their GPU share, the gate, the recent actions) must match /status read just before
   and after. A screenshot is saved under .cache/artifacts/ (path printed).
2. Against the HTTP server alone with a hand-made /status full of markup in service text,
   a spilled model, an unreachable service, two GPUs and a dry run: nothing the services
   say may become markup, and each of those states must show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from supervisor.http import StatusServer
from supervisor.sim import SimHost
from supervisor.units import GIB, format_bytes
from tests.e2e.browser import Node, chromium, dump_dom, parse, screenshot
from tests.e2e.test_supervisor_on_sim import (
    Supervisor,
    free_port,
    hold_comfy_vram,
    start_supervisor,
    stop,
)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".cache" / "artifacts"
MAX_ACTIONS = 20  # the page shows the latest 20


@pytest.fixture
def sim() -> Iterator[SimHost]:
    with SimHost(time_scale=0.1) as host:
        yield host


def figures(status: dict[str, Any]) -> dict[str, Any]:
    """What the page shows, minus what changes every pass."""
    return {k: v for k, v in status.items() if k != "last_pass_wall_time"}


def settled(sup: Supervisor, timeout_s: float = 20.0) -> dict[str, Any]:
    """/status once two reads a pass apart agree (the simulated host is at rest)."""
    deadline = time.monotonic() + timeout_s
    previous = figures(sup.status())
    while time.monotonic() < deadline:
        time.sleep(1.1)  # VRAM_CHECK_INTERVAL=1
        current = figures(sup.status())
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"/status kept changing:\n{sup.log()}")


def pct(part: int, total: int) -> str:
    return f"{100 * part / total:.3f}%"


def number(value: float) -> str:
    """How JavaScript's String() writes these numbers (24.2, 100)."""
    return f"{value:g}"


def held_text(tenant: dict[str, Any]) -> str:
    """What the page says a tenant holds: no bytes for a ComfyUI on the CPU (its "vram"
    figures are system RAM), and an estimate (Dynamic VRAM without NVML) marked so."""
    if tenant.get("mode") == "cpu" or tenant.get("device_type") == "cpu":
        return "on the CPU, no VRAM"
    estimate = " (estimate)" if tenant.get("vram_is_estimate") else ""
    return format_bytes(tenant["vram_bytes"]) + estimate


def assert_page_matches(page: Node, status: dict[str, Any]) -> None:
    assert page.find("span", id="updated").attrs["data-state"] == "ok"
    tenants = [*status["ollama"], *status["comfyui"]]

    # GPU bars: one per GPU, a segment per tenant holding VRAM, then other and free.
    [gpu] = status["gpus"]
    bar = page.find("div", data_uuid=gpu["uuid"])
    assert bar.attrs["data-total"] == str(gpu["total_bytes"])
    assert bar.attrs["data-used"] == str(gpu["used_bytes"])
    assert bar.find("span", class_="gpu-used").text == (
        f"used {format_bytes(gpu['used_bytes'])} of {format_bytes(gpu['total_bytes'])} "
        f"({number(gpu['used_percent'])}%)"
    )
    holding = [t for t in tenants if t["vram_bytes"]]
    assert len(holding) == 2, "the scenario leaves both tenants holding VRAM"
    segments = bar.find_all("div", data_tenant=None)
    assert [s.attrs["data-tenant"] for s in segments] == [
        *(t["key"] for t in holding),
        "(other)",
        "(free)",
    ]
    for tenant, segment in zip(holding, segments, strict=False):
        assert segment.attrs["data-bytes"] == str(tenant["vram_bytes"])
        assert f"width:{pct(tenant['vram_bytes'], gpu['total_bytes'])}" in segment.attrs["style"]
        legend = bar.find("span", data_legend=tenant["key"]).text
        assert legend.endswith(f"{tenant['name']} {held_text(tenant)}")
    held = sum(t["vram_bytes"] for t in holding)
    assert segments[-2].attrs["data-bytes"] == str(max(0, gpu["used_bytes"] - held))
    assert bar.find("span", data_legend="(free)").text == f"free {format_bytes(gpu['free_bytes'])}"

    # Tenants: kind, reachable, busy, what each holds, models with their GPU share.
    rows = page.find("table", id="tenants").find_all("tr", data_key=None)
    assert [r.attrs["data-key"] for r in rows] == [t["key"] for t in tenants]
    for tenant, row in zip(tenants, rows, strict=True):
        cells = row.find_all("td")
        assert cells[0].text.endswith("Ollama" if tenant in status["ollama"] else "ComfyUI")
        assert cells[1].text == tenant["name"]
        assert cells[2].text == "fixed URL"
        assert cells[3].text == ("yes" if tenant["reachable"] else f"no: {tenant['error']}")
        assert cells[5].text.startswith(held_text(tenant))
        assert (cells[5].attrs.get("data-estimate") == "true") is bool(
            tenant.get("vram_is_estimate")
        )
    [ollama] = status["ollama"]
    shown = rows[0].find_all("li", data_model=None)
    assert [li.attrs["data-model"] for li in shown] == [m["name"] for m in ollama["models"]]
    for model, li in zip(ollama["models"], shown, strict=True):
        assert li.attrs["data-gpu-percent"] == number(model["gpu_percent"])
        assert f"{format_bytes(model['size_bytes'])}, {number(model['gpu_percent'])}% on GPU" in (
            li.text
        )
    [comfy] = status["comfyui"]
    mode = rows[1].find("div", data_mode=comfy["mode"])
    assert mode.text.startswith(f"ComfyUI {comfy['version']}, ")
    assert ("estimated from the whole GPU" in mode.text) is comfy["vram_is_estimate"]
    busy = "idle" if comfy["queue"]["running"] == 0 else f"running {comfy['queue']['running']}"
    assert rows[1].find_all("td")[4].text.startswith(busy)

    # The gate.
    gate = status["gate"]
    shown_gate = page.find("dl", data_gate="on")
    assert shown_gate.attrs["data-requests"] == str(gate["requests_total"])
    assert shown_gate.attrs["data-waits"] == str(gate["waits_total"])
    assert f"{gate['host']}:{gate['port']}" in shown_gate.text

    # Recent actions, newest first, with outcome, VRAM before/after and reason.
    recent = status["recent_actions"][-MAX_ACTIONS:][::-1]
    rows = page.find("table", id="actions").find_all("tr", data_action=None)
    assert [r.attrs["data-action"] for r in rows] == [a["action"] for a in recent]
    for action, row in zip(recent, rows, strict=True):
        cells = [c for c in row.children if isinstance(c, Node)]
        assert cells[2].text == action["target"]
        assert cells[4].text == (
            f"{format_bytes(action['before_bytes'])} → {format_bytes(action['after_bytes'])}"
        )
        assert cells[6].text.startswith(action["reason"])
        if action["action"] == "FreeComfy":
            assert cells[3].text == f"{action['stage']} free: {action['result']}"


def test_the_page_shows_what_status_says(sim: SimHost) -> None:
    binary = chromium()
    gate_port = free_port()
    with httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, sim, model_gib=10.0)
        sup = start_supervisor(sim, VRAM_GATE_PORT=str(gate_port), VRAM_GATE_HOST="127.0.0.1")
        try:
            sup.wait_for("VRAM source: api")
            r = client.post(
                f"http://127.0.0.1:{gate_port}/api/generate", json={"model": "llama3.1:8b"}
            )
            assert r.status_code == 200, r.text
            sup.wait_for("Freed ComfyUI memory")
            hold_comfy_vram(client, sim, model_gib=4.0)  # ComfyUI holds VRAM again
            for _ in range(3):  # the page must have read the state that /status settled on
                before = settled(sup)
                t0 = time.monotonic()
                html = dump_dom(binary, f"http://127.0.0.1:{sup.port}/")
                load_s = time.monotonic() - t0
                if figures(sup.status()) == before:
                    break
            else:
                raise AssertionError("/status did not stay still while the page loaded")
            t0 = time.monotonic()
            shot = screenshot(
                binary, f"http://127.0.0.1:{sup.port}/ui", ARTIFACTS / "status-page.png"
            )
            shot_s = time.monotonic() - t0
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert any(
        a["action"] == "FreeComfy" and a["result"] == "freed" for a in before["recent_actions"]
    )
    assert before["gate"]["requests_total"] >= 1
    assert_page_matches(parse(html), before)
    print(f"\nstatus page: dump-dom {load_s:.1f} s, screenshot {shot_s:.1f} s -> {shot}")


HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def hostile_status() -> dict[str, Any]:
    service = {
        "running": True,
        "health": "unhealthy",
        "url": "http://127.0.0.1:1",
        "failed_checks": 3,
        "container_id": "0123456789abcdef",
    }
    return {
        "dry_run": True,
        "priority": HOSTILE,
        "last_pass_wall_time": 1_800_000_000.0,
        "docker": {"in_use": True, "state": "ok", "reconnects": 0},
        "vram_source": "nvml",
        "gpus": [
            {
                "uuid": "GPU-a",
                "index": 0,
                "name": HOSTILE,
                "total_bytes": 24 * GIB,
                "used_bytes": 20 * GIB,
                "free_bytes": 4 * GIB,
                "used_percent": 83.3,
            },
            {
                "uuid": "GPU-b",
                "index": 1,
                "name": "second",
                "total_bytes": 16 * GIB,
                "used_bytes": GIB,
                "free_bytes": 15 * GIB,
                "used_percent": 6.3,
            },
        ],
        "ollama": [
            {
                **service,
                "key": "ollama/" + HOSTILE,
                "name": HOSTILE,
                "reachable": True,
                "error": None,
                "vram_bytes": 5 * GIB,
                "gpu_uuids": ["GPU-a"],
                "models": [
                    {
                        "name": HOSTILE,
                        "size_bytes": 8 * GIB,
                        "size_vram_bytes": 5 * GIB,
                        "gpu_percent": 62.5,
                        "expires_at": None,
                    }
                ],
                "vram": "5.0 GiB",
            }
        ],
        "comfyui": [
            {
                **service,
                "key": "comfyui/c",
                "name": "c",
                "reachable": False,
                "error": HOSTILE,
                "vram_bytes": 12 * GIB,
                "gpu_uuids": ["GPU-a"],
                "queue": {"running": 1, "pending": 2},
                "vram": "12.0 GiB",
            }
        ],
        "gate": {"error": HOSTILE},
        "recent_actions": [
            {
                "wall_time": 1_800_000_000.0,
                "action": "HealOllama",
                "target": HOSTILE,
                "reason": HOSTILE,
                "ok": False,
                "result": None,
                "before_bytes": None,
                "after_bytes": None,
                "duration_s": 1.0,
                "dry_run": False,
                "detail": HOSTILE,
                "model": HOSTILE,
            }
        ],
    }


def test_service_text_never_becomes_markup() -> None:
    binary = chromium()
    server = StatusServer(
        "127.0.0.1",
        0,
        health=lambda: (True, {}),
        snapshot=hostile_status,
        registry=CollectorRegistry(),
    )
    server.start()
    try:
        html = dump_dom(binary, f"http://127.0.0.1:{server.port}/ui/")
    finally:
        server.close()
    page = parse(html)
    assert page.find("span", id="updated").attrs["data-state"] == "ok"
    assert page.find_all("img") == [], "service text became an element"
    assert page.find("title").text == "vram-supervisor"
    text = page.text
    assert text.count(HOSTILE) >= 9  # shown as text everywhere it appears
    assert "DRY RUN" in page.find("span", id="facts").text
    # Two bars; the tenants are on the first one only.
    first, second = page.find_all("div", data_uuid=None)
    assert [s.attrs["data-tenant"] for s in first.find_all("div", data_tenant=None)] == [
        "ollama/" + HOSTILE,
        "comfyui/c",
        "(other)",
        "(free)",
    ]
    assert [s.attrs["data-tenant"] for s in second.find_all("div", data_tenant=None)] == [
        "(other)",
        "(free)",
    ]
    assert first.find("div", data_tenant="(other)").attrs["data-bytes"] == str(3 * GIB)
    ollama_row, comfy_row = page.find("table", id="tenants").find_all("tr", data_key=None)
    assert "62.5% on GPU (spilled)" in ollama_row.text
    assert ollama_row.find("span", class_="spilled")
    cells = [c for c in comfy_row.children if isinstance(c, Node)]
    assert cells[3].text.startswith(f"no: {HOSTILE}")
    assert cells[4].text == "running 1, 2 pending"
    assert page.find("p", data_gate="error").text == HOSTILE
    [action] = page.find("table", id="actions").find_all("tr", data_action=None)
    assert action.find("td", data_result="failed").text == "failed"


def test_the_page_says_when_status_cannot_be_read() -> None:
    binary = chromium()

    def failing() -> dict[str, Any]:
        raise RuntimeError("snapshot broke")

    server = StatusServer(
        "127.0.0.1", 0, health=lambda: (True, {}), snapshot=failing, registry=CollectorRegistry()
    )
    server.start()
    try:
        page = parse(dump_dom(binary, f"http://127.0.0.1:{server.port}/"))
    finally:
        server.close()
    updated = page.find("span", id="updated")
    assert updated.attrs["data-state"] == "error"
    assert updated.text == "cannot read /status (HTTP 500); retrying"
    assert "no reading yet" in page.find("div", id="gpus").text


def mode_status() -> dict[str, Any]:
    """One GPU; a ComfyUI on the CPU, a Dynamic-VRAM one bounded without NVML, and a
    classic one; as /status gives them."""
    status = hostile_status()
    status["ollama"] = []
    status["gpus"] = status["gpus"][:1]
    base = {
        **status["comfyui"][0],
        "reachable": True,
        "error": None,
        "queue": {"running": 0, "pending": 0},
        "gpu_uuids": [],
        "vram_measured": False,
        "vram_is_estimate": False,
    }
    status["comfyui"] = [
        {**base, "key": "comfyui/cpu", "name": "cpu", "vram_bytes": 0, "mode": "cpu",
         "version": "0.38.1", "device_type": "cpu"},
        {**base, "key": "comfyui/dyn", "name": "dyn", "vram_bytes": 8 * GIB,
         "mode": "dynamic-vram", "version": "0.38.1", "device_type": "cuda",
         "vram_is_estimate": True},
        {**base, "key": "comfyui/old", "name": "old", "vram_bytes": 6 * GIB, "mode": "classic",
         "version": "0.3.64", "device_type": "cuda"},
    ]  # fmt: skip
    return status


def test_comfyui_modes_and_estimates_show() -> None:
    """A CPU ComfyUI says so instead of "0 B" and is not drawn on the GPU; a Dynamic-VRAM
    figure bounded from the whole GPU is marked as an estimate in the table and the bar."""
    binary = chromium()
    server = StatusServer(
        "127.0.0.1",
        0,
        health=lambda: (True, {}),
        snapshot=mode_status,
        registry=CollectorRegistry(),
    )
    server.start()
    try:
        page = parse(dump_dom(binary, f"http://127.0.0.1:{server.port}/ui/"))
    finally:
        server.close()
    cpu, dyn, old = page.find("table", id="tenants").find_all("tr", data_key=None)
    cpu_vram, dyn_vram, old_vram = (
        [c for c in row.children if isinstance(c, Node)][5] for row in (cpu, dyn, old)
    )
    assert cpu_vram.text.startswith("on the CPU, no VRAM")
    assert "0 B" not in cpu_vram.text
    assert cpu_vram.find("div", data_mode="cpu").text == "ComfyUI 0.38.1, on the CPU"
    assert dyn_vram.text.startswith("8.0 GiB (estimate)")
    assert dyn_vram.attrs["data-estimate"] == "true"
    assert "Dynamic VRAM, cuda; estimated from the whole GPU (no NVML)" in dyn_vram.text
    assert old_vram.text.startswith("6.0 GiB") and "estimate" not in old_vram.text
    assert old_vram.find("div", data_mode="classic").text == "ComfyUI 0.3.64, classic VRAM, cuda"
    [bar] = page.find_all("div", data_uuid=None)
    segments = bar.find_all("div", data_tenant=None)
    assert [s.attrs["data-tenant"] for s in segments] == [
        "comfyui/dyn",
        "comfyui/old",
        "(other)",
        "(free)",
    ]
    assert segments[0].attrs["data-estimate"] == "true"
    assert bar.find("span", data_legend="comfyui/dyn").text.endswith("dyn 8.0 GiB (estimate)")


def other_kinds_status() -> dict[str, Any]:
    """One GPU; a llama-server whose one model runs partly on the CPU, and an idle A1111."""
    status = mode_status()
    status["comfyui"] = []
    common = {
        "url": "http://127.0.0.1:1",
        "container_id": None,
        "running": True,
        "state": "answers",
        "health": "none",
        "reachable": True,
        "failed_checks": 0,
        "error": None,
        "priority": 0,
        "gpu_uuids": [],
    }
    status["model_servers"] = [
        {
            **common,
            "key": "llama-server/llama",
            "name": "llama",
            "role": "llama-server",
            "kind": "llama-server",
            "vram_bytes": 6 * GIB,
            "vram": "6.0 GiB",
            "mode": "router",
            "can_unload": True,
            "busy": None,
            "models": [{"name": "qwen", "state": "loaded", "busy": None, "size_bytes": 9 * GIB}],
            "spilled": {"model": "qwen", "gpu_percent": 66.7},
        },
    ]
    status["job_servers"] = [
        {**common, "key": "sd-webui/webui", "name": "webui", "role": "sd-webui",
         "kind": "sd-webui", "vram_bytes": 5 * GIB, "vram": "5.0 GiB", "mode": "a1111",
         "can_free": True, "busy": False, "queued": 0, "models": ["sd_xl_base_1.0"]},
    ]  # fmt: skip
    return status


def test_tenants_of_other_kinds_show_with_their_state() -> None:
    binary = chromium()
    server = StatusServer(
        "127.0.0.1",
        0,
        health=lambda: (True, {}),
        snapshot=other_kinds_status,
        registry=CollectorRegistry(),
    )
    server.start()
    try:
        page = parse(dump_dom(binary, f"http://127.0.0.1:{server.port}/ui/"))
    finally:
        server.close()
    llama, webui = page.find("table", id="tenants").find_all("tr", data_key=None)
    assert llama.attrs["data-key"] == "llama-server/llama"
    assert "llama-server" in llama.text and "read before an unload" in llama.text
    assert "router; idle models can be unloaded" in llama.text
    assert "qwen (loaded)" in llama.text and "66.7% on GPU (spilled)" in llama.text
    assert llama.find("span", class_="spilled")
    assert "sd-webui" in webui.text and "idle" in webui.text
    assert "a1111; freed between jobs" in webui.text and "sd_xl_base_1.0" in webui.text
    [bar] = page.find_all("div", data_uuid=None)
    assert [s.attrs["data-tenant"] for s in bar.find_all("div", data_tenant=None)] == [
        "llama-server/llama",
        "sd-webui/webui",
        "(other)",
        "(free)",
    ]
