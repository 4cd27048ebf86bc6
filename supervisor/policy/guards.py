"""What the policy may judge from one service or one GPU reading alone (pure).

The thresholds, how much a /free could give back, which GPUs a service uses, whether a
ComfyUI may be freed now and which restart guards it fails. The rule modules (triggers,
heal, episodes) ask these questions; none of them changes state.

Restart (RestartComfy) only when every guard holds: allowed (not a Swarm task, then the
label, else VRAM_RESTART_FALLBACK), a container, running, cooldown passed, and either its queue is
known and empty or its API has been dead for DEAD_API_CHECKS passes (and Docker's health
is not "starting": slow starters are not restarted). A failed guard is named as a
sentence; a transient one (busy, queue unknown) is marked so an episode can keep waiting.

Garbage readings: a GPU with impossible figures (`gpu_ok`) or a model with no size
(`model_ok`) is left out, so a trigger never acts on it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from supervisor.config import Settings
from supervisor.model import (
    ComfyObservation,
    GpuMemory,
    JobServerObservation,
    ModelServerObservation,
    OllamaModel,
    OllamaObservation,
    ServiceHealth,
)
from supervisor.units import MIB

# Below this a free gives back nothing worth a ComfyUI reload (mGPUmanager's cushion).
MIN_RECLAIMABLE_BYTES = 256 * MIB
# What a CUDA process keeps after /free (its context), when only an NVML figure is known.
CUDA_CONTEXT_BYTES = 384 * MIB
# Head room kept on top of a model's size when judging fit and room.
SAFETY_MARGIN_BYTES = 512 * MIB
DEAD_API_CHECKS = 3
# keep_alive -1 is stored as MaxInt64 ns: expires_at lies about 292 years ahead (2318).
FOREVER_AFTER = datetime(2200, 1, 1, tzinfo=UTC).timestamp()
EPISODE_STALE_S = 300.0


def estimate_reclaimable(comfy: ComfyObservation) -> int:
    """Bytes a /free could give back, the largest of what is known:
    - torch's reserved memory from /system_stats (models plus allocator cache in classic
      mode; under Dynamic VRAM only the cache, near 0 after a job);
    - NVML's figure for its processes less a CUDA context (`vram_measured`), which shows
      Dynamic VRAM's weight pages too;
    - without NVML, the API figure in `vram_bytes` (torch's reserved bytes, or under
      Dynamic VRAM the bound from the device figures, `vram_is_estimate`: enough to start a
      soft free, never a hard free or restart, see episodes.py).
    So the torch figures alone never make a ComfyUI that holds weights look empty. 0 for a
    ComfyUI on the CPU (its "vram" fields report system RAM) or when nothing is known."""
    stats = comfy.stats
    if stats is not None and stats.device_type != "cuda":
        return 0
    torch = stats.torch_reserved_bytes if stats is not None else 0
    other = 0
    if comfy.vram_bytes is not None:
        measured = comfy.vram_measured or stats is None  # no stats: an NVML figure
        other = comfy.vram_bytes - CUDA_CONTEXT_BYTES if measured else comfy.vram_bytes
    return max(0, torch, other)


def service_gpus(
    svc: ComfyObservation | OllamaObservation | ModelServerObservation | JobServerObservation,
) -> tuple[str, ...]:
    """GPUs the service uses: where it holds memory, else what Docker granted; () = all."""
    return svc.gpu_uuids or svc.status.spec.gpu_uuids


def shares_gpu(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when two GPU lists overlap; an empty list (unknown) overlaps everything."""
    return not a or not b or bool(set(a) & set(b))


def room_needed(need_bytes: int, gpu: GpuMemory, margin_bytes: int = SAFETY_MARGIN_BYTES) -> int:
    """Bytes that must be freed on `gpu` before a load of `need_bytes` fits with the margin."""
    return max(0, need_bytes + margin_bytes - gpu.free_bytes)


def fits_gpu(size_bytes: int, gpu: GpuMemory, margin_bytes: int = SAFETY_MARGIN_BYTES) -> bool:
    """Could a model of `size_bytes` sit wholly on `gpu` if nothing else were there?"""
    return size_bytes <= gpu.total_bytes - margin_bytes


def is_api_dead(comfy: ComfyObservation) -> bool:
    """Its container runs but its API has not answered for DEAD_API_CHECKS passes."""
    st = comfy.status
    return st.is_running and not st.is_reachable and st.failed_checks >= DEAD_API_CHECKS


def has_work(comfy: ComfyObservation) -> bool:
    """It runs, answered this pass and its queue has a prompt running or waiting."""
    st, queue = comfy.status, comfy.queue
    return st.is_running and st.is_reachable and queue is not None and queue.is_busy


def free_blocker(
    comfy: ComfyObservation, cut_work: bool = False, priority: str = "balanced"
) -> str | None:
    """Why this ComfyUI may not be sent a /free now (None: it may). `cut_work`: a tenant
    that needs the room ranks above it (VRAM_PRIORITY, `Settings.outranks`), so its work
    does not protect it (its flags then act when its prompt ends)."""
    st, key = comfy.status, comfy.status.spec.key
    if not st.is_running:
        return f"{key} is not running"
    if not st.is_reachable:
        return f"{key} did not answer ({st.failed_checks} failed checks)"
    if comfy.queue is None:
        return f"the queue of {key} is unknown"
    if comfy.queue.is_busy and not cut_work:
        return (
            f"{key} has work ({comfy.queue.running} running, {comfy.queue.pending} "
            f"pending) and priority {priority} frees it only when idle"
        )
    return None


def restart_guards(
    comfy: ComfyObservation, last_restart_at: float | None, settings: Settings, now: float
) -> list[tuple[bool, str]]:
    """Failed guards as (is_transient, sentence); `last_restart_at`: its latest restart."""
    st, spec = comfy.status, comfy.status.spec
    failed: list[tuple[bool, str]] = []
    if spec.restart_block is not None:
        failed.append((False, f"restart is not allowed: {spec.restart_block}"))
    elif spec.restart_allowed is False:
        failed.append((False, "restart is not allowed (label vram-supervisor.restart=false)"))
    elif spec.restart_allowed is None and not settings.restart_fallback:
        failed.append(
            (
                False,
                "restart is not allowed (VRAM_RESTART_FALLBACK=false and no "
                "vram-supervisor.restart label)",
            )
        )
    if not spec.is_container:
        failed.append((False, "it is not a container (fixed URL)"))
    if not st.is_running:
        failed.append((False, "its container is not running"))
    if last_restart_at is not None and now - last_restart_at < settings.restart_cooldown_s:
        left = settings.restart_cooldown_s - (now - last_restart_at)
        failed.append((False, f"restart cooldown, {left:.0f} s left"))
    if is_api_dead(comfy):
        if st.health is ServiceHealth.STARTING:
            failed.append((True, "its container is still starting (health: starting)"))
    elif not st.is_reachable:
        failed.append(
            (True, f"its API did not answer ({st.failed_checks} of {DEAD_API_CHECKS} checks)")
        )
    elif comfy.queue is None:
        failed.append((True, "its queue is unknown, a generation may be running"))
    elif comfy.queue.is_busy:
        failed.append(
            (
                True,
                f"a generation is running or queued ({comfy.queue.running} "
                f"running, {comfy.queue.pending} pending)",
            )
        )
    return failed


def gpu_ok(g: GpuMemory) -> bool:
    return (
        g.total_bytes > 0
        and 0 <= g.used_bytes <= g.total_bytes
        and (0 <= g.free_bytes <= g.total_bytes)
    )


def model_ok(m: OllamaModel) -> bool:
    return m.size_bytes > 0 and m.size_vram_bytes >= 0


def expires_at(m: OllamaModel) -> float | None:
    """Its expires_at as Unix time (an offset-less value is read as UTC); None if unknown."""
    if not m.expires_at:
        return None
    try:
        at = datetime.fromisoformat(m.expires_at)
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def seems_busy(m: OllamaModel, wall_at: float | None) -> bool:
    """Still listed after its expires_at: a request is running (api-facts gotcha 6)."""
    at = expires_at(m)
    return wall_at is not None and at is not None and at < wall_at


def expiry_key(m: OllamaModel, wall_at: float | None = None) -> tuple[int, float, str]:
    """Unload order: soonest expiry first, then unknown/unparseable (it may be in use or
    pinned), then keep_alive forever (the user asked to keep it), then, with the time of
    the pass known, models whose expires_at passed while still listed: in use, and an
    unload only takes effect once their requests end."""
    at = expires_at(m)
    if at is None:
        return 1, 0.0, m.name
    if seems_busy(m, wall_at):
        return 3, at, m.name
    if at >= FOREVER_AFTER:
        return 2, at, m.name
    return 0, at, m.name
