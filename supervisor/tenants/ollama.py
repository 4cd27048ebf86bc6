"""Ollama: a model server. Its models are read from /api/ps (with their GPU share, so a
spilled model is seen and healed), unloaded with `keep_alive: 0` (Ollama defers it until
in-flight requests end), and its loads are gated (api-facts §1, api-facts-2026 §1)."""

from __future__ import annotations

from supervisor.tenants import OPENAI_BODY_ROUTES, Capability, ModelRoutes, TenantKind

KIND = TenantKind(
    role="ollama",
    title="Ollama",
    default_port=11434,
    capabilities=frozenset({Capability.LOADS_MODELS}),
    client="supervisor.clients.ollama:OllamaClient",
    summary="model server; idle models unloaded for a job server, spilled models healed, "
    "loads gated",
    routes=ModelRoutes(
        body_paths=(
            "/api/generate",
            "/api/chat",
            "/api/embed",
            "/api/embeddings",
            *OPENAI_BODY_ROUTES,
        )
    ),
)
