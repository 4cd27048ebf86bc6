"""Observe: read Docker, every running service's API and NVML into one `Observation`.

Policy:
- Each call re-reads everything it needs, so a lost or duplicated Docker event cannot
  corrupt state; an event only marks the Docker listing stale (`mark_docker_stale`).
- Docker is listed when an event said something changed, and at least once per
  VRAM_CHECK_INTERVAL. When Docker cannot be reached the last known services are kept and
  Docker is retried every call; observing never fails for it.
- No request goes to a stopped container. Each running service is read in parallel, with
  its own count of consecutive failures. Every failure is logged, with the log noise backed
  off (1st, 2nd, 4th, 8th ... failure in a row).
- VRAM figures come from NVML when it works, else from the services' APIs; the source is
  logged once and whenever it changes. A service whose processes NVML does not list, or
  lists without a memory figure (WSL2, WDDM), is read from its API even under NVML.
  `docker top` runs only when a new GPU process or another set of containers appears.
- GPUs Docker granted by index are turned into NVML UUIDs (`resolve_gpu_ids`); one that
  cannot be resolved means every GPU, with a warning once per container and id.
- It also keeps `targets`: the running services the Actor may act on.
- Each ComfyUI's version and memory mode (classic, Dynamic VRAM, CPU) are read from its
  /system_stats on every pass and logged when first seen and whenever they change: a
  recreated container (an upgrade) is detected again. Under Dynamic VRAM without an NVML
  figure, what it holds is bounded from the device (`comfy_dynamic_bound`), because its
  torch figures do not show its weights. That figure is marked `vram_is_estimate` (other
  GPU users count in it), and is left out (None) in a pass where an Ollama's /api/ps
  failed, whose weights would otherwise count as ComfyUI's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from loguru import logger

from supervisor.config import Settings
from supervisor.errors import DockerUnavailable, NvmlUnavailable
from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    ComfyStats,
    GpuMemory,
    JobServerObservation,
    ModelServerObservation,
    Observation,
    OllamaModel,
    OllamaObservation,
    Role,
    ServedState,
    ServiceHealth,
    ServiceSpec,
    ServiceStatus,
    VramSource,
)
from supervisor.ollama_profile import OllamaProfile, ollama_profile
from supervisor.policy import DEAD_API_CHECKS
from supervisor.ports import (
    ComfyApi,
    DockerApi,
    GpuProcess,
    GpuReader,
    ModelServerApi,
    OllamaApi,
    Targets,
)
from supervisor.reads import Read, Service, close_quietly, contract_break, noisy, read_all
from supervisor.tenants import Capability, kind_of, make_client
from supervisor.vram.api import (
    comfy_dynamic_bound,
    comfy_mode,
    comfy_vram_bytes,
    describe_comfy,
    gpus_from_api,
    ollama_vram_bytes,
)
from supervisor.vram.attribution import Attribution, attribute


def unresolved_gpu_ids(
    ids: tuple[str, ...], gpus: tuple[GpuMemory, ...], source: VramSource
) -> tuple[str, ...]:
    """The granted ids `resolve_gpu_ids` cannot turn into a GPU: under NVML, anything that
    is neither a "GPU-<uuid>" nor the index of a GPU NVML shows (an index beyond them, a
    MIG id)."""
    if source is not VramSource.NVML:
        return ()
    indices = {str(g.index) for g in gpus}
    return tuple(i for i in ids if i not in indices and not i.startswith("GPU-"))


def resolve_gpu_ids(
    ids: tuple[str, ...], gpus: tuple[GpuMemory, ...], source: VramSource
) -> tuple[str, ...]:
    """The GPUs Docker granted (DeviceIDs: NVML indices like "0" or "GPU-<uuid>") as the
    UUIDs the policy and the room maker compare. With NVML an index becomes the UUID of the
    GPU with that index (the supervisor sees every GPU, as the compose files grant it,
    so its indices are the host's); a UUID stays as given (one NVML does not show is a GPU
    none of ours share). An id that cannot be resolved (`unresolved_gpu_ids`) makes it ()
    = all GPUs: a service on a GPU we cannot name is still freed when room is needed,
    rather than silently never. Without NVML the GPUs are not known by UUID (the API
    source has one pseudo GPU): () = all, so that a service is not hidden from the only
    GPU there is."""
    if source is not VramSource.NVML or unresolved_gpu_ids(ids, gpus, source):
        return ()
    by_index = {str(g.index): g.uuid for g in gpus}
    return tuple(dict.fromkeys(by_index.get(i, i) for i in ids))


def _ollama_gpus(ollamas: list[OllamaObservation]) -> tuple[str, ...]:
    """The GPUs Ollama can load onto: the ones Docker granted it (resolved to UUIDs), so
    they are known before its first load, when the gate needs them most; else the GPUs
    where it holds memory; () when neither is known (any GPU)."""
    running = [o for o in ollamas if o.status.is_running]
    if running and all(o.status.spec.gpu_uuids for o in running):
        return tuple(sorted({u for o in running for u in o.status.spec.gpu_uuids}))
    return tuple(sorted({u for o in running for u in o.gpu_uuids}))


# How long a replaced client stays open for threads that took it from an earlier `targets`.
RETIRE_S = 60.0


def _runs_jobs(spec: ServiceSpec) -> bool:
    """A job server of the registry (A1111/Forge, InvokeAI ...), not a model server."""
    return kind_of(spec.role).can(Capability.RUNS_JOBS)


class Observer:
    """Builds one `Observation` per `observe()` from the adapters it owns. `close()`
    closes every client it built and the GPU reader."""

    def __init__(
        self,
        settings: Settings,
        *,
        ollama_client: Callable[[str], OllamaApi],
        comfy_client: Callable[[str], ComfyApi],
        server_client: Callable[[str, str], ModelServerApi] | None = None,
        docker: Callable[[], DockerApi] | None = None,
        gpu: GpuReader | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self._stop = stop  # set: observe() stops waiting for hung reads (`Interrupted`)
        self._docker_factory = docker if settings.needs_docker else None
        self._docker: DockerApi | None = None
        self._gpu = gpu
        self._make_ollama = ollama_client
        self._make_comfy = comfy_client
        # (role, URL) -> the client of a model server of another registry kind
        self._make_server = server_client or (
            lambda role, url: make_client(role, url, timeout_s=settings.request_timeout_s)
        )
        self._clock = clock
        self._wall = wall_clock
        self._services: dict[str, Service] = {}
        self._targets = Targets()
        self._pids: dict[str, tuple[int, ...]] = {}
        self._foreign_pids: set[int] = set()
        self._source: VramSource | None = None
        self._docker_ok: bool | None = None
        self._docker_failures = 0
        self._docker_dirty = True
        self._docker_listed_at: float | None = None
        self._nvml_failures = 0
        self._unresolved_warned: set[tuple[str, str]] = set()  # (service key, GPU id)
        self._profiles_logged: dict[str, str] = {}  # Ollama key -> what the log last said
        self._listed: dict[str, tuple[ServiceSpec, bool, ServiceHealth]] = {}
        # Per ComfyUI key: (container id, version, mode) last logged.
        self._comfy_seen: dict[str, tuple[str | None, str, ComfyMode]] = {}
        self._server_seen: dict[str, tuple[str | None, str, bool]] = {}
        self._retired: list[tuple[float, object]] = []  # (when, client) closed RETIRE_S later
        # Adapter bugs (exceptions outside the contract) already said at ERROR.
        self.broken_seen: set[tuple[str, str]] = set()
        # Fixed endpoints (VRAM_OLLAMA_URL, VRAM_COMFYUI_URL, VRAM_SERVICES): a role's first
        # is named after the role, its further ones role-2, role-3 ...
        self._fixed: list[ServiceSpec] = []
        for role, url in settings.fixed_services:
            count = sum(1 for s in self._fixed if s.role == role)
            name = role if count == 0 else f"{role}-{count + 1}"
            self._fixed.append(ServiceSpec(role=role, name=name, url=url))
        self._fixed_roles = {s.role for s in self._fixed}

    @property
    def uses_docker(self) -> bool:
        """False when both services have fixed URLs: Docker is then never touched."""
        return self._docker_factory is not None

    @property
    def docker(self) -> DockerApi | None:
        """The Docker adapter once built (after the first listing), else None."""
        return self._docker

    @property
    def docker_ok(self) -> bool | None:
        """None: Docker is not used; else whether the last listing worked."""
        return self._docker_ok

    @property
    def gpu(self) -> GpuReader | None:
        return self._gpu

    def pids(self, key: str) -> tuple[int, ...]:
        """The PIDs in the service's container at the last `docker top` (() if unknown)."""
        return self._pids.get(key, ())

    def refresh_pids(self, key: str) -> None:
        """`docker top` one service's container again (its processes changed: a restart).
        On failure the PIDs are left as they were."""
        service = self._services.get(key)
        container_id = service.spec.container_id if service else None
        if self._docker is None or container_id is None:
            return
        try:
            self._pids[key] = self._docker.container_pids(container_id)
        except DockerUnavailable as exc:  # a container still restarting, or Docker gone
            logger.debug(f"docker top {key} failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - adapter bug: said once, PIDs kept
            contract_break("docker top", exc, self.broken_seen)

    @property
    def targets(self) -> Targets:
        """The running services of the last observation, for the Actor."""
        return self._targets

    def mark_docker_stale(self) -> None:
        """A Docker event: list containers again on the next observe()."""
        self._docker_dirty = True

    def service_states(self) -> dict[str, str]:
        """Each known service: "down", "ok" or "failing" (safe from another thread)."""
        return {
            s.spec.key: ("down" if not s.is_running else "ok" if not s.failures else "failing")
            for s in list(self._services.values())
        }

    def close(self) -> None:
        for service in self._services.values():
            close_quietly(service.client)
        for _, client in self._retired:
            close_quietly(client)
        self._retired = []
        if self._gpu is not None:
            close_quietly(self._gpu)
        if self._docker is not None:
            close_quietly(self._docker)  # built here on first use: ours to close

    # ------------------------------------------------------------------ observe

    def observe(self) -> Observation:
        at, wall_at = self._clock(), self._wall()
        self._refresh_services(at)
        running = [s for s in self._services.values() if s.is_running]
        reads = dict(zip([s.spec.key for s in running], read_all(running, self._stop), strict=True))
        for service in running:
            broken = reads[service.spec.key].broken
            if broken is not None:
                contract_break(f"The client of {service.spec.key}", broken, self.broken_seen)
        self._count_failures(running, reads)
        for service in running:
            version = reads[service.spec.key].version
            if version is not None:
                service.version = version
        stats = [r.stats for r in reads.values() if r.stats is not None]
        models = [m for r in reads.values() for m in r.models or ()]
        ollama_failed = any(
            s.spec.role == Role.OLLAMA and reads[s.spec.key].models is None for s in running
        )
        source, gpus, processes = self._read_vram(stats, models)
        attributed = self._attribute(processes, running) if processes is not None else {}
        measured = self._measured(processes or ())
        specs = {
            key: replace(s.spec, gpu_uuids=self._resolve_gpus(s.spec, gpus, source))
            for key, s in self._services.items()
        }

        ollamas: list[OllamaObservation] = []
        comfyuis: list[ComfyObservation] = []
        servers: list[ModelServerObservation] = []
        jobs: list[JobServerObservation] = []
        profiles: dict[str, OllamaProfile] = {}
        for service in self._services.values():
            read = reads.get(service.spec.key, Read())
            status = ServiceStatus(
                spec=specs[service.spec.key],
                is_running=service.is_running,
                health=service.health,
                is_reachable=service.is_running and read.error is None,
                failed_checks=service.failures,
                error=service.error if service.is_running else "not running",
            )
            attribution = attributed.get(service.spec.key)
            gpu_uuids = attribution.gpu_uuids if attribution else ()
            # NVML's figure only where it measured something; else the service's own API.
            nvml_bytes = (
                attribution.vram_bytes
                if attribution is not None and service.spec.key in measured
                else None
            )
            if service.spec.role not in (Role.OLLAMA, Role.COMFYUI) and _runs_jobs(service.spec):
                own = read.jobs.vram_bytes if read.jobs is not None else None
                jobs.append(
                    JobServerObservation(
                        status,
                        kind_of(service.spec.role).title,
                        read.jobs,
                        nvml_bytes if nvml_bytes is not None else own,
                        gpu_uuids,
                    )
                )
            elif service.spec.role not in (Role.OLLAMA, Role.COMFYUI):
                servers.append(
                    ModelServerObservation(
                        status,
                        kind_of(service.spec.role).title,
                        read.served,
                        nvml_bytes,
                        gpu_uuids,
                    )
                )
                self._note_server(specs[service.spec.key], read.served)
            elif service.spec.role == Role.OLLAMA:
                vram = (
                    nvml_bytes
                    if nvml_bytes is not None
                    else (ollama_vram_bytes(read.models) if read.models is not None else None)
                )
                profile = self._profile(service, specs[service.spec.key], gpus)
                profiles[service.spec.key] = profile
                ollamas.append(
                    OllamaObservation(
                        status,
                        read.models,
                        vram,
                        gpu_uuids,
                        version=service.version,
                        generation=profile.generation,
                        fit_target_bytes=profile.fit_target_bytes,
                        is_llama_server=profile.is_llama_server,
                    )
                )
            else:
                mode = comfy_mode(read.stats)
                self._note_comfy(specs[service.spec.key], read.stats)
                if nvml_bytes is not None:
                    vram = nvml_bytes
                elif read.stats is None:
                    vram = None
                elif mode is ComfyMode.DYNAMIC:
                    # A failed /api/ps would put that Ollama's weights in ComfyUI's figure.
                    vram = None if ollama_failed else comfy_dynamic_bound(read.stats, models)
                else:
                    vram = comfy_vram_bytes(read.stats)
                comfyuis.append(
                    ComfyObservation(
                        status,
                        read.queue,
                        read.stats,
                        vram,
                        gpu_uuids,
                        vram_measured=nvml_bytes is not None,
                        mode=mode,
                        vram_is_estimate=(
                            nvml_bytes is None and mode is ComfyMode.DYNAMIC and vram is not None
                        ),
                    )
                )

        obs = Observation(
            at=at,
            source=source,
            gpus=gpus,
            ollamas=tuple(ollamas),
            comfyuis=tuple(comfyuis),
            model_servers=tuple(servers),
            job_servers=tuple(jobs),
            docker_ok=self._docker_ok,
            wall_at=wall_at,
        )
        self._targets = Targets(
            comfyuis={
                s.spec.key: (specs[s.spec.key], s.client)
                for s in running
                if s.spec.role == Role.COMFYUI
            },
            ollamas={
                s.spec.key: (specs[s.spec.key], s.client)
                for s in running
                if s.spec.role == Role.OLLAMA
            },
            ollama_gpus=_ollama_gpus(ollamas),
            ollama_profiles={
                s.spec.key: profiles[s.spec.key] for s in running if s.spec.key in profiles
            },
            model_servers={
                s.spec.key: (specs[s.spec.key], s.client)
                for s in running
                if s.spec.role not in (Role.OLLAMA, Role.COMFYUI) and not _runs_jobs(s.spec)
            },
            job_servers={
                s.spec.key: (specs[s.spec.key], s.client)
                for s in running
                if s.spec.role not in (Role.OLLAMA, Role.COMFYUI) and _runs_jobs(s.spec)
            },
            dead_comfyuis=frozenset(
                s.spec.key
                for s in running
                if s.spec.role == Role.COMFYUI and s.failures >= DEAD_API_CHECKS
            ),
        )
        return obs

    def _note_server(self, spec: ServiceSpec, served: ServedState | None) -> None:
        """Log how a model server of another kind runs when first read and on a change."""
        if served is None:
            return
        mode = served.mode or "running"
        seen = (spec.container_id, mode, served.can_unload)
        if self._server_seen.get(spec.key) == seen:
            return
        self._server_seen[spec.key] = seen
        how = (
            "its idle models can be unloaded"
            if served.can_unload
            else "it has no unload: observed only"
        )
        logger.info(f"{spec.key}: {kind_of(spec.role).title} ({mode}); {how}")

    def _note_comfy(self, spec: ServiceSpec, stats: ComfyStats | None) -> None:
        """Log a ComfyUI's version and mode when first read and whenever they change."""
        if stats is None:
            return
        seen = (spec.container_id, stats.version, comfy_mode(stats))
        if self._comfy_seen.get(spec.key) == seen:
            return
        self._comfy_seen[spec.key] = seen
        logger.info(f"{spec.key}: {describe_comfy(stats)}")

    def _profile(
        self, service: Service, spec: ServiceSpec, gpus: tuple[GpuMemory, ...]
    ) -> OllamaProfile:
        """What this Ollama does (ollama_profile.py), logged when first known or changed
        (a recreated container may be an upgrade, or have other settings)."""
        seen = [g for g in gpus if not spec.gpu_uuids or g.uuid in spec.gpu_uuids]
        total = sum(g.total_bytes for g in seen) if seen else None
        profile = ollama_profile(service.version, dict(spec.env), total, max(len(seen), 1))
        if service.version is not None and service.is_running:
            what = profile.describe()
            before = self._profiles_logged.get(spec.key)
            if before != what:
                self._profiles_logged[spec.key] = what
                where = (
                    ""
                    if spec.is_container
                    else " (fixed URL: its settings are unknown, Ollama's defaults assumed)"
                )
                verb = "is" if before is None else "is now"
                logger.info(f"Ollama {spec.name} {verb} version {profile.version}{where}: {what}")
                for note in profile.notes:
                    logger.warning(f"Ollama {spec.name}: {note}")
        return profile

    def _resolve_gpus(
        self, spec: ServiceSpec, gpus: tuple[GpuMemory, ...], source: VramSource
    ) -> tuple[str, ...]:
        """`resolve_gpu_ids`, warning once per service and id that cannot be resolved."""
        for gpu_id in unresolved_gpu_ids(spec.gpu_uuids, gpus, source):
            if (spec.key, gpu_id) not in self._unresolved_warned:
                self._unresolved_warned.add((spec.key, gpu_id))
                seen = ", ".join(str(g.index) for g in gpus) or "none"
                logger.warning(
                    f"Docker granted {spec.role} container {spec.name} GPU {gpu_id!r}, which "
                    f"NVML does not show (it sees GPU indices {seen}); treating it as on "
                    "every GPU"
                )
        return resolve_gpu_ids(spec.gpu_uuids, gpus, source)

    def _refresh_services(self, now: float) -> None:
        wanted: dict[str, tuple[ServiceSpec, bool, ServiceHealth]] = {}
        for spec in self._fixed:
            wanted[spec.key] = (spec, True, ServiceHealth.NONE)
        if self._docker_factory is not None:
            listed_at = self._docker_listed_at
            due = listed_at is None or now - listed_at >= self.settings.check_interval_s
            if self._docker_dirty or due or not self._docker_ok:
                self._list_docker(now)
            # While Docker is unreachable this is the last listing that worked.
            wanted.update(self._listed)
        for key in [k for k in self._services if k not in wanted]:
            service = self._services.pop(key)
            if service.is_running and service.spec.is_container:
                logger.warning(f"Lost {service.spec.role} container {service.spec.name} (removed)")
            self._retire(service.client, now)
        for key, (spec, is_running, health) in wanted.items():
            self._update_service(key, spec, is_running, health)
        # Clients replaced at least RETIRE_S ago: no thread still uses one by now.
        keep = [(at, c) for at, c in self._retired if now - at < RETIRE_S]
        for at, client in self._retired:
            if now - at >= RETIRE_S:
                close_quietly(client)
        self._retired = keep

    def _retire(self, client: object, now: float) -> None:
        """A client of a service that went or was replaced: the gates and the actor may
        still hold it from the last `targets` (an immutable snapshot per pass), so it is
        closed RETIRE_S later, not now (a closed httpx client raises RuntimeError)."""
        if client is not None:
            self._retired.append((now, client))

    def _list_docker(self, now: float) -> None:
        # Cleared before listing: an event that arrives while the listing is under way
        # marks it stale again, so the change it announces is listed next pass, not lost.
        self._docker_dirty = False
        try:
            if self._docker is None:
                assert self._docker_factory is not None
                self._docker = self._docker_factory()
            containers = self._docker.list_services()
        except Exception as exc:  # noqa: BLE001 - DockerUnavailable, or an adapter bug
            if not isinstance(exc, DockerUnavailable):
                contract_break("The Docker adapter", exc, self.broken_seen)
            self._docker_failures += 1
            if noisy(self._docker_failures):
                logger.warning(
                    f"Docker is unreachable: {exc} (failure {self._docker_failures} in a row; "
                    "keeping the last known services and retrying every pass)"
                )
            self._docker_ok = False
            self._docker_dirty = True
            return
        if self._docker_failures:
            logger.info(f"Docker is reachable again after {self._docker_failures} failures")
        self._docker_failures = 0
        self._docker_ok = True
        self._docker_listed_at = now
        self._listed = {
            c.spec.key: (c.spec, c.is_running, c.health)
            for c in containers
            if c.spec.role not in self._fixed_roles
        }

    def _update_service(
        self, key: str, spec: ServiceSpec, is_running: bool, health: ServiceHealth
    ) -> None:
        service = self._services.get(key)
        if service is None:
            service = Service(spec, is_running=False)
            self._services[key] = service
        was_running = service.is_running
        # A recreated container (new id, same name) may be replaced between two listings
        # without ever being seen stopped: treat it as new all the same, with a fresh
        # client and failure count, so it is announced and judged on its own.
        if service.spec.url != spec.url or service.spec.container_id != spec.container_id:
            self._retire(service.client, self._clock())
            service.client = None
            service.version = None  # a recreated container may be an upgrade: read it again
            was_running = False
        service.spec, service.is_running, service.health = spec, is_running, health
        if is_running and service.client is None:
            if spec.role == Role.OLLAMA:
                service.client = self._make_ollama(spec.url)
            elif spec.role == Role.COMFYUI:
                service.client = self._make_comfy(spec.url)
            else:
                service.client = self._make_server(spec.role, spec.url)
        if is_running and not was_running:
            service.failures, service.error = 0, None
            if spec.is_container:
                logger.info(f"Discovered {spec.role} container {spec.name} at {spec.url}")
            else:
                logger.info(f"Using {spec.role} at {spec.url} (fixed URL)")
        elif was_running and not is_running:
            logger.warning(f"Lost {spec.role} container {spec.name} (not running)")

    def _count_failures(self, running: list[Service], reads: Mapping[str, Read]) -> None:
        for service in running:
            read = reads[service.spec.key]
            spec = service.spec
            what = (
                f"{spec.role} container {spec.name}"
                if spec.is_container
                else (f"{spec.role} (fixed URL)")
            )
            if read.error is None:
                if service.failures:
                    logger.info(f"{what} answers again after {service.failures} failed checks")
                service.failures, service.error = 0, None
                continue
            service.failures += 1
            service.error = read.error
            if noisy(service.failures):
                logger.warning(
                    f"Cannot read {what}: {read.error} ({service.failures} failed checks in a row)"
                )

    def _read_vram(
        self, stats: list[ComfyStats], models: list[OllamaModel]
    ) -> tuple[VramSource, tuple[GpuMemory, ...], tuple[GpuProcess, ...] | None]:
        gpus: tuple[GpuMemory, ...] = ()
        processes: tuple[GpuProcess, ...] | None = None
        source = VramSource.NONE
        if self._gpu is not None:
            try:
                gpus, processes = self._gpu.gpus(), self._gpu.processes()
                source = VramSource.NVML
                self._nvml_failures = 0
            except Exception as exc:  # noqa: BLE001 - NvmlUnavailable, or a reader bug
                if not isinstance(exc, NvmlUnavailable):
                    contract_break("The NVML reader", exc, self.broken_seen)
                self._nvml_failures += 1
                if noisy(self._nvml_failures):
                    logger.warning(f"NVML reading failed: {exc}; using the services' APIs")
                gpus, processes = (), None
        if source is not VramSource.NVML:
            gpus = gpus_from_api(stats, models)
            source = VramSource.API if gpus else VramSource.NONE
        if source is not self._source:
            logger.info(f"VRAM source: {source}")
            self._source = source
        return source, gpus, processes

    def _measured(self, processes: tuple[GpuProcess, ...]) -> set[str]:
        """The services NVML measured: at least one of their PIDs is listed with a memory
        figure. On WSL2 / Docker Desktop NVML lists no processes, and under WDDM it lists
        them with usedGpuMemory None (api-facts 4, gotcha 20); summing those would say
        0 bytes for a ComfyUI holding 11 GiB, so such a service is read from its API."""
        with_figure = {p.pid for p in processes if p.used_bytes is not None}
        return {key for key, pids in self._pids.items() if with_figure.intersection(pids)}

    def _attribute(
        self, processes: tuple[GpuProcess, ...], running: list[Service]
    ) -> dict[str, Attribution]:
        containers = [s for s in running if s.spec.container_id and self._docker is not None]
        if not containers:
            return {}
        # docker top only when the picture changed: a new GPU process (an Ollama runner
        # starts per model) or another set of containers. PIDs of processes outside every
        # container are remembered so they do not cause a re-read on every pass.
        known = {pid for pids in self._pids.values() for pid in pids} | self._foreign_pids
        stale = {s.spec.key for s in containers} != set(self._pids)
        if stale or any(p.pid not in known for p in processes):
            pids: dict[str, tuple[int, ...]] = {}
            for s in containers:
                try:
                    assert self._docker is not None and s.spec.container_id is not None
                    pids[s.spec.key] = self._docker.container_pids(s.spec.container_id)
                except DockerUnavailable as exc:  # a gone container, or Docker gone
                    logger.debug(f"docker top {s.spec.name} failed: {exc}")
                except Exception as exc:  # noqa: BLE001 - adapter bug: said once, pass goes on
                    contract_break("docker top", exc, self.broken_seen)
            self._pids = pids
            owned = {pid for pids_ in pids.values() for pid in pids_}
            self._foreign_pids = {p.pid for p in processes if p.pid not in owned}
        return attribute(processes, self._pids) if self._pids else {}
