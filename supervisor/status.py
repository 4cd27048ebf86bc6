"""The `status` command's data and table: ask the running supervisor for its snapshot
(GET /status on VRAM_HTTP_PORT), else observe once, and render it for a human.

Stdlib only at import (it is imported by `cli`, which must start fast); the one-shot
observation builds the real adapters only when no supervisor answered.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from supervisor.config import Settings
from supervisor.units import format_bytes


def local_url(settings: Settings, path: str) -> str | None:
    """The URL of this host's supervisor endpoint (VRAM_HTTP_HOST/PORT); None when off.
    A wildcard bind address is reached over loopback."""
    if settings.http_port is None:
        return None
    host = settings.http_host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}{path}"


def get_json(url: str, timeout_s: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def fetch_snapshot(
    settings: Settings, observe_once: Callable[[], dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """(where it came from, the snapshot): the running supervisor's, else `observe_once()`."""
    url = local_url(settings, "/status")
    if url is not None:
        snapshot: dict[str, Any] | None
        try:
            snapshot = get_json(url)
        except (OSError, ValueError):
            snapshot = None
        if snapshot is not None:
            return f"the running supervisor at {url}", snapshot
    where = (
        f"no running supervisor answered at {url}"
        if url is not None
        else "VRAM_HTTP_PORT=0: no running supervisor to ask"
    )
    return f"a one-shot observation ({where})", observe_once()


_MODE_WORDS = {
    "dynamic-vram": "Dynamic VRAM (weights outside torch's figures)",
    "classic": "classic VRAM",
    "cpu": "runs on the CPU: holds no VRAM",
    "unknown": "mode unknown (no /system_stats reading)",
}


def _comfy_kind(c: dict[str, Any]) -> str:
    """The second line of a ComfyUI in the table: version, memory mode and device."""
    mode = c.get("mode") or "unknown"
    text = f"ComfyUI {c.get('version') or '(version unknown)'}, {_MODE_WORDS.get(mode, mode)}"
    if c.get("device_type"):
        text += f", device {c['device_type']}: {c.get('device_name') or 'unnamed'}"
    if mode == "dynamic-vram" and c.get("vram_bytes") is not None and not c.get("vram_measured"):
        text += " (VRAM bounded from the device figures: no NVML)"
    return text


def render_status(snap: dict[str, Any]) -> str:
    """The human table of `status`."""
    fb = format_bytes

    lines: list[str] = []
    docker = snap.get("docker", {})
    lines.append(
        f"Docker: {docker.get('state')}   VRAM source: {snap.get('vram_source')}   "
        f"priority: {snap.get('priority')}" + ("   DRY RUN" if snap.get("dry_run") else "")
    )
    lines.append("")
    lines.append("GPUs:")
    for g in snap.get("gpus", []):
        lines.append(
            f"  [{g['index']}] {g['name']}: {fb(g['used_bytes'])} used of "
            f"{fb(g['total_bytes'])} ({g['used_percent']}%), {fb(g['free_bytes'])} free"
        )
    if not snap.get("gpus"):
        lines.append("  (unknown: no NVML and no ComfyUI reading)")
    lines.append("")
    lines.append("Services:")
    servers = snap.get("model_servers", [])
    job_servers = snap.get("job_servers", [])
    for s in [*snap.get("ollama", []), *snap.get("comfyui", []), *servers, *job_servers]:
        state = s.get("state") or ("running" if s["running"] else "stopped")
        reach = "answers" if s["reachable"] else f"no answer ({s.get('error')})"
        if state == "answers":  # a fixed URL: no container to be running
            state = "fixed URL"
        health = "" if s["health"] == "none" else f", {s['health']}"
        lines.append(f"  {s['key']:<28} {state}{health}, {reach}   {s['url']}")
    for o in snap.get("ollama", []):
        if o.get("version"):
            fit = o.get("fit_target_bytes") or 0
            lines.append(
                f"  {o['key']:<28} Ollama {o['version']}: {o.get('generation')}"
                + (f", keeps {fb(fit)} free when it loads" if fit else "")
            )
    lines.append("")
    lines.append("Ollama models:")
    any_model = False
    for o in snap.get("ollama", []):
        for m in o.get("models") or []:
            any_model = True
            spill = "" if m["gpu_percent"] >= 100 else "   <- spilled to CPU"
            lines.append(
                f"  {m['name']:<32} size {fb(m['size_bytes']):>9}  on GPU "
                f"{fb(m['size_vram_bytes']):>9}  {m['gpu_percent']:>5}%{spill}"
            )
    if not any_model:
        lines.append("  (none loaded)")
    if servers:
        lines.append("")
        lines.append("Other model servers:")
    for m in servers:
        how = m.get("mode") or ""
        how += ("; " if how else "") + (
            "idle models unloadable" if m.get("can_unload") else "no unload: observed only"
        )
        lines.append(f"  {m['key']:<28} {m['kind']}, VRAM {fb(m.get('vram_bytes'))}   {how}")
        for x in m.get("models") or []:
            busy = {True: "busy", False: "idle", None: "busy unknown"}[x.get("busy")]
            size = f"  size {fb(x['size_bytes'])}" if x.get("size_bytes") else ""
            lines.append(f"    {x['name']:<30} {x['state']:<9} {busy}{size}")
        if m.get("models") == []:
            lines.append("    (no model loaded)")
        if m.get("spilled"):
            sp = m["spilled"]
            lines.append(
                f"    {sp['model']} runs partly on the CPU: {sp['gpu_percent']}% of its "
                "weights on the GPU   <- spilled"
            )
    if job_servers:
        lines.append("")
        lines.append("Other job servers:")
    for j in job_servers:
        busy = {True: "has work", False: "idle", None: "work unknown"}[j.get("busy")]
        how = (j.get("mode") or "") + ("; " if j.get("mode") else "")
        how += "freed between jobs" if j.get("can_free") else "no free call: observed only"
        lines.append(f"  {j['key']:<28} {j['kind']}, VRAM {fb(j.get('vram_bytes'))}   {busy}")
        lines.append(f"  {'':<28} {how}")
    lines.append("")
    lines.append("ComfyUI:")
    for c in snap.get("comfyui", []):
        q = c.get("queue")
        queue = f"{q['running']} running, {q['pending']} pending" if q else "queue unknown"
        lines.append(f"  {c['name']:<28} VRAM {fb(c.get('vram_bytes')):>9}   {queue}")
        lines.append(f"  {'':<28} {_comfy_kind(c)}")
    if not snap.get("comfyui"):
        lines.append("  (none)")
    lines.append("")
    lines.append("Recent actions:")
    for a in snap.get("recent_actions", [])[-10:]:
        what = a["action"] + (f" {a['stage']}" if "stage" in a else "")
        what += f" {a['model']}" if "model" in a else ""
        result = "dry run" if a["dry_run"] else a["result"] or ("ok" if a["ok"] else "failed")
        lines.append(
            f"  {what} {a['target']}: {result}, {fb(a['before_bytes'])} -> "
            f"{fb(a['after_bytes'])} in {a['duration_s']} s ({a['reason']})"
        )
    if not snap.get("recent_actions"):
        lines.append("  (none)")
    return "\n".join(lines)
