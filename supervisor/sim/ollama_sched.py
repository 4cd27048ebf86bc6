"""The fake Ollama's scheduler: loads, placement, keep-alive, unloads and token timing.

Behaviour follows api-facts 1.3, 1.6 and 1.8 (current llama-server builds):
* One load at a time; requests for a model already loaded do not wait for it.
* Placement is decided once, at load time, from the GPU's free bytes (which include other
  processes' use). What does not fit goes to the CPU, whole layers at a time, and stays
  there until the runner is unloaded: nothing ever moves layers back.
* The first model may load partly offloaded. A further model must fit fully: Ollama evicts
  its own runners (keep-alive ascending, then name; idle first, else it waits for the first)
  and retries; it never evicts another process. When nothing of its own is left, it loads
  partly offloaded.
* A model is listed only once loaded (unless `list_while_loading`, the 2025 behaviour).
  It leaves the list as soon as its unload starts; its VRAM comes back `unload_delay_s`
  later. With requests in flight, the unload waits for them.
* A load dies with its client: `gone()` is polled while waiting and loading.

Every duration here is simulated seconds; `time_scale` converts to real ones (0.01 runs a
5 min keep-alive in 3 s). Wall-clock `expires_at` values are real time, so they say when the
sim will really unload.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from supervisor.sim.catalog import FOREVER, ModelSpec
from supervisor.sim.gpu import GIB, MIB, SimGpu

_POLL_S = 0.01  # how often a waiting load checks its client (real seconds)


class LoadAborted(Exception):
    """The client went away before its model finished loading."""


@dataclass
class OllamaConfig:
    time_scale: float = 1.0
    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE; math.inf = forever
    unload_delay_s: float = 0.5  # runner exit to VRAM really free
    load_base_s: float = 0.2
    load_bytes_per_s: float = 24 * GIB
    cpu_slowdown: float = 9.0  # per-token cost on CPU vs GPU; fits Ollama #14258's figures
    num_ctx: int = 4096
    num_parallel: int = 1
    max_loaded_models: int = 3
    fit_margin_bytes: int = 256 * MIB  # llama-server keeps this much free when fitting layers
    num_predict: int = 32  # tokens per answer when the request does not say
    version: str = "0.12.6"
    list_while_loading: bool = False
    pid: int | None = None  # reported to the GPU; default os.getpid()


@dataclass
class ModelStats:
    requests: int = 0
    loads: int = 0
    loads_full_gpu: int = 0
    loads_aborted: int = 0
    unloads: int = 0
    evictions: int = 0
    tokens: int = 0
    tokens_full_gpu: int = 0
    spilled_s: float = 0.0  # simulated seconds a partly offloaded runner was loaded
    last_gpu_fraction: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(eq=False)
class Runner:
    spec: ModelSpec
    num_ctx: int
    num_gpu: int
    size_bytes: int
    size_vram: int
    keep_alive_s: float
    owner: str
    loaded_mono: float
    slots: threading.Semaphore
    refcount: int = 0
    loading: bool = False
    expire_when_idle: bool = False
    expires_wall: float | None = None  # None until the first request finishes
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def gpu_fraction(self) -> float:
        return self.size_vram / self.size_bytes if self.size_bytes else 0.0

    @property
    def is_spilled(self) -> bool:
        return self.size_vram < self.size_bytes


class Scheduler:
    def __init__(self, gpu: SimGpu, config: OllamaConfig) -> None:
        self.gpu = gpu
        self.config = config
        self.pid = config.pid if config.pid is not None else os.getpid()
        self._cond = threading.Condition()
        self._loaded: dict[str, Runner] = {}
        self._load_lock = threading.Lock()
        self._stats: dict[str, ModelStats] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="sim-ollama-reaper")
        self._reaper.start()

    # ------------------------------------------------------------------ time helpers

    def real_s(self, sim_s: float) -> float:
        return sim_s * self.config.time_scale

    def sleep(self, sim_s: float, gone: Callable[[], bool] | None = None) -> None:
        """Sleep `sim_s` simulated seconds; raise LoadAborted if `gone()` turns true."""
        deadline = time.monotonic() + self.real_s(sim_s)
        while (left := deadline - time.monotonic()) > 0:
            if gone is not None and gone():
                raise LoadAborted
            if self._stop.wait(min(left, _POLL_S)):
                return

    def stats(self, name: str) -> ModelStats:
        return self._stats.setdefault(name, ModelStats())

    # ------------------------------------------------------------------ public API

    def loaded(self) -> list[Runner]:
        """Runners shown by /api/ps."""
        with self._cond:
            return [
                r for r in self._loaded.values() if self.config.list_while_loading or not r.loading
            ]

    def acquire(
        self,
        spec: ModelSpec,
        *,
        keep_alive_s: float | None,
        num_ctx: int | None,
        num_gpu: int | None,
        gone: Callable[[], bool],
    ) -> Runner:
        """A loaded runner for `spec` with one reference held; loads it if needed."""
        with self._cond:
            self.stats(spec.name).requests += 1
        while True:
            with self._cond:
                runner = self._loaded.get(spec.name)
                if (
                    runner
                    and not runner.loading
                    and not self._needs_reload(runner, num_ctx, num_gpu)
                ):
                    self._use(runner, keep_alive_s)
                    return runner
            self._wait_for_lock(self._load_lock, gone)
            try:
                with self._cond:
                    runner = self._loaded.get(spec.name)
                    if runner and not self._needs_reload(runner, num_ctx, num_gpu):
                        continue  # loaded by someone else meanwhile; use it on the next pass
                if runner is not None:
                    self._evict(runner, gone)
                return self._load(spec, keep_alive_s, num_ctx, num_gpu, gone)
            finally:
                self._load_lock.release()

    def done(self, runner: Runner) -> None:
        """Drop one reference; start the keep-alive timer or the pending unload."""
        with self._cond:
            runner.refcount -= 1
            if runner.refcount > 0:
                return
            if runner.expire_when_idle or runner.keep_alive_s <= 0:
                self._begin_unload(runner)
            else:
                runner.expires_wall = time.time() + self._keep_alive_real(runner)
                self._cond.notify_all()

    def unload(self, spec: ModelSpec) -> None:
        """keep_alive 0 with no prompt: answer at once, unload when idle (no-op if absent)."""
        with self._cond:
            runner = self._loaded.get(spec.name)
            if runner is None or runner.loading:
                return
            runner.expire_when_idle = True
            if runner.refcount == 0:
                self._begin_unload(runner)

    def seconds_per_token(self, runner: Runner) -> float:
        """Simulated decode time per token: the GPU share at GPU speed, the rest on CPU."""
        gpu_s = 1.0 / runner.spec.tokens_per_s_on_gpu
        cpu_share = 1 - runner.gpu_fraction
        return gpu_s * (runner.gpu_fraction + cpu_share * self.config.cpu_slowdown)

    def tokens(self, runner: Runner, count: int) -> Iterator[int]:
        """Yield token indexes at the speed the runner's GPU share allows."""
        per_token = self.seconds_per_token(runner)
        st = self.stats(runner.name)
        full = not runner.is_spilled
        with runner.slots:
            due = time.monotonic()
            for i in range(count):
                due += self.real_s(per_token)
                # Sleep only when a millisecond is owed: sleeping per token would cost more
                # than the token at small time scales.
                owed = due - time.monotonic()  # read once: a second read may be past due
                if owed > 0.001:
                    time.sleep(owed)
                with self._cond:
                    st.tokens += 1
                    st.tokens_full_gpu += int(full)
                yield i

    def stats_json(self) -> dict[str, Any]:
        with self._cond:
            now = time.monotonic()
            models: dict[str, Any] = {}
            for name, st in self._stats.items():
                data = st.to_json()
                runner = self._loaded.get(name)
                if runner and runner.is_spilled and not runner.loading:
                    data["spilled_s"] += (now - runner.loaded_mono) / self.config.time_scale
                models[name] = data
        totals: dict[str, float] = {k: 0 for k in ModelStats().__dict__ if k != "last_gpu_fraction"}
        for data in models.values():
            for key in totals:
                totals[key] += data[key]
        return {"time_scale": self.config.time_scale, "totals": totals, "models": models}

    def reset_stats(self) -> None:
        with self._cond:
            self._stats.clear()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            for runner in list(self._loaded.values()):
                self.gpu.release(runner.owner)
            self._loaded.clear()

    # ------------------------------------------------------------------ internals

    def _keep_alive_real(self, runner: Runner) -> float:
        return math.inf if runner.keep_alive_s == FOREVER else self.real_s(runner.keep_alive_s)

    def _needs_reload(self, runner: Runner, num_ctx: int | None, num_gpu: int | None) -> bool:
        ctx = runner.spec.effective_ctx(num_ctx or self.config.num_ctx)
        return ctx != runner.num_ctx or (num_gpu is not None and num_gpu != runner.num_gpu)

    def _use(self, runner: Runner, keep_alive_s: float | None) -> None:
        runner.refcount += 1
        if keep_alive_s is not None:  # copied only when the request set it
            runner.keep_alive_s = keep_alive_s
            runner.expire_when_idle = keep_alive_s <= 0

    def _wait_for_lock(self, lock: threading.Lock, gone: Callable[[], bool]) -> None:
        while not lock.acquire(timeout=_POLL_S):
            if gone():
                raise LoadAborted

    def _wait_released(self, runner: Runner, gone: Callable[[], bool]) -> None:
        while not runner.released.wait(_POLL_S):
            if gone():
                raise LoadAborted

    def _evict(self, runner: Runner, gone: Callable[[], bool]) -> None:
        with self._cond:
            self.stats(runner.name).evictions += 1
            runner.expire_when_idle = True
            if runner.refcount == 0:
                self._begin_unload(runner)
        self._wait_released(runner, gone)

    def _make_room(self, need: int, gone: Callable[[], bool]) -> None:
        """requireFull: evict our own runners until `need` fits or none is left."""
        while True:
            with self._cond:
                ours = [r for r in self._loaded.values() if not r.loading]
            if not ours:
                return
            if len(ours) < self.config.max_loaded_models:
                free = self.gpu.free_bytes() - self.config.fit_margin_bytes
                if need <= free:
                    return
            ours.sort(key=lambda r: (r.keep_alive_s, r.name))
            idle = [r for r in ours if r.refcount == 0]
            self._evict(idle[0] if idle else ours[0], gone)

    def _load(
        self,
        spec: ModelSpec,
        keep_alive_s: float | None,
        num_ctx: int | None,
        num_gpu: int | None,
        gone: Callable[[], bool],
    ) -> Runner:
        cfg = self.config
        ctx = spec.effective_ctx(num_ctx or cfg.num_ctx)
        need = spec.runner_bytes(ctx, cfg.num_parallel)
        if num_gpu != 0:
            self._make_room(need, gone)
        owner = f"ollama:{spec.name}"
        layers = spec.block_count + 1
        granted = 0
        if num_gpu != 0:
            # llama-server fits whole layers into what the device reports free right now.
            granted = self.gpu.allocate_partial(
                owner,
                self.pid,
                need,
                keep_free_bytes=cfg.fit_margin_bytes,
                step_bytes=math.ceil(need / layers),
            )
        runner = Runner(
            spec=spec,
            num_ctx=ctx,
            num_gpu=-1 if num_gpu is None else num_gpu,
            size_bytes=need,
            size_vram=granted,
            keep_alive_s=cfg.keep_alive_s if keep_alive_s is None else keep_alive_s,
            owner=owner,
            loaded_mono=time.monotonic(),
            slots=threading.Semaphore(1 if spec.is_embedding else max(1, cfg.num_parallel)),
            refcount=1,
            loading=True,
        )
        runner.expire_when_idle = runner.keep_alive_s <= 0
        with self._cond:
            self._loaded[spec.name] = runner
        try:
            self.sleep(cfg.load_base_s + spec.size_bytes / cfg.load_bytes_per_s, gone)
        except LoadAborted:
            with self._cond:
                self._loaded.pop(spec.name, None)
                self.stats(spec.name).loads_aborted += 1
            self.gpu.release(owner)
            runner.released.set()
            raise
        with self._cond:
            runner.loading = False
            runner.loaded_mono = time.monotonic()
            st = self.stats(spec.name)
            st.loads += 1
            st.loads_full_gpu += int(not runner.is_spilled)
            st.last_gpu_fraction = round(runner.gpu_fraction, 4)
        return runner

    def _begin_unload(self, runner: Runner) -> None:
        """Caller holds the condition. Drop from the list now, free VRAM after the delay."""
        if self._loaded.get(runner.name) is runner:
            del self._loaded[runner.name]
        st = self.stats(runner.name)
        st.unloads += 1
        if runner.is_spilled:
            st.spilled_s += (time.monotonic() - runner.loaded_mono) / self.config.time_scale

        def release() -> None:
            self.gpu.release(runner.owner)
            runner.released.set()

        timer = threading.Timer(self.real_s(self.config.unload_delay_s), release)
        timer.daemon = True
        timer.start()

    def _reap(self) -> None:
        """Unload idle runners whose keep-alive ran out."""
        while not self._stop.is_set():
            with self._cond:
                now = time.time()
                wait = 0.5
                for runner in list(self._loaded.values()):
                    if runner.refcount or runner.loading or runner.expires_wall is None:
                        continue
                    if runner.expires_wall <= now:
                        self._begin_unload(runner)
                    else:
                        wait = min(wait, runner.expires_wall - now)
                self._cond.wait(timeout=max(wait, 0.001))
