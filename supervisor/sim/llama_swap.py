"""A fake llama-swap (mostlygeek/llama-swap HEAD, 2026; tenants.md section 2) on the shared
`SimGpu`.

Models come from a config with llama-swap's keys (JSON, which is also YAML):

    {"globalTTL": 0, "healthCheckTimeout": 120,
     "models": {"chat": {"model": "llama3.1:8b", "ttl": 300, "aliases": ["gpt-4o"],
                         "name": "Chat", "description": "...", "unloadTimeout": 10,
                         "ctx_size": 4096, "size_bytes": 4920753328}},
     "groups": {"pair": {"swap": false, "exclusive": false, "persistent": false,
                         "members": ["chat", "embed"]}}}

`model` (a catalog name; default the key) and `size_bytes` / `ctx_size` are the sim's own
keys: they say what the upstream `llama-server` loads. Each model's upstream is a
llama-server child (`LlamaChild`, with --fit on) with its own stand-in process, so its
VRAM is allocated under that PID; the fake proxies to it in-process.

Behaviour (HEAD):
* A request for a stopped model starts it and blocks until it is ready; concurrent callers
  join the same start. Models outside any group share a default group with swap and
  exclusive on, so by default one model runs at a time.
* Requests are served first in, first out: a request whose model would stop a busy one
  waits until that one has drained, and later requests for the busy model queue behind it.
  A request that conflicts with no earlier waiting request goes ahead.
* An explicit unload (`GET /unload`, `POST /api/models/unload[/{model}]`) does not wait for
  in-flight requests: the upstream is killed, a streamed answer breaks off and an answer
  not yet started gets 502 (Go's reverse proxy). The unload answers once the process has
  stopped. Callers still waiting for that model get 500 `unspecific error: ...`.
* A model's TTL (seconds after its last request; -1 = `globalTTL`, 0 = never) is skipped
  while a request is in flight.
* Errors use llama-swap's `SendResponse`: JSON `{"src":"llama-swap","error":msg}`, or
  `llama-swap: msg` as text/plain when the client's Accept asks for it.

UNVERIFIED, chosen here: the bodies of `/api/models/unload/{model}`'s 404s use the same
`SendResponse` shape; an unknown model in a request body answers 404 `no model id could be
identified`; the FIFO lets non-conflicting requests pass a waiting swap.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from supervisor.sim.catalog import Catalog, ModelSpec
from supervisor.sim.gpu import MIB, SimGpu
from supervisor.sim.httpbase import BadJson, ClientGone, Exchange, Route, SimServer
from supervisor.sim.llama_server import Clock, LlamaChild, LlamaServerConfig, resolve_spec

DEFAULT_GROUP = "(default)"
START_PORT = 5800

# Routes whose JSON body names the model (server.go).
BODY_ROUTES = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/infill",
    "/completion",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
)
QUERY_ROUTES = ("/props", "/v1/audio/voices", "/sdapi/v1/loras")


class ConfigError(ValueError):
    """The llama-swap config is invalid; the message names the key."""


@dataclass(frozen=True)
class SwapModel:
    id: str
    model: str  # the catalog model the upstream llama-server loads
    ttl_s: float = -1.0  # -1: globalTTL
    aliases: tuple[str, ...] = ()
    name: str = ""
    description: str = ""
    unload_timeout_s: float = 10.0
    ctx_size: int = 4096
    size_bytes: int | None = None
    cmd: str = ""


@dataclass(frozen=True)
class SwapGroup:
    name: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@dataclass
class LlamaSwapConfig:
    models: tuple[SwapModel, ...] = ()
    groups: tuple[SwapGroup, ...] = ()
    global_ttl_s: float = 0.0
    health_check_timeout_s: float = 120.0
    performance_monitor: bool = True  # False: /metrics answers 503
    child_exit_s: float = 0.3  # upstream exit after SIGTERM (simulated seconds)
    load_base_s: float = 0.3
    token_s: float | None = None  # simulated seconds per token; None: from the size
    n_predict: int = 32
    time_scale: float = 1.0


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def parse_swap_config(source: str | dict[str, Any]) -> LlamaSwapConfig:
    """A config from a dict, inline JSON (starting with "{") or a path to a JSON file."""
    if isinstance(source, dict):
        data = source
    else:
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"llama-swap config is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ConfigError("llama-swap config: 'models' must be a mapping of model ids")
    models = []
    known_keys = {
        "model",
        "ttl",
        "aliases",
        "name",
        "description",
        "unloadTimeout",
        "ctx_size",
        "size_bytes",
        "cmd",
    }
    for mid, raw in data["models"].items():
        raw = raw or {}
        unknown = set(raw) - known_keys
        if unknown:
            raise ConfigError(f"models.{mid}: unknown key(s) {sorted(unknown)}")
        aliases = raw.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ConfigError(f"models.{mid}.aliases: expected a list of names")
        size = raw.get("size_bytes")
        models.append(
            SwapModel(
                id=mid,
                model=str(raw.get("model", mid)),
                ttl_s=_number(raw.get("ttl", -1), f"models.{mid}.ttl"),
                aliases=tuple(aliases),
                name=str(raw.get("name", "")),
                description=str(raw.get("description", "")),
                unload_timeout_s=_number(
                    raw.get("unloadTimeout", 10), f"models.{mid}.unloadTimeout"
                ),
                ctx_size=int(_number(raw.get("ctx_size", 4096), f"models.{mid}.ctx_size")),
                size_bytes=int(_number(size, f"models.{mid}.size_bytes")) if size else None,
                cmd=str(raw.get("cmd", "")),
            )
        )
    groups = []
    raw_groups = data.get("groups", {}) or {}
    if not isinstance(raw_groups, dict):
        raise ConfigError("groups: expected a mapping of group names")
    for gname, raw in raw_groups.items():
        members = raw.get("members", [])
        if not isinstance(members, list):
            raise ConfigError(f"groups.{gname}.members: expected a list of model ids")
        groups.append(
            SwapGroup(
                name=gname,
                members=tuple(str(m) for m in members),
                swap=_bool(raw.get("swap", True), f"groups.{gname}.swap"),
                exclusive=_bool(raw.get("exclusive", True), f"groups.{gname}.exclusive"),
                persistent=_bool(raw.get("persistent", False), f"groups.{gname}.persistent"),
            )
        )
    return LlamaSwapConfig(
        models=tuple(models),
        groups=tuple(groups),
        global_ttl_s=_number(data.get("globalTTL", 0), "globalTTL"),
        health_check_timeout_s=_number(data.get("healthCheckTimeout", 120), "healthCheckTimeout"),
    )


def go_float(value: float) -> str:
    """A float as Go's %g-like shortest form prints it (3.2656850944e+10, 70, 95.5)."""
    if value == 0:
        return "0"
    dec = Decimal(repr(float(value))).normalize()
    sign, digits, exponent = dec.as_tuple()
    assert isinstance(exponent, int)
    exp10 = len(digits) + exponent - 1
    text = "".join(map(str, digits))
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:  # strconv.FormatFloat(v, 'g', -1, 64)
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'+' if exp10 >= 0 else '-'}{abs(exp10):02d}"
    return prefix + format(dec.copy_abs(), "f")


def swap_error(ex: Exchange, status: int, message: str) -> None:
    """llama-swap's SendResponse: JSON, or text when the client accepts text/plain."""
    accept = ex.headers.get("Accept", "")
    if "text/plain" in accept:
        ex.send(status, f"llama-swap: {message}".encode(), "text/plain")
    elif "text/html" in accept:
        page = f"<html><body><h1>llama-swap</h1><p>{message}</p></body></html>"
        ex.send(status, page.encode(), "text/html")
    else:
        ex.send(
            status, json.dumps({"src": "llama-swap", "error": message}).encode(), "application/json"
        )


class StartFailed(Exception):
    """The model could not be started, or was unloaded while the caller waited."""


@dataclass(eq=False)
class _Proc:
    model: SwapModel
    spec: ModelSpec
    group: SwapGroup
    port: int
    state: str = "stopped"  # stopped, starting, ready, stopping
    child: LlamaChild | None = None
    inflight: int = 0
    last_request: float = 0.0
    aborts: int = 0  # bumped by explicit unloads: waiting callers get 500
    failures: int = 0  # bumped by failed starts: waiting callers get 500
    error: str = ""

    @property
    def cmd(self) -> str:
        if self.model.cmd:
            return self.model.cmd.replace("${PORT}", str(self.port))
        return (
            f"llama-server --port {self.port} -m /models/{self.model.model}.gguf "
            f"-c {self.model.ctx_size}"
        )


@dataclass(eq=False)
class _Ticket:
    model: str
    aborts: int
    failures: int
    done: bool = False
    queued: float = field(default_factory=time.monotonic)


class FakeLlamaSwap:
    """Serve with `serve(host, port)`; stop the server, then `close()`."""

    def __init__(
        self, gpu: SimGpu, catalog: Catalog | None = None, config: LlamaSwapConfig | None = None
    ) -> None:
        self.gpu = gpu
        self.catalog = catalog or Catalog()
        self.config = config or LlamaSwapConfig()
        self.clock = Clock(self.config.time_scale)
        self.created = int(time.time())
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._seq = itertools.count(1)
        self._aliases: dict[str, str] = {}
        self._procs: dict[str, _Proc] = {}
        self._stop = threading.Event()
        groups = {g.name: g for g in self.config.groups}
        member_of: dict[str, SwapGroup] = {}
        ids = {m.id for m in self.config.models}
        for group in self.config.groups:
            for member in group.members:
                if member not in ids:
                    raise ConfigError(f"groups.{group.name}: unknown model {member!r}")
                if member in member_of:
                    raise ConfigError(f"model {member!r} is in more than one group")
                member_of[member] = group
        ungrouped = tuple(m.id for m in self.config.models if m.id not in member_of)
        default = SwapGroup(DEFAULT_GROUP, ungrouped)
        groups[DEFAULT_GROUP] = default
        self._groups = groups
        ports = itertools.count(START_PORT)
        for m in self.config.models:
            for alias in m.aliases:
                if alias in self._aliases or alias in ids:
                    raise ConfigError(f"alias {alias!r} is used twice")
                self._aliases[alias] = m.id
            spec = resolve_spec(self.catalog, m.model, m.size_bytes)
            self._procs[m.id] = _Proc(m, spec, member_of.get(m.id, default), next(ports))
        self._reaper = threading.Thread(target=self._ttl_loop, daemon=True, name="sim-swap-ttl")
        self._reaper.start()

    # ------------------------------------------------------------------ test accessors

    def inflight(self, model: str) -> int:
        with self._cond:
            return self._procs[self._real(model) or model].inflight

    def state(self, model: str) -> str:
        with self._cond:
            return self._procs[self._real(model) or model].state

    def child(self, model: str) -> LlamaChild | None:
        with self._cond:
            return self._procs[self._real(model) or model].child

    def waiting(self) -> int:
        """Requests queued for a model to start or for a swap."""
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------ lifecycle

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> SimServer:
        server = SimServer(host, port, self._route, server_name="llama-swap", verbose=verbose)
        server.start()
        return server

    def close(self) -> None:
        self._stop.set()
        self.unload_all()

    # ------------------------------------------------------------------ scheduling

    def _real(self, name: str) -> str | None:
        if name in self._procs:
            return name
        return self._aliases.get(name)

    def _stops(self, target: str) -> set[str]:
        """Models that starting `target` stops (by group rules; running or not)."""
        proc = self._procs[target]
        out: set[str] = set()
        for other in self._procs.values():
            if other.model.id == target:
                continue
            if other.group is proc.group:
                if proc.group.swap:
                    out.add(other.model.id)
            elif proc.group.exclusive and not other.group.persistent:
                out.add(other.model.id)
        return out

    def _conflict(self, a: str, b: str) -> bool:
        return a != b and (b in self._stops(a) or a in self._stops(b))

    def _ttl_s(self, proc: _Proc) -> float:
        return proc.model.ttl_s if proc.model.ttl_s >= 0 else self.config.global_ttl_s

    def _child_config(self, proc: _Proc) -> LlamaServerConfig:
        cfg = self.config
        return LlamaServerConfig(
            model=proc.model.model,
            alias=proc.model.id,
            ctx_size=proc.model.ctx_size,
            stop_timeout_s=proc.model.unload_timeout_s,
            child_exit_s=cfg.child_exit_s,
            load_base_s=cfg.load_base_s,
            token_s=cfg.token_s,
            n_predict=cfg.n_predict,
            time_scale=cfg.time_scale,
        )

    def acquire(self, model: str) -> _Proc:
        """Wait for `model` to be ready (starting or swapping to it); count one request in
        flight. Raises StartFailed (HTTP 500)."""
        with self._cond:
            proc = self._procs[model]
            ticket = _Ticket(model, proc.aborts, proc.failures)
            self._queue.append(ticket)
            self._cond.notify_all()
            try:
                while True:
                    proc = self._procs[model]
                    if proc.aborts != ticket.aborts:
                        raise StartFailed(f"model {model} was unloaded while loading")
                    if proc.failures != ticket.failures:
                        raise StartFailed(proc.error)
                    if self._may_act(ticket) and self._act(proc):
                        proc.inflight += 1
                        proc.last_request = time.monotonic()
                        return proc
                    self._cond.wait(0.05)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _may_act(self, ticket: _Ticket) -> bool:
        for earlier in self._queue:
            if earlier is ticket:
                return True
            if self._conflict(earlier.model, ticket.model):
                return False
        return True

    def _act(self, proc: _Proc) -> bool:
        """Move `proc` towards ready (under the lock); True once it is ready."""
        if proc.state == "ready":
            return True
        if proc.state != "stopped":
            return False
        victims = [self._procs[v] for v in self._stops(proc.model.id)]
        running = [v for v in victims if v.state != "stopped"]
        if any(v.inflight for v in running):
            return False  # FIFO: wait for the busy process to drain
        for victim in running:
            if victim.state in ("ready", "starting"):
                self._begin_stop(victim)
        if running:
            return False
        self._begin_start(proc)
        return False

    def _begin_start(self, proc: _Proc) -> None:
        proc.state, proc.error = "starting", ""
        child = LlamaChild(
            self.gpu,
            proc.spec,
            self._child_config(proc),
            model_path=f"/models/{proc.model.model}.gguf",
            alias=proc.model.id,
            owner=f"llama-swap:{proc.model.id}#{next(self._seq)}",
            port=proc.port,
        )
        proc.child = child
        threading.Thread(target=self._health_check, args=(proc, child), daemon=True).start()

    def _health_check(self, proc: _Proc, child: LlamaChild) -> None:
        timeout = self.clock.real_s(self.config.health_check_timeout_s)
        state = child.wait_state("loaded", "failed", "stopping", "stopped", timeout_s=timeout)
        with self._cond:
            if proc.child is not child or proc.state != "starting":
                return
            if state == "loaded":
                proc.state = "ready"
                proc.last_request = time.monotonic()
            else:
                proc.error = (
                    f"upstream command exited prematurely: {child.error or 'health check timeout'}"
                )
                proc.failures += 1
                self._begin_stop(proc)
            self._cond.notify_all()

    def _begin_stop(self, proc: _Proc) -> None:
        """SIGTERM: in-flight requests break off; the process ends `child_exit_s` later
        (killed at `unloadTimeout`)."""
        child = proc.child
        if child is None:
            proc.state = "stopped"
            return
        proc.state = "stopping"

        def exited() -> None:
            with self._cond:
                if proc.child is child:
                    proc.child = None
                    proc.state = "stopped"
                self._cond.notify_all()

        child.stop(on_exit=exited)

    def release(self, proc: _Proc) -> None:
        with self._cond:
            proc.inflight -= 1
            proc.last_request = time.monotonic()
            self._cond.notify_all()

    def unload(self, model: str) -> None:
        """Explicit unload: does not wait for in-flight requests; returns once stopped."""
        with self._cond:
            proc = self._procs[model]
            proc.aborts += 1
            if proc.state in ("starting", "ready"):
                self._begin_stop(proc)
            self._cond.notify_all()
            self._cond.wait_for(lambda: proc.state == "stopped", timeout=30)

    def unload_all(self) -> None:
        with self._cond:
            for proc in self._procs.values():
                proc.aborts += 1
                if proc.state in ("starting", "ready"):
                    self._begin_stop(proc)
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: all(p.state == "stopped" for p in self._procs.values()), timeout=30
            )

    def _ttl_loop(self) -> None:
        while not self._stop.wait(0.02):
            now = time.monotonic()
            with self._cond:
                for proc in self._procs.values():
                    ttl = self._ttl_s(proc)
                    if proc.state != "ready" or ttl <= 0 or proc.inflight:
                        continue
                    if now - proc.last_request >= self.clock.real_s(ttl):
                        self._begin_stop(proc)
                        self._cond.notify_all()

    # ------------------------------------------------------------------ HTTP

    def _route(self, method: str, path: str) -> Route | None:
        if path == "/health" and method == "GET":
            return lambda ex: ex.send_text(200, "OK")
        if path == "/running" and method == "GET":
            return self._running
        if path == "/unload" and method == "GET":
            return self._unload_everything_text
        if path == "/api/models/unload" and method == "POST":
            return self._unload_everything_json
        if path.startswith("/api/models/unload/") and method == "POST":
            return self._unload_one
        if path in ("/v1/models", "/models") and method == "GET":
            return self._models
        if path == "/metrics" and method == "GET":
            return self._metrics
        if path.startswith("/upstream/"):
            return self._upstream
        if method == "POST" and path in BODY_ROUTES:
            return self._dispatch_body
        if method == "GET" and path in QUERY_ROUTES:
            return self._dispatch_query
        return None

    def _running(self, ex: Exchange) -> None:
        with self._cond:
            running = [
                {
                    "model": p.model.id,
                    "state": p.state,
                    "cmd": p.cmd,
                    "proxy": f"http://127.0.0.1:{p.port}",
                    "ttl": int(self._ttl_s(p)),
                    "name": p.model.name,
                    "description": p.model.description,
                }
                for p in self._procs.values()
                if p.state != "stopped"
            ]
        ex.send_json(200, {"running": running})

    def _unload_everything_text(self, ex: Exchange) -> None:
        self.unload_all()
        ex.send_text(200, "OK")

    def _unload_everything_json(self, ex: Exchange) -> None:
        self.unload_all()
        ex.send_json(200, {"msg": "ok"})

    def _unload_one(self, ex: Exchange) -> None:
        name = ex.path[len("/api/models/unload/") :]
        real = self._real(name)
        if real is None:
            swap_error(ex, 404, "model not found")
            return
        self.unload(real)
        ex.send_text(200, "OK")

    def _models(self, ex: Exchange) -> None:
        with self._cond:
            data = []
            for mid in sorted(self._procs):
                proc = self._procs[mid]
                entry: dict[str, Any] = {
                    "id": mid,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama-swap",
                }
                if proc.model.name:
                    entry["name"] = proc.model.name
                if proc.model.description:
                    entry["description"] = proc.model.description
                entry["status"] = {"value": "loaded" if proc.state == "ready" else "unloaded"}
                entry["meta"] = {"llamaswap": {"aliases": list(proc.model.aliases)}}
                data.append(entry)
        ex.send_json(200, {"object": "list", "data": data})

    def _metrics(self, ex: Exchange) -> None:
        if not self.config.performance_monitor:
            ex.send(503, b"# performance monitor not available\n", "text/plain")
            return
        snap = self.gpu.snapshot()
        labels = f'{{id="0",name="{snap.name}",uuid="{snap.uuid}"}}'
        used = snap.used_bytes // MIB * MIB
        total = snap.total_bytes // MIB * MIB
        rows = [
            ("llamaswap_gpu_util_percent", "GPU utilization percent (0-100)", 0.0),
            (
                "llamaswap_gpu_memory_util_percent",
                "GPU memory utilization percent (0-100)",
                100.0 * used / total if total else 0.0,
            ),
            ("llamaswap_gpu_memory_used_bytes", "GPU memory used in bytes", float(used)),
            ("llamaswap_gpu_memory_total_bytes", "GPU memory total in bytes", float(total)),
        ]
        lines = []
        for name, help_text, value in rows:
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} gauge",
                f"{name}{labels} {go_float(value)}",
            ]
        ex.send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")

    def _proxy(self, ex: Exchange, model: str) -> None:
        try:
            proc = self.acquire(model)
        except StartFailed as exc:
            swap_error(ex, 500, f"unspecific error: {exc}")
            return
        try:
            child = proc.child
            if child is None or proc.state != "ready":
                swap_error(ex, 503, f"[{model}] process is not ready")
                return
            child.handle(ex)
        except ClientGone:
            if ex.answered:
                raise  # a streamed answer breaks off
            ex.send_empty(502)  # Go's reverse proxy: upstream gone before its headers
        finally:
            self.release(proc)

    def _dispatch_body(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson:
            body = None
        name = body.get("model") if isinstance(body, dict) else None
        real = self._real(name) if isinstance(name, str) and name else None
        if real is None:
            swap_error(ex, 404, "no model id could be identified")
            return
        self._proxy(ex, real)

    def _dispatch_query(self, ex: Exchange) -> None:
        name = ex.query.get("model", "")
        real = self._real(name) if name else None
        if real is None:
            swap_error(ex, 404, "no model id could be identified")
            return
        self._proxy(ex, real)

    def _upstream(self, ex: Exchange) -> None:
        parts = ex.path[len("/upstream/") :].split("/")
        found: tuple[str, str] | None = None
        for i in range(1, len(parts) + 1):
            real = self._real("/".join(parts[:i]))
            if real is not None:
                found = (real, "/" + "/".join(parts[i:]))
        if found is None:
            swap_error(ex, 404, "no model id could be identified")
            return
        ex.path = found[1]
        self._proxy(ex, found[0])
