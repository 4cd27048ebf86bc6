"""Stable Diffusion web UIs with the `/sdapi/v1` API (tenants.md §4, §6): AUTOMATIC1111,
Forge (and Forge classic/Neo) and SD.Next, told apart by what their API shows. Busy from
`/sdapi/v1/progress` (`state.job_count`; Forge also `/internal/pending-tasks`) or SD.Next's
`/sdapi/v1/status`; its own torch figure from `/sdapi/v1/memory`; freed with
`POST /sdapi/v1/unload-checkpoint` only while idle (it does not wait for a running job).
A1111's free parks the weights in CPU RAM: they are put back with
`POST /sdapi/v1/reload-checkpoint` once the GPU has room (`JobState.parked_bytes`).
A1111 and Forge serve the API only when started with `--api` (or `--nowebui`)."""

from __future__ import annotations

from supervisor.tenants import Capability, TenantKind

KIND = TenantKind(
    role="sd-webui",
    title="SD web UI",
    default_port=7860,
    capabilities=frozenset({Capability.RUNS_JOBS}),
    client="supervisor.clients.sd_webui:SdWebUiClient",
    summary="job server (A1111, Forge, SD.Next); its checkpoint unloaded while idle",
)
