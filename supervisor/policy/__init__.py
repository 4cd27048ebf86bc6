"""The pure decision core: what to do about GPU memory this pass, and what to remember.

`decide(obs, state, settings, now)` reads one `Observation` and the previous `PolicyState`
and returns a `Decision`: actions with reasons, the next state, INFO notes, DEBUG reasons
why a trigger did not act, and when to look again. `record(state, outcome, now)` folds the
measured `Outcome` of one action back into the state. Nothing here performs I/O or reads
the clock: both functions are deterministic in their arguments (imports: stdlib, model,
config, units only; a test checks every module of this package in a fresh interpreter).

The package, in the order one pass runs it (`core.decide`):
- `scratch`   the pass's working state; cleans the observation.
- `triggers`  1. new models, 2. a GPU over VRAM_THRESHOLD, 4. unload idle models for a
              busy ComfyUI or job server.
- `servers`   the model servers of every kind (Ollama, llama-server ...) as triggers 1 and
              4 read them: resident model names, unload candidates.
- `jobs`      the job servers of every kind (ComfyUI, A1111 ...) as triggers 1, 2 and 4
              read them: has work, how a free is asked for.
- `heal`      3. Ollama models spilled to the CPU: heal, or free room for them.
- `episodes`  per-ComfyUI free episodes (soft -> hard -> restart), rate limit, restarts.
- `guards`    judgements of one reading: what a free returns, may it be freed or
              restarted now, is a reading garbage.
- `core`      decide() and record(); when to wake next (0.5 s while an episode or a
              heal is in motion, min(check interval, 2 s) for a busy ComfyUI alone).

Never: an action on a stopped or unreachable service (other than the dead-API restart),
an action from a missing or garbage reading (models/queue None, a GPU with impossible
figures: that trigger does nothing this pass), or the same action twice in one decision.
"""

from __future__ import annotations

from supervisor.policy.core import BUSY_WAKE_S, FAST_WAKE_S, decide, record
from supervisor.policy.guards import (
    CUDA_CONTEXT_BYTES,
    DEAD_API_CHECKS,
    EPISODE_STALE_S,
    MIN_RECLAIMABLE_BYTES,
    SAFETY_MARGIN_BYTES,
    estimate_reclaimable,
    fits_gpu,
    free_blocker,
    is_api_dead,
    room_needed,
    service_gpus,
    shares_gpu,
)

__all__ = [
    "BUSY_WAKE_S",
    "CUDA_CONTEXT_BYTES",
    "DEAD_API_CHECKS",
    "EPISODE_STALE_S",
    "FAST_WAKE_S",
    "MIN_RECLAIMABLE_BYTES",
    "SAFETY_MARGIN_BYTES",
    "decide",
    "estimate_reclaimable",
    "fits_gpu",
    "free_blocker",
    "is_api_dead",
    "record",
    "room_needed",
    "service_gpus",
    "shares_gpu",
]
