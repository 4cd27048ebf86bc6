"""What the demo prints: narration, figures, and the supervisor's own log lines.

Everything goes to stdout, one whole line at a time under one lock, so the supervisor's
lines (written from its own threads) never tear the narration. Plain ASCII; colour only
when stdout is a terminal and NO_COLOR is unset, so CI logs and pipes stay clean.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

GIB = 1024**3
MIB = 1024**2
WIDTH = 92
SUPERVISOR_PREFIX = "    supervisor | "


def gib(value: int | float | None) -> str:
    if value is None:
        return "unknown"
    if abs(value) < GIB:
        return f"{value / MIB:.0f} MiB"
    return f"{value / GIB:.1f} GiB"


def percent(part: int, whole: int) -> int:
    return round(100 * part / whole) if whole else 0


def wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Console:
    def __init__(self, stream: TextIO | None = None, colour: bool | None = None) -> None:
        self._stream = stream or sys.stdout
        self._colour = wants_colour(self._stream) if colour is None else colour
        self._lock = threading.Lock()

    def _style(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._colour else text

    def bold(self, text: str) -> str:
        return self._style("1", text)

    def green(self, text: str) -> str:
        return self._style("32", text)

    def red(self, text: str) -> str:
        return self._style("31", text)

    def dim(self, text: str) -> str:
        return self._style("2", text)

    def line(self, text: str = "") -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def heading(self, text: str) -> None:
        self.line()
        self.line(self.bold(text))
        self.line(self.bold("-" * len(text)))

    def say(self, text: str, indent: str = "  ") -> None:
        """A paragraph of narration, wrapped."""
        for part in textwrap.wrap(text, WIDTH - len(indent)) or [""]:
            self.line(indent + part)

    def supervisor(self, message: str) -> None:
        first, *rest = message.splitlines() or [""]
        self.line(self.dim(SUPERVISOR_PREFIX + first))
        for more in rest:
            self.line(self.dim(" " * len(SUPERVISOR_PREFIX) + more))


@dataclass
class LogLine:
    at: float  # monotonic
    level: str
    message: str


@dataclass
class SupervisorLog:
    """A loguru sink: shows each of the supervisor's log lines and keeps them to be read."""

    console: Console
    lines: list[LogLine] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, message: Any) -> None:
        record = message.record
        level = record["level"].name
        text = record["message"]
        shown = text if level in ("INFO", "SUCCESS") else f"{level}: {text}"
        self.console.supervisor(shown)
        with self._cond:
            self.lines.append(LogLine(time.monotonic(), level, text))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, since: int, timeout_s: float) -> re.Match[str] | None:
        """The first line from index `since` on matching `pattern`, waiting up to
        `timeout_s`; None when none came."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    found = regex.search(line.message)
                    if found:
                        return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def matches(self, pattern: str, since: int = 0) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        with self._cond:
            found = [regex.search(line.message) for line in self.lines[since:]]
        return [m for m in found if m is not None]

    def problems(self, since: int = 0) -> list[str]:
        with self._cond:
            return [
                f"{line.level}: {line.message}"
                for line in self.lines[since:]
                if line.level in ("WARNING", "ERROR", "CRITICAL")
            ]
