"""The registry of GPU tenant kinds: which services the supervisor knows, and what each can do.

A tenant kind is one module in this package that declares `KIND = TenantKind(...)`: the
role value of its `vram-supervisor.role` label (also its name in `VRAM_SERVICES` and
`VRAM_PRIORITY`), its default port, the capabilities it has, the client that reads and
acts on it (named as "module:Class", imported only when a service of that kind is used),
and the requests that make it load a model (for the gate). The registry finds the kind
modules by listing this package, so adding a kind adds a module here and changes no other
file of the core: labels, configuration, observation, policy, actions, `status`, `doctor`
and metrics work on the registry and on capabilities.

Pure: the kind modules import nothing but this module and `supervisor.model`; clients are
imported lazily by `make_client`. Policy code never imports this package: an observation
carries the capabilities of its service.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import Any


class Capability(StrEnum):
    """What the supervisor may do with a tenant of a kind."""

    # Loads models on request and can be told to unload one: its loads can be gated, its
    # idle models unloaded when a job server needs the room.
    LOADS_MODELS = "loads-models"
    # Runs jobs from a queue and can be told to free its memory between jobs.
    RUNS_JOBS = "runs-jobs"
    # Can be put to sleep (its VRAM given back, the process kept) and woken.
    SLEEPS = "sleeps"
    # May be restarted through Docker as the last resort (never during a job).
    RESTARTABLE = "restartable"


@dataclass(frozen=True)
class ModelRoutes:
    """The requests by which a client makes a model server load a model (for the gate).

    `body_paths`: POST paths whose JSON body names the model in `"model"`; `query_paths`:
    GET paths that name it in the query parameter `model`; `form_paths`: POST paths whose
    multipart form names it in the field `model`. A trailing `*` matches a prefix.
    """

    body_paths: tuple[str, ...] = ()
    query_paths: tuple[str, ...] = ()
    form_paths: tuple[str, ...] = ()

    def names_model(self, method: str, path: str) -> str | None:
        """Where a request names its model: "body", "query", "form", or None."""
        for where, paths in (
            ("body", self.body_paths if method == "POST" else ()),
            ("form", self.form_paths if method == "POST" else ()),
            ("query", self.query_paths if method == "GET" else ()),
        ):
            for p in paths:
                if path == p or (p.endswith("*") and path.startswith(p[:-1])):
                    return where
        return None


# The OpenAI-style routes llama-server, llama-swap and vLLM load a model for (tenants.md).
OPENAI_BODY_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
    "/v1/audio/speech",
)


@dataclass(frozen=True)
class TenantKind:
    """One kind of GPU tenant, declared once in its module (`KIND`)."""

    role: str  # the label's value: lower case, letters, digits and "-"
    title: str  # how logs and `status` name the product, e.g. "llama-swap"
    default_port: int
    capabilities: frozenset[Capability]
    client: str  # "module:Class": built with the base URL and the request timeout
    summary: str  # one line for the docs and `doctor`
    routes: ModelRoutes = field(default_factory=ModelRoutes)

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities


@cache
def kinds() -> dict[str, TenantKind]:
    """Every kind in this package, by role (modules found by listing the package)."""
    found: dict[str, TenantKind] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        kind = getattr(module, "KIND", None)
        if not isinstance(kind, TenantKind):
            continue
        if kind.role in found:
            raise RuntimeError(f"two tenant kinds declare the role {kind.role!r}")
        found[kind.role] = kind
    return dict(sorted(found.items(), key=lambda kv: _BUILTIN_ORDER.get(kv[0], 99)))


# Ollama and ComfyUI first (in messages and docs), then the rest by name.
_BUILTIN_ORDER = {"ollama": 0, "comfyui": 1}


def roles() -> tuple[str, ...]:
    return tuple(kinds())


def kind_of(role: str) -> TenantKind:
    """The kind of a role; KeyError for a role no module declares."""
    return kinds()[role]


def make_client(role: str, url: str, **options: Any) -> Any:
    """Build the client of a kind for `url` (imports its module on first use)."""
    module_name, _, class_name = kind_of(role).client.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module_name), class_name)
    return factory(url, **options)
