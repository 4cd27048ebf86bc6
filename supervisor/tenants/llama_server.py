"""llama.cpp's `llama-server` (tenants.md §1): a model server.

Router mode (started without a model: `/models` lists models with their status, each
loaded model a child process with its own PID) unloads a model with
`POST /models/unload`, which returns before the memory is released; a model is busy while
one of its `/slots?model=` is processing, and an unload cuts its requests off, so a busy
model is never unloaded. Single-model mode has no unload: it is observed (what it holds,
whether it is busy), never unloaded.
"""

from __future__ import annotations

from supervisor.tenants import OPENAI_BODY_ROUTES, Capability, ModelRoutes, TenantKind

KIND = TenantKind(
    role="llama-server",
    title="llama-server",
    default_port=8080,
    capabilities=frozenset({Capability.LOADS_MODELS}),
    client="supervisor.clients.llama_server:LlamaServerClient",
    summary="model server (llama.cpp); router mode: idle models unloaded for a job server; "
    "single-model mode: observed only",
    routes=ModelRoutes(
        body_paths=(*OPENAI_BODY_ROUTES, "/completion", "/completions", "/infill", "/embedding*"),
        query_paths=("/props", "/slots", "/metrics"),
    ),
)
