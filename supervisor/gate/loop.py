"""The event loop each gate's thread runs: asyncio's own, or uvloop (libuv, in C) when
VRAM_GATE_LOOP=uvloop and it is installed (`pip install 'vram-supervisor[uvloop]'`; the
image does not ship it).

The gate's code is the same on both: its transports are used only through the
asyncio.Transport methods, which uvloop's transports have without deriving from that
class. On uvloop the loop's own share of a request is about halved. Through h11 that
share was small next to the Python above it, and the time the gate adds did not change
measurably (docs/benchmarks.md, "Gate overhead: uvloop"); through the express lane it
takes off about 0.08 ms at p50 ("Gate overhead: the express lane"). asyncio's loop stays
the default, and the image does not ship uvloop.
"""

from __future__ import annotations

import asyncio

from loguru import logger

from supervisor.config import GATE_LOOPS as LOOPS


def new_event_loop(choice: str = "asyncio") -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `choice` names (one of LOOPS); `uvloop` when it is
    not installed: asyncio's loop, with a warning."""
    if choice not in LOOPS:
        raise ValueError(f"unknown event loop {choice!r}; one of: {', '.join(LOOPS)}")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            logger.bind(component="gate").warning(
                "VRAM_GATE_LOOP=uvloop but uvloop is not installed (pip install "
                "'vram-supervisor[uvloop]'); the gate runs on asyncio's own event loop"
            )
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`, for the line a gate logs when it starts."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
