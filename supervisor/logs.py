"""Logging setup, done once by the CLI; every other module only `logger.bind(...)`s and logs.

Everything goes to stderr (what `docker logs` shows). Text lines for people, or with
VRAM_LOG_FORMAT=json one JSON object per line: `time`, `level`, `message`, the fields bound
with `logger.bind`, and `exception` when there is one. Warnings from libraries that use the
stdlib `logging` module (docker, urllib3, httpx) are routed into the same sink.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any, TextIO

from loguru import logger

from supervisor.model import LogFormat

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


class _JsonSink:
    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, message: Any) -> None:
        record = message.record
        data: dict[str, Any] = {
            "time": record["time"].isoformat(),
            "level": record["level"].name,
            "message": record["message"],
        }
        for key, value in record["extra"].items():
            data.setdefault(key, value if isinstance(value, int | float | bool) else str(value))
        exc = record["exception"]
        if exc is not None and exc.type is not None:
            data["exception"] = "".join(
                traceback.format_exception(exc.type, exc.value, exc.traceback)
            ).rstrip()
        # Resolved at write time so tests that swap sys.stderr see the lines.
        stream = self._stream or sys.stderr
        stream.write(json.dumps(data, default=str) + "\n")
        stream.flush()


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(
            level, f"{record.name}: {record.getMessage()}"
        )


def configure_logging(
    *, debug: bool = False, log_format: LogFormat = LogFormat.TEXT, stream: TextIO | None = None
) -> None:
    """Replace every loguru handler with one stderr handler at INFO (or DEBUG)."""
    level = "DEBUG" if debug else "INFO"
    logger.remove()
    if log_format is LogFormat.JSON:
        logger.add(_JsonSink(stream), level=level, format="{message}", backtrace=False)
    else:
        logger.add(
            stream if stream is not None else _StderrProxy(),
            level=level,
            format=TEXT_FORMAT,
            backtrace=False,
            diagnose=False,  # diagnose prints variable values: could leak secrets
            colorize=False,
        )
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)


class _StderrProxy:
    """Writes to whatever sys.stderr is at the time of the write."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
