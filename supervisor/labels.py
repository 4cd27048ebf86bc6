"""Container labels: the one place that declares every `vram-supervisor.*` label.

A container opts in with `vram-supervisor.role`; the other labels are optional. `LABELS` is
the single source for the label reference in docs/ (a test compares the two), so a new label
is added here and nowhere else.

Policy:
- A bad value raises `LabelError` naming the container, the label, the value and what is
  accepted; the caller leaves that container out (and logs it once).
- An unknown `vram-supervisor.*` key is never silently ignored: `unknown_labels()` returns a
  warning for each (most likely a typo).
- How a container's URL is derived when it has no `vram-supervisor.url` label is the rule in
  `derive_url` (also in the docs).

Pure: no Docker import, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from supervisor.config import BOOL_ACCEPTED, URL_ACCEPTED, base_url, bool_word
from supervisor.errors import LabelError
from supervisor.model import ServiceSpec
from supervisor.tenants import kinds, roles

PREFIX = "vram-supervisor."

# Ports the services listen on unless told otherwise: each tenant kind's default.
DEFAULT_PORTS: Mapping[str, int] = {role: k.default_port for role, k in kinds().items()}
_PORTS_TEXT = ", ".join(f"{port} for {role}" for role, port in DEFAULT_PORTS.items())


@dataclass(frozen=True)
class Label:
    """One label: its key, the values it accepts, its default and what it does."""

    key: str
    accepted: str
    default: str  # as a user would read it; "" means required
    help: str


ROLE = Label(
    key=f"{PREFIX}role",
    accepted="one of: " + ", ".join(roles()),
    default="",
    help="Which service the container runs. Required: only containers with this label are "
    "supervised.",
)
URL = Label(
    key=f"{PREFIX}url",
    accepted=URL_ACCEPTED,
    default="derived from the container's network",
    help="Base URL the supervisor uses to reach the service. Without it: host network -> "
    "http://127.0.0.1:<port>; a user-defined network shared with the supervisor -> "
    "http://<container name>:<port>; otherwise the container's IP address on its first "
    "network that has one. Ports: " + _PORTS_TEXT + ".",
)
RESTART = Label(
    key=f"{PREFIX}restart",
    accepted=BOOL_ACCEPTED,
    default="VRAM_RESTART_FALLBACK",
    help="Allow (true) or forbid (false) restarting this ComfyUI container as the last "
    "resort; overrides VRAM_RESTART_FALLBACK for this container.",
)

PRIORITY = Label(
    key=f"{PREFIX}priority",
    accepted="an integer from -999999 to 999999 (e.g. -10, 0, 10)",
    default="0",
    help="Breaks ties of VRAM_PRIORITY between containers: of two tenants that rank the "
    "same there, the one with the higher number keeps its VRAM (its idle models are not "
    "unloaded for the other, and its running work is never cut for it).",
)

LABELS: tuple[Label, ...] = (ROLE, URL, RESTART, PRIORITY)
_KNOWN = frozenset(label.key for label in LABELS)


def parse_role(container_name: str, labels: Mapping[str, str]) -> str | None:
    """The container's role, or None when it does not carry `vram-supervisor.role`.

    Raises LabelError for a value that is not a role (case and surrounding spaces are
    forgiven).
    """
    raw = labels.get(ROLE.key)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in kinds():
        return value
    raise LabelError(container_name, ROLE.key, raw, ROLE.accepted)


def parse_url(container_name: str, raw: str) -> str | None:
    """A `vram-supervisor.url` value as a base URL without a trailing slash.

    An empty value means "not given" (None). Raises LabelError for anything that is not an
    http(s) URL with a host and a valid port.
    """
    try:
        return base_url(raw)
    except ValueError:
        raise LabelError(container_name, URL.key, raw, URL.accepted) from None


def parse_priority(container_name: str, raw: str) -> int:
    value = raw.strip()
    digits = value[1:] if value[:1] in "+-" else value
    if not digits.isascii() or not digits.isdigit() or len(digits) > 6:
        raise LabelError(container_name, PRIORITY.key, raw, PRIORITY.accepted)
    return int(value)


def parse_restart(container_name: str, raw: str) -> bool:
    value = bool_word(raw)
    if value is None:
        raise LabelError(container_name, RESTART.key, raw, RESTART.accepted)
    return value


def parse_labels(
    container_name: str, labels: Mapping[str, str], *, default_url: str
) -> ServiceSpec | None:
    """The service a container's labels describe, or None when it has no role label.

    `default_url` is used when there is no (or an empty) `vram-supervisor.url` label; get
    it from `derive_url`. The spec has no container id or GPUs: the Docker adapter adds
    them. Raises LabelError for the first bad value. Unknown `vram-supervisor.*` keys do not
    fail the parse: see `unknown_labels`.
    """
    role = parse_role(container_name, labels)
    if role is None:
        return None
    url = default_url.rstrip("/")
    if URL.key in labels:
        url = parse_url(container_name, labels[URL.key]) or url
    restart: bool | None = None
    if RESTART.key in labels and labels[RESTART.key].strip():
        restart = parse_restart(container_name, labels[RESTART.key])
    priority = 0
    if PRIORITY.key in labels and labels[PRIORITY.key].strip():
        priority = parse_priority(container_name, labels[PRIORITY.key])
    return ServiceSpec(
        role=role, name=container_name, url=url, restart_allowed=restart, priority=priority
    )


def unknown_labels(container_name: str, labels: Mapping[str, str]) -> tuple[str, ...]:
    """A warning for each `vram-supervisor.*` key that is not declared in LABELS."""
    known = ", ".join(sorted(_KNOWN))
    return tuple(
        f"container {container_name}: unknown label {key} is ignored (a typo?); known: {known}"
        for key in sorted(labels)
        if key.startswith(PREFIX) and key not in _KNOWN
    )


def _host_port(host: str, port: int) -> str:
    # An IPv6 literal needs brackets in a URL.
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def derive_url(
    role: str,
    *,
    network_mode: str,
    networks: Mapping[str, str],
    shared_networks: Set[str],
    container_name: str,
    host_address: str = "127.0.0.1",
) -> str:
    """The base URL of a container that has no `vram-supervisor.url` label.

    The rule, first match wins (port: the kind's default, `DEFAULT_PORTS`):
    1. `network_mode` "host": `http://<host_address>:<port>`. `host_address` is 127.0.0.1
       when the supervisor itself shares the host's network (or runs on the host); a
       supervisor in a bridge network passes its gateway, which is the host.
    2. A user-defined network the supervisor's container is also on (`shared_networks`):
       `http://<container name>:<port>`, resolved by Docker's DNS. The default `bridge`
       network has no such DNS, so it does not count here.
    3. The container's IP on its first network (in the order given) that has one.
    4. Nothing known (a stopped container has no IP; `none` or `container:<id>` network
       modes): `http://<container name>:<port>`, which fails to connect until a later
       pass finds an address, or the user sets `vram-supervisor.url`.

    `networks` maps network name to the IPAddress Docker reports ("" when none).
    """
    port = DEFAULT_PORTS[role]
    if network_mode == "host":
        return _host_port(host_address, port)
    for name in networks:
        if name in shared_networks and name != "bridge":
            return _host_port(container_name, port)
    for ip in networks.values():
        if ip:
            return _host_port(ip, port)
    return _host_port(container_name, port)
