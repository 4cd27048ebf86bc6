"""The policy stays pure: importing any of its modules pulls in no I/O library (checked in
a fresh interpreter, since this test process has them all loaded already), and no module
of the package reads the clock. New modules in supervisor/policy/ are covered by the glob.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "supervisor" / "policy"
SOURCES = sorted(PACKAGE.glob("*.py"))
MODULES = [
    "supervisor.policy" if f.stem == "__init__" else f"supervisor.policy.{f.stem}" for f in SOURCES
]
FORBIDDEN = ("docker", "httpx", "pynvml", "requests", "loguru", "urllib3", "tenacity")
# The pure layer below the policy: model, config (which imports errors) and units.
ALLOWED = {"supervisor", "supervisor.model", "supervisor.config", "supervisor.errors"}
ALLOWED |= {"supervisor.units", *MODULES}
# The tenant registry (config checks roles against it): pure declarations, one per kind.
TENANTS = ROOT / "supervisor" / "tenants"
ALLOWED |= {"supervisor.tenants", *(f"supervisor.tenants.{f.stem}" for f in TENANTS.glob("*.py"))}

PROBE = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("supervisor"))))
"""


def test_the_package_has_its_modules() -> None:
    # Guards the glob: an empty or moved package would make the tests below vacuous.
    assert {"__init__", "core", "guards", "episodes"} <= {f.stem for f in SOURCES}


@pytest.mark.parametrize("module", MODULES)
def test_policy_module_imports_no_io_library(module: str) -> None:
    code = PROBE.format(module=module, forbidden=set(FORBIDDEN))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    io_modules, ours = (json.loads(line) for line in done.stdout.splitlines())
    assert io_modules == []
    assert set(ours) <= ALLOWED, sorted(set(ours) - ALLOWED)


@pytest.mark.parametrize("source", sorted(TENANTS.glob("*.py")), ids=lambda f: f.name)
def test_tenant_kind_modules_import_only_the_registry(source: Path) -> None:
    # A kind names its client as "module:Class"; importing the client here would pull
    # httpx into the policy (config lists the roles).
    imports = [
        line.split()[1]
        for line in source.read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]
    assert set(imports) <= {
        "__future__",
        "supervisor.tenants",
        "importlib",
        "pkgutil",
        "collections.abc",
        "dataclasses",
        "enum",
        "functools",
        "typing",
    }


@pytest.mark.parametrize("source", SOURCES, ids=lambda f: f.name)
def test_policy_source_never_reads_the_clock(source: Path) -> None:
    text = source.read_text()
    for forbidden in ("import time", "from time", "monotonic(", "datetime.now", "time.time"):
        assert forbidden not in text


@pytest.mark.parametrize("module", ["supervisor.ollama_actions", "supervisor.tenant_actions"])
def test_per_kind_action_modules_do_not_import_the_actor(module: str) -> None:
    # One direction only: actions (the Actor) imports them; they see it through
    # ports.ActorPort. (The import cycle actions <-> ollama_actions is gone.)
    code = PROBE.format(module=module, forbidden=set(FORBIDDEN))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout.splitlines()[1])
    assert "supervisor.actions" not in ours and "supervisor.observe" not in ours
