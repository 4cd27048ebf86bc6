"""Settings from the environment: one declared table, one frozen `Settings`.

Every variable is declared once in `VARIABLES` (name, default, accepted values, meaning);
the configuration reference in docs/ is checked against this table by a test. A bad value
raises `ConfigError` naming the variable, the value and what is accepted (the CLI turns it
into exit code 2). An unknown `VRAM_*` name is returned as a warning, since it is most
likely a typo. Pure: reads only the mapping it is given.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from supervisor.errors import ConfigError
from supervisor.model import LogFormat, ServiceSpec
from supervisor.tenants import Capability, kinds, roles

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
BOOL_ACCEPTED = "true or false (also 1/0, yes/no, on/off)"
URL_ACCEPTED = "an http:// or https:// URL (a bare host:port gets http://)"


def bool_word(raw: str) -> bool | None:
    """What an accepted spelling (BOOL_ACCEPTED) means; None for anything else.

    labels.py uses it too, so a label and a variable accept the same words.
    """
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def parse_bool(name: str, raw: str) -> bool:
    value = bool_word(raw)
    if value is None:
        raise ConfigError(name, raw, BOOL_ACCEPTED)
    return value


def _number(
    lo: float, hi: float | None = None, *, integer: bool = False, lo_open: bool = False
) -> tuple[Callable[[str, str], Any], str]:
    kind = "an integer" if integer else "a number"
    lo_word = "greater than" if lo_open else "at least"
    accepted = f"{kind} {lo_word} {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")

    def parse(name: str, raw: str) -> Any:
        if not raw.isascii():  # int() and float() would read "١٢" as 12
            raise ConfigError(name, raw, accepted)
        try:
            value: float = int(raw.strip()) if integer else float(raw.strip())
        except ValueError:
            raise ConfigError(name, raw, accepted) from None
        if not math.isfinite(value) or (value <= lo if lo_open else value < lo):
            raise ConfigError(name, raw, accepted)
        if hi is not None and value > hi:
            raise ConfigError(name, raw, accepted)
        return value

    return parse, accepted


def _choice(values: list[str]) -> tuple[Callable[[str, str], Any], str]:
    accepted = "one of: " + ", ".join(values)

    def parse(name: str, raw: str) -> Any:
        value = raw.strip().lower()
        if value not in values:
            raise ConfigError(name, raw, accepted)
        return value

    return parse, accepted


def base_url(raw: str) -> str | None:
    """`raw` as a base URL without a trailing slash; None when empty (URL_ACCEPTED).

    Raises ValueError for anything that is not an http(s) URL with a host and a valid
    port. labels.py uses it too, so a label and a variable accept the same URLs.
    """
    value = raw.strip().rstrip("/")
    if not value:
        return None
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    parts.port  # noqa: B018 - raises ValueError on a bad port
    return parts.geturl()


def _url() -> tuple[Callable[[str, str], Any], str]:
    def parse(name: str, raw: str) -> Any:
        try:
            return base_url(raw)
        except ValueError:
            raise ConfigError(name, raw, URL_ACCEPTED) from None

    return parse, URL_ACCEPTED


def _port(optional: bool) -> tuple[Callable[[str, str], Any], str]:
    accepted = "a TCP port 1-65535" + (", or 0 to disable" if optional else "")

    def parse(name: str, raw: str) -> Any:
        value = raw.strip()
        if optional and value in ("", "0"):
            return None
        if not value.isascii():
            raise ConfigError(name, raw, accepted)
        try:
            port = int(value)
        except ValueError:
            raise ConfigError(name, raw, accepted) from None
        if not 1 <= port <= 65535:
            raise ConfigError(name, raw, accepted)
        return port

    return parse, accepted


def _folder() -> tuple[Callable[[str, str], Any], str]:
    accepted = "an absolute path of a folder, e.g. /comfyui-models, or empty for none"

    def parse(name: str, raw: str) -> Any:
        value = raw.strip()
        if not value:
            return None
        if not value.startswith("/") or "\0" in value or not value.isprintable():
            raise ConfigError(name, raw, accepted)
        return value

    return parse, accepted


def _bool() -> tuple[Callable[[str, str], Any], str]:
    return parse_bool, BOOL_ACCEPTED


def _host() -> tuple[Callable[[str, str], Any], str]:
    accepted = "an IP address or host name to bind, e.g. 0.0.0.0 or 127.0.0.1"

    def parse(name: str, raw: str) -> Any:
        value = raw.strip().strip("[]")
        if not value or any(c.isspace() or c in "/@" for c in value):
            raise ConfigError(name, raw, accepted)
        try:
            value.encode("idna")  # what binding does with it (a label over 63, a surrogate)
        except UnicodeError:
            raise ConfigError(name, raw, accepted) from None
        return value

    return parse, accepted


def _priority() -> tuple[Callable[[str, str], Any], str]:
    accepted = (
        "balanced, one role, or an ordered comma-separated list of roles (first keeps its "
        "VRAM most); roles: " + ", ".join(roles())
    )

    def parse(name: str, raw: str) -> Any:
        words = [w.strip().lower() for w in raw.split(",")]
        if words == ["balanced"]:
            return "balanced"
        if any(w not in roles() for w in words) or len(set(words)) != len(words):
            raise ConfigError(name, raw, accepted)
        return ",".join(words)

    return parse, accepted


SERVICES_ACCEPTED = (
    "a comma-separated list of role=URL pairs (a role may repeat), e.g. "
    "llama-swap=http://127.0.0.1:8080,comfyui=http://127.0.0.1:8188"
)


def _services() -> tuple[Callable[[str, str], Any], str]:
    accepted = SERVICES_ACCEPTED + "; roles: " + ", ".join(roles())

    def parse(name: str, raw: str) -> Any:
        pairs: list[tuple[str, str]] = []
        for entry in raw.split(","):
            role, sep, url = entry.partition("=")
            role = role.strip().lower()
            if not entry.strip() or not sep or role not in roles():
                raise ConfigError(name, raw, f"{accepted} (bad entry {entry.strip()!r})")
            try:
                parsed = base_url(url)
            except ValueError:
                parsed = None
            if parsed is None:
                raise ConfigError(name, raw, f"{accepted} (bad URL in {entry.strip()!r})")
            pairs.append((role, parsed))
        return tuple(pairs)

    return parse, accepted


def _gated_roles() -> list[str]:
    """The roles a model-server gate can front: kinds that load models on request, other
    than Ollama (whose gate is VRAM_GATE_PORT)."""
    return [
        role
        for role, kind in kinds().items()
        if kind.can(Capability.LOADS_MODELS) and role not in _OWN_GATES
    ]


def _gates() -> tuple[Callable[[str, str], Any], str]:
    accepted = (
        "a comma-separated list of role=port pairs, one per role, e.g. llama-swap=8081 "
        "(ports 1-65535); roles: " + ", ".join(_gated_roles())
    )

    def parse(name: str, raw: str) -> Any:
        pairs: list[tuple[str, int]] = []
        for entry in raw.split(","):
            role, sep, port = entry.partition("=")
            role, port = role.strip().lower(), port.strip()
            ok = sep and role in _gated_roles() and port.isdecimal()
            if not ok or not 1 <= int(port) <= 65535 or role in dict(pairs):
                raise ConfigError(name, raw, f"{accepted} (bad entry {entry.strip()!r})")
            pairs.append((role, int(port)))
        return tuple(pairs)

    return parse, accepted


# Roles whose gates have variables of their own (VRAM_GATE_PORT, VRAM_COMFYUI_GATE_PORT).
_OWN_GATES = frozenset({"ollama", "comfyui"})


@dataclass(frozen=True)
class Variable:
    name: str
    field: str
    default: str  # as a user would write it; "" means unset
    parse: Callable[[str, str], Any]
    accepted: str
    help: str


def _var(
    name: str, field: str, default: str, parser: tuple[Callable[[str, str], Any], str], help: str
) -> Variable:
    return Variable(name, field, default, parser[0], parser[1], help)


# The event loops a gate may run on (VRAM_GATE_LOOP; supervisor/gate/loop.py).
GATE_LOOPS = ("asyncio", "uvloop")

VARIABLES: tuple[Variable, ...] = (
    _var(
        "VRAM_CHECK_INTERVAL",
        "check_interval_s",
        "5",
        _number(0, 3600, lo_open=True),
        "Longest gap between two observations, in seconds. The loop polls faster while "
        "something is in motion (a load, a free being verified, a queued prompt).",
    ),
    _var(
        "VRAM_THRESHOLD",
        "threshold_percent",
        "75",
        _number(1, 100),
        "Free ComfyUI when GPU memory use reaches this percentage.",
    ),
    _var(
        "VRAM_AGGRESSIVE_THRESHOLD",
        "aggressive_threshold_percent",
        "85",
        _number(1, 100),
        "Escalate to the hard free when use is still at or above this percentage.",
    ),
    _var(
        "VRAM_MIN_FREE_INTERVAL",
        "min_free_interval_s",
        "30",
        _number(0),
        "At most one free episode per this many seconds (escalations within an episode "
        "are not limited by it).",
    ),
    _var("VRAM_DEBUG", "debug", "false", _bool(), "Log at DEBUG level."),
    _var(
        "VRAM_LOG_FORMAT",
        "log_format",
        "text",
        _choice(["text", "json"]),
        "Log lines as text or as one JSON object per line.",
    ),
    _var(
        "VRAM_OLLAMA_URL",
        "ollama_url",
        "",
        _url(),
        "Fixed Ollama endpoint; when set, no Docker discovery is needed for Ollama.",
    ),
    _var(
        "VRAM_COMFYUI_URL",
        "comfyui_url",
        "",
        _url(),
        "Fixed ComfyUI endpoint; when set, no Docker discovery is needed for ComfyUI.",
    ),
    _var(
        "VRAM_SERVICES",
        "services",
        "",
        _services(),
        "Fixed endpoints of any tenant kinds, as role=URL pairs; when set, Docker is not "
        "used (with VRAM_OLLAMA_URL and VRAM_COMFYUI_URL, which add to it).",
    ),
    _var(
        "VRAM_PRIORITY",
        "priority",
        "balanced",
        _priority(),
        "Who yields when tenants need the same GPU (docs/policy.md has the rule): balanced "
        "ranks every role the same; a role, or a list of roles, ranks them first in that "
        "order. A job server's running work is cut only for a tenant ranked above it; a "
        "model server's idle models are unloaded for a job server unless it ranks above "
        "it. ollama: never unloads Ollama for ComfyUI and frees ComfyUI even while busy; "
        "comfyui: never frees ComfyUI while it has work.",
    ),
    _var(
        "VRAM_HEAL",
        "heal",
        "true",
        _bool(),
        "Repair Ollama models that spilled to the CPU (unload, make room, reload).",
    ),
    _var(
        "VRAM_HEAL_COOLDOWN",
        "heal_cooldown_s",
        "600",
        _number(0),
        "Never heal the same model again within this many seconds.",
    ),
    _var(
        "VRAM_RESTART_FALLBACK",
        "restart_fallback",
        "false",
        _bool(),
        "Allow restarting a ComfyUI container that keeps its VRAM after a hard free "
        "(the label vram-supervisor.restart overrides it per container).",
    ),
    _var(
        "VRAM_RESTART_COOLDOWN",
        "restart_cooldown_s",
        "600",
        _number(0),
        "At most one restart of the same ComfyUI container per this many seconds.",
    ),
    _var(
        "VRAM_VERIFY_TIMEOUT",
        "verify_timeout_s",
        "10",
        _number(0, lo_open=True),
        "How long a free is watched for the VRAM to come back before it is judged.",
    ),
    _var(
        "VRAM_REQUEST_TIMEOUT",
        "request_timeout_s",
        "5",
        _number(0, lo_open=True),
        "Timeout for one request to Ollama, ComfyUI or Docker (model loads get longer).",
    ),
    _var(
        "VRAM_DRY_RUN",
        "dry_run",
        "false",
        _bool(),
        'Decide and log ("DRY RUN: would ...") but send nothing.',
    ),
    _var(
        "VRAM_HTTP_PORT",
        "http_port",
        "9105",
        _port(optional=True),
        "Port of /healthz and /metrics; 0 disables the endpoint.",
    ),
    _var(
        "VRAM_HTTP_HOST",
        "http_host",
        "0.0.0.0",
        _host(),
        "Address the /healthz and /metrics endpoint binds to.",
    ),
    _var(
        "VRAM_GATE_PORT",
        "gate_port",
        "",
        _port(optional=True),
        "Enable the Ollama gate (a reverse proxy that makes room before a load) on this "
        "port; unset disables it.",
    ),
    _var("VRAM_GATE_HOST", "gate_host", "0.0.0.0", _host(), "Address the Ollama gate binds to."),
    _var(
        "VRAM_GATE_WAIT",
        "gate_wait_s",
        "30",
        _number(0),
        "Longest time the gate holds a request while making room, then forwards anyway.",
    ),
    _var(
        "VRAM_GATE_LOOP",
        "gate_loop",
        "asyncio",
        _choice(list(GATE_LOOPS)),
        "The event loop the gates run on: asyncio (Python's own) or uvloop (when "
        "installed, not in the image; measured: about 0.08 ms less added per request).",
    ),
    _var(
        "VRAM_GATE_EXPRESS",
        "gate_express",
        "true",
        _bool(),
        "Serve plain requests that need no waiting by the gates' express lane (httptools, "
        "in callbacks); false sends every request by the general path (h11), which adds "
        "more than twice the latency.",
    ),
    _var(
        "VRAM_MODEL_GATES",
        "model_gates",
        "",
        _gates(),
        "Enable a gate in front of model servers of other kinds: on each port, a reverse "
        "proxy to the running servers of that role (each load to the server that offers "
        "its model) that frees the idle job servers on their GPUs before one loads a "
        "model, bound to VRAM_GATE_HOST; unset: none.",
    ),
    _var(
        "VRAM_COMFYUI_GATE_PORT",
        "comfyui_gate_port",
        "",
        _port(optional=True),
        "Enable the image gate (a reverse proxy in front of ComfyUI that makes room before "
        "a job) on this port, bound to VRAM_GATE_HOST; unset disables it.",
    ),
    _var(
        "VRAM_COMFYUI_MODELS",
        "comfyui_models_dir",
        "",
        _folder(),
        "ComfyUI's models folder mounted into the supervisor (read-only): the image gate "
        "sizes a job it has not seen run yet from its model files there; unset: 8 GiB.",
    ),
)


_BY_NAME = {v.name: v for v in VARIABLES}
# Variables of the earlier single script that mean nothing here; accepted silently.
_LEGACY_IGNORED = frozenset({"VRAM_OLLAMA_HOST", "VRAM_COMFYUI_HOST"})


@dataclass(frozen=True)
class Settings:
    check_interval_s: float = 5.0
    threshold_percent: float = 75.0
    aggressive_threshold_percent: float = 85.0
    min_free_interval_s: float = 30.0
    debug: bool = False
    log_format: LogFormat = LogFormat.TEXT
    ollama_url: str | None = None
    comfyui_url: str | None = None
    services: tuple[tuple[str, str], ...] | None = None  # VRAM_SERVICES: (role, URL) pairs
    priority: str = "balanced"  # "balanced" or roles, comma-separated, first ranks highest
    heal: bool = True
    heal_cooldown_s: float = 600.0
    restart_fallback: bool = False
    restart_cooldown_s: float = 600.0
    verify_timeout_s: float = 10.0
    request_timeout_s: float = 5.0
    dry_run: bool = False
    http_port: int | None = 9105
    http_host: str = "0.0.0.0"
    gate_port: int | None = None
    gate_host: str = "0.0.0.0"
    gate_wait_s: float = 30.0
    gate_loop: str = "asyncio"
    gate_express: bool = True
    comfyui_gate_port: int | None = None
    comfyui_models_dir: str | None = None  # VRAM_COMFYUI_MODELS
    model_gates: tuple[tuple[str, int], ...] | None = None  # VRAM_MODEL_GATES: (role, port)

    @property
    def needs_docker(self) -> bool:
        """Docker is needed unless VRAM_SERVICES is set or both the Ollama and the ComfyUI
        have fixed URLs."""
        if self.services:
            return False
        return self.ollama_url is None or self.comfyui_url is None

    @property
    def fixed_services(self) -> tuple[tuple[str, str], ...]:
        """Every fixed endpoint as (role, URL): VRAM_OLLAMA_URL, VRAM_COMFYUI_URL, then
        VRAM_SERVICES in its order."""
        pairs = [("ollama", self.ollama_url), ("comfyui", self.comfyui_url)]
        fixed = tuple((role, url) for role, url in pairs if url)
        return fixed + tuple(self.services or ())

    def rank(self, spec: ServiceSpec) -> tuple[int, int]:
        """How strongly a tenant keeps its VRAM: its role's place in VRAM_PRIORITY (a role
        listed earlier ranks higher, unlisted roles lowest, balanced all the same), then
        its `vram-supervisor.priority` label."""
        order = [] if self.priority == "balanced" else self.priority.split(",")
        role_rank = len(order) - order.index(spec.role) if spec.role in order else 0
        return role_rank, spec.priority

    def outranks(self, a: ServiceSpec, b: ServiceSpec) -> bool:
        """`a` ranks strictly above `b` (see `rank`)."""
        return self.rank(a) > self.rank(b)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.75)
    return f"did you mean {close[0]}?" if close else "a typo?"


def load_settings(env: Mapping[str, str]) -> tuple[Settings, list[str]]:
    """Parse the environment. Returns the settings and warnings (unknown VRAM_* names).

    Raises ConfigError on the first bad value; an empty value means "use the default".
    """
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = env.get(var.name, "")
        if raw.strip() == "":
            raw = var.default
            if raw == "":
                values[var.field] = None
                continue
        values[var.field] = var.parse(var.name, raw)
    if values["aggressive_threshold_percent"] < values["threshold_percent"]:
        raise ConfigError(
            "VRAM_AGGRESSIVE_THRESHOLD",
            env.get("VRAM_AGGRESSIVE_THRESHOLD", "85"),
            f"a percentage at or above VRAM_THRESHOLD ({values['threshold_percent']:g})",
        )
    values["log_format"] = LogFormat(values["log_format"])
    warnings = [
        f"Unknown variable {name} is ignored ({_did_you_mean(name)}); known: "
        + ", ".join(sorted(_BY_NAME))
        for name in sorted(env)
        if name.startswith("VRAM_") and name not in _BY_NAME and name not in _LEGACY_IGNORED
    ]
    return Settings(**values), warnings
