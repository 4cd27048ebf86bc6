"""The soak: many simulated hours of a busy host with faults, against the real supervisor.

    .venv/bin/python -m tests.soak --hours 24        # about 30 min of wall time

See docs/soak.md. One `run_soak()` call: a `SoakHost` (fake Ollama and ComfyUI behind fault
proxies, a file-backed GPU read through the fake NVML library), the real supervisor process
(`python -m supervisor run` with the gate, through tests/soak/supervisor_main.py), the
benchmark's mixed workload at `rate` times its rate (chats through the gate, image jobs to
ComfyUI), and the seeded faults of faults.py. A sampler records the supervisor's RSS,
threads and open descriptors, its health, the fake Ollama's counters and what /api/ps shows.
`evaluate()` turns all that into the figures and the targets (report.py writes them out).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from supervisor.clients._http import shared_tls
from tests.bench.supervisor_proc import ROOT, Supervisor, free_port, scaled_settings
from tests.bench.workload import (
    CHAT_MEAN_GAP_S,
    GPU_TOTAL_GIB,
    IMAGE_MEAN_GAP_S,
    ChatEvent,
    ImageEvent,
    catalog,
    image_prompt,
    make_workload,
)
from tests.soak.faults import Fault, Injector, make_faults
from tests.soak.host import SoakHost
from tests.soak.proxy import CHAT_HEADER, UPSTREAM_HEADER

SAFETY_CAP_PER_MIN = 6  # daemon.MAX_ACTIONS_PER_SERVICE_PER_MIN, per simulated minute
CLIENT_TIMEOUT_S = 120.0  # real seconds; far above any hold the gate may make
GRACE_REAL_S = 2.0  # after an Ollama fault ends, before the upstream counts as up again
SPILL_LIMIT_S = 1800.0  # simulated: a spill that outlives two heal cooldowns never converged
RSS_GROWTH_LIMIT = 5 * 1024 * 1024
CHECKPOINTS = (("start", 0.1), ("middle", 0.5))  # and "end", after the drain
# Chats held at once through the gate before the schedule starts (see `warm_up_backlog`).
WARM_UP_CHATS = 400


@dataclass
class Chat:
    start: float  # monotonic
    end: float
    status: int  # 0: no answer (lost)
    # ok / bad-answer / 5xx / 4xx / lost (no answer, and not for want of Ollama's) /
    # waited-for-ollama (no answer in CLIENT_TIMEOUT_S: Ollama had it and had not begun
    # its answer, e.g. queued behind another model's requests at CPU speed)
    outcome: str
    detail: str = ""
    from_upstream: bool = False  # the answer came from Ollama (or its fault), not the gate


@dataclass
class Sample:
    t: float  # monotonic
    sim_s: float
    rss: int
    threads: int
    fds: int
    healthy: bool
    loads: int
    loads_full: int
    spilled: list[str]
    chats_ok: int
    chats_failed: int
    fd_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class SoakRun:
    hours: float
    time_scale: float
    rate: float
    seed: int
    fault_gap_s: float
    started: float = 0.0
    ended: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    chats: list[Chat] = field(default_factory=list)
    images_sent: int = 0
    images_refused: int = 0
    # When each image job was handed to ComfyUI (monotonic): it goes straight to ComfyUI,
    # not through a gate, so a load it races is no free the supervisor could have sent.
    image_times: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    supervisor_exits: list[tuple[float, int]] = field(default_factory=list)
    log: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    mutations: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    comfy_stats: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    checkpoints: list[tuple[str, Sample, int]] = field(
        default_factory=list
    )  # name, figures, in flight
    paused_s: float = 0.0  # real seconds the schedule stood still for checkpoints
    # The Docker-backed form (tests/soak/docker_soak.py): the sims run in labelled
    # containers on a real engine and the supervisor discovers them.
    docker: bool = False
    model_names: dict[str, str] = field(default_factory=dict)  # workload model -> served
    kinds: dict[str, str] = field(default_factory=dict)  # the fault kinds of this form
    unlabelled_actions: list[str] = field(default_factory=list)  # what reached them
    unlabelled_requests: int = 0  # requests (of anyone) that reached them by their old URL
    docker_events: int = 0  # events the engine emitted during the bursts
    # Why the daemon restarts were left out ("" when they ran, or in the fixed-URL form).
    daemon_restart_note: str = ""
    notes: list[str] = field(default_factory=list)  # what the report should mention
    # Every Ollama load's placement with who held the GPU then (host.Placement; the
    # fixed-URL form, where the fakes run in this process).
    placements: list[Any] = field(default_factory=list)
    debug: bool = False  # the supervisor logs at DEBUG (VRAM_DEBUG=true)

    def sim(self, t: float) -> float:
        """A monotonic time as simulated seconds of the schedule since the start."""
        return (t - self.started - self.paused_s) / self.time_scale


# --------------------------------------------------------------------------- supervisor


def supervisor_settings(time_scale: float) -> dict[str, str]:
    settings = scaled_settings(time_scale)
    # Verification polls every 0.25 s (a real-time constant): give it a few looks.
    settings["VRAM_VERIFY_TIMEOUT"] = f"{max(0.5, float(settings['VRAM_VERIFY_TIMEOUT'])):g}"
    return settings


def start_supervisor(
    host: Any, run: SoakRun, clock_file: Path, docker_host: str | None = None
) -> Supervisor:
    """With `docker_host`, it discovers the services on that engine (no fixed URLs)."""
    http_port, gate_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.pop("DOCKER_CONTEXT", None)
    if docker_host is None:
        env.update(VRAM_OLLAMA_URL=host.ollama_url, VRAM_COMFYUI_URL=host.comfyui_url)
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST=docker_host or "unix:///nonexistent/vram-supervisor-soak.sock",
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(http_port),
        VRAM_LOG_FORMAT="json",
        VRAM_GATE_PORT=str(gate_port),
        VRAM_GATE_HOST="127.0.0.1",
        SOAK_TIME_SCALE=f"{run.time_scale:g}",
        SOAK_CLOCK_FILE=str(clock_file),
        **({"VRAM_DEBUG": "true"} if run.debug else {}),
        **run.settings,
        **host.nvml_env(),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.soak.supervisor_main"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sup = Supervisor(proc, http_port, gate_port)
    sup.lines = run.log  # one log across restarts, should there be any
    threading.Thread(target=sup._follow, daemon=True, name="supervisor-log").start()
    try:
        sup.wait_ready(60)
    except BaseException:
        sup.stop()
        raise
    return sup


_TCP_STATES = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listen"}


def _tcp_sockets(pid: int) -> dict[str, tuple[str, int, int]]:
    """socket inode -> (state, local port, remote port), from the process's /proc/net/tcp."""
    out: dict[str, tuple[str, int, int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9:
                state = _TCP_STATES.get(f[3], f[3])
                out[f[9]] = (
                    state,
                    int(f[1].rsplit(":", 1)[1], 16),
                    int(f[2].rsplit(":", 1)[1], 16),
                )
    return out


def _unix_rows() -> list[list[str]]:
    """`ss -xan` rows split in fields ([] without ss): Netid State Recv-Q Send-Q Local-path
    Local-inode Peer-path Peer-inode."""
    try:
        out = subprocess.run(
            ["ss", "-xan"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f for f in (row.split() for row in out.splitlines()[1:]) if len(f) >= 8]


def _unix_peers(rows: list[list[str]]) -> dict[str, str]:
    """Unix socket inode -> the path its peer listens on: a client's end of a connection to
    the Docker socket shows as "to /path/docker.sock" (the server's end of the same
    connection carries the path and the client's inode)."""
    peers: dict[str, str] = {}
    for f in rows:
        if f[1] == "LISTEN":
            continue
        if f[4].startswith("/") and f[7] != "0":
            peers[f[7]] = f[4]
        elif f[1] == "ESTAB" and f[7] == "0":
            # Connected, and the other end is gone (closed, its process dead): a connection
            # its holder has not closed yet (e.g. to an engine that stopped).
            peers.setdefault(f[5], "")
    return peers


# Unix socket inode -> (the socket path it was connected to, when it was last seen
# connected: time.monotonic()), of the connections to such a path seen while noting
# (`remember_unix_peers`: the Docker form notes the Docker socket's at every sample and
# every 50 ms while the engine stops). Once the server has closed its end, ss no longer
# tells where a connection led, and this does: a pooled connection whose engine
# restarted, or closed it after 300 s idle, which its pool drops when it next takes it,
# is told from a descriptor never seen connected there ("unix, peer closed").
_UNIX_PATHS_SEEN: dict[str, tuple[str, float]] = {}


def remember_unix_peers(path: str) -> None:
    """Note the connections to the unix socket `path` now."""
    now = time.monotonic()
    _UNIX_PATHS_SEEN.update(
        {k: (v, now) for k, v in _unix_peers(_unix_rows()).items() if v == path}
    )


def _proc_net_inodes(pid: int, table: str, column: int) -> dict[str, list[str]]:
    """inode -> its row's fields, of /proc/<pid>/net/<table> (the process's namespace)."""
    try:
        rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {f[column]: f for f in (row.split() for row in rows) if len(f) > column}


_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has


def _socket_family(pid: int, fd: str, inode: str) -> str:
    """The family of a socket that is in no table (a TCP socket never connected, or whose
    connect failed, is in none), through a copy of the descriptor (pidfd_getfd, Linux >=
    5.6; the supervisor is our child); "" when that is not allowed here.

    The copy is closed at once, whatever it is: the process may have closed that number
    since it was listed and opened something else under it, such as the simulated GPU's
    state file while its fake NVML holds a shared flock on it. A copy kept open would keep
    that lock (it belongs to the open file, which the copy shares) and stall every writer
    of the file. One of another inode names nothing."""
    import ctypes
    import socket
    import stat

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return ""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
    except (OSError, ValueError):
        return ""
    finally:
        os.close(pidfd)
    if copy < 0:
        return ""
    try:
        found = os.fstat(copy)
        if not stat.S_ISSOCK(found.st_mode) or str(found.st_ino) != inode:
            return ""  # the number now names something else
        with socket.socket(fileno=copy) as sock:  # closes the copy
            copy = -1
            family = {socket.AF_INET: "TCP/IP", socket.AF_INET6: "TCP/IPv6"}.get(
                sock.family, str(sock.family)
            )
            kind = "stream" if sock.type == socket.SOCK_STREAM else str(sock.type)
            return f"{family} {kind}"
    except (OSError, ValueError):
        return ""
    finally:
        if copy >= 0:
            os.close(copy)


def fd_kinds(pid: int, ports: dict[int, str] | None = None) -> dict[str, int]:
    """Open descriptors by kind: pipe, anon_inode:[eventpoll], a file's path, a TCP socket
    by state and by which of `ports` (port -> name) it listens on or talks to, a unix
    socket by its peer (the Docker socket, a socketpair within the process, unconnected),
    UDP or netlink; a socket in no table by its family (e.g. a TCP socket whose connect
    failed: such a socket is in no table, and one that stays open is a leak)."""
    kinds: dict[str, int] = {}
    detailed = ports is not None
    tcp = _tcp_sockets(pid) if detailed else {}
    rows = _unix_rows() if detailed else []
    unix = _unix_peers(rows)
    unix_peer = {f[5]: f[7] for f in rows}
    unix_state = {f[5]: f[1] for f in rows}  # ss lists unconnected ones too (UNCONN)
    others = [
        (name, _proc_net_inodes(pid, table, column) if detailed else {})
        for name, table, column in (
            ("UDP", "udp", 9),
            ("UDP", "udp6", 9),
            ("netlink", "netlink", 9),
        )
    ]
    try:
        fds = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
    except OSError:
        return kinds
    own_inodes = {t[8:-1] for t in fds.values() if t.startswith("socket:[")}
    for fd, target in fds.items():
        kind = target.split(":[", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        inode = target[8:-1] if target.startswith("socket:[") else ""
        if not inode or not detailed:
            pass
        elif inode in tcp and ports is not None:
            state, local, remote = tcp[inode]
            if state == "listen":
                kind = f"listening ({ports.get(local, local)})"
            elif local in ports:
                kind = f"from a client of {ports[local]} ({state})"
            else:
                kind = f"to {ports.get(remote, remote)} ({state})"
        elif inode in unix:
            if unix[inode]:
                kind = f"unix socket to {unix[inode]}"
            elif inode in _UNIX_PATHS_SEEN:
                # A pooled connection its server closed (an engine that restarted, or
                # one idle for 300 s, which Docker's engine closes): the pool drops it
                # when it next takes it.
                path, seen = _UNIX_PATHS_SEEN[inode]
                kind = (
                    f"unix socket to {path}, closed by its server (last seen connected "
                    f"{time.monotonic() - seen:.0f} real s before)"
                )
            else:
                kind = "unix, peer closed"
        elif inode in unix_state:
            if unix_peer.get(inode) in own_inodes:
                kind = "unix socketpair (both ends in the process)"
            elif unix_state[inode] == "UNCONN":
                kind = "unix socket, unconnected (e.g. its connect failed)"
            else:
                kind = "unix socket, connected to a peer without a path"
        else:
            found = next((name for name, table in others if inode in table), "")
            if found:
                kind = f"{found} socket"
            else:
                family = _socket_family(pid, fd, inode)
                kind = (
                    f"{family} socket in no table (never connected, or its connect failed)"
                    if family
                    else "socket in no table"
                )
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, threads, open file descriptors) of a process, from /proc."""
    rss = threads = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return 0, 0, 0
    return rss, threads, fds


# --------------------------------------------------------------------------- clients


class Clients:
    """Chat clients through the gate (one thread and one connection each, as independent
    clients), image jobs straight to ComfyUI.

    Not one shared pool: under a backlog of hundreds of chats a pool's own limits and races
    lost chats that never reached the gate, or hung them (a 24-hour Docker-backed run:
    PoolTimeout at its 400 connections, and two chats whose connection the pool closed
    while they waited for their answer, httpcore 1.0.9's encode/httpcore#1110)."""

    def __init__(self, run: SoakRun, host: Any, gate_url: Callable[[], str]) -> None:
        self.run = run
        self.host = host
        self.gate_url = gate_url
        self.lock = threading.Lock()
        self.inflight = 0
        self.ok = 0
        self.failed = 0
        self.images = httpx.Client(timeout=5.0)
        self._ids = itertools.count(1)

    def chat(self, event: ChatEvent) -> None:
        with self.lock:
            self.inflight += 1
        threading.Thread(target=self._chat, args=(event,), daemon=True).start()

    def _chat(self, event: ChatEvent) -> None:
        body = {
            "model": event.model,
            "messages": [{"role": "user", "content": " ".join(["word"] * event.words)}],
            "stream": False,
            "options": {"num_predict": event.num_predict},
        }
        chat_id = str(next(self._ids))  # count's next is atomic
        start = time.monotonic()
        status, outcome, detail, upstream = 0, "lost", "", False
        try:
            with httpx.Client(
                timeout=httpx.Timeout(10.0, read=CLIENT_TIMEOUT_S), verify=shared_tls()
            ) as client:
                r = client.post(
                    f"{self.gate_url()}/api/chat", json=body, headers={CHAT_HEADER: chat_id}
                )
            status = r.status_code
            upstream = UPSTREAM_HEADER in r.headers
            if status == 200:
                try:
                    data = r.json()
                    ok = isinstance(data, dict) and data.get("done") is True
                except ValueError:
                    ok = False
                outcome, detail = ("ok", "") if ok else ("bad-answer", r.text[:120])
            else:
                outcome = "5xx" if status >= 500 else "4xx"
                detail = r.text[:160]
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"[:160]
            stats = self.host.proxy("ollama").stats
            reached = stats.chats_arrived.get(chat_id)
            if (
                isinstance(exc, httpx.ReadTimeout)
                and reached is not None
                and chat_id not in stats.chats_answered
            ):
                # The gate passed it on; Ollama had not begun to answer when the client
                # gave up: Ollama's queue, not a chat the gate lost.
                outcome, upstream = "waited-for-ollama", True
                detail = (
                    f"Ollama got it {reached - start:.1f} s after it was sent and had not "
                    f"begun its answer {time.monotonic() - reached:.0f} s later"
                )
        chat = Chat(start, time.monotonic(), status, outcome, detail, upstream)
        with self.lock:
            self.run.chats.append(chat)
            self.inflight -= 1
            if outcome == "ok":
                self.ok += 1
            else:
                self.failed += 1

    def image(self, event: ImageEvent) -> None:
        url = self.host.direct_url("comfyui")
        ok = False
        if url is not None:
            try:
                ok = self.images.post(
                    f"{url}/prompt", json={"prompt": image_prompt(event)}
                ).is_success
            except httpx.HTTPError:
                ok = False
        self.run.images_sent += 1
        self.run.images_refused += int(not ok)
        if ok:
            self.run.image_times.append(time.monotonic())

    def close(self) -> None:
        self.images.close()


# --------------------------------------------------------------------------- sampler


class Sampler:
    def __init__(self, run: SoakRun, host: Any, clients: Clients, sup: Callable[[], Supervisor]):
        self.run = run
        self.host = host
        self.clients = clients
        self.sup = sup
        self.http = httpx.Client(timeout=2.0)
        self._base = (0, 0)  # counters of Ollama processes that have gone (restarts)
        self._last = (0, 0)

    def sample(self) -> None:
        sup = self.sup()
        rss, threads, fds = proc_figures(sup.pid)
        if socket_path := getattr(self.host, "docker_socket", ""):
            remember_unix_peers(socket_path)
        try:
            healthy = self.http.get(f"http://127.0.0.1:{sup.http_port}/healthz").is_success
        except httpx.HTTPError:
            healthy = False
        loads, full, spilled = self._last[0], self._last[1], []
        url = self.host.direct_url("ollama")
        if url is not None:
            try:
                totals = self.http.get(f"{url}/sim/stats").json()["totals"]
                cur = (int(totals["loads"]), int(totals["loads_full_gpu"]))
                if cur[0] < self._last[0] - self._base[0]:
                    self._base = self._last  # a fresh Ollama counts from 0
                loads, full = self._base[0] + cur[0], self._base[1] + cur[1]
                self._last = (loads, full)
                for m in self.http.get(f"{url}/api/ps").json().get("models", []):
                    if int(m.get("size_vram", 0)) < int(m.get("size", 0)):
                        spilled.append(str(m.get("name")))
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        now = time.monotonic()
        with self.clients.lock:
            ok, failed = self.clients.ok, self.clients.failed
        self.run.samples.append(
            Sample(
                now, self.run.sim(now), rss, threads, fds, healthy, loads, full, spilled, ok, failed
            )
        )

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------- the run


def run_soak(
    *,
    hours: float,
    time_scale: float,
    rate: float,
    seed: int,
    fault_gap_s: float,
    workdir: Path,
    debug: bool = False,
    sample_s: float = 60.0,
    checkpoints: tuple[tuple[str, float], ...] = CHECKPOINTS,
    progress: Callable[[str], None] = print,
) -> SoakRun:
    duration_s = hours * 3600
    run = SoakRun(hours, time_scale, rate, seed, fault_gap_s, debug=debug)
    run.settings = supervisor_settings(time_scale)
    run.faults = make_faults(seed, duration_s, fault_gap_s)
    clock_file = workdir / "clock-offset"
    host = SoakHost(workdir, catalog=catalog(), time_scale=time_scale, gpu_gib=GPU_TOTAL_GIB)
    injector = Injector(host, clock_file)
    return soak_on(
        run,
        host,
        injector,
        lambda: start_supervisor(host, run, clock_file),
        duration_s=duration_s,
        sample_s=sample_s,
        checkpoints=checkpoints,
        progress=progress,
    )


def soak_on(
    run: SoakRun,
    host: Any,
    injector: Any,
    start: Callable[[], Supervisor],
    *,
    duration_s: float,
    sample_s: float,
    checkpoints: tuple[tuple[str, float], ...],
    progress: Callable[[str], None],
) -> SoakRun:
    """The run itself on a host that is up (either form): the supervisor (`start`), the
    workload, the faults (`injector.start/end`), the samples and checkpoints; `host.close()`
    at the end. `host` has `direct_url(service)`, `proxy(service)`, `ollama_proxy`,
    `comfy_proxy` and `close()`, as SoakHost."""
    holder: dict[str, Supervisor] = {}
    try:
        holder["sup"] = start()
    except BaseException:
        host.close()
        raise
    clients = Clients(run, host, lambda: holder["sup"].gate_url)
    sampler = Sampler(run, host, clients, lambda: holder["sup"])
    try:
        warm_up_backlog(run, host, holder["sup"].gate_url, progress)
        run.started = time.monotonic()
        _drive(
            checkpoints,
            run,
            host,
            injector,
            clients,
            sampler,
            holder,
            start,
            duration_s,
            sample_s,
            progress,
        )
        # Drain: the last answers come in (simulated minutes), then the last figures.
        checkpoint(run, clients, sampler, "end", getattr(injector, "settle", None))
        run.ended = time.monotonic()
        sup = holder["sup"]
        try:
            run.metrics = sup.metrics()
        except httpx.HTTPError:
            run.metrics = {}
        url = host.direct_url("comfyui")
        if url is not None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                run.comfy_stats = httpx.get(f"{url}/sim/stats", timeout=5).json()
    finally:
        code = holder["sup"].stop()
        if code not in (0, -15):
            run.supervisor_exits.append((time.monotonic(), code))
        run.mutations = {
            name: [(m.at, m.kind) for m in host.proxy(name).stats.mutations]
            for name in ("ollama", "comfyui")
        }
        run.placements = list(getattr(host, "placements", []))

        # Bounded: with many chats still queued (a host past its capacity), closing the
        # clients' pool and the fakes can take long; the figures are in already.
        def close_all() -> None:
            clients.close()
            sampler.close()
            host.close()

        closer = threading.Thread(
            target=close_all,
            daemon=True,
            name="soak-cleanup",
        )
        closer.start()
        closer.join(30)
    return run


def warm_up_backlog(
    run: SoakRun, host: Any, gate_url: str, progress: Callable[[str], None]
) -> None:
    """Before the schedule: WARM_UP_CHATS chats held at once by a hung Ollama, then all
    answered 502 as the hang ends (not counted among the run's chats).

    The memory a backlog of hundreds of chats takes stays with the process afterwards as
    the allocator's high-water mark, reused by later backlogs rather than grown again
    (300 chats held at once, eight times: 38.7 MiB before, then 42.8, 43.9, 44.8, 45.5 and
    45.5 MiB four more times). A backlog that first came after the start checkpoint would
    count as growth; one before it sets the mark, so the RSS target measures growth over
    time, as the Docker form's first burst fills the SDK's connection pools."""
    proxy = host.ollama_proxy
    answers: list[str] = []
    lock = threading.Lock()
    body = {"model": "llama3.1:8b", "messages": [], "stream": False}

    def chat() -> None:
        try:
            with httpx.Client(timeout=60.0, verify=shared_tls()) as client:
                status = str(client.post(f"{gate_url}/api/chat", json=body).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with lock:
            answers.append(status)

    began = time.monotonic()
    proxy.set("hang")
    threads = [threading.Thread(target=chat, daemon=True) for _ in range(WARM_UP_CHATS)]
    try:
        for t in threads:
            t.start()
        time.sleep(5.0)
    finally:
        proxy.set("pass")  # the proxy closes the held requests: the gate answers them
    for t in threads:
        t.join(90)
    counts = {a: answers.count(a) for a in sorted(set(answers))}
    line = (
        f"warm-up: {WARM_UP_CHATS} chats held at once by a hung Ollama, then answered "
        f"({', '.join(f'{k}: {v}' for k, v in counts.items())}) in "
        f"{time.monotonic() - began:.0f} s"
    )
    run.notes.append(line)
    progress(f"   {line}")


def _drive(
    checkpoint_at: tuple[tuple[str, float], ...],
    run: SoakRun,
    host: Any,
    injector: Any,  # start(fault) / end(fault)
    clients: Clients,
    sampler: Sampler,
    holder: dict[str, Supervisor],
    restart: Callable[[], Supervisor],
    duration_s: float,
    sample_s: float,
    progress: Callable[[str], None],
) -> None:
    scale = run.time_scale
    hour_events: list[ChatEvent | ImageEvent] = []
    next_hour = 0
    pending = list(run.faults)
    active: list[Fault] = []
    next_sample = 0.0
    next_progress = 0.0
    checkpoints = [(name, at * duration_s) for name, at in checkpoint_at]
    sampler.sample()
    while True:
        now_s = run.sim(time.monotonic())
        if now_s >= duration_s:
            break
        if not hour_events and next_hour * 3600 < duration_s and now_s >= next_hour * 3600 - 1:
            chunk = make_workload(
                run.seed * 1000 + next_hour,
                min(3600.0, duration_s - next_hour * 3600),
                chat_gap_s=CHAT_MEAN_GAP_S / run.rate,
                image_gap_s=IMAGE_MEAN_GAP_S / run.rate,
            )
            offset = next_hour * 3600
            # `rate` times the requests and model switches; answers 1/rate as long, or one
            # simulated Ollama could not serve them (2x the benchmark's rate at its own
            # lengths already keeps its decode busy all the time).
            hour_events = [
                ChatEvent(
                    e.at_s + offset,
                    run.model_names.get(e.model, e.model),
                    max(16, round(e.num_predict / run.rate)),
                    e.words,
                )
                if isinstance(e, ChatEvent)
                else ImageEvent(e.at_s + offset, e.checkpoint, e.steps)
                for e in chunk
            ]
            next_hour += 1
        while hour_events and hour_events[0].at_s <= now_s:
            event = hour_events.pop(0)
            if isinstance(event, ChatEvent):
                clients.chat(event)
            else:
                clients.image(event)
        for fault in list(active):
            if now_s >= fault.end_s:
                injector.end(fault)
                active.remove(fault)
                fault.real_end = time.monotonic()
        # A due checkpoint comes after the faults that end and before any fault that starts
        # in the same step (the loop may have stood a while: a fault's start or end, or an
        # image job, that took long), so its figures are from before that fault.
        if checkpoints and now_s >= checkpoints[0][1]:
            settle = getattr(injector, "settle", None)
            checkpoint(run, clients, sampler, checkpoints.pop(0)[0], settle)
            progress(f"   {_hms(now_s)} checkpoint: {_describe(run.checkpoints[-1])}")
        while pending and pending[0].at_s <= now_s:
            fault = pending.pop(0)
            fault.real_start = fault.real_end = time.monotonic()
            injector.start(fault)
            if fault.duration_s > 0:
                active.append(fault)
            progress(f"   {_hms(fault.at_s)} fault: {fault.describe()}, {fault.duration_s:.0f} s")
        if now_s >= next_sample:
            sampler.sample()
            next_sample = now_s + sample_s
            sup = holder["sup"]
            code = sup.proc.poll()
            if code is not None:  # target 0; counted, then started again to go on
                run.supervisor_exits.append((time.monotonic(), code))
                progress(f"   {_hms(now_s)} THE SUPERVISOR EXITED with {code}; starting it again")
                holder["sup"] = restart()
        if now_s >= next_progress:
            s = run.samples[-1]
            progress(
                f"   {_hms(now_s)} chats ok {s.chats_ok}, failed {s.chats_failed}, in flight "
                f"{clients.inflight}; RSS {s.rss / 2**20:.1f} MiB, {s.threads} threads, "
                f"{s.fds} fds"
            )
            next_progress = now_s + 3600
        waits = [duration_s]
        if hour_events:
            waits.append(hour_events[0].at_s)
        if pending:
            waits.append(pending[0].at_s)
        waits += [f.end_s for f in active] + [next_sample]
        time.sleep(max(0.0, min(0.05, (min(waits) - now_s) * scale)))
    for fault in active:
        injector.end(fault)
        fault.real_end = time.monotonic()


def checkpoint(
    run: SoakRun,
    clients: Clients,
    sampler: Sampler,
    name: str,
    settle: Callable[[], None] | None = None,
) -> None:
    """The supervisor's RSS, threads and descriptors at a quiet moment: the schedule stands
    still until no chat is in flight (the queue drains, as no new chat comes; each chat
    ends within its client's timeout, answered or not; a chat's connection closes with it,
    so no client holds a socket open then); then the least of five readings (a pass's read
    threads come and go)."""
    paused = time.monotonic()
    if settle is not None:  # a fault still under way in the background ends first
        settle()
    deadline = time.monotonic() + CLIENT_TIMEOUT_S + 10.0
    while clients.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    sup = sampler.sup()
    ports = {
        sup.http_port: "http",
        sup.gate_port or 0: "gate",
        sampler.host.ollama_proxy.port: "Ollama",
        sampler.host.comfy_proxy.port: "ComfyUI",
    }
    readings = []
    for _ in range(5):
        sampler.sample()
        reading = run.samples[-1]
        # The descriptors by kind, and their count, from one look (a count taken apart
        # from the kinds could meet another moment's short-lived socket).
        reading.fd_kinds = fd_kinds(sup.pid, ports)
        reading.fds = sum(reading.fd_kinds.values()) or reading.fds
        readings.append(reading)
        time.sleep(0.2)
    best = min(readings, key=lambda s: (s.fds - docker_socket_fds(s), s.fds, s.threads, s.rss))
    # Each figure at its least: a pass's read threads and a verification's sockets come
    # and go within a second; a leak shows in every reading.
    best.rss = min(s.rss for s in readings)
    best.threads = min(s.threads for s in readings)
    run.checkpoints.append((name, best, clients.inflight))
    if name != "end":
        run.paused_s += time.monotonic() - paused


def docker_socket_fds(s: Sample) -> int:
    """The supervisor's connections to a Docker socket (the SDK's pools), of `s.fd_kinds`:
    those to an engine that restarted too (judged with them against the pools' bound)."""
    return sum(
        n
        for k, n in s.fd_kinds.items()
        if k.startswith("unix socket to") and k.split(",")[0].endswith("docker.sock")
    )


def _describe(cp: tuple[str, Sample, int]) -> str:
    name, s, inflight = cp
    return (
        f"{name}: RSS {s.rss / 2**20:.1f} MiB, {s.threads} threads, {s.fds} fds "
        f"({inflight} chats still in flight)"
    )


def _hms(sim_s: float) -> str:
    s = int(sim_s)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def save_raw(run: SoakRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "hours": run.hours,
        "time_scale": run.time_scale,
        "rate": run.rate,
        "seed": run.seed,
        "faults": [f.to_json() for f in run.faults],
        "samples": [s.__dict__ | {"t": run.sim(s.t)} for s in run.samples],
        "chats_failed": [
            c.__dict__ | {"start": run.sim(c.start), "end": run.sim(c.end)}
            for c in run.chats
            if c.outcome != "ok"
        ],
        "metrics": run.metrics,
        "supervisor_exits": run.supervisor_exits,
        "spilled_loads": [p.to_json(run.sim) for p in run.placements if p.spilled],
        "image_jobs": [round(run.sim(t), 1) for t in run.image_times],
    }
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
