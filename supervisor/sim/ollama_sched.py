"""The fake Ollama's scheduler: loads, placement, keep-alive, unloads and token timing.

Two generations (`OllamaConfig.profile`, built by `ollama_config`; see sim/profiles.py):

**2025** (Ollama 0.12, api-facts 1.3, 1.6 and 1.8):
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
* After every unload (keep_alive 0, keep-alive expiry, eviction) Ollama waits for VRAM
  recovery: it notes the GPU's free memory just before the runner exits, then polls every
  250 ms until free memory has grown by more than 80 % (2026: 75 %) of the runner's VRAM,
  for at most 5 s. Memory another process takes meanwhile does not count, so then the
  wait runs to the 5 s cap. A load that had to evict waits for this; other loads do not
  (Ollama runs the wait in its completion loop, and its pending loop waits on it only for
  its own evictions). The completion loop is serial in Ollama (a second unload is handled
  after the first one's wait); here each unload's wait runs on its own.
* A load dies with its client: `gone()` is polled while waiting and loading.

**2026** (Ollama >= 0.30, llama-server runners; api-facts-2026 section 1), as 2025 except:
* Each runner is a `llama-server` child process with its own PID (a new one on every load
  or reload); its memory is attributed to that PID.
* Without `num_gpu` llama-server fits layers into the free memory it reads once at its
  start, keeping the fit target free (1 GiB; `LLAMA_ARG_FIT_TARGET` overrides). An
  explicit `num_gpu` > 0 skips fitting: layers that do not fit fail the load with out of
  memory instead of spilling; `num_gpu: 0` is CPU only.
* Default context by the GPU's total memory when `OLLAMA_CONTEXT_LENGTH` is unset: >= 47 GiB
  262144, >= 23 GiB 32768, else 4096 (capped at the trained context).
* A further model need not fit fully: Ollama predicts its need (weights + f16 KV for
  num_ctx x num_parallel + a batch surcharge of 768 MiB, 2 GiB above 32768 tokens) and
  evicts one of its own runners at a time only while that prediction exceeds 80 % of its
  free figure: the free memory logged at the last load, corrected for its own loads and
  unloads since, so stale with respect to other processes. Then the load may spill.
* Out of memory at load: all other runners are evicted and an automatic context drops one
  step (> 32768 -> 32768, > 4096 -> 4096); one retry, then HTTP 500.
* An unload gives most of the memory back `unload_delay_s` after the runner exits and the
  rest `unload_tail_s` later (NVML lags); an eviction waits until 75 % is back (at most
  5 s, as above), so the next runner may start beside the tail.

Every duration here is simulated seconds; `time_scale` converts to real ones (0.01 runs a
5 min keep-alive in 3 s). Wall-clock `expires_at` values are real time, so they say when the
sim will really unload.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from supervisor.sim.catalog import FOREVER, ModelSpec
from supervisor.sim.gpu import GIB, MIB, SimGpu
from supervisor.sim.process import StandInProcess as _RunnerProcess

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
    pid: int | None = None  # reported to the GPU; default os.getpid() (2025)
    profile: str = "2025"  # see the module docstring; build a 2026 one with ollama_config()
    context_by_vram: bool = False  # 2026 without OLLAMA_CONTEXT_LENGTH: ctx by total VRAM
    gpu_overhead_bytes: int = 0  # OLLAMA_GPU_OVERHEAD: lowers the context tier only (2026)
    unload_tail_s: float = 0.5  # 2026: the last part of an unload's memory comes back later
    runner_processes: bool = True  # 2026: a child process per runner (its PID in NVML)

    @property
    def is_2026(self) -> bool:
        return self.profile == "2026"


# api-facts-2026 section 1
FIT_TARGET_BYTES = 1024 * MIB  # llama-server keeps this free when it fits layers
RECOVER_FRACTION = {"2025": 0.8, "2026": 0.75}  # of an unloaded model's VRAM, waited for
RECOVER_WAIT_S = 5.0
RECOVER_POLL_S = 0.25
EVICT_ABOVE = 0.8  # 2026: evict own runners only while need > this x Ollama's free figure
TIER_CONTEXTS = ((47 * GIB, 262144), (23 * GIB, 32768))
SMALL_BATCH_BYTES = 768 * MIB
LARGE_BATCH_BYTES = 2 * GIB
LARGE_CONTEXT = 32768  # above this the batch surcharge is the large one (UNVERIFIED bound)
_TAIL_FRACTION = 0.1  # 2026: the share of an unload's memory that comes back late


class LoadFailed(Exception):
    """The load failed (2026: out of memory with an explicit num_gpu)."""


def ollama_config(profile: str = "2025", **changes: object) -> OllamaConfig:
    """An OllamaConfig for a profile ("2025" or "2026"), with `changes` on top."""
    if profile == "2025":
        return dataclasses.replace(OllamaConfig(), **changes)  # type: ignore[arg-type]
    if profile != "2026":
        raise ValueError(f"unknown simulator profile {profile!r}; accepted: 2026, 2025")
    base = OllamaConfig(
        profile="2026",
        version="0.33.0",
        fit_margin_bytes=FIT_TARGET_BYTES,
        context_by_vram=True,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def tier_context(total_bytes: int) -> int:
    """Ollama >= 0.15.5's default context for this much VRAM (api-facts-2026 section 1)."""
    for floor, ctx in TIER_CONTEXTS:
        if total_bytes >= floor:
            return ctx
    return 4096


def batch_surcharge(num_ctx: int) -> int:
    return LARGE_BATCH_BYTES if num_ctx > LARGE_CONTEXT else SMALL_BATCH_BYTES


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
    last_size_bytes: int | None = None  # what the last load really took (RAM + VRAM)
    first_size_bytes: int | None = None  # and the first one since the counters were reset

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
    requested_ctx: int = 0  # the context asked for (before an OOM retry lowered it)
    pid: int = 0
    process: _RunnerProcess | None = None
    refcount: int = 0
    loading: bool = False
    expire_when_idle: bool = False
    expires_wall: float | None = None  # None until the first request finishes
    released: threading.Event = field(default_factory=threading.Event)
    recovered: threading.Event = field(default_factory=threading.Event)  # recovery wait over

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
        self._seq = 0
        # 2026: the free memory llama-server logged at the last load, and Ollama's own VRAM
        # then (its free figure is that, corrected for its own use since).
        self._logged_free: int | None = None
        self._own_at_log = 0
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

    def default_ctx(self) -> int:
        """The context a request gets when neither it nor the Modelfile sets `num_ctx`."""
        cfg = self.config
        if cfg.context_by_vram:
            return tier_context(self.gpu.total_bytes - cfg.gpu_overhead_bytes)
        return cfg.num_ctx

    def free_figure(self) -> int | None:
        """2026: the free memory Ollama believes the GPU has (stale for other processes)."""
        with self._cond:
            if self._logged_free is None:
                return None
            own = sum(r.size_vram for r in self._loaded.values())
            return self._logged_free + self._own_at_log - own

    # ------------------------------------------------------------------ public API

    def loaded(self) -> list[Runner]:
        """Runners shown by /api/ps."""
        with self._cond:
            return [
                r for r in self._loaded.values() if self.config.list_while_loading or not r.loading
            ]

    def holders(self) -> list[dict[str, Any]]:
        """The runners holding VRAM: model, vram_bytes, busy (serving or loading for a
        request), loaded_mono (for the image simulator's low-VRAM trace)."""
        with self._cond:
            return [
                {
                    "model": r.name,
                    "vram_bytes": r.size_vram,
                    "busy": r.refcount > 0 or r.loading,
                    "loaded_mono": r.loaded_mono,
                }
                for r in self._loaded.values()
                if r.size_vram > 0
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
        counters = [k for k in ModelStats().__dict__ if not k.startswith(("last_", "first_"))]
        totals: dict[str, float] = dict.fromkeys(counters, 0)
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
                if runner.process is not None:
                    runner.process.stop()
            self._loaded.clear()

    # ------------------------------------------------------------------ internals

    def _keep_alive_real(self, runner: Runner) -> float:
        return math.inf if runner.keep_alive_s == FOREVER else self.real_s(runner.keep_alive_s)

    def _needs_reload(self, runner: Runner, num_ctx: int | None, num_gpu: int | None) -> bool:
        ctx = runner.spec.effective_ctx(num_ctx or runner.spec.num_ctx or self.default_ctx())
        asked = runner.requested_ctx or runner.num_ctx
        return ctx != asked or (num_gpu is not None and num_gpu != runner.num_gpu)

    def _use(self, runner: Runner, keep_alive_s: float | None) -> None:
        runner.refcount += 1
        if keep_alive_s is not None:  # copied only when the request set it
            runner.keep_alive_s = keep_alive_s
            runner.expire_when_idle = keep_alive_s <= 0

    def _wait_for_lock(self, lock: threading.Lock, gone: Callable[[], bool]) -> None:
        while not lock.acquire(timeout=_POLL_S):
            if gone():
                raise LoadAborted

    def _evict(self, runner: Runner, gone: Callable[[], bool]) -> None:
        """Unload `runner` (once its requests end) and wait for its VRAM recovery wait."""
        with self._cond:
            self.stats(runner.name).evictions += 1
            runner.expire_when_idle = True
            if runner.refcount == 0:
                self._begin_unload(runner)
        while not runner.recovered.wait(_POLL_S):
            if gone():
                raise LoadAborted

    def _make_room_2026(self, spec: ModelSpec, ctx: int, gone: Callable[[], bool]) -> None:
        """Evict own runners while the predicted need exceeds 80 % of Ollama's (stale) free
        figure, or while too many models are loaded. It never waits for a fit."""
        cfg = self.config
        parallel = 1 if spec.is_embedding else max(1, cfg.num_parallel)
        predicted = spec.size_bytes + spec.kv_bytes(ctx, parallel) + batch_surcharge(ctx)
        while True:
            with self._cond:
                ours = [r for r in self._loaded.values() if not r.loading]
            if not ours:
                return
            figure = self.free_figure()
            if len(ours) < cfg.max_loaded_models and (
                figure is None or predicted <= EVICT_ABOVE * figure
            ):
                return
            ours.sort(key=lambda r: (r.keep_alive_s, r.name))
            idle = [r for r in ours if r.refcount == 0]
            self._evict(idle[0] if idle else ours[0], gone)

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
        ctx = spec.effective_ctx(num_ctx or spec.num_ctx or self.default_ctx())
        requested_ctx = ctx
        if num_gpu != 0:
            if cfg.is_2026:
                self._make_room_2026(spec, ctx, gone)
            else:
                self._make_room(spec.runner_bytes(ctx, cfg.num_parallel), gone)
        self._seq += 1
        owner = f"ollama:{spec.name}" if not cfg.is_2026 else f"ollama:{spec.name}#{self._seq}"
        process = _RunnerProcess() if cfg.is_2026 and cfg.runner_processes else None
        pid = process.pid if process is not None else self.pid
        try:
            need, granted = self._place(spec, ctx, num_gpu, owner, pid)
            if granted is None:  # 2026: out of memory with an explicit num_gpu
                self._evict_all(gone)
                auto = num_ctx is None and spec.num_ctx is None and cfg.context_by_vram
                if auto and ctx > 4096:
                    ctx = 32768 if ctx > 32768 else 4096
                need, granted = self._place(spec, ctx, num_gpu, owner, pid)
                if granted is None:
                    with self._cond:
                        self.stats(spec.name).loads_aborted += 1
                    raise LoadFailed(
                        "llama runner process has terminated: cudaMalloc failed: out of memory"
                    )
        except BaseException:
            if process is not None:
                process.stop()
            raise
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
            requested_ctx=requested_ctx,
            pid=pid,
            process=process,
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
            if process is not None:
                process.stop()
            runner.released.set()
            runner.recovered.set()
            raise
        with self._cond:
            runner.loading = False
            runner.loaded_mono = time.monotonic()
            st = self.stats(spec.name)
            st.loads += 1
            st.loads_full_gpu += int(not runner.is_spilled)
            st.last_gpu_fraction = round(runner.gpu_fraction, 4)
            st.last_size_bytes = runner.size_bytes
            if st.first_size_bytes is None:
                st.first_size_bytes = runner.size_bytes
        return runner

    def _place(
        self, spec: ModelSpec, ctx: int, num_gpu: int | None, owner: str, pid: int
    ) -> tuple[int, int | None]:
        """(runner bytes, bytes granted on the GPU); None granted: out of memory."""
        cfg = self.config
        need = spec.runner_bytes(ctx, cfg.num_parallel)
        layers = spec.block_count + 1
        if num_gpu == 0:
            return need, 0
        if cfg.is_2026:
            with self._cond:
                self._logged_free = self.gpu.free_bytes()
                self._own_at_log = sum(r.size_vram for r in self._loaded.values())
        if num_gpu is not None and num_gpu > 0 and cfg.is_2026:
            # An explicit -ngl: no fitting, the layers asked for or out of memory.
            want = need if num_gpu >= layers else math.ceil(need * num_gpu / layers)
            return need, (want if self.gpu.allocate(owner, pid, want) else None)
        # Fitting: whole layers into what the device reports free right now.
        granted = self.gpu.allocate_partial(
            owner,
            pid,
            need,
            keep_free_bytes=cfg.fit_margin_bytes,
            step_bytes=math.ceil(need / layers),
        )
        return need, granted

    def _evict_all(self, gone: Callable[[], bool]) -> None:
        with self._cond:
            ours = [r for r in self._loaded.values() if not r.loading]
        for runner in ours:
            self._evict(runner, gone)

    def _begin_unload(self, runner: Runner) -> None:
        """Caller holds the condition. Drop from the list now, free VRAM after the delay."""
        if self._loaded.get(runner.name) is runner:
            del self._loaded[runner.name]
        st = self.stats(runner.name)
        st.unloads += 1
        if runner.is_spilled:
            st.spilled_s += (time.monotonic() - runner.loaded_mono) / self.config.time_scale
        self._watch_recovery(runner, self.gpu.free_bytes())

        def release() -> None:
            self.gpu.release(runner.owner)
            if runner.process is not None:
                runner.process.stop()
            runner.released.set()

        def release_bulk() -> None:
            # 2026: the bulk now (over 75 %: the recovery wait may end), the rest later.
            tail = math.floor(runner.size_vram * _TAIL_FRACTION)
            self.gpu.release(runner.owner, max(runner.size_vram - tail, 0))
            runner.released.set()
            later = threading.Timer(self.real_s(self.config.unload_tail_s), release)
            later.daemon = True
            later.start()

        delay = self.real_s(self.config.unload_delay_s)
        timer = threading.Timer(delay, release_bulk if self.config.is_2026 else release)
        timer.daemon = True
        timer.start()

    def _watch_recovery(self, runner: Runner, free_before: int) -> None:
        """Ollama's wait for VRAM recovery after an unload (api-facts 1.3; api-facts-2026
        section 1): every 250 ms, has free memory grown by more than the profile's share of
        the runner's VRAM since just before the unload? At most 5 s. Sets `recovered`."""
        if runner.size_vram <= 0:  # nothing on the GPU: Ollama does not wait
            runner.recovered.set()
            return
        want = runner.size_vram * RECOVER_FRACTION[self.config.profile]

        def watch() -> None:
            deadline = time.monotonic() + self.real_s(RECOVER_WAIT_S)
            try:
                while not self._stop.wait(self.real_s(RECOVER_POLL_S)):
                    if self.gpu.free_bytes() - free_before > want:
                        return
                    if time.monotonic() >= deadline:
                        return
            finally:
                runner.recovered.set()

        threading.Thread(target=watch, daemon=True, name="sim-ollama-recovery").start()

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
