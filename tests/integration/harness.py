"""Helpers and fixtures for the supervisor's behaviour against a real Docker engine.

Used by tests/integration/test_supervisor_*.py through `pytest_plugins =
["tests.integration.harness"]` (fixtures below) and plain imports (helpers).

What it gives a test:
- `sims`: simulated Ollama / ComfyUI containers (`python -m supervisor.sim`) from the offline
  base image with this checkout bind-mounted read-only at /src, so nothing is built and a
  container answers within about a second. Every container uses the host network and binds
  127.0.0.1 on a fixed port of this harness's block (18400-18499, see conftest.py's table);
  all sims of one test share a simulated GPU through a state file in a bind-mounted
  temporary directory. They are started with conftest's `run_container` (host network
  enforced, force-removed at teardown) and carry HARNESS_LABEL as well.
- `host_sims`: the same sims as host processes (fixed-URL mode needs no Docker at all).
- `start_supervisor`: the real supervisor as a host process (`python -m supervisor run`)
  with DOCKER_HOST to the test engine, /healthz on a free 127.0.0.1 port, short intervals
  and JSON logs, read line by line so a test can wait for a log line with a deadline.
  Stopped (SIGTERM, then SIGKILL) at teardown; its log is kept in the test's tmp_path.
- `isolated_engine` (module scope): other supervisors and other labelled services on the same
  engine (the demo stack of test_compose_demo.py stays up for the whole session) would act
  on this module's containers, and this module's supervisor would read theirs. They are
  paused for the module and unpaused afterwards. Containers of this harness are never
  touched by it.

The test modules import helpers from here before pytest loads it as a plugin, so pytest
could not rewrite its asserts anyway: PYTEST_DONT_REWRITE says so (no warning); helpers fail
with explicit messages instead.

Policy: nothing is skipped: a missing engine or image fails (conftest's fixtures say how to
get them). Traffic goes only to 127.0.0.1. Every wait has a deadline and a failure shows the
supervisor's log and the containers' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker.errors import APIError, NotFound
from docker.models.containers import Container

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3

# Not `vram-supervisor.*`: the supervisor warns about unknown labels of its own prefix.
HARNESS_LABEL = "vram-supervisor-tests.harness"
RUN_ID = uuid.uuid4().hex[:10]
ROLE_LABEL = "vram-supervisor.role"
URL_LABEL = "vram-supervisor.url"
RESTART_LABEL = "vram-supervisor.restart"

PORT_FIRST, PORT_LAST = 18400, 18499
SIM_TIME_SCALE = 0.1
# Keep the supervisor quick on 2 cores: a pass per second, frees verified within 2 s.
FAST_SETTINGS = {
    "VRAM_CHECK_INTERVAL": "1",
    "VRAM_MIN_FREE_INTERVAL": "1",
    "VRAM_VERIFY_TIMEOUT": "2",
    "VRAM_REQUEST_TIMEOUT": "3",
    "VRAM_LOG_FORMAT": "json",
    "VRAM_DEBUG": "true",
}


def fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """An ephemeral port free on 127.0.0.1 (for the supervisor's own endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class _Ports:
    """Hands out ports of this harness's block round-robin, skipping ports in use."""

    def __init__(self) -> None:
        self._next = PORT_FIRST
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for _ in range(PORT_LAST - PORT_FIRST + 1):
                port = self._next
                self._next = port + 1 if port < PORT_LAST else PORT_FIRST
                if _port_is_free(port):
                    return port
        fail(f"No free port left in {PORT_FIRST}-{PORT_LAST} on 127.0.0.1")
        raise AssertionError("unreachable")


PORTS = _Ports()


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, pause_s: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"Timed out after {timeout_s:g}s waiting for {what}{extra}")
        time.sleep(pause_s)


# --------------------------------------------------------------------------- sims


class SimApi:
    """What tests ask a simulated service, wherever it runs (container or host process)."""

    role: str  # "ollama" | "comfyui" | "llama-server" | "llama-swap"
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        raise NotImplementedError

    def state(self) -> str:
        raise NotImplementedError

    def access_log(self) -> list[str]:
        """Request lines the sim logged (`--verbose`): `"GET /queue HTTP/1.1" 200 -`."""
        return [line for line in self.logs().splitlines() if '"' in line and "HTTP/1" in line]

    def get(self, path: str, timeout_s: float = 10.0) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=timeout_s)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any, timeout_s: float = 60.0) -> Any:
        response = httpx.post(f"{self.url}{path}", json=body, timeout=timeout_s)
        response.raise_for_status()
        return response.json() if response.content else None

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        # Not a path the supervisor uses: access logs then tell who asked what.
        # (llama-server, llama-swap, vLLM, speaches: /health, which the supervisor reads
        # only of a single-model llama-server; the image servers' fakes: /sim/stats.)
        path = {
            "ollama": "/api/version",
            "comfyui": "/sim/stats",
            "sd-webui": "/sim/stats",
            "invokeai": "/sim/stats",
        }.get(self.role, "/health")

        def answers() -> bool:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200

        try:
            wait_until(answers, timeout_s, f"{self.name} to answer on {self.url}{path}")
        except AssertionError as exc:
            fail(f"{exc}\n{self.name}: {self.state()}; logs:\n{tail(self.logs())}")


@dataclass
class Sim(SimApi):
    """One simulated service in a container."""

    role: str
    name: str
    port: int
    container: Container
    labelled: bool

    def reload(self) -> Container:
        self.container.reload()
        return self.container

    @property
    def started_at(self) -> str:
        return str(self.reload().attrs["State"]["StartedAt"])

    def state(self) -> str:
        try:
            return str(self.reload().attrs["State"]["Status"])
        except (APIError, NotFound) as exc:
            return f"gone ({exc.__class__.__name__})"

    def logs(self) -> str:
        try:
            raw: bytes = self.container.logs()
        except (APIError, NotFound) as exc:
            return f"(no logs: {exc})"
        return raw.decode(errors="replace")


@dataclass
class HostSim(SimApi):
    """One simulated service as a process on the host (no Docker involved)."""

    role: str
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def state(self) -> str:
        code = self.proc.poll()
        return "running" if code is None else f"exited {code}"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no logs: {exc})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def sim_command(
    role: str, port: int, state_file: str, time_scale: float, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        "-m", "supervisor.sim", role, "--port", str(port), "--gpu-state", state_file,
        "--gpu-total-gib", "24", "--time-scale", f"{time_scale:g}", "--verbose", *extra,
    ]  # fmt: skip


class Sims:
    """Factory of sim containers sharing one simulated GPU (the `sims` fixture)."""

    def __init__(
        self,
        run_container: Callable[..., Container],
        image: str,
        state_dir: Path,
        *,
        time_scale: float = SIM_TIME_SCALE,
    ) -> None:
        self._run = run_container
        self.image = image
        self.state_dir = state_dir
        self.time_scale = time_scale
        self.started: list[Sim] = []

    def volumes(self) -> dict[str, dict[str, str]]:
        return {
            str(REPO): {"bind": "/src", "mode": "ro"},
            str(self.state_dir): {"bind": "/state", "mode": "rw"},
        }

    def command(self, role: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
        return ["python3", *sim_command(role, port, "/state/gpu.json", self.time_scale, extra)]

    def run_kwargs(
        self,
        role: str,
        port: int,
        name: str,
        *,
        labelled: bool = True,
        restart: bool | None = None,
        labels: dict[str, str] | None = None,
        health_flag: str | None = None,
        restart_policy: dict[str, Any] | None = None,
        extra: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Everything `run_container` needs; recreate tests reuse it for a twin.
        `environment` adds to the sims' environment (e.g. VLLM_SERVER_DEV_MODE=1)."""
        all_labels = {HARNESS_LABEL: RUN_ID, **(labels or {})}
        if labelled:
            all_labels[ROLE_LABEL] = role
            all_labels[URL_LABEL] = f"http://127.0.0.1:{port}"
            if restart is not None:
                all_labels[RESTART_LABEL] = "true" if restart else "false"
        kwargs: dict[str, Any] = {
            "command": self.command(role, port, extra),
            "name": name,
            "labels": all_labels,
            "network_mode": "host",
            "init": True,
            "volumes": self.volumes(),
            "environment": {
                "PYTHONPATH": "/src",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
                # A model stays loaded until someone unloads it: no expiry mid-test.
                "OLLAMA_KEEP_ALIVE": "-1",
                # The services' generation (2026 unless the test run names another).
                "VRAM_SIM_PROFILE": os.environ.get("VRAM_SIM_PROFILE") or "2026",
                **(environment or {}),
            },
        }
        if health_flag is not None:
            kwargs["healthcheck"] = health_check_file(port, health_flag)
        if restart_policy is not None:
            kwargs["restart_policy"] = restart_policy
        return kwargs

    def start(
        self,
        role: str,
        *,
        name: str | None = None,
        port: int | None = None,
        wait: bool = True,
        **options: Any,
    ) -> Sim:
        port = port or PORTS.take()
        name = name or unique_name(role)
        kwargs = self.run_kwargs(role, port, name, **options)
        command = kwargs.pop("command")
        container = self._run(self.image, command, **kwargs)
        sim = Sim(role, name, port, container, labelled=options.get("labelled", True))
        self.started.append(sim)
        if wait:
            sim.wait_ready()
        return sim

    def ollama(self, **options: Any) -> Sim:
        return self.start("ollama", **options)

    def comfyui(self, **options: Any) -> Sim:
        return self.start("comfyui", **options)

    def describe(self) -> str:
        """State and log of each sim; of the access log only the last few requests."""
        parts = []
        for sim in self.started:
            lines = sim.logs().splitlines()
            access = set(sim.access_log())
            other = [line for line in lines if line not in access]
            recent = [line for line in lines if line in access][-5:]
            parts.append(
                f"--- {sim.name} ({sim.role} on {sim.url}, {sim.state()}):\n"
                + "\n".join([*other[-20:], *recent])
            )
        return "\n".join(parts)


def start_host_sim(role: str, port: int, state_dir: Path, extra: tuple[str, ...] = ()) -> HostSim:
    """`python -m supervisor.sim ROLE` on the host, GPU state in `state_dir`/gpu.json."""
    log_path = state_dir / f"{role}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                *sim_command(role, port, str(state_dir / "gpu.json"), SIM_TIME_SCALE, extra),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "OLLAMA_KEEP_ALIVE": "-1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sim = HostSim(role, f"host-{role}-{port}", port, proc, log_path)
    try:
        sim.wait_ready()
    except BaseException:
        sim.stop()
        raise
    return sim


def unique_name(role: str) -> str:
    return f"vs-sup-{uuid.uuid4().hex[:6]}-{role}"


def health_check_file(port: int, flag: str) -> dict[str, Any]:
    """A HEALTHCHECK that fails while /state/<flag> exists, else asks the sim itself."""
    probe = (
        f"test ! -e /state/{flag} && "
        f"python3 -m supervisor.sim healthcheck http://127.0.0.1:{port}/sim/stats"
    )
    return {
        "test": ["CMD-SHELL", probe],
        "interval": 300_000_000,  # ns
        "timeout": 3_000_000_000,
        "retries": 1,
        "start_period": 0,
    }


# --------------------------------------------------------------------------- workloads


def comfy_job(model_gib: float, seconds: float, *, name: str | None = None) -> dict[str, Any]:
    """A prompt for the fake ComfyUI: load `model_gib` of weights, work `seconds` (sim)."""
    return {
        "prompt": {
            "9": {
                "class_type": "SimJob",
                "inputs": {
                    "ckpt_name": name or f"sim-{model_gib:g}gib.safetensors",
                    "model_gib": model_gib,
                    "workspace_gib": 1.0,
                    "seconds": seconds,
                    "steps": 10,
                },
            }
        }
    }


def comfy_submit(comfy: SimApi, model_gib: float, seconds: float) -> str:
    answer = comfy.post("/prompt", comfy_job(model_gib, seconds))
    return str(answer["prompt_id"])


def comfy_idle(comfy: SimApi) -> bool:
    return int(comfy.get("/prompt")["exec_info"]["queue_remaining"]) == 0


def comfy_hold_vram(comfy: SimApi, model_gib: float, timeout_s: float = 30.0) -> int:
    """Run a short job; smart memory keeps its model on the GPU. Returns `comfy_held`."""
    comfy_submit(comfy, model_gib, 1.0)
    wait_until(lambda: comfy_idle(comfy), timeout_s, f"the image job on {comfy.name}")
    return comfy_held(comfy)


def comfy_held(comfy: SimApi) -> int:
    """What the fake ComfyUI holds on the GPU (weights + torch's cache), via /sim/stats.
    Not /system_stats' torch_vram_total: under Dynamic VRAM (the default of ComfyUI 0.15+,
    the sim's 2026 profile) that shows no weights at all."""
    return int(comfy.get("/sim/stats")["memory"]["held"])


def comfy_torch_reserved(comfy: SimApi) -> int:
    """torch's reserved bytes as /system_stats reports them (`torch_vram_total`)."""
    return int(comfy.get("/system_stats")["devices"][0]["torch_vram_total"])


def comfy_history(comfy: SimApi, prompt_id: str) -> dict[str, Any] | None:
    """The finished prompt's history entry (None while it runs or waits)."""
    entry = comfy.get(f"/history/{prompt_id}").get(prompt_id)
    return dict(entry) if entry else None


def ollama_load(ollama: SimApi, model: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Load a model (a generate request without a prompt) and wait for the answer."""
    answer = ollama.post("/api/generate", {"model": model}, timeout_s=timeout_s)
    if not answer or answer.get("done_reason") != "load":
        fail(f"Loading {model} on {ollama.name} answered {answer!r}")
    return dict(answer)


def ollama_ps(ollama: SimApi) -> list[dict[str, Any]]:
    return list(ollama.get("/api/ps")["models"])


def ollama_model(ollama: SimApi, model: str) -> dict[str, Any] | None:
    return next((m for m in ollama_ps(ollama) if m["name"] == model), None)


# --------------------------------------------------------------------------- supervisor


def freed_on(name: str) -> re.Pattern[str]:
    """The stable line of a verified free of the ComfyUI called `name`."""
    return re.compile(rf"^Freed ComfyUI memory \((soft|hard)\): .* on {re.escape(name)} ")


@dataclass(frozen=True)
class Record:
    at: float  # monotonic time the line was read
    level: str
    message: str
    raw: str


@dataclass
class Supervisor:
    """The supervisor as a host process, with its log parsed as it arrives."""

    proc: subprocess.Popen[str]
    http_port: int
    log_path: Path
    records: list[Record] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _follow(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("w") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                line = line.rstrip("\n")
                try:
                    data = json.loads(line)
                    record = Record(
                        time.monotonic(), str(data["level"]), str(data["message"]), line
                    )
                except (ValueError, KeyError, TypeError):
                    record = Record(time.monotonic(), "RAW", line, line)
                with self._lock:
                    self.records.append(record)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def mark(self) -> int:
        """An index: `wait_for(..., since=mark)` looks only at lines logged after it."""
        with self._lock:
            return len(self.records)

    def log(self, lines: int = 120) -> str:
        return tail("\n".join(f"{r.level:<7} {r.message}" for r in self.snapshot()), lines)

    def find(self, pattern: str | re.Pattern[str], since: int = 0) -> list[Record]:
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        return [r for r in self.snapshot()[since:] if regex.search(r.message)]

    def wait_for(
        self, pattern: str | re.Pattern[str], *, since: int = 0, timeout_s: float = 20.0
    ) -> Record:
        """The first line at or after `since` matching `pattern` (a str matches literally)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.find(pattern, since)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                found = self.find(pattern, since)
                if found:
                    return found[0]
                raise AssertionError(
                    f"The supervisor exited ({self.proc.returncode}) before logging "
                    f"{_show(pattern)}; log:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"No log line {_show(pattern)} within {timeout_s:g}s; log:\n{self.log()}"
                )
            time.sleep(0.05)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=5)

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def service(self, role: str, name: str) -> dict[str, Any] | None:
        """This service's entry in /status (None when the supervisor does not list it)."""
        return next((s for s in self.status()[role] if s["name"] == name), None)

    def wait_pass(self, timeout_s: float = 15.0) -> None:
        """Until a pass of the loop has completed after this call (so it saw the present)."""
        now = time.time()
        wait_until(
            lambda: (self.status()["last_pass_wall_time"] or 0) > now,
            timeout_s,
            f"a pass of the supervisor's loop; log:\n{self.log(40)}",
        )

    def wait_passes(self, passes: int) -> None:
        """Let the loop run `passes` more times (at least one VRAM_CHECK_INTERVAL apart,
        unless something wakes it early)."""
        for _ in range(passes):
            self.wait_pass()

    def wait_service(
        self, role: str, name: str, timeout_s: float = 10.0, **expected: Any
    ) -> dict[str, Any]:
        """This service's /status entry once it exists and has the `expected` fields.

        /status shows the last completed pass, so right after a log line (logged during a
        pass) it may still show the pass before: poll instead of reading once."""

        def check() -> dict[str, Any] | None:
            entry = self.service(role, name)
            if entry is None or any(entry.get(k) != v for k, v in expected.items()):
                return None
            return entry

        found: dict[str, Any] = wait_until(
            check,
            timeout_s,
            f"/status to list {role} {name} with {expected}; last: {self.service(role, name)}",
        )
        return found

    def healthz(self) -> int:
        try:
            return self.get("/healthz").status_code
        except httpx.HTTPError:
            return 0

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the supervisor for the block: what happens meanwhile happens while it is
        busy (as during a long verify or a model reload), then SIGCONT."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def errors(self) -> list[Record]:
        return [r for r in self.snapshot() if r.level in ("ERROR", "CRITICAL")]

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)


def _show(pattern: str | re.Pattern[str]) -> str:
    return repr(pattern if isinstance(pattern, str) else pattern.pattern)


def launch_supervisor(log_path: Path, docker_host: str, **env: str) -> Supervisor:
    """Start `python -m supervisor run`; returns once /healthz answers (or fails)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    environ.pop("DOCKER_CONTEXT", None)
    environ.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        DOCKER_HOST=docker_host,
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        **FAST_SETTINGS,
    )
    environ.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run"],
        cwd=REPO,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sup = Supervisor(proc, port, log_path)
    threading.Thread(target=sup._follow, name="supervisor-log", daemon=True).start()
    try:
        wait_until(lambda: sup.healthz() == 200 or not sup.is_alive(), 30, "/healthz")
    except AssertionError as exc:
        sup.stop()
        fail(f"{exc}\n{sup.log()}")
    if not sup.is_alive():
        fail(f"The supervisor exited at start ({proc.returncode}):\n{sup.log()}")
    return sup


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sims(
    run_container: Callable[..., Container], base_image: str, tmp_path: Path
) -> Iterator[Sims]:
    state = tmp_path / "gpu-state"
    state.mkdir()
    factory = Sims(run_container, base_image, state)
    yield factory
    # pytest shows this only when the test failed. Removal is run_container's teardown.
    print(f"sim containers of this test:\n{factory.describe()}")


@pytest.fixture
def host_sims(tmp_path: Path) -> Iterator[Callable[..., HostSim]]:
    """`host_sims(role, *extra_args) -> HostSim` sharing one GPU state file; stopped after."""
    state = tmp_path / "host-gpu-state"
    state.mkdir()
    started: list[HostSim] = []

    def start(role: str, *extra: str) -> HostSim:
        sim = start_host_sim(role, PORTS.take(), state, extra)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def start_supervisor(
    docker_host: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Supervisor]]:
    """`start_supervisor(**VRAM_env) -> Supervisor`; all of them are stopped at teardown."""
    started: list[Supervisor] = []

    def start(**env: str) -> Supervisor:
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        sup = launch_supervisor(log_path, env.pop("DOCKER_HOST", docker_host), **env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        code = sup.stop()
        # pytest shows this only when the test failed.
        print(f"supervisor (exit {code}), full log in {sup.log_path}:\n{sup.log(60)}")


def _is_foreign_actor(container: Container) -> bool:
    """A labelled service or a supervisor that this harness did not start."""
    labels = container.labels or {}
    if labels.get(HARNESS_LABEL):
        return False
    if ROLE_LABEL in labels:
        return True
    env = container.attrs.get("Config", {}).get("Env") or []
    return any(str(item).startswith("VRAM_") for item in env)


@pytest.fixture(scope="module")
def isolated_engine(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Pause other supervisors and labelled services for this module; unpause afterwards."""
    paused: list[Container] = []
    for container in docker_client.containers.list():
        if _is_foreign_actor(container):
            try:
                container.pause()
                paused.append(container)
            except (APIError, NotFound) as exc:
                print(f"could not pause {container.name}: {exc}", file=sys.stderr)
    if paused:
        print(
            "paused for this module: " + ", ".join(c.name for c in paused if c.name),
            file=sys.stderr,
        )
    yield [c.name for c in paused if c.name]
    for container in paused:
        with contextlib.suppress(APIError, NotFound):
            container.unpause()
