"""The soak's Docker-backed form: the real supervisor discovers labelled sim containers on a
real Docker engine, while Docker breaks as well as the services, NVML and the clock.

    .venv/bin/python -m tests.soak --docker --hours 2     # see docs/soak.md

The host: the simulator's Ollama and ComfyUI, each in a host-network container of the
offline base image with this checkout mounted (tests/integration/harness.py's `Sims`), on
one file-backed 24 GiB GPU that the supervisor reads through the fake NVML library. Each
carries `vram-supervisor.role` and a `vram-supervisor.url` that points at a fault proxy
(tests/soak/proxy.py) in front of the container's fixed port: every action that reaches the
service is counted with its time, as in the fixed-URL form. The supervisor (`python -m
supervisor run` with the gate) is given DOCKER_HOST and no URL.

The faults (one at a time, in seeded rounds, as faults.py's): a container recreated (same
name, new id), renamed (and renamed back), stopped by the user (started again later),
recreated without its role label (and later with it), a burst of short-lived containers,
labelled and not, that makes hundreds of Docker events, and the Docker daemon restarting;
and (unless `service_faults=False`) every kind of the fixed-URL form, done by faults.py's
`Injector` on this host: a crash kills the simulator's process, and the container's restart
policy brings it back; hang, garbage, 500s and slow answers are the proxy's; NVML faults
go through the fake library's fault file; the outside process allocates on the GPU file.
The run, the figures and the targets are the fixed-URL form's (run.py's `soak_on`,
report.py's `evaluate`), plus "actions on unlabelled containers" and the daemon restarts.

The daemon restart (tests/lib/dockerd.sh stop, then start) is done only on the private
engine of tests/lib/dockerd.sh (namespaced_engine.py's `engine_is_ours`), which tests/run
and CI use; on any other engine (a developer's Docker) it is left out and the report says
so. The sims carry the restart policy `unless-stopped`, so the engine brings them back, as
a user's services would. Each restart waits until the supervisor's /status shows Docker
reachable again (its events stream reconnected) and both services running and reachable
with their container ids; the seconds that took are in the fault's entry of the report.
At the end the engine is up again, even on failure, and the containers of others that it
stopped run again (namespaced_engine.py's `restored_engine`).

Other supervisors and labelled services on the engine (not this soak's) are paused for the
run, as the integration harness's `isolated_engine` does, and unpaused after it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import requests
from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container

from tests.bench.supervisor_proc import Supervisor
from tests.integration.harness import (
    HARNESS_LABEL,
    ROLE_LABEL,
    RUN_ID,
    URL_LABEL,
    Sim,
    Sims,
    _is_foreign_actor,
)
from tests.integration.namespaced_engine import (
    dockerd,
    engine_answers,
    engine_is_ours,
    restored_engine,
)
from tests.soak.faults import (
    DAEMON_RESTART_NOT_RUN,
    DOCKER_KINDS,
    FOUND_LIMIT_S,
    KINDS,
    Fault,
    Injector,
    draw_fault,
)
from tests.soak.host import GpuFaults
from tests.soak.proxy import FaultProxy, ProxyLoop
from tests.soak.run import (
    CHECKPOINTS,
    SoakRun,
    remember_unix_peers,
    soak_on,
    start_supervisor,
    supervisor_settings,
)

BASE_IMAGE = "vram-supervisor-base:bookworm"
SOAK_LABEL = "vram-supervisor-tests.soak"
# Fixed ports of this form on 127.0.0.1 (see tests/integration/conftest.py's table).
OLLAMA_PORT, COMFYUI_PORT, NOBODY_PORT = 19601, 19602, 19699
# The simulator's catalog has no gemma2:27b; its biggest model plays the big one.
MODEL_NAMES = {"gemma2:27b": "qwen2.5:32b"}
ROLES = ("ollama", "comfyui")
RESTART_POLICY = {"Name": "unless-stopped"}
# A daemon restart: its length in the schedule (simulated s; the schedule stands still for
# whatever it takes beyond), how long the supervisor may take to show Docker unreachable,
# and to find both services again once the engine answers (real s; the target).
RESTART_DURATION_S = 600.0
NOTICE_LIMIT_S = 15.0


def make_docker_faults(
    seed: int,
    duration_s: float,
    mean_gap_s: float,
    burst: int,
    *,
    restarts: bool = True,
    first_restart_s: float = 0.0,
    service_faults: bool = True,
) -> list[Fault]:
    """As faults.make_faults: rounds of every kind once, in a seeded order. Without
    `restarts` no daemon restart; none starts before `first_restart_s` (simulated), so the
    start checkpoint's figures come before every restart. With `service_faults` the
    fixed-URL form's kinds (faults.KINDS) are in every round too; a crash there is
    momentary (its restart policy brings the container back at once)."""
    rng = random.Random(f"docker-faults-{seed}")
    kinds = [k for k in DOCKER_KINDS if restarts or k != "daemon_restart"]
    if service_faults:
        kinds += list(KINDS)
    # First a burst: it fills the Docker SDK's connection pools (one per API path, up to
    # 25) before the start checkpoint, as the fixed-URL form lets its thread pools fill.
    faults: list[Fault] = [Fault(60.0, "event_burst", duration_s=120.0)]
    faults[0].params["containers"] = burst
    t = faults[0].end_s + rng.expovariate(1 / mean_gap_s) + 30.0
    order: list[str] = []
    targets = ("ollama", "comfyui")
    first = {kind: rng.randrange(2) for kind in DOCKER_KINDS}
    first_crash = rng.randrange(2) if service_faults else 0
    while True:
        if not order:
            order = list(kinds)
            rng.shuffle(order)
        kind = order.pop()
        if kind == "daemon_restart" and t < first_restart_s:
            if not order:
                continue  # this round goes without one
            order.insert(0, kind)  # later in this round
            kind = order.pop()
        fault = Fault(round(t, 1), kind)
        if kind in KINDS:
            fault = draw_fault(rng, t, kind)
            if kind == "crash":
                fault.duration_s = 0.0  # the restart policy: back as soon as it is up
                done = sum(1 for f in faults if f.kind == kind)  # each target in turn
                fault.target = targets[(done + first_crash) % 2]
        elif kind == "daemon_restart":
            fault.duration_s = RESTART_DURATION_S
        elif kind != "event_burst":  # each target in turn, the first drawn
            done = sum(1 for f in faults if f.kind == kind)
            fault.target = targets[(done + first[kind]) % 2]
        else:
            fault.params["containers"] = burst
        if kind in ("rename", "user_stop", "unlabel"):
            fault.duration_s = round(rng.uniform(60, 300), 1)
        elif kind == "event_burst":
            fault.duration_s = 120.0  # the burst runs in the background meanwhile
        if fault.end_s > duration_s - 120:
            break
        faults.append(fault)
        t = fault.end_s + rng.expovariate(1 / mean_gap_s) + 30.0
    return faults


class DockerSoakHost:
    """The two sim containers, their counting proxies, the GPU state, the burst."""

    def __init__(
        self, client: docker.DockerClient, workdir: Path, time_scale: float, docker_socket: str
    ):
        self.client = client
        self.docker_socket = docker_socket  # its path, whose connections the soak notes
        self.state_dir = workdir / "gpu-state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.gpu_faults = GpuFaults(workdir, self.state_dir / "gpu.json")
        self.session = uuid.uuid4().hex[:8]
        self.created: list[Container] = []
        self._lock = threading.Lock()
        self.sims = Sims(self._run, BASE_IMAGE, self.state_dir, time_scale=time_scale)
        self._loop = ProxyLoop()
        self._closed = False
        self.ollama_proxy: FaultProxy = self._loop.proxy("ollama", ("127.0.0.1", OLLAMA_PORT))
        self.comfy_proxy: FaultProxy = self._loop.proxy("comfyui", ("127.0.0.1", COMFYUI_PORT))
        self.names = {r: f"vs-soak-{self.session}-{r}" for r in ("ollama", "comfyui")}
        self.current: dict[str, Sim] = {}
        self.down: set[str] = set()
        self.paused: list[Container] = []
        try:
            self.pause_others()
            for role in ("ollama", "comfyui"):
                self.current[role] = self._start(role, labelled=True)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ containers

    def _run(self, image: str, command: list[str] | None = None, **kwargs: Any) -> Container:
        kwargs["detach"] = True
        labels = {**(kwargs.get("labels") or {}), SOAK_LABEL: self.session}
        if ROLE_LABEL in labels:  # the URL label points at the proxy, not at the port
            labels[URL_LABEL] = self.proxy(labels[ROLE_LABEL]).url
        kwargs["labels"] = labels
        container: Container = self.client.containers.run(image, command, **kwargs)
        with self._lock:
            self.created.append(container)
        return container

    def _start(self, role: str, *, labelled: bool) -> Sim:
        port = OLLAMA_PORT if role == "ollama" else COMFYUI_PORT
        return self.sims.start(
            role,
            name=self.names[role],
            port=port,
            labelled=labelled,
            restart_policy=RESTART_POLICY,  # a daemon restart brings it back
        )

    def _remove(self, role: str) -> None:
        with contextlib.suppress(NotFound):
            self.current[role].container.remove(force=True)

    def pause_others(self) -> None:
        """Pause other supervisors and labelled services (again after a daemon restart:
        one with a restart policy comes back running)."""
        for container in self.client.containers.list():
            if (container.labels or {}).get(SOAK_LABEL):
                continue
            if _is_foreign_actor(container):
                with contextlib.suppress(APIError, NotFound):
                    container.pause()
                    if all(c.id != container.id for c in self.paused):
                        self.paused.append(container)

    # ------------------------------------------------------------------ faults

    def recreate(self, role: str, *, labelled: bool = True) -> None:
        self.down.add(role)
        self._remove(role)
        self.current[role] = self._start(role, labelled=labelled)
        self.down.discard(role)

    def rename(self, role: str, suffix: str) -> str:
        """Rename the container to its name + `suffix`; returns the name it has now."""
        container = self.current[role].container
        wanted = self.names[role] + suffix
        container.reload()
        if container.name != wanted:
            container.rename(wanted)
            container.reload()
        return str(container.name)

    def user_stop(self, role: str) -> None:
        self.down.add(role)
        self.current[role].container.stop(timeout=5)

    def user_start(self, role: str) -> None:
        self.current[role].container.start()
        self.current[role].wait_ready(30)
        self.down.discard(role)

    def crash(self, role: str) -> None:
        """The service's process dies (SIGKILL, from inside its container: every process
        there but its init; the fake GPU gives the VRAM back, as a real one does for a dead
        process); the container exits and its restart policy starts it again, as Docker
        does for a crashed service. Returns once it answers again (a new process, nothing
        loaded)."""
        sim = self.current[role]
        restarts = int(sim.reload().attrs.get("RestartCount") or 0)
        self.down.add(role)
        # The exec dies with the container: its end, however it is reported, is no failure.
        with contextlib.suppress(APIError, requests.exceptions.ConnectionError):
            sim.container.exec_run(["sh", "-c", "kill -KILL -1"])
        deadline = time.monotonic() + 60
        while True:
            state = sim.reload().attrs
            if int(state.get("RestartCount") or 0) > restarts and state["State"]["Running"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {role} container was not restarted within 60 s of its crash: "
                    f"{state['State']}"
                )
            time.sleep(0.1)
        sim.wait_ready(30)
        self.down.discard(role)

    def come_back(self, role: str) -> None:
        """Nothing to do: the restart policy brought the crashed service back (`crash`)."""

    def frees_requested(self, role: str) -> int:
        """The frees the fake ComfyUI itself counts (0 for an Ollama: its own counter of
        unloads counts its model switches too, so the proxy's count of unload requests is
        the one that tells)."""
        if role == "ollama":
            return 0
        return int(self.current[role].get("/sim/stats")["frees_requested"])

    def burst(self, count: int) -> None:
        """`count` short-lived containers, every other one labelled as a ComfyUI at a port
        where nothing answers: each is created, started, dies and is removed."""
        per_thread = [list(range(i, count, 3)) for i in range(3)]

        def work(indexes: list[int]) -> None:
            for i in indexes:
                labels = {
                    HARNESS_LABEL: RUN_ID,
                    SOAK_LABEL: self.session,
                    f"{SOAK_LABEL}-burst": self.session,
                }
                if i % 2 == 0:
                    labels[ROLE_LABEL] = "comfyui"
                    labels["vram-supervisor.url"] = f"http://127.0.0.1:{NOBODY_PORT}"
                try:
                    c = self.client.containers.run(
                        BASE_IMAGE,
                        ["true"],
                        name=f"vs-soak-{self.session}-burst-{i}",
                        labels=labels,
                        network_mode="host",
                        detach=True,
                    )
                    c.wait(timeout=30)
                    c.remove(force=True)
                except (DockerException, httpx.HTTPError, OSError) as exc:
                    print(f"burst container {i}: {exc}")

        threads = [threading.Thread(target=work, args=(ix,), daemon=True) for ix in per_thread]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    def counted_burst(self, count: int) -> int:
        """`burst(count)`, counting the events the engine streams for its containers
        meanwhile (a `since` query would see only the engine's last 256 events)."""
        seen = [0]
        stream = self.client.events(
            decode=True, filters={"label": f"{SOAK_LABEL}-burst={self.session}"}
        )

        def count_them() -> None:
            with contextlib.suppress(DockerException, httpx.HTTPError, OSError, ValueError):
                for _ in stream:
                    seen[0] += 1

        counter = threading.Thread(target=count_them, daemon=True)
        counter.start()
        try:
            self.burst(count)
            time.sleep(1.0)  # the last events arrive
        finally:
            with contextlib.suppress(Exception):  # closing a stream may raise anything
                stream.close()
            counter.join(5)
        return seen[0]

    # ------------------------------------------------------------------ SoakHost's face

    def proxy(self, service: str) -> FaultProxy:
        return self.ollama_proxy if service == "ollama" else self.comfy_proxy

    def direct_url(self, service: str) -> str | None:
        if service in self.down:
            return None
        return f"http://127.0.0.1:{OLLAMA_PORT if service == 'ollama' else COMFYUI_PORT}"

    def nvml_env(self) -> dict[str, str]:
        return self.gpu_faults.nvml_env()

    def close(self) -> None:
        """Removes every container of this run, unpauses the others (may run twice)."""
        with self._lock:
            created = list(self.created)
        # DockerException: the engine may be down (a daemon restart under way); the run's
        # last close, after the restart, removes what is left.
        gone = (DockerException, requests.exceptions.ConnectionError)
        for container in created:
            with contextlib.suppress(*gone):
                container.remove(force=True)
        with contextlib.suppress(*gone):
            for container in self.client.containers.list(
                all=True, filters={"label": f"{SOAK_LABEL}={self.session}"}
            ):
                with contextlib.suppress(*gone):
                    container.remove(force=True)
        for container in self.paused:
            with contextlib.suppress(*gone):
                container.unpause()
        self.paused = []
        self.gpu_faults.close()
        if not self._closed:
            self._closed = True
            self._loop.close()


class DockerInjector:
    """Starts and ends the Docker faults; records what reached an unlabelled container, and
    how the supervisor came through each daemon restart."""

    def __init__(
        self,
        host: DockerSoakHost,
        run: SoakRun,
        overlap: bool = True,
        *,
        docker_host: str = "",
        supervisor: Callable[[], Supervisor] | None = None,
        clock_file: Path | None = None,
    ):
        self.host = host
        self.run = run
        # The fixed-URL form's kinds (services, NVML, an outside process, the clock).
        self.service = Injector(host, clock_file) if clock_file is not None else None
        self.overlap = overlap  # False: every fault waits for a running burst to end
        self.docker_host = docker_host
        self.supervisor = supervisor
        self._burst: threading.Thread | None = None
        self._restart: threading.Thread | None = None

    def start(self, fault: Fault) -> None:
        self.wait_restart()  # nothing else happens to an engine that is down
        if not self.overlap:
            self.wait_burst()
        h, role = self.host, fault.target
        if fault.kind in KINDS:
            assert self.service is not None, "service faults need the clock file"
            self.service.start(fault)
        elif fault.kind == "recreate":
            old = h.current[role].container.id
            h.recreate(role)
            fault.params["new_id"] = (h.current[role].container.id or "")[:12]
            assert old != h.current[role].container.id
        elif fault.kind == "rename":
            if not h.rename(role, "-renamed").endswith("-renamed"):
                raise RuntimeError(f"docker rename of the {role} container did not take")
        elif fault.kind == "user_stop":
            h.user_stop(role)
        elif fault.kind == "unlabel":
            h.recreate(role, labelled=False)
            fault.params["unlabelled_at"] = time.monotonic()
            fault.params["requests_before"] = h.proxy(role).stats.requests
        elif fault.kind == "event_burst":
            self.wait_burst()  # one burst at a time (other faults may meet a long one)
            self._burst = threading.Thread(target=self._run_burst, args=(fault,), daemon=True)
            self._burst.start()
        elif fault.kind == "daemon_restart":
            # In the background: the schedule goes on (chats meet the engine down) until
            # the fault's end, which waits for it.
            self._restart = threading.Thread(
                target=self._restart_engine, args=(fault,), daemon=True, name="soak-restart"
            )
            self._restart.start()
        fault.real_end = time.monotonic()  # done (the schedule waited for it)

    def end(self, fault: Fault) -> None:
        h, role = self.host, fault.target
        if fault.kind != "daemon_restart":
            # Not on an engine that is down (a loop that fell behind may end a fault after
            # the next one, a restart, started).
            self.wait_restart()
        if fault.kind in KINDS:
            assert self.service is not None
            self.service.end(fault)
        elif fault.kind == "rename":
            h.rename(role, "")
        elif fault.kind == "user_stop":
            h.user_start(role)
        elif fault.kind == "unlabel":
            self._check_unlabelled(fault)
            h.recreate(role)
        elif fault.kind == "daemon_restart":
            # Whatever the restart takes beyond its slot, the schedule stands still (as for
            # a checkpoint), so no simulated time passes unserved and then floods.
            waited = time.monotonic()
            self.wait_restart()
            self.run.paused_s += time.monotonic() - waited

    def wait_restart(self) -> None:
        if self._restart is not None:
            self._restart.join(300)
            self._restart = None

    def _restart_engine(self, fault: Fault) -> None:
        """tests/lib/dockerd.sh stop; the supervisor shows Docker unreachable; start; then
        the seconds, from the engine answering again, until /status shows Docker ok (the
        events stream reconnected) and until both services run and answer with their
        container ids. /healthz is read throughout. Any failure goes into the fault's
        entry (`error`), and the engine is started again whatever happened."""
        # A burst under way ends first (here, not in `start`: a long burst must not hold
        # the schedule up).
        h, p = self.host, fault.params
        waited = time.monotonic()
        self.wait_burst()
        if (burst_wait := time.monotonic() - waited) >= 0.1:
            p["burst_wait_s"] = round(burst_wait, 1)
        assert self.supervisor is not None
        sup = self.supervisor()
        http = httpx.Client(base_url=f"http://127.0.0.1:{sup.http_port}", timeout=2.0)
        unhealthy = [0]

        def status() -> dict[str, Any]:
            try:
                if not http.get("/healthz").is_success:
                    unhealthy[0] += 1
                data: dict[str, Any] = http.get("/status").json()
                return data
            except (httpx.HTTPError, ValueError):
                unhealthy[0] += 1
                return {}

        def wait(check: Callable[[dict[str, Any]], bool], limit_s: float) -> float | None:
            """Seconds until `check(/status)` held (None: not within `limit_s`)."""
            began = time.monotonic()
            while time.monotonic() - began < limit_s:
                if check(status()):
                    return round(time.monotonic() - began, 1)
                time.sleep(0.1)
            return None

        ids = {role: h.current[role].container.id for role in ROLES}
        reconnects = int((status().get("docker") or {}).get("reconnects") or 0)

        def docker_ok(s: dict[str, Any]) -> bool:
            d = s.get("docker") or {}
            return d.get("state") == "ok" and int(d.get("reconnects") or 0) > reconnects

        def found(s: dict[str, Any]) -> bool:
            return docker_ok(s) and all(
                any(
                    e.get("container_id") == ids[role] and e.get("running") and e.get("reachable")
                    for e in s.get(role) or []
                )
                for role in ROLES
            )

        h.down.update(ROLES)
        # Where the supervisor's pooled connections lead, noted until the engine is gone
        # (its end of them closes then, and only this tells them from a leak): while it
        # stops its containers the supervisor still calls it, on new connections too.
        stopped = threading.Event()
        noter = threading.Thread(
            target=_note_connections,
            args=(self.host.docker_socket, stopped),
            daemon=True,
            name="soak-note-connections",
        )
        noter.start()
        began = time.monotonic()
        try:
            try:
                dockerd("stop")
            finally:
                stopped.set()
                noter.join()
            p["stop_s"] = round(time.monotonic() - began, 1)
            noticed = wait(
                lambda s: (s.get("docker") or {}).get("state") == "unreachable", NOTICE_LIMIT_S
            )
            if noticed is None:
                p["error"] = f"/status did not show Docker unreachable in {NOTICE_LIMIT_S:g} s"
            dockerd("start")
            up = time.monotonic()
            p["down_s"] = round(up - began, 1)
            p["docker_ok_s"] = wait(docker_ok, 2 * FOUND_LIMIT_S)
            left = max(0.1, 2 * FOUND_LIMIT_S - (time.monotonic() - up))
            if wait(found, left) is not None:
                p["found_s"] = round(time.monotonic() - up, 1)
            else:
                p["found_s"] = None
            for role in ROLES:
                h.current[role].wait_ready(30)
            h.pause_others()
        # Any failure of the phase is its finding, recorded in the report (dockerd()
        # fails as a test does).
        except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001
            p.setdefault("error", f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if not engine_answers(self.docker_host):
                with contextlib.suppress(Exception, pytest.fail.Exception):
                    dockerd("start")
            h.down.difference_update(ROLES)
            p["healthz_failed"] = unhealthy[0]
            http.close()

    def _run_burst(self, fault: Fault) -> None:
        """The burst, in the background (the schedule goes on), then its events counted."""
        events = self.host.counted_burst(int(fault.params["containers"]))
        fault.params["events"] = events
        self.run.docker_events += events

    def wait_burst(self) -> None:
        """Until the running burst is over (also before a checkpoint: `settle`)."""
        if self._burst is not None:
            self._burst.join(600)
            self._burst = None

    def settle(self) -> None:
        """Before a checkpoint: a burst or a daemon restart under way ends first."""
        self.wait_restart()
        self.wait_burst()

    def _check_unlabelled(self, fault: Fault) -> None:
        """Nothing may act on the unlabelled container: no unload or free at its proxy
        since it was created, none counted by the fake itself, no action line about it."""
        role, since = fault.target, float(fault.params.pop("unlabelled_at"))
        name = self.host.names[role]
        found = [
            f"{m.kind} at the {role} proxy"
            for m in self.host.proxy(role).stats.mutations
            if m.at >= since and m.kind in ("free", "unload")
        ]
        self.run.unlabelled_requests += self.host.proxy(role).stats.requests - int(
            fault.params.pop("requests_before")
        )
        try:
            if frees := self.host.frees_requested(role):
                found.append(f"{role}'s own count of frees requested: {frees}")
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # the proxy and log still tell
            self.run.notes.append(f"{fault.describe()}: its own counters unreadable: {exc}")
        for at, entry in self.run.log:
            message = str(entry.get("message", ""))
            if at >= since and name in message and _is_action(message):
                found.append(f"log: {message[:160]}")
        self.run.unlabelled_actions += [f"{fault.describe()}: {f}" for f in found]


def _note_connections(path: str, stopped: threading.Event) -> None:
    """`remember_unix_peers(path)` every 50 ms until `stopped`."""
    while True:
        remember_unix_peers(path)
        if stopped.wait(0.05):
            return


def _is_action(message: str) -> bool:
    return message.startswith(("Freed", "Restarted", "Unloaded", "Interrupted", "Healed"))


def engine(docker_host: str) -> docker.DockerClient:
    client = docker.DockerClient(base_url=docker_host, timeout=120)
    client.ping()
    client.images.get(BASE_IMAGE)
    return client


@contextlib.contextmanager
def _client(docker_host: str) -> Iterator[docker.DockerClient]:
    client = engine(docker_host)
    try:
        yield client
    finally:
        client.close()


def run_docker_soak(
    *,
    docker_host: str,
    hours: float,
    time_scale: float,
    rate: float,
    seed: int,
    fault_gap_s: float,
    workdir: Path,
    burst: int = 100,
    overlap: bool = True,
    sample_s: float = 60.0,
    checkpoints: tuple[tuple[str, float], ...] = CHECKPOINTS,
    progress: Callable[[str], None] = print,
    service_faults: bool = True,
) -> SoakRun:
    """The run. Daemon restarts only where the engine is tests/lib/dockerd.sh's (then the
    whole run is inside `restored_engine`: the engine is up again at the end, whatever
    happened); elsewhere the report says they were not run."""
    restarts = engine_is_ours(docker_host)
    guard = restored_engine(docker_host) if restarts else contextlib.nullcontext()
    with guard:
        return _run_docker_soak(
            docker_host=docker_host,
            restarts=restarts,
            hours=hours,
            time_scale=time_scale,
            rate=rate,
            seed=seed,
            fault_gap_s=fault_gap_s,
            workdir=workdir,
            burst=burst,
            overlap=overlap,
            sample_s=sample_s,
            checkpoints=checkpoints,
            progress=progress,
            service_faults=service_faults,
        )


def _run_docker_soak(
    *,
    docker_host: str,
    restarts: bool,
    hours: float,
    time_scale: float,
    rate: float,
    seed: int,
    fault_gap_s: float,
    workdir: Path,
    burst: int,
    overlap: bool,
    sample_s: float,
    checkpoints: tuple[tuple[str, float], ...],
    progress: Callable[[str], None],
    service_faults: bool,
) -> SoakRun:
    duration_s = hours * 3600
    run = SoakRun(hours, time_scale, rate, seed, fault_gap_s, docker=True)
    run.settings = supervisor_settings(time_scale)
    run.model_names = dict(MODEL_NAMES)
    run.kinds = {k: v for k, v in DOCKER_KINDS.items() if restarts or k != "daemon_restart"}
    if service_faults:
        run.kinds.update(KINDS)
        run.kinds["crash"] = (
            "the service's process dies (SIGKILL, VRAM released); its restart policy "
            "starts the container again"
        )
    if not restarts:
        run.daemon_restart_note = DAEMON_RESTART_NOT_RUN
        progress(f"   daemon restart: {DAEMON_RESTART_NOT_RUN} ({docker_host})")
    # The first restart after the start checkpoint (and a minute more), so the resource
    # figures from start to end span every restart.
    first_restart_s = (dict(checkpoints).get("start", 0.0) * duration_s) + 60.0
    run.faults = make_docker_faults(
        seed,
        duration_s,
        fault_gap_s,
        burst,
        restarts=restarts,
        first_restart_s=first_restart_s,
        service_faults=service_faults,
    )
    clock_file = workdir / "clock-offset"
    clock_file.write_text("0")
    with _client(docker_host) as client:
        host = DockerSoakHost(client, workdir, time_scale, docker_host.removeprefix("unix://"))
        current: dict[str, Supervisor] = {}

        def start() -> Supervisor:
            current["sup"] = start_supervisor(host, run, clock_file, docker_host)
            return current["sup"]

        injector = DockerInjector(
            host,
            run,
            overlap,
            docker_host=docker_host,
            supervisor=lambda: current["sup"],
            clock_file=clock_file if service_faults else None,
        )
        try:
            return soak_on(
                run,
                host,
                injector,
                start,
                duration_s=duration_s,
                sample_s=sample_s,
                checkpoints=checkpoints,
                progress=progress,
            )
        finally:
            injector.wait_restart()
            injector.wait_burst()
            host.close()  # again (soak_on's is bounded): no container is left behind
