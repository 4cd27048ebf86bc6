"""One assembly of the running supervisor: the daemon with its real adapters, the status
server, the gates and the loop thread, started and stopped in one order.

`cli.run` (the product), `cli.status` / `doctor` (the daemon only) and the demo use it, so
the wiring exists once: which adapters back the daemon, which gate reports to /status and
/metrics, which unloads the Ollama gate hears about, what the image gate asks the Ollama
gate, where the model-server gates forward.

Policy: starting stops at the first port that cannot be bound (`OSError` with
`binding` naming the variable), after stopping what was already started. Docker is
neither imported nor built when no role needs discovery; NVML is tried unless told not to
(`nvml=False`: the demo, whose GPU is simulated).
"""

from __future__ import annotations

import threading
from typing import Any

from loguru import logger

from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.metrics import Metrics
from supervisor.ports import DockerApi, EventSource, GpuReader, ModelServerApi


def build_daemon(
    settings: Settings, metrics: Metrics | None = None, *, nvml: bool = True
) -> Daemon:
    """The real adapters behind the daemon: a client per tenant kind (the registry's),
    NVML when it loads, Docker when a role needs discovery."""
    from supervisor.clients.comfyui import ComfyClient
    from supervisor.clients.ollama import OllamaClient
    from supervisor.errors import NvmlUnavailable

    gpu: GpuReader | None = None
    if nvml:
        try:
            from supervisor.vram.nvml import NvmlReader

            gpu = NvmlReader()
        except NvmlUnavailable as exc:
            logger.info(f"NVML is not available ({exc}); VRAM figures come from the services' APIs")
    docker: DockerApi | None = None
    events: EventSource | None = None
    if settings.needs_docker:
        from supervisor.docker.discovery import DockerAdapter
        from supervisor.docker.events import DockerEvents

        docker = DockerAdapter(timeout_s=settings.request_timeout_s)
        events = DockerEvents(timeout_s=settings.request_timeout_s)
    timeout = settings.request_timeout_s
    adapter = docker
    return Daemon(
        settings,
        ollama_client=lambda url: OllamaClient(url, timeout),
        comfy_client=lambda url: ComfyClient(url, timeout),
        docker=(lambda: adapter) if adapter is not None else None,
        events=events,
        gpu=gpu,
        metrics=metrics,
    )


class Assembly:
    """The running supervisor: `start()`, then `stop()` (idempotent)."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        registry: Any = None,
        nvml: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.daemon = build_daemon(settings, metrics, nvml=nvml)
        self.server: Any = None
        self.gate: Any = None  # the Ollama gate
        self.image_gate: Any = None
        self.model_gates: list[Any] = []
        self.loop: threading.Thread | None = None
        self.binding = ""  # what was being bound when start() failed

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Serve, open the gates, run the loop. OSError: a port could not be bound
        (everything started is stopped again; `binding` names the variable)."""
        try:
            self._serve()
            self._gates()
        except OSError:
            self.stop()
            raise
        self.loop = threading.Thread(target=self.daemon.run, name="loop", daemon=True)
        self.loop.start()

    def _serve(self) -> None:
        s = self.settings
        if s.http_port is None or self.registry is None:
            return
        from supervisor.http import StatusServer

        self.binding = f"VRAM_HTTP_PORT={s.http_port} (on {s.http_host})"
        self.server = StatusServer(
            s.http_host,
            s.http_port,
            health=self.daemon.health,
            snapshot=self.daemon.snapshot,
            registry=self.registry,
        )
        self.server.start()
        logger.info(f"Serving /healthz, /status and /metrics on {s.http_host}:{self.server.port}")

    def _gates(self) -> None:
        from supervisor.gate import start_comfy_gate, start_gate
        from supervisor.snapshot import gate_json

        s, daemon = self.settings, self.daemon
        if s.gate_port is not None:
            self.binding = f"VRAM_GATE_PORT={s.gate_port} (on {s.gate_host})"
            self.gate = start_gate(s, daemon.room_maker, daemon.current_ollama)
            if self.gate is not None:
                gate = self.gate
                if self.metrics is not None:
                    self.metrics.watch_gate(gate.stats)
                daemon.gate_status = lambda: gate_json(
                    gate.stats(), host=s.gate_host, port=gate.port, wait_s=s.gate_wait_s
                )
                # The policy counts Ollama as gated only while this gate serves.
                daemon.ollama_gate_serving = gate.is_serving
                # A model the supervisor unloads stops counting as resident for the gate.
                daemon.actor.unload_listeners.append(gate.forget_resident)
        if s.comfyui_gate_port is not None:
            self.binding = f"VRAM_COMFYUI_GATE_PORT={s.comfyui_gate_port} (on {s.gate_host})"
            # Never unload a model the Ollama gate has a request in flight for.
            busy = self.gate.busy_models if self.gate is not None else frozenset
            self.image_gate = start_comfy_gate(
                s, daemon.image_room_maker(busy), daemon.current_comfyui_url
            )
            if self.image_gate is not None and self.metrics is not None:
                self.metrics.watch_comfyui_gate(self.image_gate.stats)
        for role, port in s.model_gates or ():
            self.binding = f"VRAM_MODEL_GATES={role}={port} (on {s.gate_host})"
            model_gate = self._model_gate(role, port)
            self.model_gates.append(model_gate)
            # A model with a request in flight through it is never unloaded.
            daemon.actor.in_flight_sources.append(model_gate.in_flight)

    def _model_gate(self, role: str, port: int) -> Any:
        """In front of the running servers of `role` (routing by model), freeing the idle
        job servers on their GPUs before one loads a model (VRAM_MODEL_GATES)."""
        from supervisor.gate.servers import ServerGate
        from supervisor.tenants import kind_of, make_client

        kind = kind_of(role)
        # Before the loop's first pass knows them, the fixed URLs of the role (if any): a
        # request right after the start is forwarded, not answered 502.
        # Named as the observer names them: the role, then role-2, role-3 ...
        urls = [url for r, url in self.settings.fixed_services if r == role]
        timeout_s = self.settings.request_timeout_s
        fallback = [
            (
                f"{role}/{role if i == 0 else f'{role}-{i + 1}'}",
                url,
                make_client(role, url, timeout_s=timeout_s),
            )
            for i, url in enumerate(urls)
        ]

        def servers() -> list[tuple[str, str, ModelServerApi]]:
            return self.daemon.current_servers(role) or fallback

        gate = ServerGate(
            title=kind.title,
            routes=kind.routes,
            servers=servers,
            room=self.daemon.job_room_freer,
            host=self.settings.gate_host,
            port=port,
            wait_s=self.settings.gate_wait_s,
            event_loop=self.settings.gate_loop,
            express_lane=self.settings.gate_express,
        )
        gate.start()
        return gate

    # ------------------------------------------------------------------ stop

    def stop(self, loop_grace_s: float = 10.0) -> None:
        """Stop the loop (waiting up to `loop_grace_s` for an action under way), the gates,
        the server, then close the adapters."""
        self.daemon.stop()
        if self.loop is not None:
            self.loop.join(loop_grace_s)
        for started in [self.image_gate, self.gate, *self.model_gates]:
            if started is not None:
                started.stop(timeout_s=0.5)
        self.image_gate, self.gate, self.model_gates = None, None, []
        if self.server is not None:
            self.server.close()
            self.server = None
        self.daemon.close()
