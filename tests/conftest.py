"""Suite-wide test configuration; kept minimal on purpose.

Fixtures live next to the tests that use them (tests/<dir>/conftest.py). The one rule
here: every test under tests/integration/ carries the `integration` marker (it needs a
real Docker engine, which `tests/run` provides), so `-m integration` and
`-m "not integration"` select exactly that directory without each module marking itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
