"""DockerAdapter against a hand-written fake of the docker SDK (shapes per api-facts 3.4-3.5)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests
from loguru import logger

from supervisor.docker.discovery import DockerAdapter, find_own_container_id, gpu_ids
from supervisor.errors import DockerUnavailable
from supervisor.model import Role, ServiceHealth
from supervisor.tenants import roles

# --------------------------------------------------------------------------- the fake SDK


def cid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()  # 64 hex, like a container id


def inspect(
    name: str,
    labels: dict[str, str] | None,
    *,
    status: str = "running",
    health: str | None = None,
    pid: int = 4242,
    network_mode: str = "host",
    networks: dict[str, tuple[str, str]] | None = None,  # name -> (IPAddress, Gateway)
    device_requests: list[dict[str, Any]] | None = None,
    env: list[str] | None = None,
) -> dict[str, Any]:
    """GET /containers/{id}/json as the engine sends it (the fields we read and a few more)."""
    state: dict[str, Any] = {
        "Status": status,
        "Running": status in ("running", "paused"),
        "Paused": status == "paused",
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": pid if status in ("running", "paused") else 0,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2025-10-20T10:00:00.000000000Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
    if networks is None:
        networks = {"host": ("", "")} if network_mode == "host" else {}
    return {
        "Id": cid(name),
        "Name": f"/{name}",
        "Created": "2025-10-20T09:59:59.000000000Z",
        "State": state,
        "Config": {"Image": "img:latest", "Labels": labels, "Env": env or ["PATH=/usr/bin"]},
        "HostConfig": {"NetworkMode": network_mode, "DeviceRequests": device_requests},
        "NetworkSettings": {
            "Networks": {
                net: {
                    "IPAddress": ip,
                    "Gateway": gw,
                    "NetworkID": cid(net),
                    "EndpointID": cid(net + name) if ip else "",
                    "Aliases": None,
                }
                for net, (ip, gw) in networks.items()
            }
        },
    }


class FakeContainer:
    def __init__(self, engine: FakeEngine, attrs: dict[str, Any]) -> None:
        self._engine = engine
        self.attrs = attrs
        self.id = attrs["Id"]
        self.name = attrs["Name"].lstrip("/")
        self.top_answer: dict[str, Any] = {
            "Titles": ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"],
            "Processes": [
                ["root", "12345", "12300", "0", "10:00", "?", "00:00:01", "ollama serve"],
                ["root", "12399", "12345", "9", "10:01", "?", "00:03:00", "ollama runner"],
            ],
        }
        self.restarts: list[int] = []

    def top(self, ps_args: str | None = None) -> dict[str, Any]:
        self._engine.check()
        if self.attrs["State"]["Status"] != "running":
            response = requests.Response()
            response.status_code = 409  # what the engine answers (docker-py keeps it)
            raise docker.errors.APIError(
                "409 Client Error: Conflict",
                response=response,
                explanation=f"Container {self.id} is not running",
            )
        return self.top_answer

    def restart(self, timeout: int = 10) -> None:
        self._engine.check()
        self.restarts.append(timeout)


class FakeContainers:
    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self.list_calls: list[dict[str, Any]] = []

    def list(
        self,
        all: bool = False,  # the SDK's name
        filters: dict[str, Any] | None = None,
        sparse: bool = False,
        ignore_removed: bool = False,
    ) -> list[FakeContainer]:
        self._engine.check()
        self.list_calls.append(
            {"all": all, "filters": filters, "sparse": sparse, "ignore_removed": ignore_removed}
        )
        wanted = (filters or {}).get("label", [])
        wanted = [wanted] if isinstance(wanted, str) else wanted
        found = []
        for c in self._engine.containers.values():
            labels = c.attrs["Config"]["Labels"] or {}
            if not all and c.attrs["State"]["Status"] != "running":
                continue
            if all_match(labels, wanted):
                found.append(c)
        return found

    def get(self, container_id: str) -> FakeContainer:
        self._engine.check()
        for c in self._engine.containers.values():
            if c.id.startswith(container_id) or c.name == container_id:
                return c
        response = requests.Response()
        response.status_code = 404
        raise docker.errors.NotFound(
            "404 Client Error: Not Found",
            response=response,
            explanation=f"No such container: {container_id}",
        )


def all_match(labels: dict[str, str], wanted: list[str]) -> bool:
    """The engine AND-s label filters (gotcha 15)."""
    for item in wanted:
        key, eq, value = item.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


class FakeEngine:
    """The daemon behind the fake clients: can be up or down."""

    def __init__(self) -> None:
        self.up = True
        self.containers: dict[str, FakeContainer] = {}
        self.clients_built = 0
        self.clients_closed = 0

    def add(self, attrs: dict[str, Any]) -> FakeContainer:
        container = FakeContainer(self, attrs)
        self.containers[container.id] = container
        return container

    def check(self) -> None:
        if not self.up:
            raise requests.exceptions.ConnectionError(
                "('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"
            )

    def client_factory(self) -> FakeClient:
        if not self.up:  # like docker.from_env() with version="auto" (gotcha 21)
            raise docker.errors.DockerException(
                "Error while fetching server API version: ('Connection aborted.', "
                "FileNotFoundError(2, 'No such file or directory'))"
            )
        self.clients_built += 1
        return FakeClient(self)


class FakeClient:
    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self.containers = FakeContainers(engine)

    def ping(self) -> bool:
        self._engine.check()
        return True

    def close(self) -> None:
        self._engine.clients_closed += 1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m).rstrip("\n")), level="WARNING", format="{message}"
    )
    yield lines
    logger.remove(sink)


def adapter(engine: FakeEngine, own_id: str | None = None) -> DockerAdapter:
    return DockerAdapter(client_factory=engine.client_factory, own_container_id=lambda: own_id)


# --------------------------------------------------------------------------- list_services


def test_lists_labelled_containers_with_state_health_pid_and_gpus(engine: FakeEngine) -> None:
    engine.add(
        inspect(
            "ollama",
            {"vram-supervisor.role": "ollama", "com.docker.compose.service": "ollama"},
            health="healthy",
            pid=3100,
            device_requests=[
                {
                    "Driver": "",
                    "Count": -1,
                    "DeviceIDs": None,
                    "Capabilities": [["gpu"]],
                    "Options": {},
                }
            ],
        )
    )
    engine.add(
        inspect(
            "comfyui",
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "true"},
            status="exited",
            health="unhealthy",
            network_mode="ai_default",
            networks={"ai_default": ("", "")},
            device_requests=[
                {
                    "Driver": "nvidia",
                    "Count": 0,
                    "DeviceIDs": ["GPU-5f1a", "1"],
                    "Capabilities": [["gpu", "utility"]],
                    "Options": {},
                }
            ],
        )
    )
    engine.add(inspect("postgres", {"com.docker.compose.service": "db"}))
    adapter_ = adapter(engine)

    states = adapter_.list_services()

    by_name = {s.spec.name: s for s in states}
    assert set(by_name) == {"ollama", "comfyui"}
    ollama, comfy = by_name["ollama"], by_name["comfyui"]
    assert ollama.spec.role == Role.OLLAMA
    assert ollama.spec.url == "http://127.0.0.1:11434"
    assert ollama.spec.container_id == cid("ollama")
    assert ollama.spec.gpu_uuids == ()  # --gpus all
    assert ollama.spec.restart_allowed is None
    assert (ollama.status, ollama.is_running, ollama.health, ollama.pid) == (
        "running",
        True,
        ServiceHealth.HEALTHY,
        3100,
    )
    assert comfy.spec.role == Role.COMFYUI
    assert comfy.spec.restart_allowed is True
    assert comfy.spec.gpu_uuids == ("GPU-5f1a", "1")
    assert (comfy.status, comfy.is_running, comfy.health, comfy.pid) == (
        "exited",
        False,
        ServiceHealth.UNHEALTHY,
        0,
    )
    assert comfy.spec.url == "http://comfyui:8188"  # stopped: no IP yet


def test_ollamas_settings_that_change_a_loads_need_are_kept_and_nothing_else(
    engine: FakeEngine,
) -> None:
    env = [
        "PATH=/usr/bin",
        "OLLAMA_CONTEXT_LENGTH=8192",
        "HF_TOKEN=secret",
        "OLLAMA_NUM_PARALLEL=2",
    ]
    engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}, env=env))
    engine.add(inspect("comfyui", {"vram-supervisor.role": "comfyui"}, env=env))
    states = {c.spec.name: c for c in adapter(engine).list_services()}
    assert states["ollama"].spec.env == (
        ("OLLAMA_CONTEXT_LENGTH", "8192"),
        ("OLLAMA_NUM_PARALLEL", "2"),
    )
    assert states["comfyui"].spec.env == ()


def test_asks_docker_for_all_labelled_containers_tolerating_removal(engine: FakeEngine) -> None:
    client = engine.client_factory()
    adapter_ = DockerAdapter(client_factory=lambda: client, own_container_id=lambda: None)
    assert adapter_.list_services() == ()
    assert client.containers.list_calls == [
        {
            "all": True,
            "filters": {"label": "vram-supervisor.role"},
            "sparse": False,
            "ignore_removed": True,
        }
    ]


def test_no_healthcheck_means_health_none_and_status_is_passed_through(
    engine: FakeEngine,
) -> None:
    engine.add(inspect("o", {"vram-supervisor.role": "ollama"}, status="paused"))
    engine.add(inspect("c", {"vram-supervisor.role": "comfyui"}, health="starting"))
    states = {s.spec.name: s for s in adapter(engine).list_services()}
    assert states["o"].health is ServiceHealth.NONE
    assert states["o"].status == "paused" and not states["o"].is_running
    assert states["c"].health is ServiceHealth.STARTING


def test_ip_is_used_when_no_network_is_shared(engine: FakeEngine) -> None:
    engine.add(
        inspect(
            "ollama",
            {"vram-supervisor.role": "ollama"},
            network_mode="ai_default",
            networks={"ai_default": ("172.18.0.5", "172.18.0.1")},
        )
    )
    (state,) = adapter(engine).list_services()
    assert state.spec.url == "http://172.18.0.5:11434"


def test_a_network_shared_with_the_supervisor_gives_the_container_name(
    engine: FakeEngine,
) -> None:
    engine.add(
        inspect(
            "vram-supervisor",
            {"com.docker.compose.service": "supervisor"},
            network_mode="ai_default",
            networks={"ai_default": ("172.18.0.2", "172.18.0.1")},
        )
    )
    engine.add(
        inspect(
            "ollama",
            {"vram-supervisor.role": "ollama"},
            network_mode="ai_default",
            networks={"ai_default": ("172.18.0.5", "172.18.0.1")},
        )
    )
    engine.add(inspect("comfyui", {"vram-supervisor.role": "comfyui"}))  # host network
    states = {s.spec.name: s for s in adapter(engine, cid("vram-supervisor")[:12]).list_services()}
    assert states["ollama"].spec.url == "http://ollama:11434"
    # A host-network service is reached through the supervisor's gateway (the host).
    assert states["comfyui"].spec.url == "http://172.18.0.1:8188"


def test_supervisor_on_the_host_network_uses_loopback(engine: FakeEngine) -> None:
    engine.add(inspect("vram-supervisor", {}, network_mode="host"))
    engine.add(inspect("comfyui", {"vram-supervisor.role": "comfyui"}))
    (state,) = adapter(engine, cid("vram-supervisor")).list_services()
    assert state.spec.url == "http://127.0.0.1:8188"


def test_a_wrong_guess_of_the_own_container_is_harmless_and_logged_once(
    engine: FakeEngine, warnings: list[str]
) -> None:
    engine.add(inspect("comfyui", {"vram-supervisor.role": "comfyui"}))
    adapter_ = adapter(engine, "0123456789ab")
    for _ in range(3):
        (state,) = adapter_.list_services()
        assert state.spec.url == "http://127.0.0.1:8188"
    assert len([w for w in warnings if "0123456789ab" in w]) == 1


# --------------------------------------------------------------------------- bad labels


def test_a_bad_label_leaves_the_container_out_and_is_logged_once(
    engine: FakeEngine, warnings: list[str]
) -> None:
    engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}))
    bad = engine.add(inspect("comfy", {"vram-supervisor.role": "comfy"}))
    adapter_ = adapter(engine)

    for _ in range(3):
        assert [s.spec.name for s in adapter_.list_services()] == ["ollama"]
    assert warnings == [
        "container comfy: label vram-supervisor.role='comfy' is not valid: expected one of: "
        f"{', '.join(roles())}; the container is ignored"
    ]

    # The user fixes one mistake and makes another: that is news, logged again once.
    bad.attrs["Config"]["Labels"] = {
        "vram-supervisor.role": "comfyui",
        "vram-supervisor.restart": "sometimes",
    }
    for _ in range(2):
        assert [s.spec.name for s in adapter_.list_services()] == ["ollama"]
    assert len(warnings) == 2 and "vram-supervisor.restart='sometimes'" in warnings[1]

    bad.attrs["Config"]["Labels"] = {"vram-supervisor.role": "comfyui"}
    assert [s.spec.name for s in adapter_.list_services()] == ["comfy", "ollama"]
    assert len(warnings) == 2


def test_an_unknown_label_is_warned_once_and_the_container_still_counts(
    engine: FakeEngine, warnings: list[str]
) -> None:
    engine.add(inspect("comfy", {"vram-supervisor.role": "comfyui", "vram-supervisor.rstart": "1"}))
    adapter_ = adapter(engine)
    for _ in range(3):
        (state,) = adapter_.list_services()
        assert state.spec.restart_allowed is None
    assert len(warnings) == 1
    assert "comfy" in warnings[0] and "vram-supervisor.rstart" in warnings[0]


def test_a_swarm_task_is_never_restarted_and_a_restart_label_on_it_is_warned_once(
    engine: FakeEngine, warnings: list[str]
) -> None:
    task = {"com.docker.swarm.task.id": "k8ofree6cbi0", "com.docker.swarm.service.name": "s_c"}
    engine.add(inspect("task-default", {"vram-supervisor.role": "comfyui", **task}))
    engine.add(
        inspect(
            "task-allowed",
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "true", **task},
        )
    )
    engine.add(
        inspect("plain", {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "true"})
    )
    adapter_ = adapter(engine)
    for _ in range(2):
        allowed = {s.spec.name: s.spec.restart_allowed for s in adapter_.list_services()}
        assert allowed == {"task-default": False, "task-allowed": False, "plain": True}
        blocks = {s.spec.name: s.spec.restart_block for s in adapter_.list_services()}
        assert blocks["plain"] is None
        assert "Swarm task" in (blocks["task-default"] or "")
        assert blocks["task-default"] == blocks["task-allowed"]
    assert len(warnings) == 1
    assert "task-allowed is a Swarm task: the restart fallback is off" in warnings[0]


def test_null_labels_in_inspect_are_handled(engine: FakeEngine) -> None:
    # Config.Labels is null for a container without labels; it cannot match the filter,
    # but a container relabelled between list and inspect must not crash discovery.
    attrs = inspect("x", None)
    engine.add(attrs)
    client = engine.client_factory()
    client.containers.list = lambda **_: [engine.containers[attrs["Id"]]]  # type: ignore[method-assign]
    adapter_ = DockerAdapter(client_factory=lambda: client, own_container_id=lambda: None)
    assert adapter_.list_services() == ()


# --------------------------------------------------------------------------- daemon down


def test_daemon_down_raises_docker_unavailable_then_recovers(engine: FakeEngine) -> None:
    engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}))
    engine.up = False
    adapter_ = adapter(engine)  # constructing it needs no daemon

    with pytest.raises(DockerUnavailable) as caught:
        adapter_.list_services()
    assert isinstance(caught.value.__cause__, docker.errors.DockerException)
    with pytest.raises(DockerUnavailable):
        adapter_.ping()

    engine.up = True
    assert [s.spec.name for s in adapter_.list_services()] == ["ollama"]
    adapter_.ping()
    assert engine.clients_built == 1


def test_a_broken_connection_drops_the_client_and_the_next_call_builds_a_new_one(
    engine: FakeEngine,
) -> None:
    engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}))
    adapter_ = adapter(engine)
    adapter_.list_services()
    assert engine.clients_built == 1

    engine.up = False  # the daemon restarts under us
    with pytest.raises(DockerUnavailable) as caught:
        adapter_.list_services()
    assert isinstance(caught.value.__cause__, requests.exceptions.ConnectionError)
    assert engine.clients_closed == 1

    engine.up = True
    assert len(adapter_.list_services()) == 1
    assert engine.clients_built == 2


def test_an_http_error_from_a_live_daemon_keeps_the_client(engine: FakeEngine) -> None:
    adapter_ = adapter(engine)
    with pytest.raises(DockerUnavailable) as caught:
        adapter_.restart("doesnotexist", 10)
    assert isinstance(caught.value.__cause__, docker.errors.NotFound)
    adapter_.ping()
    assert engine.clients_built == 1 and engine.clients_closed == 0


# --------------------------------------------------------------------------- top / restart


def test_container_pids_reads_the_pid_column_as_ints(engine: FakeEngine) -> None:
    c = engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}))
    adapter_ = adapter(engine)
    assert adapter_.container_pids(c.id) == (12345, 12399)

    # The column is found by its title, not its position (ps_args can reorder it).
    c.top_answer = {"Titles": ["PID", "CMD"], "Processes": [["77", "python3 main.py"]]}
    assert adapter_.container_pids(c.id) == (77,)


def test_container_pids_of_a_stopped_container_is_empty(engine: FakeEngine) -> None:
    c = engine.add(inspect("comfy", {"vram-supervisor.role": "comfyui"}, status="exited"))
    assert adapter(engine).container_pids(c.id) == ()


def test_container_pids_failures_are_docker_unavailable(engine: FakeEngine) -> None:
    c = engine.add(inspect("ollama", {"vram-supervisor.role": "ollama"}))
    adapter_ = adapter(engine)
    with pytest.raises(DockerUnavailable):
        adapter_.container_pids(cid("gone"))
    c.top_answer = {"Titles": ["UID", "CMD"], "Processes": [["root", "x"]]}
    with pytest.raises(DockerUnavailable, match="unreadable"):
        adapter_.container_pids(c.id)


def test_restart_passes_whole_seconds_rounded_up(engine: FakeEngine) -> None:
    c = engine.add(inspect("comfy", {"vram-supervisor.role": "comfyui"}))
    adapter_ = adapter(engine)
    adapter_.restart(c.id, 10)
    adapter_.restart(c.id, 2.2)
    assert c.restarts == [10, 3]
    engine.up = False
    with pytest.raises(DockerUnavailable):
        adapter_.restart(c.id, 10)
    assert c.restarts == [10, 3]  # never retried behind the caller's back


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("requests_", "expected"),
    [
        (None, ()),
        ([], ()),
        ([{"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]}], ()),
        ([{"Driver": "", "Count": 2, "DeviceIDs": None, "Capabilities": [["gpu"]]}], ("0", "1")),
        (
            [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-a", "GPU-b"], "Capabilities": []}],
            ("GPU-a", "GPU-b"),
        ),
        (  # a non-GPU device request does not grant GPUs
            [{"Driver": "", "Count": 1, "DeviceIDs": None, "Capabilities": [["tpu"]]}],
            (),
        ),
        (
            [
                {"Driver": "", "Count": 0, "DeviceIDs": ["0"], "Capabilities": [["gpu"]]},
                {"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]},
            ],
            (),
        ),
    ],
)
def test_gpu_ids_from_device_requests(requests_: Any, expected: tuple[str, ...]) -> None:
    assert gpu_ids(requests_) == expected


def _proc(tmp_path: Path, mountinfo: str = "", cgroup: str = "") -> Path:
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(cgroup)
    return tmp_path


def test_own_container_from_mountinfo(tmp_path: Path) -> None:
    own = cid("me")
    mountinfo = (
        "600 500 0:52 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l\n"
        f"610 600 8:1 /var/lib/docker/containers/{own}/resolv.conf /etc/resolv.conf rw - ext4 "
        "/dev/sda1 rw\n"
        f"611 600 8:1 /var/lib/docker/containers/{own}/hostname /etc/hostname rw - ext4 "
        "/dev/sda1 rw\n"
    )
    proc = _proc(tmp_path, mountinfo, "0::/\n")
    assert find_own_container_id(proc_self=proc, hostname="", dockerenv=tmp_path / "no") == own


def test_own_container_from_cgroup_v1(tmp_path: Path) -> None:
    own = cid("me")
    cgroup = f"12:pids:/docker/{own}\n11:memory:/docker/{own}\n"
    proc = _proc(tmp_path, "", cgroup)
    assert find_own_container_id(proc_self=proc, hostname="", dockerenv=tmp_path / "no") == own


def test_own_container_from_hostname_only_inside_docker(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "", "0::/\n")
    dockerenv = tmp_path / ".dockerenv"
    assert (
        find_own_container_id(proc_self=proc, hostname="3f2a1b4c5d6e", dockerenv=dockerenv) is None
    )
    dockerenv.write_text("")
    assert (
        find_own_container_id(proc_self=proc, hostname="3f2a1b4c5d6e", dockerenv=dockerenv)
        == "3f2a1b4c5d6e"
    )
    assert find_own_container_id(proc_self=proc, hostname="gpu-box", dockerenv=dockerenv) is None


def test_on_the_host_other_containers_mounts_are_not_mistaken_for_ours(tmp_path: Path) -> None:
    other = cid("other")
    mountinfo = (
        "25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        f"300 25 0:60 / /var/lib/docker/containers/{other}/mounts/shm rw - tmpfs shm rw\n"
    )
    proc = _proc(tmp_path, mountinfo, "0::/user.slice/user-0.slice/session-1.scope\n")
    assert (
        find_own_container_id(proc_self=proc, hostname="gpu-box", dockerenv=tmp_path / "no") is None
    )
