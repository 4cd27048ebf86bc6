"""Admission of load requests: make room for a model before Ollama loads it.

Ollama fixes a model's GPU/CPU split when it loads it, from the VRAM free at that moment
(api-facts §1.8), so freeing ComfyUI after the load is too late. Policy:
- A load request for a model not in Ollama's /api/ps is held: estimate the VRAM it needs
  (estimate.py, with the assumptions of the Ollama in use: `RoomMaker.load_profile`, e.g.
  its default context by VRAM tier), add what its loads keep free
  (`OllamaProfile.load_headroom_bytes`: llama-server's 1 GiB fit target; before 0.30 the
  head room of Ollama's own layer estimate), ask the RoomMaker for that unless the room
  already covers it (free VRAM, plus those of Ollama's resident models its own rule evicts
  for this load: `RoomMaker.room_for`), then forward. The RoomMaker gets `wait_s`
  seconds; after that the request goes on anyway, with the log line
  "Gate: forwarding <model> without enough free VRAM after <s> s".
  Nothing is ever refused or changed; without an estimate (model not installed, Ollama
  silent) the request goes on at once and Ollama answers it.
- Held loads go one at a time (Ollama loads one at a time anyway), and the next one waits
  until the previous model is in (its answer's head arrived, or it shows in /api/ps), so
  it measures free VRAM with that model in place. Requests for resident models never
  wait behind a held load (one waiting for its room).
- A forwarded load that needs more than the free VRAM makes Ollama evict resident models
  (or spill). Until that model is in, the gate doubts its /api/ps cache: a request for
  another model the cache lists as resident asks /api/ps afresh (before 0.30, once the
  load is in, at most `load_hold_max_s`: that Ollama queues the request behind the
  eviction anyway; from 0.30 at once: Ollama removes a runner from /api/ps as it evicts
  it and serves one that stays at once); a model that was evicted is gated like any
  load, instead of being forwarded "as resident" and loaded beside whatever holds the
  room (found by the soak: Ollama evicts at once, the cache lags by up to `ps_ttl_s`). A
  /api/ps answer read while such a load was under way is never taken as fresh
  afterwards.
- /api/ps is cached for `ps_ttl_s`; a request that finds the cache older refreshes it in
  the background and uses the old answer, unless that is older than `ps_max_stale_s`
  (after an idle spell a model may have expired) or does not list the model (it may have
  loaded since), in which case it waits for a fresh one (at most PS_WAIT_S). If /api/ps
  cannot be read, nothing is held.
- Every size /api/ps shows is remembered: the next load of that model asks for it.
- Ollama and RoomMaker calls block; they run on the gate's thread pool. Everything else
  runs on the gate's event loop thread only.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from loguru import logger

from supervisor.clients.ollama import normalise_model_name
from supervisor.estimate import Estimate, EstimateParams, SeenSize, estimate_need, uses_seen_as_is
from supervisor.gate.load_request import LoadRequest
from supervisor.gate.stats import Counters
from supervisor.model import OllamaModel
from supervisor.ports import LoadRoom, OllamaApi, RoomMaker

log = logger.bind(component="gate")

T = TypeVar("T")


class Forward(Protocol):
    """Forwards the request; `on_head` (if not None) is called when the answer's head
    arrives. `upstream_url`: another server than the gate's own upstream (a gate in front
    of several servers routes by model)."""

    def __call__(
        self, on_head: Callable[[], None] | None, upstream_url: str | None = None
    ) -> Awaitable[bool]: ...


PS_WAIT_S = 3.0  # longest a request waits for a fresh /api/ps before going on without
DOOMED_S = 30.0  # the longest a model the supervisor unloads counts as not resident
LOAD_POLL_S = 0.5  # how often a held load checks /api/ps for its model
MAKE_ROOM_GRACE_S = 2.0  # beyond wait_s, in case a RoomMaker overruns its deadline


class WaitCounters(Protocol):
    """The counters a gate keeps of its waits for room."""

    waits_total: int
    wait_seconds_total: float
    forwarded_anyway_total: int


async def make_room_within(
    call: Callable[[Callable[[], bool]], Awaitable[bool]],
    make_room: Callable[[], bool],
    wait_s: float,
    stats: WaitCounters,
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run a RoomMaker's `make_room` (through `call`, off the event loop) for at most
    `wait_s` and a grace; count the wait, and the request forwarded without the room."""
    stats.waits_total += 1
    started = clock()
    try:
        async with asyncio.timeout(wait_s + MAKE_ROOM_GRACE_S):
            is_room = await call(make_room)
    except TimeoutError:
        is_room = False
    except Exception as exc:  # noqa: BLE001 - the request is forwarded anyway
        log.warning(f"Gate: making room for {what} failed: {exc}")
        is_room = False
    waited_s = clock() - started
    stats.wait_seconds_total += waited_s
    if not is_room:
        stats.forwarded_anyway_total += 1
        log.warning(f"Gate: forwarding {what} without enough free VRAM after {waited_s:.1f} s")


class Admission:
    """Decides when a load request may go to Ollama (event loop thread only)."""

    def __init__(
        self,
        *,
        ollama: OllamaApi,
        room: RoomMaker,
        executor: Executor,
        stats: Counters,
        wait_s: float,
        params: EstimateParams,
        ps_ttl_s: float,
        ps_max_stale_s: float,
        load_hold_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock  # monotonic seconds: /api/ps ages and doomed models' deadlines
        self._ollama = ollama
        self._room = room
        self._executor = executor
        self._stats = stats
        self._wait_s = wait_s
        self._params = params
        self._ps_ttl_s = ps_ttl_s
        self._ps_max_stale_s = max(ps_max_stale_s, ps_ttl_s)
        self._load_hold_max_s = load_hold_max_s
        self._ps_models: dict[str, OllamaModel] | None = None
        self._ps_at = -math.inf
        self._ps_task: asyncio.Task[None] | None = None
        self._seen: dict[str, SeenSize] = {}
        self._load_lock = asyncio.Lock()
        # Models the supervisor is unloading (key -> until when, monotonic): not resident
        # for the gate even while /api/ps still lists them, or a request forwarded "to a
        # resident model" would reload it next to whatever took the room meanwhile.
        self._doomed: dict[str, float] = {}
        # The forwarded load that may make Ollama evict resident models, until it is in.
        self._evicting: _Evicting | None = None
        # Bumped when such a load is in: an /api/ps read begun before is not fresh.
        self._ps_epoch = 0

    def doom(self, key: str) -> None:
        """The supervisor is about to unload `key` (event loop thread only)."""
        self._doomed[key] = self._clock() + DOOMED_S
        if self._ps_models is not None:
            self._ps_models.pop(key, None)

    def close(self) -> None:
        if self._ps_task is not None:
            self._ps_task.cancel()

    async def admit(self, load: LoadRequest, forward: Forward) -> bool:
        """Forward `load` once there is room for its model (at once when it is resident);
        returns what `forward` returns. `forward` gets a callback for the answer's head."""
        key = load.model.casefold()
        resident = await self.is_resident(key)
        evicting = self._evicting
        if resident and evicting is not None and evicting.key != key:
            # Ollama may be evicting this model for that load: look again, once that load
            # is in where Ollama queues this request behind it anyway (before 0.30), else
            # at once (from 0.30 Ollama removes an evicted runner from /api/ps as it
            # evicts it, and serves a runner that stays at once).
            if evicting.queues:
                await self._wait_loaded(evicting)
            resident = await self.is_resident(key, is_fresh=True)
        if resident is not False:
            return await forward(None)
        await self._load_lock.acquire()
        release = _once(self._load_lock.release)
        holder: asyncio.Task[None] | None = None
        try:
            if await self.is_resident(key, is_fresh=True) is not False:
                release()  # a load queued before this one brought it in
                return await forward(None)
            self._stats.gated_total += 1
            may_evict, queues = await self._make_room_for(load, key)
            self._doomed.pop(key, None)  # this load brings it back, with the room made
            if may_evict:
                evicting = self._evicting = _Evicting(key, asyncio.Event(), queues)
                release = _once(functools.partial(self._loaded, evicting, release))
            head_seen = asyncio.Event()
            holder = asyncio.get_running_loop().create_task(
                self._hold_until_loaded(key, head_seen, release)
            )
            return await forward(head_seen.set)
        finally:
            release()
            if holder is not None:
                holder.cancel()

    def admits_now(self, key: str) -> bool:
        """Whether a load of `key` would go on at once, known without waiting: /api/ps,
        read at most `ps_max_stale_s` ago, lists it, no other model's load may be evicting
        it, and the supervisor is not unloading it (what `admit` forwards at once). False
        also when only waiting could tell (then `admit` decides)."""
        evicting = self._evicting
        models = self._ps_models
        if (
            key in self._doomed
            or (evicting is not None and evicting.key != key)
            or models is None
            or key not in models
        ):
            return False
        age_s = self._clock() - self._ps_at
        if age_s > self._ps_max_stale_s:
            return False
        if age_s > self._ps_ttl_s:
            self._refresh_soon()  # stale but recent: never make a resident request wait
        return True

    def _loaded(self, evicting: _Evicting, release: Callable[[], None]) -> None:
        """The load that may have evicted is in (or given up on): what /api/ps said before
        is not fresh, and requests waiting on it look again."""
        if self._evicting is evicting:
            self._evicting = None
        self._ps_epoch += 1
        self._ps_at = -math.inf
        evicting.done.set()
        release()

    async def _wait_loaded(self, evicting: _Evicting) -> None:
        try:
            async with asyncio.timeout(self._load_hold_max_s):
                await evicting.done.wait()
        except TimeoutError:
            pass

    async def _hold_until_loaded(
        self, key: str, head_seen: asyncio.Event, release: Callable[[], None]
    ) -> None:
        """Keep the next gated load waiting until this model is in: its answer's head came
        (a streamed answer starts after the load), or /api/ps lists it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_hold_max_s
        try:
            while loop.time() < deadline:
                try:
                    async with asyncio.timeout(LOAD_POLL_S):
                        await head_seen.wait()
                    return
                except TimeoutError:
                    pass
                await self._refresh_ps()
                if self._ps_models is not None and key in self._ps_models:
                    return
        finally:
            release()

    async def _make_room_for(self, load: LoadRequest, key: str) -> tuple[bool, bool]:
        """Make room for the load (or give up at the deadline); returns whether Ollama may
        evict resident models for it (it needs more than the free VRAM, or that is
        unknown), and whether Ollama queues other requests behind that eviction (before
        0.30)."""
        model = load.model
        profile = await self._call_or_none(self._room.load_profile)
        queues = profile is not None and not profile.is_llama_server
        params = profile.params if profile is not None else self._params
        # llama-server's fit target, or the head room of an older Ollama's layer estimate.
        headroom = profile.load_headroom_bytes if profile is not None else 0
        what_room = "fit target" if profile is not None and profile.is_llama_server else "head room"
        estimate = await self._estimate(load, key, params)
        if estimate is None:
            log.info(
                f"Gate: no VRAM estimate for {model} (not installed, or Ollama did not say);"
                " forwarding it as is"
            )
            return False, queues
        # Free VRAM, plus Ollama's resident models where it evicts them itself.
        need = estimate.need_bytes + headroom
        fit = f" + {what_room} {_gib(headroom)}" if headroom else ""
        room: LoadRoom | None = await self._call_or_none(self._room.room_for, need)
        if room is not None and room.total_bytes >= need:
            log.info(
                f"Gate: {model} needs about {_gib(estimate.need_bytes)}{fit}"
                f" ({_basis(estimate)}); room {_gib(room.total_bytes)}"
            )
            return room.free_bytes < need, queues
        shown = _gib(room.total_bytes) if room is not None else "unknown"
        log.info(
            f"Gate: making room for {model}: needs about {_gib(estimate.need_bytes)}{fit}"
            f" ({_basis(estimate)}), room {shown}"
            " (free VRAM plus what Ollama evicts itself)"
        )
        make_room = functools.partial(
            self._room.make_room,
            need,
            reason=f"gate: load of {model}",  # room.py reads the model name back from it
            deadline_s=self._wait_s,
        )
        await make_room_within(self._call, make_room, self._wait_s, self._stats, model, self._clock)
        # Freeing ComfyUI usually leaves the free VRAM enough: then Ollama evicts nothing.
        room = await self._call_or_none(self._room.room_for, need)
        return room is None or room.free_bytes < need, queues

    async def _estimate(
        self, load: LoadRequest, key: str, params: EstimateParams
    ) -> Estimate | None:
        seen = self._seen.get(key)
        if uses_seen_as_is(seen, load.num_ctx):
            return estimate_need(
                weights_bytes=None,
                facts=None,
                request_num_ctx=load.num_ctx,
                seen=seen,
                params=params,
            )
        show = self._call_or_none(self._ollama.show, load.model)
        tags = self._call_or_none(self._ollama.tags) if seen is None else _none()
        facts, tagged = await asyncio.gather(show, tags)
        weights = None
        for entry in tagged or ():
            if model_key(entry.name) == key:
                weights = entry.size_bytes
                break
        return estimate_need(
            weights_bytes=weights,
            facts=facts,
            request_num_ctx=load.num_ctx,
            seen=seen,
            params=params,
        )

    # ------------------------------------------------------------------ /api/ps cache

    async def is_resident(self, key: str, *, is_fresh: bool = False) -> bool | None:
        """Whether Ollama has the model loaded; None when /api/ps cannot be read."""
        doomed_until = self._doomed.get(key)
        if doomed_until is not None:
            if self._clock() < doomed_until:
                await self._refresh_ps()
                if self._ps_models is not None and key not in self._ps_models:
                    # gone: from now on /api/ps tells the truth (pop: requests for the
                    # same model wait here together, and each of them gets here)
                    self._doomed.pop(key, None)
                return False
            self._doomed.pop(key, None)
        age_s = self._clock() - self._ps_at
        if is_fresh or age_s > self._ps_max_stale_s:
            await self._refresh_ps()
        elif age_s > self._ps_ttl_s:
            self._refresh_soon()
            if self._ps_models is not None and key in self._ps_models:
                return True  # stale but recent: never make a resident request wait
            await self._refresh_ps()
        models = self._ps_models
        return None if models is None else key in models

    def _refresh_soon(self) -> asyncio.Task[None]:
        if self._ps_task is None or self._ps_task.done():
            self._ps_task = asyncio.get_running_loop().create_task(self._read_ps())
        return self._ps_task

    async def _refresh_ps(self) -> None:
        try:
            async with asyncio.timeout(PS_WAIT_S):
                # Shielded: a waiter that gives up must not cancel the shared read.
                await asyncio.shield(self._refresh_soon())
        except TimeoutError:
            pass

    async def _read_ps(self) -> None:
        epoch = self._ps_epoch
        try:
            models = await self._call(self._ollama.ps)
        except Exception as exc:  # noqa: BLE001 - no /api/ps: not gating
            if self._ps_models is not None:
                log.debug(f"Gate: cannot read Ollama's /api/ps, not gating for now: {exc}")
            self._ps_models = None
        else:
            resident: dict[str, OllamaModel] = {}
            for entry in models:
                key = model_key(entry.name)
                resident[key] = entry
                if entry.size_bytes > 0:
                    self._seen[key] = SeenSize(entry.size_bytes, entry.context_length)
            self._ps_models = resident
        finally:
            # Begun before an evicting load was in: use it, but never as fresh.
            self._ps_at = self._clock() if self._ps_epoch == epoch else -math.inf

    # ------------------------------------------------------------------ blocking calls

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call_or_none(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return await self._call(fn, *args)
        except Exception as exc:  # noqa: BLE001 - advice only: the request goes on
            log.debug(f"Gate: {getattr(fn, '__name__', fn)} failed: {exc}")
            return None


class _Evicting:
    """A forwarded load of `key` that may make Ollama evict others; `done` once it is in;
    `queues`: Ollama serves other requests only after it (before 0.30)."""

    __slots__ = ("done", "key", "queues")

    def __init__(self, key: str, done: asyncio.Event, queues: bool) -> None:
        self.key = key
        self.done = done
        self.queues = queues


def model_key(name: str) -> str:
    """How the gate keys a model (residency, sizes seen, unloads): the name as /api/ps shows
    it, case-folded, since Ollama compares names case-insensitively."""
    return normalise_model_name(name).casefold()


async def _none() -> None:
    return None


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, callable many times, effective once (the load slot has several releasers)."""
    is_done = False

    def call() -> None:
        nonlocal is_done
        if not is_done:
            is_done = True
            fn()

    return call


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _basis(estimate: Estimate) -> str:
    if estimate.basis == "formula":
        return (
            f"weights {_gib(estimate.weights_bytes or 0)} + KV {_gib(estimate.kv_bytes or 0)}"
            f" at {estimate.num_ctx} ctx + overhead {_gib(estimate.overhead_bytes)}"
        )
    if estimate.basis == "seen+kv":
        return f"its last /api/ps size with the KV cache rescaled to {estimate.num_ctx} ctx"
    return "its last /api/ps size"
