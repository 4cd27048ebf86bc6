"""The image gate: a reverse proxy in front of ComfyUI that makes room before a job.

ComfyUI decides how much of a job's models goes to the GPU when the job loads them, from
the VRAM free then; an idle Ollama model holding the card makes the job run in low-VRAM
mode or paged (api-facts 2.7, api-facts-2026 section 2). Users point the web UI and API
clients at the gate instead of ComfyUI.
Policy:
- `POST /prompt` (and `/api/prompt`) is read whole. Its need is estimated (`PromptAdmission`:
  learned from the earlier runs of the same model files, else from the files' sizes in
  ComfyUI's models folder when it is mounted (VRAM_COMFYUI_MODELS), else a default) and,
  when the room is short, the RoomMaker (room_image.py) unloads idle Ollama models
  first; then the prompt is forwarded unchanged.
- Prompts go in arrival order: a prompt waiting for room holds later prompts behind it,
  until ComfyUI has answered it (so it has its place in ComfyUI's queue). The wait is
  bounded by `wait_s` (VRAM_GATE_WAIT); after it the prompt goes on anyway, logged.
  A prompt is never refused or changed by the admission; one the gate cannot read
  (not JSON, no graph) is forwarded at once and ComfyUI answers it.
- `GET /ws` (WebSocket upgrade) is relayed as a byte tunnel (tunnel.py). Every other
  request passes through untouched (core.Proxy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from loguru import logger

from supervisor.gate.admission import Forward, make_room_within
from supervisor.gate.core import Proxy
from supervisor.gate.http11 import Fields, Limits
from supervisor.gate.tunnel import WS_IDLE_S

log = logger.bind(component="gate")

T = TypeVar("T")

PROMPT_PATHS = frozenset({b"/prompt", b"/api/prompt"})
# What a job needs when nothing was learned for its model files: an SDXL checkpoint (about
# 6.5 GiB) with its sampling workspace.
DEFAULT_JOB_NEED_BYTES = 8 * 1024**3
# A learned need is what ComfyUI's VRAM grew by at most during the job, plus this share
# (workspace that comes and goes between readings, api-facts-2026 section 2).
LEARNED_MARGIN = 0.15
MIN_GROWTH_BYTES = 256 * 1024**2  # growth below this: the models were already loaded
# Free VRAM below this during a job: the job was squeezed (its growth is only a floor).
SQUEEZED_BYTES = 1024**3
SQUEEZED_EXTRA_BYTES = 2 * 1024**3
WATCH_EVERY_S = 0.5  # how often ComfyUI's VRAM is read after a prompt went on
WATCH_S = 600.0  # for how long at most (a new prompt ends it sooner)
# What a job needs beyond its model files' sizes (read from the models folder): sampling
# workspace (activations, VAE decode), a base plus a share of the weights.
FILE_WORKSPACE_BYTES = 1536 * 1024**2
FILE_WORKSPACE_SHARE = 0.10
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


class JobRoomMaker(Protocol):
    """What the image gate needs of its RoomMaker (room_image.OllamaRoomMaker)."""

    def free_bytes(self) -> int | None: ...
    def held_bytes(self) -> int | None: ...
    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool: ...


@dataclass(frozen=True)
class PromptJob:
    """What the gate reads of a prompt: the model files its graph names."""

    files: tuple[str, ...]

    @property
    def label(self) -> str:
        return ", ".join(self.files)[:200] if self.files else "no model file named"


@dataclass(frozen=True)
class ComfyGateStats:
    """Counters since start, for /metrics."""

    requests_total: int = 0  # every request the gate read
    express_total: int = 0  # of those, served by the express lane (express.py)
    prompts_total: int = 0  # prompts admitted (POST /prompt with a graph)
    waits_total: int = 0  # prompts held to make room
    wait_seconds_total: float = 0.0  # time spent making room
    forwarded_anyway_total: int = 0  # the room was not there in time (or not to be made)
    upstream_errors_total: int = 0  # answered 502
    websockets_total: int = 0  # WebSocket tunnels opened


@dataclass
class ComfyCounters:
    """The live counters (loop thread only); `ComfyGateStats` is their snapshot."""

    requests_total: int = 0
    express_total: int = 0
    prompts_total: int = 0
    waits_total: int = 0
    wait_seconds_total: float = 0.0
    forwarded_anyway_total: int = 0
    upstream_errors_total: int = 0
    websockets_total: int = 0


class ModelFolder:
    """ComfyUI's models folder as the supervisor sees it (VRAM_COMFYUI_MODELS, mounted
    read-only): the size of a file a prompt names. A node names a file relative to one of
    the folder's type folders (checkpoints/, diffusion_models/, unet/, clip/, text_encoders/,
    vae/, loras/ ...), possibly with subfolders (`SDXL/model.safetensors`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def size_of(self, name: str) -> int | None:
        """The file's size in bytes, the largest where several type folders hold that name;
        None when not found or the name leaves the folder (absolute, `..`)."""
        rel = PurePosixPath(name.replace("\\", "/"))
        if not rel.parts or rel.is_absolute() or ".." in rel.parts or "\0" in name:
            return None
        candidates = [self.root / rel]
        try:
            with os.scandir(self.root) as entries:
                candidates += [Path(e.path) / rel for e in entries if e.is_dir()]
        except OSError:
            return None
        sizes = []
        for path in candidates:
            try:
                st = path.stat()
            except (OSError, ValueError):
                continue
            if st.st_size > 0 and path.is_file():
                sizes.append(st.st_size)
        return max(sizes) if sizes else None


def files_need(sizes: list[int]) -> int:
    """What a job whose model files weigh `sizes` needs: the weights plus a workspace."""
    weights = sum(sizes)
    return weights + FILE_WORKSPACE_BYTES + int(weights * FILE_WORKSPACE_SHARE)


def parse_prompt(body: bytes, json_values: int) -> PromptJob | None:
    """The job a `/prompt` body asks for; None when the gate cannot read it (ComfyUI then
    answers it) or it is too large to parse cheaply (then it is not gated)."""
    if body.count(b",") + body.count(b"{") + body.count(b"[") > json_values:
        log.info("Gate: a ComfyUI prompt too large to look into; forwarding it as is")
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), dict):
        return None
    files: set[str] = set()
    for node in data["prompt"].values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            if isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES):
                files.add(value)
    return PromptJob(tuple(sorted(files)))


class PromptAdmission:
    """Decides when a prompt may go to ComfyUI (event loop thread only).

    The need of a job is learned per set of model files: the most ComfyUI's VRAM grew by
    while the job ran (NVML's per-process reading, else the device figures), plus a margin
    (`learned_need`). Before a first run (or when what was learned is below the files'
    weights: the reading missed the job's peak), the files' sizes in `models` plus a
    workspace (`files_need`); without those: `default_need_bytes`."""

    def __init__(
        self,
        *,
        room: JobRoomMaker,
        executor: Executor,
        stats: ComfyCounters,
        wait_s: float,
        default_need_bytes: int = DEFAULT_JOB_NEED_BYTES,
        models: ModelFolder | None = None,
    ) -> None:
        self._room = room
        self._executor = executor
        self._stats = stats
        self._wait_s = wait_s
        self._default_need = default_need_bytes
        self._models = models
        self._lock = asyncio.Lock()  # FIFO: prompts go in arrival order
        self.learned: dict[tuple[str, ...], int] = {}
        self._watch: asyncio.Task[None] | None = None  # what the last prompt's job takes

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def admit(self, job: PromptJob, forward: Forward) -> bool:
        """Forward `job` in arrival order once there is room for it (or the wait is over);
        returns what `forward` returns."""
        await self._lock.acquire()
        is_released = False

        def release() -> None:
            nonlocal is_released
            if not is_released:
                is_released = True
                self._lock.release()

        try:
            self._stats.prompts_total += 1
            if self._watch is not None:
                self._watch.cancel()  # from here on, growth is this job's
            held = await self._call_or_none(self._room.held_bytes)
            room = await self._call_or_none(self._room.free_bytes)
            await self._make_room_for(job, room)
            if held is not None and job.files:
                self._watch = asyncio.get_running_loop().create_task(self._learn(job, held))
            return await forward(release)  # the next prompt goes once ComfyUI answered
        finally:
            release()

    def need_of(self, job: PromptJob) -> tuple[int, str]:
        """The need and what it is based on (reads the models folder: not on the loop)."""
        learned = self.learned.get(job.files)
        sizes: list[int] = []
        if self._models is not None:
            found = [self._models.size_of(name) for name in job.files]
            sizes = [size for size in found if size is not None]
            if len(sizes) < len(found):
                missing = [n for n, size in zip(job.files, found, strict=True) if size is None]
                log.debug(f"Gate: not in the models folder: {', '.join(missing)[:200]}")
        # A learned need below its largest file (the weights the job must hold) came from
        # a run that was squeezed; one below the sum need not be (text encoders leave the
        # GPU after encoding, weights may run in a smaller type).
        if learned is not None and learned >= max(sizes, default=0):
            return learned, "learned from its earlier runs"
        if sizes:
            need = files_need(sizes)
            if len(sizes) < len(job.files):
                return max(need, self._default_need), "its files' sizes, some not found"
            return need, "its files' sizes"
        return self._default_need, "the default"

    async def _learn(self, job: PromptJob, held_before: int) -> None:
        """Watch what ComfyUI holds while the job runs (every WATCH_EVERY_S, for WATCH_S
        or until the next prompt): its largest growth over `held_before` is what the job
        took (see `learned_need`)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + WATCH_S
        prior = self.learned.get(job.files)
        peak = 0
        is_squeezed = False
        while loop.time() < end:
            await asyncio.sleep(WATCH_EVERY_S)
            held = await self._call_or_none(self._room.held_bytes)
            room = await self._call_or_none(self._room.free_bytes)
            if held is None:
                continue
            peak = max(peak, held - held_before)
            if peak >= MIN_GROWTH_BYTES and room is not None and room - held < SQUEEZED_BYTES:
                is_squeezed = True
            need = learned_need(prior, self._default_need, peak, is_squeezed=is_squeezed)
            if need is not None and need != self.learned.get(job.files):
                self.learned[job.files] = need
                log.debug(f"Gate: a ComfyUI job with {job.label} takes about {_gib(need)}")

    async def _make_room_for(self, job: PromptJob, room: int | None) -> None:
        if self._models is None:
            need, basis = self.need_of(job)
        else:
            need, basis = await self._call(self.need_of, job)
        if room is not None and room >= need:
            log.debug(
                f"Gate: ComfyUI job ({job.label}) needs about {_gib(need)}; room {_gib(room)}"
            )
            return
        shown = _gib(room) if room is not None else "unknown"
        log.info(
            f"Gate: making room for a ComfyUI job ({job.label}): needs about {_gib(need)}"
            f" ({basis}), room {shown} (free VRAM plus ComfyUI's own models)"
        )
        make_room = functools.partial(
            self._room.make_room,
            need,
            reason=f"image gate: ComfyUI job with {job.label}",
            deadline_s=self._wait_s,
        )
        what = f"the ComfyUI job ({job.label})"
        await make_room_within(self._call, make_room, self._wait_s, self._stats, what)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call_or_none(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return await self._call(fn, *args)
        except Exception as exc:  # noqa: BLE001 - a reading is advice: the job goes on
            log.debug(f"Gate: {getattr(fn, '__name__', fn)} failed: {exc}")
            return None


def learned_need(prior: int | None, default: int, growth: int, *, is_squeezed: bool) -> int | None:
    """The need learned from a run that grew ComfyUI's VRAM by `growth` (None: nothing to
    learn, the models were already loaded). The largest seen wins (`prior`), plus a margin
    for what the reading misses. A squeezed run (the device left nearly full) took what it
    could and probably ran in low-VRAM mode: its growth is only a floor, so the need is
    raised by SQUEEZED_EXTRA_BYTES over the larger of it and what was known."""
    if growth < MIN_GROWTH_BYTES:
        return None
    need = int(growth * (1 + LEARNED_MARGIN))
    if is_squeezed:
        need = max(need, prior if prior is not None else default) + SQUEEZED_EXTRA_BYTES
    return max(need, prior or 0)


class ComfyGate(Proxy):
    """The image gate on `host:port` in front of ComfyUI (see the module's policy)."""

    upstream_name = "ComfyUI"
    allows_upgrade = True

    def __init__(
        self,
        *,
        upstream_url: str | Callable[[], str | None],
        room: JobRoomMaker,
        host: str = "127.0.0.1",
        port: int,
        wait_s: float = 30.0,
        default_need_bytes: int = DEFAULT_JOB_NEED_BYTES,
        models_dir: Path | None = None,
        connect_timeout_s: float = 10.0,
        limits: Limits | None = None,
        ws_idle_s: float = WS_IDLE_S,
        event_loop: str = "asyncio",
        express_lane: bool = True,
    ) -> None:
        counters = ComfyCounters()
        super().__init__(
            upstream_url=upstream_url,
            host=host,
            port=port,
            connect_timeout_s=connect_timeout_s,
            limits=limits,
            stats=counters,
            ws_idle_s=ws_idle_s,
            event_loop=event_loop,
            express_lane=express_lane,
        )
        self._counters = counters
        self.admission = PromptAdmission(
            room=room,
            executor=self._executor,
            stats=counters,
            wait_s=wait_s,
            default_need_bytes=default_need_bytes,
            models=ModelFolder(models_dir) if models_dir is not None else None,
        )

    def stats(self) -> ComfyGateStats:
        """A snapshot of the counters (safe from any thread)."""
        return ComfyGateStats(**dataclasses.asdict(self._counters))

    def _reads_body(self, method: bytes, route: bytes) -> bool:
        return method == b"POST" and route in PROMPT_PATHS

    def _parse(self, route: bytes, fields: Fields, body: bytes) -> object | None:
        return parse_prompt(body, self._limits.json_values)

    async def _admit(self, request: object, forward: Forward) -> bool:
        assert isinstance(request, PromptJob)
        return await self.admission.admit(request, forward)

    def _on_tunnel(self) -> None:
        self._counters.websockets_total += 1

    def _on_stop(self) -> None:
        self.admission.close()


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"
