"""The event loop each gate's thread runs: uvloop (libuv, in C) when it is installed, else
asyncio's own; VRAM_GATE_LOOP picks one (`auto`, `uvloop`, `asyncio`).

uvloop is a dependency of the package; asyncio's loop stays the fallback for an install
without it. The gate's code is the same on both (its transports are used only through the
asyncio.Transport methods, which uvloop's transports have without deriving from that
class). Why uvloop: docs/benchmarks.md, "Gate overhead: uvloop".
"""

from __future__ import annotations

import asyncio

from loguru import logger

from supervisor.config import GATE_LOOPS as LOOPS


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `choice` names (one of LOOPS). `uvloop` or `auto`
    without uvloop installed: asyncio's loop (asked for by name: with a warning)."""
    if choice not in LOOPS:
        raise ValueError(f"unknown event loop {choice!r}; one of: {', '.join(LOOPS)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                logger.bind(component="gate").warning(
                    "VRAM_GATE_LOOP=uvloop but uvloop is not installed; the gate runs on "
                    "asyncio's own event loop"
                )
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`, for the log line a gate writes when it starts."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
