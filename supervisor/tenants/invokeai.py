"""InvokeAI (tenants.md §5): a job server with a session queue. Busy from its queue status
(`/api/v1/queue/default/status`: processing, or items in progress or pending); freed with
`POST /api/v2/models/empty_model_cache`, which waits for the model cache's lock and drops
every model that no running node holds locked; its own figures are the RAM cache's only
(no VRAM figure), so NVML measures what it holds."""

from __future__ import annotations

from supervisor.tenants import Capability, TenantKind

KIND = TenantKind(
    role="invokeai",
    title="InvokeAI",
    default_port=9090,
    capabilities=frozenset({Capability.RUNS_JOBS}),
    client="supervisor.clients.invokeai:InvokeAIClient",
    summary="job server (session queue); its model cache emptied while its queue is idle",
)
