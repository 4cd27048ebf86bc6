"""Docker discovery and control: the `DockerApi` port implemented with the docker SDK.

What it does: lists the containers labelled `vram-supervisor.role` (running or not) as
`ContainerState`s, reads a container's host PIDs (`docker top`) and restarts a container.

Policy:
- The SDK client is built lazily on the first call (`docker.from_env()` needs a live daemon,
  api-facts gotcha 21) and dropped after a failure that is not an HTTP answer, so the next
  call builds a fresh one. There are no retries here: each call is one attempt and the
  daemon's next pass is the retry. A restart in particular is never repeated behind the
  caller's back.
- Every docker/requests/socket exception becomes `DockerUnavailable` from its cause, its
  frames released first (`release_failure`: else each failed connect keeps a socket open).
- A container with a bad label is left out and logged ONCE per container, label and value
  (not every pass); an unknown `vram-supervisor.*` label is logged once as well.
- The URL of a container without `vram-supervisor.url` follows `labels.derive_url`. To know
  which networks the supervisor shares with a service, it finds its own container from
  /proc/self/mountinfo, /proc/self/cgroup or HOSTNAME (none when it runs on the host).
- `container_pids` of a container that is not running is () (Docker answers 409).
"""

from __future__ import annotations

import math
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from loguru import logger

from supervisor.errors import DockerUnavailable, LabelError
from supervisor.labels import ROLE, derive_url, parse_labels, parse_role, unknown_labels
from supervisor.model import ContainerState, Role, ServiceHealth
from supervisor.ollama_profile import env_subset

ClientFactory = Callable[[], docker.DockerClient]

# What a failed call to the daemon can raise through the SDK.
DOCKER_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
)

_ID64 = re.compile(r"\b([0-9a-f]{64})\b")
_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")
# Mount points Docker (and Podman) bind from the container's own state directory.
_OWN_MOUNTS = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
_HEALTH = {h.value: h for h in ServiceHealth}


# Set by Swarm on the container of every service task.
SWARM_TASK_LABEL = "com.docker.swarm.task.id"
SWARM_TASK_BLOCK = (
    "it is a Swarm task (Swarm would count a restart as a failed task and start a second "
    "container beside it)"
)


def release_failure(exc: BaseException) -> None:
    """Lets go of what a failed SDK call's tracebacks hold, now.

    The SDK's unix-socket connection makes its socket in a local variable and keeps it only
    once `connect()` succeeds; when the daemon is down, the socket stays referenced from
    the failed frame, which the exception chain keeps in reference cycles that only a full
    garbage collection breaks. Each failed attempt (each retry while the daemon is down or
    restarting) so left one descriptor open for as long as the next full collection took.
    Clearing the frames of the whole chain closes it at once; the messages and the
    traceback lines stay for the log."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def default_client_factory(base_url: str | None, timeout_s: float) -> ClientFactory:
    """Builds a client for `base_url`, or from DOCKER_HOST & co when it is None."""

    def build() -> docker.DockerClient:
        if base_url:
            return docker.DockerClient(base_url=base_url, timeout=timeout_s)
        return docker.from_env(timeout=timeout_s)

    return build


def find_own_container_id(
    *,
    proc_self: Path = Path("/proc/self"),
    hostname: str | None = None,
    dockerenv: Path = Path("/.dockerenv"),
) -> str | None:
    """The id (or 12-hex prefix) of the container this process runs in; None on the host.

    Tries, in order: the state-directory mounts in mountinfo (works with cgroup v2), a
    64-hex id in the cgroup paths (cgroup v1), and HOSTNAME when /.dockerenv exists and it
    looks like Docker's default hostname (the short id). A wrong guess is harmless: the
    adapter then finds no such container and treats the supervisor as outside Docker.
    """
    try:
        for line in (proc_self / "mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] in _OWN_MOUNTS:
                match = _ID64.search(fields[3])
                if match:
                    return match.group(1)
    except OSError:
        pass
    try:
        for line in (proc_self / "cgroup").read_text().splitlines():
            match = _ID64.search(line.rpartition(":")[2])
            if match:
                return match.group(1)
    except OSError:
        pass
    if hostname is None:
        hostname = os.environ.get("HOSTNAME", "")
    if _SHORT_ID.match(hostname) and dockerenv.exists():
        return hostname
    return None


@dataclass(frozen=True)
class _Self:
    """Where the supervisor sits, as far as URLs are concerned."""

    shared_networks: frozenset[str] = frozenset()
    host_address: str = "127.0.0.1"


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def gpu_ids(device_requests: Any) -> tuple[str, ...]:
    """GPUs granted by `HostConfig.DeviceRequests` (api-facts 3.4, gotcha 17).

    DeviceIDs as given (NVML indices like "0" or "GPU-<uuid>"); `--gpus N` grants the first
    N ("0".."N-1"); `--gpus all` (Count -1), no GPU request or anything unreadable -> ()
    which means unknown/all.
    """
    if not isinstance(device_requests, list):
        return ()
    ids: list[str] = []
    for request in device_requests:
        request = _dict(request)
        capabilities = request.get("Capabilities") or []
        is_gpu = request.get("Driver") == "nvidia" or any(
            "gpu" in caps for caps in capabilities if isinstance(caps, list)
        )
        if not is_gpu:
            continue
        device_ids = request.get("DeviceIDs") or []
        count = request.get("Count") or 0
        if device_ids:
            ids.extend(str(i) for i in device_ids)
        elif isinstance(count, int) and count > 0:
            ids.extend(str(i) for i in range(count))
        else:
            return ()  # Count -1: all GPUs
    return tuple(dict.fromkeys(ids))


class DockerAdapter:
    """`ports.DockerApi` on the docker SDK. Thread-safe: calls may come from several threads."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        client_factory: ClientFactory | None = None,
        own_container_id: Callable[[], str | None] = find_own_container_id,
    ) -> None:
        self._factory = client_factory or default_client_factory(base_url, timeout_s)
        self._find_self = own_container_id
        self._own_id: str | None = None
        self._own_id_known = False
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._warned: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------------ client lifecycle

    def _get_client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - must not mask the real error
                logger.debug(f"Closing the Docker client: {exc}")

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turns SDK failures into DockerUnavailable; drops the client unless the daemon
        answered (an APIError is an HTTP answer, so the connection is fine)."""
        try:
            yield
        except DOCKER_ERRORS as exc:
            if not isinstance(exc, docker.errors.APIError):
                self._drop_client()
            release_failure(exc)
            raise DockerUnavailable(f"Docker {what} failed: {exc}") from exc

    def close(self) -> None:
        self._drop_client()

    # ------------------------------------------------------------------ DockerApi

    def ping(self) -> None:
        with self._calling("ping"):
            self._get_client().ping()

    def list_services(self) -> tuple[ContainerState, ...]:
        """Every container labelled `vram-supervisor.role`, running or not, sorted by name.
        Containers with a bad label are left out (logged once)."""
        with self._calling("container list"):
            client = self._get_client()
            containers = client.containers.list(
                all=True, filters={"label": ROLE.key}, ignore_removed=True
            )
            where = self._where(client)
        states = (self._state(c.attrs, where) for c in containers)
        return tuple(sorted((s for s in states if s is not None), key=lambda s: s.spec.name))

    def container_pids(self, container_id: str) -> tuple[int, ...]:
        with self._calling(f"top of container {container_id[:12]}"):
            try:
                top = self._get_client().containers.get(container_id).top()
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # "is not running"
                    return ()
                raise
        try:
            titles = top["Titles"]
            column = titles.index("PID")
            return tuple(int(row[column]) for row in top.get("Processes") or ())
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
            raise DockerUnavailable(
                f"Docker top of container {container_id[:12]} gave an unreadable answer: {top!r}"
            ) from exc

    def role_label(self, container_id: str) -> str | None:
        with self._calling(f"inspect of container {container_id[:12]}"):
            try:
                attrs = self._get_client().api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
        labels = ((attrs or {}).get("Config") or {}).get("Labels") or {}
        value = labels.get(ROLE.key) if isinstance(labels, dict) else None
        return value.strip().lower() if isinstance(value, str) else None

    def restart(self, container_id: str, timeout_s: float) -> None:
        with self._calling(f"restart of container {container_id[:12]}"):
            # The API takes whole seconds; round up so the stop timeout is never shortened.
            seconds = max(0, math.ceil(timeout_s))
            self._get_client().containers.get(container_id).restart(timeout=seconds)

    # ------------------------------------------------------------------ helpers

    def _warn_once(self, key: tuple[str, ...], message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message)

    def _where(self, client: docker.DockerClient) -> _Self:
        """The supervisor's own networks (re-read each pass: `docker network connect`)."""
        if not self._own_id_known:
            self._own_id = self._find_self()
            self._own_id_known = True
        if self._own_id is None:
            return _Self()
        try:
            attrs = client.containers.get(self._own_id).attrs
        except docker.errors.NotFound:
            self._warn_once(
                ("self", self._own_id),
                f"This process looks like container {self._own_id[:12]}, which Docker does "
                "not know; URLs are derived as for a supervisor outside Docker",
            )
            return _Self()
        if _dict(attrs.get("HostConfig")).get("NetworkMode") == "host":
            return _Self()
        networks = _dict(_dict(attrs.get("NetworkSettings")).get("Networks"))
        gateway = next(
            (str(_dict(n).get("Gateway")) for n in networks.values() if _dict(n).get("Gateway")),
            "127.0.0.1",
        )
        return _Self(shared_networks=frozenset(networks), host_address=gateway)

    def _state(self, attrs: Mapping[str, Any], where: _Self) -> ContainerState | None:
        name = str(attrs.get("Name") or attrs.get("Id", "?")[:12]).lstrip("/")
        config = _dict(attrs.get("Config"))
        labels = {str(k): str(v) for k, v in _dict(config.get("Labels")).items()}
        host_config = _dict(attrs.get("HostConfig"))
        state = _dict(attrs.get("State"))
        networks = {
            str(net): str(_dict(info).get("IPAddress") or "")
            for net, info in _dict(_dict(attrs.get("NetworkSettings")).get("Networks")).items()
        }
        for warning in unknown_labels(name, labels):
            self._warn_once(("unknown", name, warning), warning)
        try:
            role = parse_role(name, labels)
            if role is None:  # the label vanished between list and inspect
                return None
            url = derive_url(
                role,
                network_mode=str(host_config.get("NetworkMode") or ""),
                networks=networks,
                shared_networks=where.shared_networks,
                container_name=name,
                host_address=where.host_address,
            )
            spec = parse_labels(name, labels, default_url=url)
        except LabelError as exc:
            self._warn_once(("label", name, exc.label, exc.value), str(exc))
            return None
        if spec is None:
            return None
        if SWARM_TASK_LABEL in labels:
            # Measured on Engine 20.10: `docker restart` of a task's container brings it
            # back, but Swarm marks the task failed and starts a second container beside it.
            if spec.restart_allowed:
                self._warn_once(
                    ("swarm-restart", name),
                    f"container {name} is a Swarm task: the restart fallback is off for it "
                    "whatever vram-supervisor.restart says (Swarm would count the restart "
                    "as a failed task and start a second container beside it)",
                )
            spec = replace(spec, restart_allowed=False, restart_block=SWARM_TASK_BLOCK)
        env = config.get("Env")
        spec = replace(
            spec,
            container_id=str(attrs.get("Id", "")),
            gpu_uuids=gpu_ids(host_config.get("DeviceRequests")),
            env=env_subset([str(e) for e in env])
            if spec.role == Role.OLLAMA and isinstance(env, list)
            else (),
        )
        health = _HEALTH.get(str(_dict(state.get("Health")).get("Status")), ServiceHealth.NONE)
        pid = state.get("Pid")
        return ContainerState(
            spec=spec,
            status=str(state.get("Status") or "unknown"),
            health=health,
            pid=pid if isinstance(pid, int) and pid > 0 else 0,
        )
