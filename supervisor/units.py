"""Byte units and the one way sizes are written for users (logs, `status`, notes).

Pure: imports nothing, so the policy can use it without pulling in an I/O library.
"""

from __future__ import annotations

MIB = 1024**2
GIB = 1024**3


def format_bytes(value: int | None) -> str:
    """12.3 GiB / 512 MiB / unknown: the sizes users see in logs and `status`."""
    if value is None:
        return "unknown"
    if abs(value) >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB"
