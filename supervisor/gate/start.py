"""Build and start the gates from the settings (what cli calls when VRAM_GATE_PORT or
VRAM_COMFYUI_GATE_PORT is set).

The gate follows whichever Ollama the daemon uses now (`current_ollama`: discovered
containers come and go); without that callable it uses the fixed VRAM_OLLAMA_URL, and
without either it stays off with a warning rather than guess an address.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger

from supervisor.clients.ollama import OllamaClient
from supervisor.config import Settings
from supervisor.errors import ServiceError
from supervisor.gate.comfy import ComfyGate, JobRoomMaker
from supervisor.gate.core import Gate
from supervisor.model import OllamaModel
from supervisor.ports import ModelFacts, OllamaApi, RoomMaker, TaggedModel


class CurrentOllama:
    """`ports.OllamaApi` that forwards to whatever Ollama `current()` returns now."""

    def __init__(self, current: Callable[[], OllamaApi | None]) -> None:
        self._current = current

    def url(self) -> str | None:
        api = self._current()
        return api.base_url if api is not None else None

    base_url = ""  # which server changes; the gate asks `url()` for each request

    def _api(self) -> OllamaApi:
        api = self._current()
        if api is None:
            raise ServiceError("ollama", "no Ollama server is known now")
        return api

    def version(self) -> str:
        return self._api().version()

    def ps(self) -> tuple[OllamaModel, ...]:
        return self._api().ps()

    def tags(self) -> tuple[TaggedModel, ...]:
        return self._api().tags()

    def show(self, model: str) -> ModelFacts:
        return self._api().show(model)

    def unload(self, model: str) -> None:
        self._api().unload(model)

    def preload(self, model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        self._api().preload(model, timeout_s, keep_alive)


def start_gate(
    settings: Settings,
    room: RoomMaker,
    current_ollama: Callable[[], OllamaApi | None] | None = None,
) -> Gate | None:
    """Start the gate on VRAM_GATE_HOST:VRAM_GATE_PORT; None when it is off or cannot
    know where Ollama is. OSError when the port cannot be bound."""
    if settings.gate_port is None:
        return None
    if current_ollama is None:
        if not settings.ollama_url:
            logger.warning(
                "VRAM_GATE_PORT is set but the gate cannot tell where Ollama is; set "
                "VRAM_OLLAMA_URL. The gate is off"
            )
            return None
        fixed = OllamaClient(settings.ollama_url, settings.request_timeout_s)

        def current_ollama() -> OllamaApi | None:
            return fixed

    elif settings.ollama_url:
        # Before the loop's first pass knows the Ollama of a fixed URL, the gate still
        # forwards there (a request right after the start is not answered 502).
        known = current_ollama
        fallback = OllamaClient(settings.ollama_url, settings.request_timeout_s)

        def current_ollama() -> OllamaApi | None:
            return known() or fallback

    ollama = CurrentOllama(current_ollama)
    gate = Gate(
        upstream_url=ollama.url,
        ollama=ollama,
        room=room,
        host=settings.gate_host,
        port=settings.gate_port,
        wait_s=settings.gate_wait_s,
        event_loop=settings.gate_loop,
        express_lane=settings.gate_express,
    )
    gate.start()
    return gate


def start_comfy_gate(
    settings: Settings,
    room: JobRoomMaker,
    current_comfyui: Callable[[], str | None] | None = None,
) -> ComfyGate | None:
    """Start the image gate on VRAM_GATE_HOST:VRAM_COMFYUI_GATE_PORT, forwarding to the
    ComfyUI `current_comfyui()` names (else the fixed VRAM_COMFYUI_URL); None when it is
    off or cannot know where ComfyUI is. OSError when the port cannot be bound."""
    if settings.comfyui_gate_port is None:
        return None
    upstream: str | Callable[[], str | None]
    if current_comfyui is not None and settings.comfyui_url:
        # Before the loop's first pass knows it, the fixed URL (not a 502 right after start).
        known, fixed_url = current_comfyui, settings.comfyui_url

        def upstream() -> str | None:
            return known() or fixed_url

    elif current_comfyui is not None:
        upstream = current_comfyui
    elif settings.comfyui_url:
        upstream = settings.comfyui_url
    else:
        logger.warning(
            "VRAM_COMFYUI_GATE_PORT is set but the gate cannot tell where ComfyUI is; set "
            "VRAM_COMFYUI_URL. The image gate is off"
        )
        return None
    models_dir = Path(settings.comfyui_models_dir) if settings.comfyui_models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        logger.warning(
            f"VRAM_COMFYUI_MODELS={settings.comfyui_models_dir!r} is not a folder the "
            "supervisor can read; the image gate sizes new jobs at 8 GiB until they ran once"
        )
    gate = ComfyGate(
        upstream_url=upstream,
        room=room,
        host=settings.gate_host,
        port=settings.comfyui_gate_port,
        wait_s=settings.gate_wait_s,
        models_dir=models_dir,
        event_loop=settings.gate_loop,
        express_lane=settings.gate_express,
    )
    gate.start()
    return gate
