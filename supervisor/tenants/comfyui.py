"""ComfyUI: a job server. Busy from /queue, its memory from /system_stats (classic,
Dynamic VRAM or CPU), freed between prompts with /free (soft, then hard), restarted
through Docker only as the last resort and never during a prompt (api-facts §2,
api-facts-2026 §2-4)."""

from __future__ import annotations

from supervisor.tenants import Capability, TenantKind

KIND = TenantKind(
    role="comfyui",
    title="ComfyUI",
    default_port=8188,
    capabilities=frozenset({Capability.RUNS_JOBS, Capability.RESTARTABLE}),
    client="supervisor.clients.comfyui:ComfyClient",
    summary="job server; freed between prompts (soft, hard, restart as the last resort)",
)
