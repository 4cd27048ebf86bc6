"""HTTP clients for the services the supervisor steers (Ollama, ComfyUI).

Each raises only `errors.ServiceError`; see the module docs for the retry policy.
"""

from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient, normalise_model_name

__all__ = ["ComfyClient", "OllamaClient", "normalise_model_name"]
