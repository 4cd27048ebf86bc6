"""Container labels: what a user writes on a container and what the supervisor makes of it."""

from __future__ import annotations

import pytest

from supervisor.errors import LabelError
from supervisor.labels import (
    DEFAULT_PORTS,
    LABELS,
    PREFIX,
    derive_url,
    parse_labels,
    unknown_labels,
)
from supervisor.model import Role, ServiceSpec
from supervisor.tenants import kinds

DERIVED = "http://derived:1"


def test_every_label_is_declared_once_with_the_prefix_and_documented() -> None:
    keys = [label.key for label in LABELS]
    assert keys == sorted(set(keys), key=keys.index)  # no duplicates
    assert set(keys) == {
        "vram-supervisor.role",
        "vram-supervisor.url",
        "vram-supervisor.restart",
        "vram-supervisor.priority",
    }
    for label in LABELS:
        assert label.key.startswith(PREFIX)
        assert label.accepted and label.help


def test_default_ports_are_the_services_own_defaults() -> None:
    assert {role: kind.default_port for role, kind in kinds().items()} == DEFAULT_PORTS
    assert DEFAULT_PORTS[Role.OLLAMA] == 11434 and DEFAULT_PORTS[Role.COMFYUI] == 8188
    assert DEFAULT_PORTS["llama-server"] == 8080 and DEFAULT_PORTS["llama-swap"] == 8080


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            {"vram-supervisor.role": "ollama"},
            ServiceSpec(Role.OLLAMA, "c", DERIVED),
        ),
        (
            {"vram-supervisor.role": " ComfyUI "},
            ServiceSpec(Role.COMFYUI, "c", DERIVED),
        ),
        (
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "true"},
            ServiceSpec(Role.COMFYUI, "c", DERIVED, restart_allowed=True),
        ),
        (
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "False"},
            ServiceSpec(Role.COMFYUI, "c", DERIVED, restart_allowed=False),
        ),
        (
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "no"},
            ServiceSpec(Role.COMFYUI, "c", DERIVED, restart_allowed=False),
        ),
        (
            {"vram-supervisor.role": "LLAMA-SWAP", "vram-supervisor.priority": " -3 "},
            ServiceSpec("llama-swap", "c", DERIVED, priority=-3),
        ),
        (
            {"vram-supervisor.role": "llama-server", "vram-supervisor.priority": "+10"},
            ServiceSpec("llama-server", "c", DERIVED, priority=10),
        ),
        (  # an empty restart label means "use VRAM_RESTART_FALLBACK"
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": ""},
            ServiceSpec(Role.COMFYUI, "c", DERIVED, restart_allowed=None),
        ),
        (
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "http://gpu-box:11434/"},
            ServiceSpec(Role.OLLAMA, "c", "http://gpu-box:11434"),
        ),
        (  # a bare host:port gets http://
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "gpu-box:11434"},
            ServiceSpec(Role.OLLAMA, "c", "http://gpu-box:11434"),
        ),
        (
            {"vram-supervisor.role": "comfyui", "vram-supervisor.url": "https://[::1]:8188"},
            ServiceSpec(Role.COMFYUI, "c", "https://[::1]:8188"),
        ),
        (  # an empty url label falls back to the derived URL
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "  "},
            ServiceSpec(Role.OLLAMA, "c", DERIVED),
        ),
        (  # other tools' labels are none of our business
            {"vram-supervisor.role": "ollama", "com.docker.compose.service": "ollama"},
            ServiceSpec(Role.OLLAMA, "c", DERIVED),
        ),
    ],
)
def test_valid_labels_give_a_service(labels: dict[str, str], expected: ServiceSpec) -> None:
    assert parse_labels("c", labels, default_url=DERIVED) == expected


@pytest.mark.parametrize(
    "labels",
    [{}, {"com.docker.compose.service": "ollama"}, {"vram-supervisor.url": "http://x:1"}],
)
def test_no_role_label_means_not_supervised(labels: dict[str, str]) -> None:
    assert parse_labels("c", labels, default_url=DERIVED) is None


@pytest.mark.parametrize(
    ("labels", "label", "value", "accepted_word"),
    [
        ({"vram-supervisor.role": "olama"}, "vram-supervisor.role", "olama", "ollama, comfyui"),
        ({"vram-supervisor.role": ""}, "vram-supervisor.role", "", "ollama, comfyui"),
        (
            {"vram-supervisor.role": "llama-swap", "vram-supervisor.priority": "high"},
            "vram-supervisor.priority",
            "high",
            "an integer",
        ),
        (
            {"vram-supervisor.role": "llama-swap", "vram-supervisor.priority": "1.5"},
            "vram-supervisor.priority",
            "1.5",
            "an integer",
        ),
        (
            {"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "maybe"},
            "vram-supervisor.restart",
            "maybe",
            "true or false",
        ),
        (
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "ftp://x:21"},
            "vram-supervisor.url",
            "ftp://x:21",
            "http://",
        ),
        (
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "http://x:99999"},
            "vram-supervisor.url",
            "http://x:99999",
            "http://",
        ),
        (
            {"vram-supervisor.role": "ollama", "vram-supervisor.url": "http://:8080"},
            "vram-supervisor.url",
            "http://:8080",
            "http://",
        ),
    ],
)
def test_a_bad_value_names_container_label_value_and_accepted(
    labels: dict[str, str], label: str, value: str, accepted_word: str
) -> None:
    with pytest.raises(LabelError) as caught:
        parse_labels("comfy-1", labels, default_url=DERIVED)
    err = caught.value
    assert (err.container, err.label, err.value) == ("comfy-1", label, value)
    assert accepted_word in err.accepted
    message = str(err)
    assert "comfy-1" in message and label in message and repr(value) in message
    assert accepted_word in message and "ignored" in message


def test_unknown_prefixed_label_is_reported_not_silently_dropped() -> None:
    labels = {
        "vram-supervisor.role": "comfyui",
        "vram-supervisor.restrat": "true",
        "com.example.other": "x",
    }
    spec = parse_labels("comfy", labels, default_url=DERIVED)
    assert spec is not None and spec.restart_allowed is None  # the typo did nothing ...
    warnings = unknown_labels("comfy", labels)  # ... and says so
    assert len(warnings) == 1
    assert "comfy" in warnings[0] and "vram-supervisor.restrat" in warnings[0]
    assert "vram-supervisor.restart" in warnings[0]  # the known ones are listed
    assert unknown_labels("comfy", {"vram-supervisor.role": "comfyui"}) == ()


@pytest.mark.parametrize(
    ("role", "network_mode", "networks", "shared", "kwargs", "expected"),
    [
        (Role.OLLAMA, "host", {"host": ""}, set(), {}, "http://127.0.0.1:11434"),
        (Role.COMFYUI, "host", {"host": ""}, set(), {}, "http://127.0.0.1:8188"),
        (  # supervisor in a bridge network reaches host-network services via its gateway
            Role.OLLAMA,
            "host",
            {"host": ""},
            {"ai"},
            {"host_address": "172.18.0.1"},
            "http://172.18.0.1:11434",
        ),
        (
            Role.OLLAMA,
            "ai_default",
            {"ai_default": "172.18.0.5"},
            {"ai_default"},
            {},
            "http://svc:11434",
        ),
        (  # the shared one wins even when it is not the first
            Role.COMFYUI,
            "front",
            {"front": "172.19.0.2", "gpu": "172.20.0.2"},
            {"gpu"},
            {},
            "http://svc:8188",
        ),
        (  # nothing shared: the IP on the first network that has one
            Role.COMFYUI,
            "a",
            {"a": "", "b": "172.20.0.9", "c": "172.21.0.9"},
            set(),
            {},
            "http://172.20.0.9:8188",
        ),
        (  # the default bridge has no DNS for names: use the IP
            Role.OLLAMA,
            "bridge",
            {"bridge": "172.17.0.3"},
            {"bridge"},
            {},
            "http://172.17.0.3:11434",
        ),
        (Role.OLLAMA, "n", {"n": "fd00::5"}, set(), {}, "http://[fd00::5]:11434"),
        (  # stopped: no IP anywhere -> the name
            Role.OLLAMA,
            "n",
            {"n": ""},
            set(),
            {},
            "http://svc:11434",
        ),
        (Role.COMFYUI, "container:abc", {}, set(), {}, "http://svc:8188"),
    ],
)
def test_derive_url_rule(
    role: Role,
    network_mode: str,
    networks: dict[str, str],
    shared: set[str],
    kwargs: dict[str, str],
    expected: str,
) -> None:
    url = derive_url(
        role,
        network_mode=network_mode,
        networks=networks,
        shared_networks=shared,
        container_name="svc",
        **kwargs,
    )
    assert url == expected


def test_derived_url_is_used_only_without_a_url_label() -> None:
    derived = derive_url(
        Role.OLLAMA,
        network_mode="host",
        networks={},
        shared_networks=set(),
        container_name="ollama",
    )
    spec = parse_labels("ollama", {"vram-supervisor.role": "ollama"}, default_url=derived)
    assert spec is not None and spec.url == "http://127.0.0.1:11434"
    spec = parse_labels(
        "ollama",
        {"vram-supervisor.role": "ollama", "vram-supervisor.url": "http://10.0.0.2:1"},
        default_url=derived,
    )
    assert spec is not None and spec.url == "http://10.0.0.2:1"
