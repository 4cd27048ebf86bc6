"""Which Ollama the supervisor talks to, and what that changes (pure: no I/O, no clock).

Ollama's behaviour around memory changed twice (api-facts-2026 sections 1 and 3):

- **>= 0.15.5**: without `OLLAMA_CONTEXT_LENGTH`, the default context depends on the total
  VRAM of the GPUs Ollama sees (minus `OLLAMA_GPU_OVERHEAD` per GPU): >= 47 GiB 262144,
  >= 23 GiB 32768, else 4096, capped at the model's trained context. Earlier: 4096.
- **>= 0.30.0** (pre-releases such as `0.30.0-rc1` count): every model runs in its own
  `llama-server`, which fits layers into the free memory it reads once at its start and
  keeps the fit target free (1 GiB; `LLAMA_ARG_FIT_TARGET`, in MiB, overrides it). A
  further model no longer has to fit fully: Ollama evicts one of its own runners at a time
  only while its predicted need exceeds 80 % of its free figure, and otherwise lets the
  new model spill. Its prediction adds a batch surcharge: 768 MiB, 2 GiB above 32768
  tokens.

`ollama_profile(version, env, gpu_total_bytes)` turns `GET /api/version`, the Ollama
container's environment (Docker inspect `Config.Env`) and the GPUs' total memory into an
`OllamaProfile`: the estimate's assumptions (estimate.EstimateParams), the fit target every
"fits" judgement adds, and which room rule applies (`is_llama_server`, for
`model.evictable_bytes`). An unknown version (Ollama
not answering yet, a development build reporting 0.0.0) is taken as the newest behaviour,
which needs more room: the safer side. Without Docker (fixed URLs) the environment is
unknown and the documented defaults apply (context by tier, one slot, f16 KV, 1 GiB).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from supervisor.estimate import EstimateParams

MIB = 1024**2
GIB = 1024**3

LLAMA_SERVER_SINCE = (0, 30, 0)
CONTEXT_TIERS_SINCE = (0, 15, 5)
FIT_TARGET_BYTES = 1024 * MIB
# Before 0.30 Ollama places a model by its own layer estimate, which keeps some memory free
# on the GPU and offloads whole layers; how much it keeps is not in the reference
# (UNVERIFIED), so a load is given the policy's safety margin (policy.guards, 512 MiB) on
# top of its size: a model that would fit with a few hundred MiB to spare spills a layer
# otherwise (found by the soak: 17.03 GiB needed, 17.16 GiB free, spilled).
LAYER_ESTIMATE_HEADROOM_BYTES = 512 * MIB
TIER_CONTEXTS = ((47 * GIB, 262144), (23 * GIB, 32768))
FALLBACK_CONTEXT = 4096
SMALL_BATCH_BYTES = 768 * MIB
LARGE_BATCH_BYTES = 2 * GIB
LARGE_CONTEXT = 32768

# The variables of the Ollama container that change a load's need; only these are kept
# from Config.Env (the rest may hold secrets and is none of our business).
ENV_KEYS = (
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_GPU_OVERHEAD",
    "LLAMA_ARG_FIT_TARGET",
)
# Bytes per KV element by OLLAMA_KV_CACHE_TYPE; quantised types apply only with flash
# attention on (Ollama falls back to f16 without it).
KV_BYTES = {"f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """`0.33.0`, `v0.30.0-rc1` -> the numbers (a pre-release counts as its release);
    None for no version, garbage, or a development build's `0.0.0`."""
    match = _VERSION.match(text or "")
    if match is None:
        return None
    numbers = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return None if numbers == (0, 0, 0) else numbers


def env_subset(env: Mapping[str, str] | Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The ENV_KEYS entries of a mapping or of Docker's `KEY=value` list, sorted."""
    items: Mapping[str, str]
    if isinstance(env, Mapping):
        items = env
    else:
        items = dict(entry.split("=", 1) for entry in env if "=" in entry)
    return tuple(sorted((k, str(v)) for k, v in items.items() if k in ENV_KEYS))


def tier_context(total_bytes: int | None) -> int:
    """Ollama >= 0.15.5's default context for GPUs of `total_bytes` in all (None: 32768,
    the tier of the commonest cards, when nothing says how big the GPUs are)."""
    if total_bytes is None:
        return TIER_CONTEXTS[1][1]
    for floor, ctx in TIER_CONTEXTS:
        if total_bytes >= floor:
            return ctx
    return FALLBACK_CONTEXT


def batch_surcharge(num_ctx: int | None) -> int:
    return LARGE_BATCH_BYTES if (num_ctx or 0) > LARGE_CONTEXT else SMALL_BATCH_BYTES


@dataclass(frozen=True)
class OllamaProfile:
    version: str | None  # as /api/version said it; None: not read (yet)
    is_llama_server: bool  # >= 0.30, or an unknown version (assumed)
    is_context_by_vram: bool
    params: EstimateParams
    fit_target_bytes: int  # what its loads leave free; 0 before 0.30
    notes: tuple[str, ...] = ()  # settings that could not be read, for the log

    @property
    def load_headroom_bytes(self) -> int:
        """What a load must find free beyond the model's size for Ollama to place it whole
        on the GPU: llama-server's fit target (>= 0.30: it fits layers into the free memory
        less that target), else the head room of Ollama's own layer estimate."""
        return self.fit_target_bytes if self.is_llama_server else LAYER_ESTIMATE_HEADROOM_BYTES

    @property
    def is_version_known(self) -> bool:
        return parse_version(self.version) is not None

    @property
    def generation(self) -> str:
        """One phrase for `status`, `doctor` and the log."""
        if not self.is_version_known:
            return "version unknown: assuming llama-server (>= 0.30) rules"
        if self.is_llama_server:
            return "llama-server runners (>= 0.30)"
        if self.is_context_by_vram:
            return "ollama runner, context by VRAM (0.15.5-0.29)"
        return "ollama runner (< 0.15.5)"

    def describe(self) -> str:
        p = self.params
        fit = f", fit target {self.fit_target_bytes // MIB} MiB" if self.fit_target_bytes else ""
        return (
            f"{self.generation}; default context {p.default_num_ctx}, "
            f"{p.num_parallel} slot(s), KV {p.kv_bytes_per_element:g} B/element{fit}"
        )


def _int(env: Mapping[str, str], key: str, notes: list[str]) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        notes.append(f"{key}={raw!r} is not a whole number; using Ollama's default")
        return None
    if value < 0:
        notes.append(f"{key}={raw!r} is negative; using Ollama's default")
        return None
    return value


def _truthy(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "t", "yes", "on")


def ollama_profile(
    version: str | None,
    env: Mapping[str, str] | None = None,
    gpu_total_bytes: int | None = None,
    gpu_count: int = 1,
) -> OllamaProfile:
    """What Ollama `version` with `env` does on GPUs of `gpu_total_bytes` in all."""
    env = env or {}
    notes: list[str] = []
    numbers = parse_version(version)
    is_llama_server = numbers is None or numbers >= LLAMA_SERVER_SINCE
    by_vram = numbers is None or numbers >= CONTEXT_TIERS_SINCE
    ctx = _int(env, "OLLAMA_CONTEXT_LENGTH", notes) or None
    overhead = _int(env, "OLLAMA_GPU_OVERHEAD", notes) or 0
    if ctx is None:
        if by_vram:
            total = None if gpu_total_bytes is None else gpu_total_bytes - overhead * gpu_count
            ctx = tier_context(total)
        else:
            ctx = FALLBACK_CONTEXT
    parallel = _int(env, "OLLAMA_NUM_PARALLEL", notes) or 1
    kv_type = env.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower() or "f16"
    if kv_type not in KV_BYTES:
        notes.append(f"OLLAMA_KV_CACHE_TYPE={kv_type!r} is unknown; assuming f16")
        kv_type = "f16"
    flash = _truthy(env.get("OLLAMA_FLASH_ATTENTION", ""))
    kv_bytes = KV_BYTES[kv_type] if flash else KV_BYTES["f16"]
    fit_target = 0
    if is_llama_server:
        fit_mib = _int(env, "LLAMA_ARG_FIT_TARGET", notes)
        fit_target = FIT_TARGET_BYTES if fit_mib is None else fit_mib * MIB
    params = EstimateParams(
        default_num_ctx=ctx,
        num_parallel=parallel,
        kv_bytes_per_element=kv_bytes,
        batch_bytes=batch_surcharge(ctx) if is_llama_server else 0,
    )
    return OllamaProfile(version, is_llama_server, by_vram, params, fit_target, tuple(notes))
