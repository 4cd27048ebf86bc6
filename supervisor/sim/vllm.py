"""A fake vLLM OpenAI server (tenants.md §3) on the shared `SimGpu`.

What it does, as the sheet says:
- At start it wants `gpu_memory_utilization x total` of the GPU free and takes all of it
  (weights, activations, a preallocated KV cache) for as long as it runs; if that much is
  not free it does not start (`VllmStartError` with vLLM's ValueError text; exit 1).
- Sleep routes only with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`; without dev
  mode they answer 404. `POST /sleep?level=1|2[&mode=abort|wait|keep]` gives back all but
  `CONTEXT_FRACTION` of the reservation (the CUDA context stays) and answers 200 with an
  empty body once done; `POST /wake_up` takes it back; `GET /is_sleeping`.
  With dev mode but without `--enable-sleep-mode`, `/sleep` fails with 500 (the exact
  error is UNVERIFIED; an assertion as in `LLMEngine.sleep` is modelled).
- `/health` is 200 also while asleep; `/v1/models`, `/metrics` (`vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:engine_sleep_state`, `vllm:kv_cache_usage_perc`) and
  `/version` keep answering.
- `/v1/chat/completions` and `/v1/completions` take `max_tokens / tokens_per_s` simulated
  seconds; at most `max_num_seqs` run at once, the others wait (counted as waiting).
- Two engine generations (`engine`):
  - "new" (0.24+): a sleep first pauses the scheduler: requests arriving while asleep are
    queued (counted in `num_requests_waiting`) and run after `/wake_up`; it never wakes by
    itself. `mode=abort` (default) aborts running requests (`finish_reason` "abort"),
    `wait` lets them finish first, `keep` freezes them until the wake.
  - "old": no guard. A request while asleep, or a sleep while a request runs, crashes the
    engine ("CUDA error: an illegal memory access was encountered"): the process exits.
- A wake that finds its memory taken fails as a CUDA out-of-memory error. What the real
  server does then is UNVERIFIED; the fake takes the harsher reading: the engine dies.
- Death (crash, OOM at wake) gives the memory back (a driver frees a dead process's
  memory), drops every open request, stops the server and sets `dead`; as a process
  (`python -m supervisor.sim vllm`) it exits 1.
- Not modelled: level 2's weight reload (`/collective_rpc reload_weights`): a wake after
  level 2 restores the memory and serves as after level 1; streaming answers.

`/sim/stats` (not a vLLM route) tells tests what it holds and did.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from supervisor.sim.gpu import GIB, SimGpu, add_gpu_args, gpu_from_args
from supervisor.sim.httpbase import BadJson, Exchange, Route, SimServer

NEW_VERSION = "0.24.1"
OLD_VERSION = "0.11.0"
CONTEXT_FRACTION = 0.014  # kept while asleep: 73.9 GiB -> ~1 GiB (tenants.md §3)
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


class VllmStartError(RuntimeError):
    """vLLM did not start (not enough free memory for its reservation)."""


class _Dead(Exception):
    """The engine died while this request waited or ran."""


@dataclass
class VllmConfig:
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    gpu_memory_utilization: float = 0.9
    enable_sleep_mode: bool = False
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1
    engine: str = "new"  # "new" (queues requests while asleep) | "old" (crashes)
    time_scale: float = 1.0
    tokens_per_s: float = 50.0
    max_num_seqs: int = 256
    sleep_s: float = 0.3  # level 1 on an H100 (dynamo #11233); scaled by time_scale
    wake_s: float = 0.3
    max_model_len: int = 32768
    announce: bool = False  # sleeps, wakes and deaths on stderr (the process mode sets it)

    @property
    def version(self) -> str:
        return NEW_VERSION if self.engine == "new" else OLD_VERSION


class FakeVllm:
    def __init__(self, gpu: SimGpu, config: VllmConfig, pid: int | None = None) -> None:
        if config.engine not in ("new", "old"):
            raise ValueError(f"engine must be new or old, got {config.engine!r}")
        self.gpu = gpu
        self.config = config
        self.pid = pid if pid is not None else os.getpid()
        self.owner = f"vllm:{config.model}"
        total = gpu.total_bytes
        self.reserve_bytes = int(total * config.gpu_memory_utilization)
        if not gpu.allocate(self.owner, self.pid, self.reserve_bytes):
            free = gpu.free_bytes()
            raise VllmStartError(
                f"ValueError: Free memory on device ({free / GIB:.2f}/{total / GIB:.2f} GiB) "
                f"on startup is less than desired GPU memory utilization "
                f"({config.gpu_memory_utilization:g}, {self.reserve_bytes / GIB:.2f} GiB). "
                "Decrease GPU memory utilization or reduce GPU memory used by other processes."
            )
        self.context_bytes = int(self.reserve_bytes * CONTEXT_FRACTION)
        self._cond = threading.Condition()
        self.sleeping = False
        self.sleep_level = 0
        self.paused = False  # the scheduler takes no new work (new engine, while asleep)
        self.frozen = False  # mode=keep: running requests make no progress
        self.running = 0
        self.waiting = 0
        self.done = 0
        self.aborted = 0
        self.sleeps = 0
        self.wakes = 0
        self._abort_epoch = 0
        self.dead = threading.Event()
        self.death: str | None = None
        self._server: SimServer | None = None
        self._started = time.time()

    # ------------------------------------------------------------------ lifecycle

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(
            host, port, self.route, server_name="vllm", not_found=_not_found, verbose=verbose
        )
        server.start()
        self._server = server
        return server

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self.gpu.release(self.owner)

    def held_bytes(self) -> int:
        return sum(a.bytes for a in self.gpu.allocations() if a.owner == self.owner)

    def _die(self, reason: str) -> None:
        """The engine crashed: memory back, open requests dropped, the server stops."""
        with self._cond:
            if self.dead.is_set():
                return
            self.death = reason
            self.dead.set()
            self._cond.notify_all()
        print(f"sim: vLLM engine died: {reason}", file=sys.stderr, flush=True)  # always
        self.gpu.release(self.owner)
        server = self._server
        if server is not None:
            threading.Thread(target=server.stop, name="vllm-crash", daemon=True).start()

    def _say(self, what: str) -> None:
        if self.config.announce:
            print(f"sim: vLLM {what}", file=sys.stderr, flush=True)

    def _scaled(self, seconds: float) -> float:
        return max(0.0, seconds * self.config.time_scale)

    # ------------------------------------------------------------------ routing

    def route(self, method: str, path: str) -> Route | None:
        if self.dead.is_set():
            return _drop
        sleep_routes = self.config.dev_mode
        table: dict[tuple[str, str], Route] = {
            ("GET", "/health"): lambda ex: ex.send_empty(200),
            ("GET", "/version"): lambda ex: ex.send_json(200, {"version": self.config.version}),
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/sim/stats"): self.stats,
            ("POST", "/v1/chat/completions"): self.completion,
            ("POST", "/v1/completions"): self.completion,
        }
        if sleep_routes:
            table[("POST", "/sleep")] = self.sleep
            table[("POST", "/wake_up")] = self.wake_up
            table[("GET", "/is_sleeping")] = self.is_sleeping
        return table.get((method, path))

    # ------------------------------------------------------------------ reads

    def models(self, ex: Exchange) -> None:
        m = self.config.model
        entry = {
            "id": m,
            "object": "model",
            "created": int(self._started),
            "owned_by": "vllm",
            "root": m,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        ex.send_json(200, {"object": "list", "data": [entry]})

    def is_sleeping(self, ex: Exchange) -> None:
        ex.send_json(200, {"is_sleeping": self.sleeping})

    def metrics(self, ex: Exchange) -> None:
        labels = f'engine="0",model_name="{self.config.model}"'
        with self._cond:
            running, waiting, level = self.running, self.waiting, self.sleep_level
            usage = 0.0 if self.sleeping else min(1.0, running / max(1, self.config.max_num_seqs))
        states = {"awake": level == 0, "weights_offloaded": level == 1, "discard_all": level == 2}
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}",
            "# HELP vllm:engine_sleep_state Engine sleep state",
            "# TYPE vllm:engine_sleep_state gauge",
        ]
        for state, on in states.items():
            lines.append(
                f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {1.0 if on else 0.0}'
            )
        ex.send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")

    def stats(self, ex: Exchange) -> None:
        with self._cond:
            ex.send_json(
                200,
                {
                    "model": self.config.model,
                    "engine": self.config.engine,
                    "version": self.config.version,
                    "held": self.held_bytes(),
                    "reserve": self.reserve_bytes,
                    "sleeping": self.sleeping,
                    "sleep_level": self.sleep_level,
                    "running": self.running,
                    "waiting": self.waiting,
                    "done": self.done,
                    "aborted": self.aborted,
                    "sleeps": self.sleeps,
                    "wakes": self.wakes,
                    "death": self.death,
                },
            )

    # ------------------------------------------------------------------ sleep

    def sleep(self, ex: Exchange) -> None:
        level = ex.query.get("level", "1")
        if level not in ("0", "1", "2"):
            ex.send_json(400, _error(f"invalid sleep level {level!r}", "BadRequestError", 400))
            return
        if not self.config.enable_sleep_mode:
            ex.send_json(
                500,
                _error(
                    "AssertionError: Sleep mode is not enabled in the model config",
                    "InternalServerError",
                    500,
                ),
            )
            return
        mode = ex.query.get("mode", "abort") if self.config.engine == "new" else "none"
        with self._cond:
            if self.config.engine == "old" and self.running > 0:
                crash = True
            else:
                crash = False
                self.paused = self.config.engine == "new"
                if mode == "abort":
                    self._abort_epoch += 1
                    self._cond.notify_all()
                elif mode == "keep":
                    self.frozen = True
                # wait (and abort, once the aborted ones left): until nothing runs
                while mode != "keep" and self.running > 0 and not self.dead.is_set():
                    self._cond.wait(0.05)
        if crash:
            self._die(f"{ILLEGAL_ACCESS} (sleep during an in-flight request)")
            _drop(ex)
            return
        time.sleep(self._scaled(self.config.sleep_s))
        with self._cond:
            if int(level) > 0 and not self.sleeping:
                self.gpu.release(self.owner, self.reserve_bytes - self.context_bytes)
                self.sleeping = True
                self.sleep_level = int(level)
                self.sleeps += 1
            elif int(level) == 0:
                self.sleeping = True  # paused: /is_sleeping says true, no memory change
        self._say(f"asleep (level {level}, mode {mode})")
        ex.send_empty(200)

    def wake_up(self, ex: Exchange) -> None:
        time.sleep(self._scaled(self.config.wake_s))
        with self._cond:
            if self.sleeping and self.sleep_level > 0:
                want = self.reserve_bytes - self.context_bytes
                if not self.gpu.allocate(self.owner, self.pid, want):
                    free = self.gpu.free_bytes()
                    oom = (
                        f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                        f"{want / GIB:.2f} GiB. GPU 0 has a total capacity of "
                        f"{self.gpu.total_bytes / GIB:.2f} GiB of which {free / GIB:.2f} GiB "
                        "is free."
                    )
                else:
                    oom = ""
            else:
                oom = ""
            if not oom:
                was = self.sleeping
                self.sleeping = False
                self.sleep_level = 0
                self.paused = False
                self.frozen = False
                if was:
                    self.wakes += 1
                self._cond.notify_all()
        if oom:
            self._die(oom)  # the memory is back by the time the client reads the answer
            ex.send_json(500, _error(oom, "InternalServerError", 500))
            return
        self._say("awake")
        ex.send_empty(200)

    # ------------------------------------------------------------------ requests

    def completion(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson as exc:
            ex.send_json(400, _error(f"invalid JSON: {exc}", "BadRequestError", 400))
            return
        if not isinstance(body, dict):
            ex.send_json(400, _error("the body must be an object", "BadRequestError", 400))
            return
        model = body.get("model")
        if model != self.config.model:
            ex.send_json(
                404, _error(f"The model `{model}` does not exist.", "NotFoundError", 404, "model")
            )
            return
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            ex.send_json(
                400, _error("max_tokens must be a positive integer", "BadRequestError", 400)
            )
            return
        if self.sleeping and self.config.engine == "old":
            self._die(f"{ILLEGAL_ACCESS} (a request while asleep)")
            ex.send_json(500, _error(ILLEGAL_ACCESS, "InternalServerError", 500))
            return
        try:
            finish = self._run(max_tokens)
        except _Dead:
            _drop(ex)
            return
        chat = ex.path.endswith("/chat/completions")
        tokens = max_tokens if finish == "length" else 0
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "sim " * tokens}
        else:
            choice["text"] = "sim " * tokens
        ex.send_json(
            200,
            {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.config.model,
                "choices": [choice],
                "usage": {"prompt_tokens": 8, "completion_tokens": tokens,
                          "total_tokens": 8 + tokens},
            },
        )  # fmt: skip

    def _run(self, max_tokens: int) -> str:
        """Wait for a slot (and for the wake), then generate; "length" or "abort"."""
        with self._cond:
            self.waiting += 1
            try:
                while (self.paused or self.running >= self.config.max_num_seqs) and not (
                    self.dead.is_set()
                ):
                    self._cond.wait(0.05)
                if self.dead.is_set():
                    raise _Dead
            finally:
                self.waiting -= 1
            self.running += 1
            epoch = self._abort_epoch
        try:
            left = self._scaled(max_tokens / self.config.tokens_per_s)
            while left > 0:
                with self._cond:
                    if self.dead.is_set():
                        raise _Dead
                    if self._abort_epoch != epoch:
                        self.aborted += 1
                        return "abort"
                    if self.frozen:
                        self._cond.wait(0.05)
                        continue
                step = min(left, 0.01)
                time.sleep(step)
                left -= step
            with self._cond:
                self.done += 1
            return "length"
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _not_found(ex: Exchange) -> None:
    ex.send_json(404, {"detail": "Not Found"})


def _drop(ex: Exchange) -> None:
    """The process is gone: close the connection without an answer."""
    ex.answered = True
    ex._h.close_connection = True  # the plumbing has no "abort" of its own


# ---------------------------------------------------------------------- the process


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m supervisor.sim vllm",
        description="A fake vLLM OpenAI server on the simulated GPU (supervisor/sim/vllm.py). "
        f"The sleep routes need --enable-sleep-mode and the environment {DEV_MODE_ENV}=1.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", "--served-model-name", dest="model", default=VllmConfig.model)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument(
        "--engine",
        choices=["new", "old"],
        default="new",
        help="new: requests wait while asleep; old: a request while asleep crashes it",
    )
    p.add_argument("--tokens-per-s", type=float, default=VllmConfig.tokens_per_s)
    p.add_argument("--max-num-seqs", type=int, default=VllmConfig.max_num_seqs)
    add_gpu_args(p)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--verbose", action="store_true", help="access logs on stderr")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        print("--gpu-memory-utilization must be in (0, 1]", file=sys.stderr)
        return 2
    config = VllmConfig(
        model=args.model,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_sleep_mode=args.enable_sleep_mode,
        dev_mode=os.environ.get(DEV_MODE_ENV, "") not in ("", "0"),
        engine=args.engine,
        time_scale=args.time_scale,
        tokens_per_s=args.tokens_per_s,
        max_num_seqs=args.max_num_seqs,
        announce=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    gpu = gpu_from_args(args)
    try:
        try:
            vllm = FakeVllm(gpu, config)
        except VllmStartError as exc:
            print(str(exc), file=sys.stderr, flush=True)
            return 1
        server = vllm.serve(args.host, args.port, verbose=args.verbose)
        sleep = "on" if config.enable_sleep_mode and config.dev_mode else "off"
        print(
            f"sim: fake vLLM {config.version} ({config.engine} engine) serving {config.model} "
            f"on {server.url}, {vllm.reserve_bytes / GIB:.1f} GiB reserved, sleep mode {sleep}",
            flush=True,
        )
        while not stop.wait(0.2) and not vllm.dead.is_set():
            pass
        if vllm.dead.is_set():
            time.sleep(0.5)  # the answer to the request that killed it goes out first
        server.stop()
        vllm.close()
        return 1 if vllm.dead.is_set() else 0
    finally:
        gpu.close()
