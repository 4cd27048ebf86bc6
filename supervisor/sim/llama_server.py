"""A fake llama.cpp `llama-server` on the shared `SimGpu` (tenants.md section 1).

Two modes, as the real server:

* **Single-model** (`LlamaServerConfig.model` set, like `-m`): one model, loaded at start.
  `/health` answers 503 "Loading model" until it is loaded. `--sleep-idle-seconds` frees
  the weights and KV cache after that long without a task (a small CUDA context stays);
  the next request that needs the model reloads it and blocks until then.
* **Router** (no model; `models` lists what a preset / models dir offers): every model
  runs as its own child (`LlamaChild`) with its own stand-in process, so its VRAM is
  allocated under that child's PID (a new PID on every load). `POST /models/load` and
  `/models/unload` answer at once and act in the background; `--models-max` evicts the
  least recently used child and waits for it to exit; a request naming an unloaded model
  loads it and blocks until loaded (autoload).

Placement (`--fit`, default on): at load time the free device memory minus `--fit-target`
(1024 MiB) is the budget; the context shrinks first (not below `--fit-ctx`, 4096; only when
no `-c` was given), then weights go to system RAM in whole layers (partial offload). The
real API reports neither; `LlamaChild.offloaded_bytes` / `FakeLlamaServer.children()` let
tests see it, a supervisor only through NVML per-PID memory versus the model's size. With
`--fit off` a model that does not fit fails to load.

Choices where tenants.md says UNVERIFIED (the safer reading for a supervisor):
* Unloading (router `/models/unload`, LRU eviction, llama-swap's explicit unload) cuts off
  in-flight requests at once: the connection drops without a complete answer.
* A sleeping process keeps `sleep_keep_bytes` (256 MiB) of CUDA context.
* `GET /slots` is not among the endpoints README lists as not waking a sleeping model, so
  here it wakes it; in router mode a GET with `?model=` autoloads like a POST.
* Waking from sleep reloads with the parameters fitted at start; if they no longer fit the
  child fails (the real one would hit out of memory).

Durations are simulated seconds; `time_scale` converts them to real ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from supervisor.sim.catalog import Catalog, ModelSpec
from supervisor.sim.gpu import GIB, MIB, SimGpu
from supervisor.sim.httpbase import BadJson, ClientGone, Exchange, Route, SimServer
from supervisor.sim.process import StandInProcess

BUILD_INFO = "b7400-sim"
_POLL_S = 0.01

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

# POST routes that run a task on the model (router mode reads their body's "model").
COMPLETION_ROUTES = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/completion",
)
EMBEDDING_ROUTES = ("/v1/embeddings", "/embedding", "/embeddings")
MODEL_POST_ROUTES = (
    *COMPLETION_ROUTES,
    *EMBEDDING_ROUTES,
    "/v1/responses",
    "/v1/messages",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)


def send_error(ex: Exchange, status: int, message: str) -> None:
    """llama-server's OpenAI-shaped error body."""
    body = {"error": {"code": status, "message": message, "type": ERROR_TYPES[status]}}
    ex.send_json(status, body)


class CutOff(Exception):
    """The model was unloaded (or its process died) while a request was in flight."""


class LoadFailed(Exception):
    """The model could not be loaded (out of memory with --fit off, or a failed wake)."""


@dataclass
class LlamaServerConfig:
    """Flags of one llama-server (single mode when `model` is set, else router)."""

    model: str | None = None  # -m: a catalog name or a path whose stem is one
    alias: str | None = None  # --alias
    models: tuple[str, ...] = ()  # router: the models a preset / models dir offers
    models_max: int = 4  # --models-max; 0 = unlimited
    models_autoload: bool = True  # --no-models-autoload turns it off
    stop_timeout_s: float = 10.0  # preset stop-timeout: force kill after this
    child_exit_s: float = 0.3  # how long a child takes to exit after "exit"
    fit: bool = True  # --fit on|off
    fit_target_mib: int = 1024  # --fit-target
    fit_ctx: int = 4096  # --fit-ctx
    ctx_size: int = 0  # -c; 0 = the model's trained context
    parallel: int = 4  # -np (-1 = auto = 4)
    sleep_idle_s: float = -1.0  # --sleep-idle-seconds; -1 = off
    sleep_keep_bytes: int = 256 * MIB  # CUDA context a process keeps (UNVERIFIED size)
    metrics: bool = False  # --metrics
    slots: bool = True  # --no-slots turns it off
    n_predict: int = 32  # tokens per answer when the request does not say
    token_s: float | None = None  # simulated seconds per token; None: from the model size
    cpu_slowdown: float = 9.0  # per-token cost of offloaded weights vs the GPU
    load_base_s: float = 0.3
    load_bytes_per_s: float = 8 * GIB
    time_scale: float = 1.0
    pid: int | None = None  # single mode: PID to report; None = a stand-in child process


class Clock:
    """Simulated time: `sleep` waits `sim_s * time_scale` real seconds, or until `stop`."""

    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale

    def real_s(self, sim_s: float) -> float:
        return max(0.0, sim_s) * self.time_scale

    def sleep(self, sim_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """False if `stop()` turned true before the time was up."""
        deadline = time.monotonic() + self.real_s(sim_s)
        while (left := deadline - time.monotonic()) > 0:
            if stop is not None and stop():
                return False
            time.sleep(min(left, _POLL_S))
        return not (stop is not None and stop())


def resolve_spec(catalog: Catalog, name: str, size_bytes: int | None = None) -> ModelSpec:
    """The catalog entry for `name` (also a path's stem: /models/x.gguf -> x)."""
    spec = catalog.model(name)
    if spec is None:
        stem = os.path.basename(name)
        stem = stem[:-5] if stem.endswith(".gguf") else stem
        spec = catalog.model(stem)
    if spec is None and size_bytes is not None:
        spec = ModelSpec(name, size_bytes)
    if spec is None:
        known = ", ".join(m.name for m in catalog.models)
        raise ValueError(f"model {name!r} is not in the simulator's catalog (known: {known})")
    if size_bytes is not None and size_bytes != spec.size_bytes:
        spec = dataclasses.replace(spec, size_bytes=size_bytes)
    return spec


def fit_context(spec: ModelSpec, ctx: int, budget: int, fit_ctx: int) -> int:
    """The largest context (a multiple of 256, at least `fit_ctx`) whose memory fits."""
    if spec.runner_bytes(ctx, 1) <= budget:
        return ctx
    per_token = spec.kv_bytes(256, 1) / 256
    fixed = spec.runner_bytes(0, 1) - spec.kv_bytes(0, 1)
    room = (budget - fixed) / per_token if per_token > 0 else ctx
    fitted = int(room) // 256 * 256
    return max(min(fitted, ctx), min(fit_ctx, ctx))


@dataclass
class Slot:
    id: int
    id_task: int = -1
    is_processing: bool = False
    n_decoded: int = 0
    n_remain: int = -1
    n_prompt: int = 0

    def to_json(self, n_ctx: int, n_predict: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "id_task": self.id_task,
            "n_ctx": n_ctx,
            "speculative": False,
            "is_processing": self.is_processing,
            "params": _params(n_predict),
            "next_token": {
                "has_next_token": self.is_processing,
                "has_new_line": False,
                "n_remain": self.n_remain,
                "n_decoded": self.n_decoded,
                "stopping_word": "",
            },
        }


def _params(n_predict: int) -> dict[str, Any]:
    return {
        "n_predict": n_predict,
        "seed": 4294967295,
        "temperature": 0.8,
        "dynatemp_range": 0.0,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "stream": False,
        "samplers": ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"],
    }


@dataclass
class ChildStats:
    """What the real API does not report, for tests: placement and counters."""

    loads: int = 0
    sleeps: int = 0
    wakes: int = 0
    requests: int = 0
    cut_off: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    decode_calls: int = 0


_task_ids = itertools.count(1)


class Task:
    """One generation holding a slot; use as a context manager (the slot is freed on exit)."""

    def __init__(
        self, child: LlamaChild, slot: Slot, epoch: int, n_prompt: int, n_predict: int
    ) -> None:
        self.child, self.slot, self.epoch = child, slot, epoch
        self.n_prompt, self.n_predict = n_prompt, n_predict
        self.cut_off = False

    def tokens(self) -> Iterator[int]:
        """Yield each token's index as it is produced; CutOff if the model goes away."""
        child, slot = self.child, self.slot
        step = child._token_s()
        child.clock.sleep(step * self.n_prompt / 50)
        with child._cond:
            child.stats.prompt_tokens += self.n_prompt
        for i in range(self.n_predict):
            if not child.clock.sleep(step, lambda: child._epoch != self.epoch):
                self.cut_off = True
                raise CutOff
            with child._cond:
                slot.n_decoded, slot.n_remain = i + 1, self.n_predict - i - 1
                child.stats.predicted_tokens += 1
                child.stats.decode_calls += 1
            yield i

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.child._end_task(self.slot, self.cut_off)


class LlamaChild:
    """One llama-server process serving one model: load, sleep, slots, generation.

    States: loading, loaded, sleeping, stopping, stopped, failed. Its GPU memory is
    allocated under `pid` with owners `<owner>:cuda` (context) and `<owner>:model`.
    """

    def __init__(
        self,
        gpu: SimGpu,
        spec: ModelSpec,
        config: LlamaServerConfig,
        *,
        model_path: str,
        alias: str | None,
        owner: str,
        own_process: bool = True,
        port: int = 0,
    ) -> None:
        self.gpu = gpu
        self.spec = spec
        self.config = config
        self.clock = Clock(config.time_scale)
        self.model_path = model_path
        self.alias = alias
        self.owner = owner
        self.port = port
        self.process = StandInProcess() if own_process else None
        if self.process is not None:
            self.pid = self.process.pid
        else:
            self.pid = config.pid if config.pid is not None else os.getpid()
        self.created = int(time.time())
        self.stats = ChildStats()
        self.state = "loading"
        self.exit_code: int | None = None
        self.error = ""
        self.n_ctx = 0
        self.need_bytes = 0  # model memory (weights + KV + graph) at the fitted context
        self.gpu_bytes = 0  # of which on the GPU
        self._cond = threading.Condition()
        self._epoch = 0  # bumped on unload/sleep-free: in-flight work of an older epoch ends
        self._inflight = 0
        self._deferred = 0
        self._last_task = time.monotonic()
        n_slots = 4 if config.parallel <= 0 else config.parallel
        self.slots = [Slot(i) for i in range(n_slots)]
        self._stopping = threading.Event()
        self._loader = threading.Thread(target=self._load_at_start, daemon=True)
        self._loader.start()
        self._sleeper: threading.Thread | None = None
        if config.sleep_idle_s >= 0:
            self._sleeper = threading.Thread(target=self._sleep_loop, daemon=True)
            self._sleeper.start()

    # ------------------------------------------------------------------ accessors

    @property
    def name(self) -> str:
        return self.alias or self.model_path

    @property
    def offloaded_bytes(self) -> int:
        """Model memory placed in system RAM by --fit (the real API does not say)."""
        return max(0, self.need_bytes - self.gpu_bytes)

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    @property
    def running(self) -> bool:
        return self.state in ("loading", "loaded", "sleeping")

    def wait_state(self, *states: str, timeout_s: float | None = None) -> str:
        with self._cond:
            self._cond.wait_for(lambda: self.state in states, timeout=timeout_s)
            return self.state

    def placement(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "state": self.state,
            "n_ctx": self.n_ctx,
            "need_bytes": self.need_bytes,
            "gpu_bytes": self.gpu_bytes,
            "offloaded_bytes": self.offloaded_bytes,
        }

    # ------------------------------------------------------------------ loading

    def _load_s(self) -> float:
        return self.config.load_base_s + self.spec.size_bytes / self.config.load_bytes_per_s

    def _load_at_start(self) -> None:
        cfg = self.config
        try:
            self.gpu.allocate_partial(f"{self.owner}:cuda", self.pid, cfg.sleep_keep_bytes)
            ctx = self.spec.effective_ctx(cfg.ctx_size or self.spec.context_length)
            margin = cfg.fit_target_mib * MIB
            if cfg.fit and not cfg.ctx_size:
                ctx = fit_context(self.spec, ctx, self.gpu.free_bytes() - margin, cfg.fit_ctx)
            need = self.spec.runner_bytes(ctx, 1)
            if cfg.fit:
                layer = math.ceil(need / (self.spec.block_count + 1))
                granted = self.gpu.allocate_partial(
                    f"{self.owner}:model",
                    self.pid,
                    need,
                    keep_free_bytes=margin,
                    step_bytes=layer,
                )
            elif self.gpu.allocate(f"{self.owner}:model", self.pid, need):
                granted = need
            else:
                raise LoadFailed("failed to allocate CUDA buffer: out of memory")
            with self._cond:
                self.n_ctx, self.need_bytes, self.gpu_bytes = ctx, need, granted
            if self._stopping.is_set():  # stopped while placing: give it back
                self._exit()
                return
            if not self.clock.sleep(self._load_s(), self._stopping.is_set):
                return
            with self._cond:
                if self.state == "loading":
                    self.state = "loaded"
                    self.stats.loads += 1
                    self._last_task = time.monotonic()
                self._cond.notify_all()
        except LoadFailed as exc:
            self._fail(str(exc))

    def _fail(self, message: str) -> None:
        with self._cond:
            self.error = message
            self.state = "failed"
            self.exit_code = 1
            self._epoch += 1
            self._cond.notify_all()
        self._exit()

    def _exit(self) -> None:
        self.gpu.release(f"{self.owner}:model")
        self.gpu.release(f"{self.owner}:cuda")
        if self.process is not None:
            self.process.stop()

    def _sleep_loop(self) -> None:
        idle_real = self.clock.real_s(self.config.sleep_idle_s)
        while not self._stopping.wait(max(_POLL_S, min(0.05, idle_real / 4))):
            with self._cond:
                idle = time.monotonic() - self._last_task
                if self.state != "loaded" or self._inflight or idle < idle_real:
                    continue
                self.state = "sleeping"
                self.stats.sleeps += 1
                # Under the lock, so a wake cannot allocate before this release.
                self.gpu.release(f"{self.owner}:model")
                self._cond.notify_all()

    def ensure_awake(self) -> None:
        """Block until the model is loaded; wake it if sleeping (raises LoadFailed)."""
        wake = False
        with self._cond:
            self._cond.wait_for(lambda: self.state != "loading")
            if self.state == "sleeping":
                self.state = "waking"
                wake = True
            elif self.state == "waking":
                self._cond.wait_for(lambda: self.state != "waking")
            if self.state in ("failed", "stopping", "stopped"):
                raise LoadFailed(self.error or "model is not loaded")
            self._last_task = time.monotonic()
        if not wake:
            return
        if not self.gpu.allocate(f"{self.owner}:model", self.pid, self.gpu_bytes):
            self._fail("failed to allocate CUDA buffer while waking: out of memory")
            raise LoadFailed(self.error)
        self.clock.sleep(self._load_s(), self._stopping.is_set)
        with self._cond:
            if self.state == "waking":
                self.state = "loaded"
                self.stats.wakes += 1
            self._last_task = time.monotonic()
            self._cond.notify_all()
            if self.state != "loaded":
                raise LoadFailed(self.error or "model is not loaded")

    # ------------------------------------------------------------------ stopping

    def stop(self, *, immediately: bool = False, on_exit: Callable[[], None] | None = None) -> None:
        """The router's "exit" command: in-flight requests are cut off at once, the
        process exits `child_exit_s` later (force-killed at `stop_timeout_s`) and its
        memory comes back then. Returns at once."""
        with self._cond:
            if self.state in ("stopping", "stopped"):
                return
            was_loading = self.state == "loading"
            if self.state != "failed":
                self.state = "stopping"
            self._epoch += 1
            self._cond.notify_all()
        self._stopping.set()
        delay = 0.0 if immediately or was_loading else self.config.child_exit_s
        delay = min(delay, self.config.stop_timeout_s)

        def finish() -> None:
            self.clock.sleep(delay)
            self._exit()
            with self._cond:
                if self.state != "failed":
                    self.state = "stopped"
                    self.exit_code = 0 if not was_loading else self.exit_code
                self._cond.notify_all()
            if on_exit is not None:
                on_exit()

        threading.Thread(target=finish, daemon=True, name="sim-llama-exit").start()

    # ------------------------------------------------------------------ generation

    def _token_s(self) -> float:
        cfg = self.config
        base = cfg.token_s if cfg.token_s is not None else 1.0 / self.spec.tokens_per_s_on_gpu
        cpu_share = self.offloaded_bytes / self.need_bytes if self.need_bytes else 0.0
        return base * (1.0 + cpu_share * (cfg.cpu_slowdown - 1.0))

    def generate(self, n_prompt: int, n_predict: int) -> Task:
        """Start one task: wakes the model and takes a slot (waiting, deferred, when all
        are busy) before returning; the iterator yields each token's index as it is
        produced. Raises CutOff when the model is unloaded meanwhile, LoadFailed when it
        cannot be (re)loaded."""
        self.ensure_awake()
        with self._cond:
            epoch = self._epoch
            self._inflight += 1
            self.stats.requests += 1
            slot = next((s for s in self.slots if not s.is_processing), None)
            if slot is None:
                self._deferred += 1
                self._cond.wait_for(
                    lambda: self._epoch != epoch or any(not s.is_processing for s in self.slots)
                )
                self._deferred -= 1
                slot = next((s for s in self.slots if not s.is_processing), None)
            if self._epoch != epoch or slot is None:
                self._inflight -= 1
                self.stats.cut_off += 1
                raise CutOff
            slot.is_processing, slot.id_task = True, next(_task_ids)
            slot.n_decoded, slot.n_remain, slot.n_prompt = 0, n_predict, n_prompt
        return Task(self, slot, epoch, n_prompt, n_predict)

    def _end_task(self, slot: Slot, cut_off: bool) -> None:
        with self._cond:
            slot.is_processing = False
            self._inflight -= 1
            if cut_off:
                self.stats.cut_off += 1
            self._last_task = time.monotonic()
            self._cond.notify_all()

    # ------------------------------------------------------------------ HTTP

    def meta(self) -> dict[str, Any] | None:
        if self.state not in ("loaded", "sleeping", "waking"):
            return None
        return {
            "vocab_type": 2,
            "n_vocab": 128256,
            "n_ctx_train": self.spec.context_length,
            "n_embd": self.spec.embedding_length,
            "n_params": _n_params(self.spec),
            "size": self.spec.size_bytes,
        }

    def models_json(self) -> dict[str, Any]:
        entry = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "llamacpp",
            "meta": self.meta(),
        }
        return {"object": "list", "data": [entry]}

    def props_json(self) -> dict[str, Any]:
        slot = Slot(0).to_json(self.n_ctx, -1)
        return {
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": self.n_ctx,
                "speculative": False,
                "is_processing": False,
                "params": slot["params"],
            },
            "total_slots": len(self.slots),
            "model_alias": self.name,
            "model_path": self.model_path,
            "modalities": {"vision": False, "audio": False},
            "chat_template": "{{ messages }}",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "build_info": BUILD_INFO,
            "is_sleeping": self.state == "sleeping",
        }

    def slots_json(self) -> list[dict[str, Any]]:
        with self._cond:
            return [s.to_json(self.n_ctx, self.config.n_predict) for s in self.slots]

    def metrics_text(self) -> str:
        with self._cond:
            s = self.stats
            processing = sum(1 for slot in self.slots if slot.is_processing)
            busy = processing / max(1, s.decode_calls) if s.decode_calls else 0.0
            rows = [
                (
                    "prompt_tokens_total",
                    "counter",
                    "Number of prompt tokens processed.",
                    s.prompt_tokens,
                ),
                ("prompt_seconds_total", "counter", "Prompt process time", 0.0),
                (
                    "tokens_predicted_total",
                    "counter",
                    "Number of generation tokens processed.",
                    s.predicted_tokens,
                ),
                ("tokens_predicted_seconds_total", "counter", "Predict process time", 0.0),
                (
                    "n_decode_total",
                    "counter",
                    "Total number of llama_decode() calls",
                    s.decode_calls,
                ),
                ("n_tokens_max", "counter", "Largest observed n_tokens.", self.n_ctx),
                (
                    "n_busy_slots_per_decode",
                    "counter",
                    "Average number of busy slots per llama_decode() call",
                    busy,
                ),
                ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.", 0.0),
                (
                    "predicted_tokens_seconds",
                    "gauge",
                    "Average generation throughput in tokens/s.",
                    0.0,
                ),
                ("requests_processing", "gauge", "Number of requests processing.", processing),
                ("requests_deferred", "gauge", "Number of requests deferred.", self._deferred),
            ]
        lines: list[str] = []
        for name, kind, help_text, value in rows:
            lines += [
                f"# HELP llamacpp:{name} {help_text}",
                f"# TYPE llamacpp:{name} {kind}",
                f"llamacpp:{name} {value}",
            ]
        return "\n".join(lines) + "\n"

    def handle(self, ex: Exchange) -> None:
        """Answer one request as this child's own HTTP server would."""
        path, method = ex.path, ex.method
        if self.state in ("stopping", "stopped", "failed"):
            raise ClientGone("the model's process has exited")
        if path in ("/health", "/v1/health") and method == "GET":
            if self.state == "loading":
                send_error(ex, 503, "Loading model")
            else:
                ex.send_json(200, {"status": "ok"})
            return
        if method == "GET" and path in ("/v1/models", "/models"):  # also while loading
            ex.send_json(200, self.models_json())
            return
        if self.state == "loading":
            send_error(ex, 503, "Loading model")
            return
        if method == "GET" and path == "/props":
            ex.send_json(200, self.props_json())
        elif method == "GET" and path == "/slots":
            self._slots(ex)
        elif method == "GET" and path == "/metrics":
            if not self.config.metrics:
                send_error(ex, 501, "This server does not support metrics endpoint.")
            else:
                ex.send(200, self.metrics_text().encode(), "text/plain; version=0.0.4")
        elif method == "POST" and path in COMPLETION_ROUTES:
            self._complete(ex)
        elif method == "POST" and path in EMBEDDING_ROUTES:
            self._embed(ex)
        else:
            send_error(ex, 404, "File Not Found")

    def _embed(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson as exc:
            send_error(ex, 400, f"Failed to parse JSON: {exc}")
            return
        body = body if isinstance(body, dict) else {}
        text = json.dumps(body.get("input", body.get("content", "")))
        try:
            with self.generate(max(1, len(text) // 4), 1) as task:
                for _ in task.tokens():
                    pass
        except LoadFailed as exc:
            send_error(ex, 500, str(exc))
            return
        except CutOff as exc:
            raise ClientGone("the model was unloaded during the request") from exc
        vector = [round(math.sin(i + len(text)), 6) for i in range(8)]
        ex.send_json(
            200,
            {
                "object": "list",
                "model": str(body.get("model") or self.name),
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "usage": {"prompt_tokens": task.n_prompt, "total_tokens": task.n_prompt},
            },
        )

    def _slots(self, ex: Exchange) -> None:
        if not self.config.slots:
            send_error(ex, 501, "This server does not support slots endpoint.")
            return
        try:
            self.ensure_awake()  # /slots goes through the task queue (UNVERIFIED: wakes)
        except LoadFailed as exc:
            send_error(ex, 500, str(exc))
            return
        slots = self.slots_json()
        if ex.query.get("fail_on_no_slot") and all(s["is_processing"] for s in slots):
            send_error(ex, 503, "no slot available")
            return
        ex.send_json(200, slots)

    def _complete(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson as exc:
            send_error(ex, 400, f"Failed to parse JSON: {exc}")
            return
        if not isinstance(body, dict):
            send_error(ex, 400, "request body must be a JSON object")
            return
        chat = "chat" in ex.path
        legacy = ex.path == "/completion"
        if chat and not isinstance(body.get("messages"), list):
            send_error(ex, 400, "'messages' is required")
            return
        limit = body.get("n_predict", body.get("max_tokens", body.get("max_completion_tokens")))
        n_predict = self.config.n_predict if not isinstance(limit, int) or limit < 0 else limit
        prompt_text = json.dumps(body.get("messages") if chat else body.get("prompt", ""))
        n_prompt = max(1, len(prompt_text) // 4)
        stream = bool(body.get("stream"))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}" if chat else f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = str(body.get("model") or self.name)
        text: list[str] = []
        try:
            with self.generate(n_prompt, n_predict) as task:
                if stream:
                    ex.start_stream("text/event-stream")
                for i in task.tokens():
                    piece = _WORDS[i % len(_WORDS)]
                    text.append(piece)
                    if stream:
                        chunk = _stream_chunk(chat, legacy, piece, None, cid, created, model, i)
                        ex.write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        except LoadFailed as exc:
            send_error(ex, 500, str(exc))
            return
        except CutOff as exc:
            raise ClientGone("the model was unloaded during the request") from exc
        usage = {
            "completion_tokens": n_predict,
            "prompt_tokens": n_prompt,
            "total_tokens": n_prompt + n_predict,
        }
        timings = {"prompt_n": n_prompt, "predicted_n": n_predict}
        if stream:
            final = _stream_chunk(chat, legacy, "", "length", cid, created, model, n_predict)
            if not legacy:
                final["usage"] = usage
            final["timings"] = timings
            ex.write_chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
            if not legacy:
                ex.write_chunk(b"data: [DONE]\n\n")
            ex.end_stream()
            return
        content = "".join(text)
        if legacy:
            ex.send_json(
                200,
                {
                    "index": 0,
                    "content": content,
                    "tokens": [],
                    "id_slot": 0,
                    "stop": True,
                    "model": model,
                    "tokens_predicted": n_predict,
                    "tokens_evaluated": n_prompt,
                    "generation_settings": _params(n_predict),
                    "prompt": body.get("prompt", ""),
                    "has_new_line": False,
                    "truncated": False,
                    "stop_type": "limit",
                    "stopping_word": "",
                    "tokens_cached": n_prompt + n_predict,
                    "timings": timings,
                },
            )
            return
        choice: dict[str, Any] = {"finish_reason": "length", "index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
            choice["logprobs"] = None
        ex.send_json(
            200,
            {
                "choices": [choice],
                "created": created,
                "model": model,
                "system_fingerprint": BUILD_INFO,
                "object": "chat.completion" if chat else "text_completion",
                "usage": usage,
                "id": cid,
                "timings": timings,
            },
        )


_WORDS = ("The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog. ")


def _stream_chunk(
    chat: bool,
    legacy: bool,
    piece: str,
    finish: str | None,
    cid: str,
    created: int,
    model: str,
    index: int,
) -> dict[str, Any]:
    if legacy:
        return {
            "index": 0,
            "content": piece,
            "tokens": [],
            "stop": finish is not None,
            "id_slot": 0,
            "tokens_predicted": index + (0 if finish else 1),
        }
    choice: dict[str, Any] = {"finish_reason": finish, "index": 0}
    if chat:
        choice["delta"] = {"content": piece} if finish is None else {}
    else:
        choice["text"] = piece
    return {
        "choices": [choice],
        "created": created,
        "id": cid,
        "model": model,
        "system_fingerprint": BUILD_INFO,
        "object": "chat.completion.chunk" if chat else "text_completion",
    }


def _n_params(spec: ModelSpec) -> int:
    digits = spec.parameter_size.rstrip("KMB")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(spec.parameter_size[-1:], 1.0)
    try:
        return int(float(digits) * scale)
    except ValueError:
        return 0


# --------------------------------------------------------------------------- router


@dataclass
class _Entry:
    name: str
    spec: ModelSpec
    child: LlamaChild | None = None
    last_used: float = 0.0
    failed: bool = False
    exit_code: int | None = None
    args: list[str] = field(default_factory=list)


class FakeLlamaServer:
    """A llama-server: single-model when `config.model` is set, else a router over
    `config.models`. Serve it with `serve(host, port)`; stop with the server's `stop()`
    and then `close()`."""

    def __init__(
        self, gpu: SimGpu, catalog: Catalog | None = None, config: LlamaServerConfig | None = None
    ) -> None:
        self.gpu = gpu
        self.catalog = catalog or Catalog()
        self.config = config or LlamaServerConfig()
        self._lock = threading.Condition()
        self._load_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._ports = itertools.count(39001)
        self._seq = itertools.count(1)
        self.single: LlamaChild | None = None
        if self.config.model is not None:
            spec = resolve_spec(self.catalog, self.config.model)
            self.single = LlamaChild(
                gpu,
                spec,
                self.config,
                model_path=self.config.model,
                alias=self.config.alias,
                owner=f"llama-server:{spec.name}",
                own_process=self.config.pid is None,
            )
        else:
            for name in self.config.models:
                self._entries[name] = _Entry(name, resolve_spec(self.catalog, name))

    @property
    def is_router(self) -> bool:
        return self.single is None

    # ------------------------------------------------------------------ test accessors

    def child(self, model: str) -> LlamaChild | None:
        """The running (or exiting) child of a router model, or the single model."""
        if self.single is not None:
            return self.single
        with self._lock:
            entry = self._entries.get(model)
            return entry.child if entry else None

    def children(self) -> dict[str, LlamaChild]:
        if self.single is not None:
            return {self.single.name: self.single}
        with self._lock:
            return {n: e.child for n, e in self._entries.items() if e.child is not None}

    def status(self, model: str) -> str:
        with self._lock:
            return self._status(self._entries[model])["value"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ lifecycle

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> SimServer:
        server = SimServer(
            host,
            port,
            self._route,
            server_name="llama-server",
            not_found=lambda ex: send_error(ex, 404, "File Not Found"),
            verbose=verbose,
        )
        server.start()
        return server

    def close(self) -> None:
        if self.single is not None:
            self.single.stop(immediately=True)
            self.single.wait_state("stopped", "failed", timeout_s=5)
            return
        with self._lock:
            children = [e.child for e in self._entries.values() if e.child is not None]
        for child in children:
            child.stop(immediately=True)
        for child in children:
            child.wait_state("stopped", "failed", timeout_s=5)

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str) -> Route | None:
        if self.single is not None:
            return self.single.handle
        if path in ("/health", "/v1/health") and method == "GET":
            return lambda ex: ex.send_json(200, {"status": "ok"})
        if path in ("/models", "/v1/models") and method == "GET":
            return self._list
        if path == "/models/load" and method == "POST":
            return self._load_route
        if path == "/models/unload" and method == "POST":
            return self._unload_route
        if method == "GET" and path in ("/props", "/slots", "/metrics"):
            return self._proxy_get
        if method == "POST" and path in MODEL_POST_ROUTES:
            return self._proxy_post
        return None

    def _status(self, entry: _Entry) -> dict[str, Any]:
        child = entry.child
        value, failed, exit_code = "unloaded", entry.failed, entry.exit_code
        if child is not None and child.state in ("failed", "stopped"):
            failed, exit_code = child.state == "failed", child.exit_code  # exited just now
        elif child is not None:  # an exiting child counts as loaded until it is gone
            value = {"loading": "loading", "sleeping": "sleeping"}.get(child.state, "loaded")
        status: dict[str, Any] = {"value": value, "args": entry.args}
        if value == "unloaded" and failed:
            status["failed"] = True
            status["exit_code"] = exit_code
        return status

    def _list(self, ex: Exchange) -> None:
        with self._lock:
            data = []
            for entry in self._entries.values():
                item: dict[str, Any] = {
                    "id": entry.name,
                    "aliases": [],
                    "tags": [],
                    "object": "model",
                    "owned_by": "llamacpp",
                    "created": 0,
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                    "source": "preset",
                    "can_remove": False,
                    "status": self._status(entry),
                }
                meta = entry.child.meta() if entry.child is not None else None
                if meta is not None:
                    item["meta"] = meta
                data.append(item)
        ex.send_json(200, {"object": "list", "data": data})

    def _body_model(self, ex: Exchange) -> str | None:
        try:
            body = ex.json()
        except BadJson:
            return None
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) and model else None

    def _load_route(self, ex: Exchange) -> None:
        name = self._body_model(ex)
        if name is None:
            send_error(ex, 400, "model name is missing from the request")
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                send_error(ex, 404, "model is not found")
                return
            if entry.child is not None:
                send_error(ex, 400, "model is already running")
                return
        self.load(name)
        ex.send_json(200, {"success": True})

    def _unload_route(self, ex: Exchange) -> None:
        name = self._body_model(ex)
        if name is None:
            send_error(ex, 400, "model name is missing from the request")
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                send_error(ex, 400, "model is not found")
                return
            if entry.child is None or entry.child.state in ("stopping", "stopped"):
                send_error(ex, 400, "model is not running")
                return
        self.unload(name)
        ex.send_json(200, {"success": True})

    # ------------------------------------------------------------------ load / unload

    def load(self, name: str) -> LlamaChild:
        """Start the child (evicting the LRU one first when at --models-max); returns once
        it is spawned, not loaded."""
        with self._load_lock:
            with self._lock:
                entry = self._entries[name]
                if entry.child is not None:
                    return entry.child
            self._evict_lru()
            with self._lock:
                port = next(self._ports)
                entry.args = [
                    "llama-server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--alias",
                    name,
                    "-m",
                    name,
                    "--fit",
                    "on" if self.config.fit else "off",
                ]
                entry.failed, entry.exit_code = False, None
                entry.last_used = time.monotonic()
                child = LlamaChild(
                    self.gpu,
                    entry.spec,
                    self.config,
                    model_path=name,
                    alias=name,
                    owner=f"llama-server:{name}#{next(self._seq)}",
                    port=port,
                )
                entry.child = child
                self._lock.notify_all()
            threading.Thread(target=self._watch, args=(entry, child), daemon=True).start()
            return child

    def _watch(self, entry: _Entry, child: LlamaChild) -> None:
        """The router's monitor: the entry goes unloaded when the child exits."""
        state = child.wait_state("stopped", "failed")
        with self._lock:
            if entry.child is child:
                entry.child = None
                entry.failed = state == "failed"
                entry.exit_code = child.exit_code if state == "failed" else None
                self._lock.notify_all()

    def _evict_lru(self) -> None:
        limit = self.config.models_max
        if limit <= 0:
            return
        with self._lock:
            running = [e for e in self._entries.values() if e.child is not None]
            if len(running) < limit:
                return
            victim = min(running, key=lambda e: e.last_used)
        self.unload(victim.name)
        with self._lock:
            self._lock.wait_for(lambda: victim.child is None)

    def unload(self, name: str) -> None:
        """Asynchronous: tell the child to exit and return."""
        with self._lock:
            child = self._entries[name].child
        if child is not None:
            child.stop()

    def _ready_child(self, ex: Exchange, name: str | None) -> LlamaChild | None:
        """The loaded child for a proxied request (autoloading it), or None after an
        error answer."""
        if name is None:
            send_error(ex, 400, "model name is missing from the request")
            return None
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                send_error(ex, 400, f"model '{name}' not found")
                return None
            child = entry.child
        autoload = ex.query.get("autoload", "true" if self.config.models_autoload else "false")
        if child is None or not child.running:
            if autoload != "true":
                send_error(ex, 400, "model is not loaded")
                return None
            if child is not None:  # still exiting: wait until it is gone, then load afresh
                old = child
                with self._lock:
                    self._lock.wait_for(lambda: entry.child is not old)
            child = self.load(name)
        state = child.wait_state("loaded", "sleeping", "failed", "stopped")
        if state not in ("loaded", "sleeping"):
            send_error(ex, 500, f"model name={name} failed to load")
            return None
        return child

    def _proxy_get(self, ex: Exchange) -> None:
        name = ex.query.get("model")
        if ex.path == "/props" and not name:
            ex.send_json(
                200,
                {
                    "role": "router",
                    "max_instances": self.config.models_max,
                    "models_autoload": self.config.models_autoload,
                    "build_info": BUILD_INFO,
                },
            )
            return
        child = self._ready_child(ex, name or None)
        if child is not None:
            child.handle(ex)

    def _proxy_post(self, ex: Exchange) -> None:
        name = self._body_model(ex)
        child = self._ready_child(ex, name)
        if child is None:
            return
        with self._lock:
            entry = self._entries[name or ""]
            entry.last_used = time.monotonic()
        child.handle(ex)
