"""Docker adapters: discovery and control (`DockerAdapter`), the events stream (`DockerEvents`).

Only this package imports the docker SDK; everything it raises is `DockerUnavailable`.
"""

from supervisor.docker.discovery import DockerAdapter, find_own_container_id
from supervisor.docker.events import DockerEvents

__all__ = ["DockerAdapter", "DockerEvents", "find_own_container_id"]
