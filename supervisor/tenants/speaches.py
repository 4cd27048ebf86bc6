"""speaches (tenants.md §7, formerly faster-whisper-server): a speech-to-text and
text-to-speech model server of the OpenAI audio API.

Loaded models from `GET /api/ps`; one is unloaded with `DELETE /api/ps/{model_id}`,
which the server itself refuses (409) while the model serves a request, so an idle model
can be unloaded for a job server without cutting anything off. It also unloads a model by
itself after its TTL (`STT_MODEL_TTL`, `TTS_MODEL_TTL`, 300 s by default).
"""

from __future__ import annotations

from supervisor.tenants import Capability, ModelRoutes, TenantKind

KIND = TenantKind(
    role="speaches",
    title="speaches",
    default_port=8000,
    capabilities=frozenset({Capability.LOADS_MODELS}),
    client="supervisor.clients.speaches:SpeachesClient",
    summary="model server (speech to text, text to speech); idle models unloaded for a job "
    "server (it refuses to unload a model in use)",
    routes=ModelRoutes(body_paths=("/v1/audio/speech",), form_paths=("/v1/audio/transcriptions",)),
)
