"""The configuration reference in docs/ is checked against the code, so it cannot drift.

`supervisor.config.VARIABLES` and `supervisor.labels.LABELS` are the single sources; every
row of the tables in docs/configuration.md must match them exactly (name, default, accepted
values), and no other `VRAM_*` name or `vram-supervisor.*` label may appear anywhere in the
docs or the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisor.config import VARIABLES
from supervisor.labels import LABELS
from supervisor.sim.profiles import PROFILE_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"


def _rows(text: str, first_cell: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        if re.fullmatch(first_cell, name):
            rows[name] = cells
    return rows


def _unquote(cell: str) -> str:
    return cell.strip().strip("`")


def test_every_variable_is_documented_with_its_default_and_accepted_values() -> None:
    rows = _rows(REFERENCE.read_text(), r"VRAM_[A-Z_]+")
    assert set(rows) == {v.name for v in VARIABLES}, "docs/configuration.md variables drifted"
    for var in VARIABLES:
        cells = rows[var.name]
        assert _unquote(cells[1]) == (var.default or "(unset)"), var.name
        assert cells[2] == var.accepted, var.name


def test_every_label_is_documented_with_its_default_and_accepted_values() -> None:
    rows = _rows(REFERENCE.read_text(), r"vram-supervisor\.[a-z_.-]+")
    assert set(rows) == {label.key for label in LABELS}, "docs/configuration.md labels drifted"
    for label in LABELS:
        cells = rows[label.key]
        assert _unquote(cells[1]) == (label.default or "(required)"), label.key
        assert cells[2] == label.accepted, label.key


@pytest.mark.parametrize(
    "path", sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]), ids=lambda p: p.name
)
def test_docs_name_no_undeclared_variable_or_label(path: Path) -> None:
    text = path.read_text()
    # The simulator's own variable (not the supervisor's) is declared in sim/profiles.py.
    known_vars = {v.name for v in VARIABLES} | {PROFILE_VARIABLE}
    known_labels = {label.key for label in LABELS}
    for name in set(re.findall(r"\bVRAM_[A-Z_]*[A-Z]\b", text)):
        assert name in known_vars, f"{path.name} mentions undeclared variable {name}"
    for key in set(re.findall(r"\bvram-supervisor\.[a-z][a-z_-]*[a-z]\b", text)):
        assert key in known_labels, f"{path.name} mentions undeclared label {key}"


def test_every_tenant_kind_has_a_row_in_the_configuration_reference() -> None:
    from supervisor.tenants import kinds

    text = REFERENCE.read_text()
    section = text.split("### Tenant kinds", 1)[1].split("\n## ", 1)[0]
    rows = _rows(section, r"[a-z0-9-]+")
    assert set(rows) == set(kinds()), "docs/configuration.md tenant kinds drifted"
    for role, kind in kinds().items():
        assert rows[role][2] == str(kind.default_port), role
