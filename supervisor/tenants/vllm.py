"""vLLM's OpenAI server (tenants.md §3): a model server of one model that sleeps.

Started with `--enable-sleep-mode` and env `VLLM_SERVER_DEV_MODE=1`, it can be put to
sleep (`POST /sleep?level=1`: the weights go to CPU RAM, the KV cache is dropped, all but
its CUDA context is given back) and woken (`POST /wake_up`); without them the sleep routes
answer 404 and it is observed only. Its "unload" is a sleep: the process and its port stay.
Requests are read from `/metrics` (running and waiting gauges), so a model that serves or
queues a request is never put to sleep. Engines that queue requests arriving while asleep
(never waking by themselves) are woken by the supervisor once room was made; older engines
crash on such a request, so they are never put to sleep (see the client).
"""

from __future__ import annotations

from supervisor.tenants import OPENAI_BODY_ROUTES, Capability, ModelRoutes, TenantKind

KIND = TenantKind(
    role="vllm",
    title="vLLM",
    default_port=8000,
    capabilities=frozenset({Capability.LOADS_MODELS, Capability.SLEEPS}),
    client="supervisor.clients.vllm:VllmClient",
    summary="model server (one model); with sleep mode an idle model is put to sleep for a "
    "job server and woken when requests wait for it; without: observed only",
    routes=ModelRoutes(body_paths=OPENAI_BODY_ROUTES),
)
