"""llama-swap (tenants.md §2): a model server that starts one upstream process per model.

Running models from `GET /running`; unload one with `POST /api/models/unload/{model}`,
which blocks until it stopped but does not wait for its in-flight requests (they are cut
off), so a model is unloaded only after its upstream's `/slots` says no request runs;
an upstream without `/slots` is never unloaded (busy unknown).
"""

from __future__ import annotations

from supervisor.tenants import OPENAI_BODY_ROUTES, Capability, ModelRoutes, TenantKind

KIND = TenantKind(
    role="llama-swap",
    title="llama-swap",
    default_port=8080,
    capabilities=frozenset({Capability.LOADS_MODELS}),
    client="supervisor.clients.llama_swap:LlamaSwapClient",
    summary="model server (one upstream per model); idle models unloaded for a job server",
    routes=ModelRoutes(
        body_paths=(*OPENAI_BODY_ROUTES, "/completion", "/infill", "/v1/images/generations"),
        query_paths=("/props", "/v1/audio/voices"),
        form_paths=("/v1/audio/transcriptions", "/v1/images/edits"),
    ),
)
