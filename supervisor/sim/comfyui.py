"""A fake ComfyUI server: the HTTP API of api-facts 2.1-2.4 over `ComfyEngine`.

Every route is also served under `/api` (`/api/system_stats` equals `/system_stats`).
Errors look like the real server's (api-facts-2026 section 4): an unknown path answers 404
with an empty body; GET or HEAD on a path that has no GET route also 404 (the static file
route catches it), another wrong method 405 with an `Allow` header; a handler that fails on
a bad body (for example `/free` with a body that is not a JSON object) 500.

`/system_stats` has the shape of the profile's generation: 2025 (0.3.64: `os` is `os.name`,
one device) or 2026 (0.15+: `os` is `sys.platform`, `comfy_package_versions` with
`comfy-aimdo`, `deploy_environment`). Under `--cpu` the one device is `cpu` with index null
and system RAM in all four vram fields.

`/sim/...` routes belong to the simulator (stats, the pinned switch, the GPU view).
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import socket
import struct
import sys
import threading
import uuid
from typing import Any

from supervisor.sim.catalog import Catalog
from supervisor.sim.comfyui_prompt import PromptError, error_body, parse_prompt, validate
from supervisor.sim.comfyui_worker import ComfyConfig, ComfyEngine
from supervisor.sim.gpu import GIB, SimGpu
from supervisor.sim.httpbase import Exchange, Route, SimServer
from supervisor.sim.websocket import (
    CLOSE,
    PING,
    PONG,
    TEXT,
    ProtocolViolation,
    accept_key,
    frame,
    read_frame,
)


class _ServerError(Exception):
    """What an uncaught exception inside an aiohttp handler becomes: a plain 500."""


RAM_TOTAL = 64 * GIB
RAM_FREE = 48 * GIB


class FakeComfyUI:
    def __init__(self, gpu: SimGpu, catalog: Catalog, config: ComfyConfig) -> None:
        self.gpu = gpu
        self.config = config
        self.engine = ComfyEngine(gpu, catalog, config)
        self._sockets: dict[str, _Socket] = {}  # sid -> open /ws connection
        self._sockets_lock = threading.Lock()
        self.engine.on_event = self._on_event
        self._routes: dict[str, dict[str, Route]] = {
            "/": {"GET": self.index},
            "/system_stats": {"GET": self.system_stats},
            "/queue": {"GET": self.get_queue, "POST": self.post_queue},
            "/prompt": {"GET": self.get_prompt, "POST": self.post_prompt},
            "/interrupt": {"POST": self.post_interrupt},
            "/free": {"POST": self.post_free},
            "/history": {"GET": self.get_history, "POST": self.post_history},
            "/ws": {"GET": self.websocket},
            "/sim/stats": {"GET": self.sim_stats},
            "/sim/reset": {"POST": self.sim_reset},
            "/sim/pinned": {"GET": self.sim_pinned, "POST": self.sim_pinned},
            "/sim/gpu": {"GET": self.sim_gpu},
        }

    def route(self, method: str, path: str) -> Route | None:
        if path.startswith("/api/"):
            path = path[4:]
        methods = self._routes.get(path)
        if methods is None and path.startswith("/history/"):
            methods = {"GET": self.get_history_item}
        if methods is None:
            return None
        if method == "HEAD" and "GET" in methods:
            method = "GET"
        if method in methods:
            return methods[method]
        if method in ("GET", "HEAD"):
            return _not_found  # aiohttp's static route answers, and finds no such file
        allowed = ",".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
        return lambda ex: _method_not_allowed(ex, allowed)

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(
            host, port, self.route, server_name="comfyui", not_found=_not_found, verbose=verbose
        )
        server.start()
        return server

    def close(self) -> None:
        self.engine.close()
        with self._sockets_lock:
            for sock in self._sockets.values():
                sock.outbox.put(None)

    # ------------------------------------------------------------------ /ws

    def websocket(self, ex: Exchange) -> None:
        """`GET /ws?clientId=<id>` (api-facts 2.5): on connect `status` with the queue and
        the sid; then the events of the prompts this client submitted (and of prompts
        submitted without a client_id), `status` on every queue change."""
        key = ex.headers.get("Sec-WebSocket-Key", "")
        if "websocket" not in ex.headers.get("Upgrade", "").lower() or not key:
            # aiohttp's WebSocketResponse.prepare refuses a plain GET.
            ex.send_text(400, "400: Bad Request")
            return
        sid = ex.query.get("clientId") or uuid.uuid4().hex
        rfile, wfile, conn = ex.switch_protocols(
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Accept": accept_key(key),
            }
        )
        sock = _Socket(sid)
        with self._sockets_lock:
            self._sockets[sid] = sock  # a reconnect with the same clientId replaces it
        status = {"exec_info": {"queue_remaining": self.engine.remaining()}}
        sock.send("status", {"status": status, "sid": sid})
        try:
            sock.serve(rfile, wfile, conn)
        finally:
            with self._sockets_lock:
                if self._sockets.get(sid) is sock:
                    del self._sockets[sid]

    def _on_event(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        """Route an engine event like ComfyUI's send_sync (api-facts 2.5)."""
        with self._sockets_lock:
            if event == "status" or (client_id is None and event in _BROADCAST_UNADDRESSED):
                targets = list(self._sockets.values())
            elif client_id is not None and client_id in self._sockets:
                targets = [self._sockets[client_id]]
            else:
                targets = []  # no client_id: the rest is not sent at all
        for sock in targets:
            sock.send(event, data)

    # ------------------------------------------------------------------ helpers

    def _json(self, ex: Exchange, *, optional: bool = False) -> dict[str, Any]:
        """`await request.json()`: a bad body is an uncaught error (500) in ComfyUI."""
        if optional and not ex.body.strip():
            return {}
        try:
            data = json.loads(ex.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if optional:
                return {}
            raise _ServerError("body is not JSON") from None
        if not isinstance(data, dict):
            raise _ServerError("body is not a JSON object")
        return data

    def _guard(self, ex: Exchange, fn: Any) -> None:
        try:
            fn()
        except _ServerError:
            ex.send_text(500, "500 Internal Server Error\n\nServer got itself in trouble")

    # ------------------------------------------------------------------ routes

    def index(self, ex: Exchange) -> None:
        ex.send(200, b"<!DOCTYPE html><title>ComfyUI (simulated)</title>", "text/html")

    def system_stats(self, ex: Exchange) -> None:
        config = self.config
        modern = config.profile != "2025"
        system: dict[str, Any] = {
            "os": sys.platform if modern else "posix",
            "ram_total": RAM_TOTAL,
            "ram_free": RAM_FREE,
            "comfyui_version": config.version,
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.94",
            "required_templates_version": "0.1.94",
            "python_version": sys.version,
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": False,
            "argv": config.argv,
        }
        if modern:
            packages = {
                "comfyui-frontend-package": "1.33.10",
                "comfyui-workflow-templates": "0.7.25",
                "comfyui-embedded-docs": "0.3.1",
            }
            if config.aimdo_version is not None:
                packages["comfy-aimdo"] = config.aimdo_version
            system["comfy_package_versions"] = packages
            system["deploy_environment"] = "local"
        ex.send_json(200, {"system": system, "devices": [self._device()]})

    def _device(self) -> dict[str, Any]:
        if self.config.cpu:
            # get_total_memory / get_free_memory report psutil's RAM for a CPU device.
            return {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": RAM_TOTAL,
                "vram_free": RAM_FREE,
                "torch_vram_total": RAM_TOTAL,
                "torch_vram_free": RAM_FREE,
            }
        mem = self.engine.memory()
        torch_free = mem["reserved"] - mem["active"]
        return {
            "name": f"cuda:0 {self.gpu.name} : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": mem["total"],
            "vram_free": mem["free"] + torch_free,
            "torch_vram_total": mem["reserved"],
            "torch_vram_free": torch_free,
        }

    def get_queue(self, ex: Exchange) -> None:
        running, pending = self.engine.queue()
        ex.send_json(
            200,
            {
                "queue_running": [j.item() for j in running],
                "queue_pending": [j.item() for j in pending],
            },
        )

    def post_queue(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._json(ex)
            self.engine.edit_queue(
                bool(body.get("clear")), [str(d) for d in body.get("delete", [])]
            )
            ex.send_empty(200)

        self._guard(ex, run)

    def get_prompt(self, ex: Exchange) -> None:
        ex.send_json(200, {"exec_info": {"queue_remaining": self.engine.remaining()}})

    def post_prompt(self, ex: Exchange) -> None:
        try:
            body = json.loads(ex.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._guard(ex, lambda: self._json(ex))  # a body that is not JSON: 500
            return
        if not isinstance(body, dict) or "prompt" not in body:
            details = "No prompt provided"
            ex.send_json(400, error_body("no_prompt", details, details, {}))
            return
        prompt = body["prompt"]
        if not isinstance(prompt, dict):  # validate_prompt fails on it: an uncaught error
            ex.send_text(500, "500 Internal Server Error\n\nServer got itself in trouble")
            return
        try:
            validate(prompt)
        except PromptError as exc:
            ex.send_json(400, exc.body)
            return
        plan = parse_prompt(self.engine.catalog, prompt)
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        for secret in ("auth_token_comfy_org", "api_key_comfy_org"):
            extra.pop(secret, None)
        fields: dict[str, Any] = {
            "prompt_id": str(body.get("prompt_id") or self.engine.new_prompt_id()),
            "prompt": prompt,
            "extra_data": extra,
            "outputs": plan.outputs,
            "plan": plan,
        }
        if isinstance(body.get("number"), int | float):
            fields["number"] = float(body["number"])
        job = self.engine.submit(fields, front=bool(body.get("front")))
        ex.send_json(200, {"prompt_id": job.prompt_id, "number": job.number, "node_errors": {}})

    def post_interrupt(self, ex: Exchange) -> None:
        body = self._json(ex, optional=True)
        prompt_id = body.get("prompt_id")
        self.engine.interrupt(str(prompt_id) if prompt_id else None)
        ex.send_empty(200)

    def post_free(self, ex: Exchange) -> None:
        def run() -> None:
            self.engine.set_flags(self._json(ex))
            ex.send_empty(200)

        self._guard(ex, run)

    def get_history(self, ex: Exchange) -> None:
        history = list(self.engine.history().items())
        max_items = int(ex.query["max_items"]) if "max_items" in ex.query else None
        offset = int(ex.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(history) - max_items
        offset = max(0, offset)
        end = offset + max_items if max_items is not None else None
        ex.send_json(200, dict(history[offset:end]))

    def get_history_item(self, ex: Exchange) -> None:
        prompt_id = ex.path.rsplit("/", 1)[-1]
        ex.send_json(200, self.engine.history(prompt_id))

    def post_history(self, ex: Exchange) -> None:
        def run() -> None:
            body = self._json(ex)
            self.engine.edit_history(
                bool(body.get("clear")), [str(d) for d in body.get("delete", [])]
            )
            ex.send_empty(200)

        self._guard(ex, run)

    # ------------------------------------------------------------------ /sim

    def sim_stats(self, ex: Exchange) -> None:
        data = self.engine.stats_json()
        data["time_scale"] = self.config.time_scale
        data["pinned"] = self.config.pinned
        data["highvram"] = self.config.highvram
        data["profile"] = self.config.profile
        data["dynamic_vram"] = self.config.dynamic_vram
        data["cpu"] = self.config.cpu
        ex.send_json(200, data)

    def sim_reset(self, ex: Exchange) -> None:
        self.engine.reset_stats()
        ex.send_json(200, {"reset": True})

    def sim_pinned(self, ex: Exchange) -> None:
        if ex.method == "POST":
            body = self._json(ex, optional=True)
            self.config.pinned = bool(body.get("pinned", True))
        ex.send_json(200, {"pinned": self.config.pinned})

    def sim_gpu(self, ex: Exchange) -> None:
        ex.send_json(200, self.gpu.snapshot().to_json())


# Sent to every socket when the prompt had no client_id; the other events are then not sent.
_BROADCAST_UNADDRESSED = frozenset(
    {"executing", "executed", "progress", "progress_state", "execution_interrupted"}
)


class _Socket:
    """One /ws connection: messages are queued by any thread and written by the
    connection's own thread, which also reads the client's frames."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.outbox: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)

    def send(self, event: str, data: dict[str, Any]) -> None:
        message = json.dumps({"type": event, "data": data}).encode()
        with contextlib.suppress(queue.Full):  # a client that reads nothing loses events
            self.outbox.put_nowait(frame(TEXT, message))

    def serve(self, rfile: Any, wfile: Any, conn: socket.socket) -> None:
        while True:
            try:
                while True:
                    out = self.outbox.get_nowait()
                    if out is None:
                        wfile.write(frame(CLOSE, struct.pack("!H", 1001)))
                        wfile.flush()
                        return
                    wfile.write(out)
                    wfile.flush()
            except queue.Empty:
                pass
            except OSError:
                return
            readable, _, _ = select.select([conn], [], [], 0.02)
            if not readable:
                continue
            try:
                got = read_frame(rfile)
            except ProtocolViolation as exc:
                with contextlib.suppress(OSError):
                    wfile.write(frame(CLOSE, struct.pack("!H", exc.code)))
                    wfile.flush()
                return
            except OSError:
                return
            if got is None:
                return
            opcode, payload = got
            try:
                if opcode == CLOSE:
                    wfile.write(frame(CLOSE, payload[:2]))
                    wfile.flush()
                    return
                if opcode == PING:
                    wfile.write(frame(PONG, payload))
                    wfile.flush()
                elif opcode == TEXT:
                    self._on_text(payload)
            except OSError:
                return

    def _on_text(self, payload: bytes) -> None:
        """A first `feature_flags` message gets the server's flags back (api-facts 2.5)."""
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags":
            self.send("feature_flags", {"supports_preview_metadata": True})


def _not_found(ex: Exchange) -> None:
    ex.send(404, b"", "application/octet-stream")


def _method_not_allowed(ex: Exchange, allowed: str) -> None:
    ex.send(405, b"405: Method Not Allowed", "text/plain; charset=utf-8", {"Allow": allowed})
