"""The namespaced-engine delegation of the engine-changing integration tests: under CI a
missing tool fails the test (a CI machine must run it), and the delegating tests' time
limit covers everything the delegation may take."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.integration import namespaced_engine as ne

INTEGRATION = Path(__file__).parents[1] / "integration"


def _missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ne, "missing_for_a_namespaced_engine", lambda: ["root", "nsenter"])


def test_missing_tools_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch)
    monkeypatch.setenv("CI", "true")
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
        ne.run_in_a_namespaced_engine("tests/x.py::t", "base", "restarts the Docker engine")
    assert info.type is pytest.fail.Exception, "skipped under CI"
    assert "needs root, nsenter" in str(info.value) and "under CI" in str(info.value)


def test_missing_tools_skip_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root, nsenter"):
        ne.run_in_a_namespaced_engine("tests/x.py::t", "base", "restarts the Docker engine")


def _timeout_marks(path: Path) -> dict[str, str]:
    """Test functions that delegate, with the argument of their pytest.mark.timeout."""
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and "run_in_a_namespaced_engine" in ast.unparse(node):
            marks = [ast.unparse(d) for d in node.decorator_list if "timeout" in ast.unparse(d)]
            out[node.name] = marks[0] if marks else ""
    return out


@pytest.mark.parametrize("name", ["test_swarm.py", "test_supervisor_zz_daemon_restart.py"])
def test_delegating_tests_may_run_as_long_as_the_delegation(name: str) -> None:
    marks = _timeout_marks(INTEGRATION / name)
    assert marks and all(m == "pytest.mark.timeout(DELEGATING_TIMEOUT_S)" for m in marks.values())
    may_take = 2 * ne.DOCKERD_TIMEOUT_S + ne.LOAD_TIMEOUT_S + ne.CHILD_TIMEOUT_S
    assert may_take < ne.DELEGATING_TIMEOUT_S
