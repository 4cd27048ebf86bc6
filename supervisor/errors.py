"""The error tree. Adapters catch library exceptions and raise these, `from` the cause."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every error the supervisor raises on purpose."""


class ConfigError(SupervisorError):
    """A bad environment variable or option. The message names it and what is accepted."""

    def __init__(self, name: str, value: str, accepted: str) -> None:
        self.name = name
        self.value = value
        self.accepted = accepted
        super().__init__(f"{name}={value!r} is not valid: expected {accepted}")


class LabelError(SupervisorError):
    """A bad `vram-supervisor.*` label on a container."""

    def __init__(self, container: str, label: str, value: str, accepted: str) -> None:
        self.container = container
        self.label = label
        self.value = value
        self.accepted = accepted
        super().__init__(
            f"container {container}: label {label}={value!r} is not valid: expected {accepted};"
            " the container is ignored"
        )


class ServiceError(SupervisorError):
    """Ollama or ComfyUI did not answer usefully: down, slow, an HTTP error or garbage."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        super().__init__(f"{service}: {message}")


class DockerUnavailable(SupervisorError):
    """The Docker daemon cannot be reached (or an API call on it failed)."""


class NvmlUnavailable(SupervisorError):
    """NVML cannot be used: no libnvidia-ml, no driver, or an NVML call failed."""
