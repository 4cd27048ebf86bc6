"""`vram-supervisor demo`: the real supervisor against a simulated GPU host, narrated.

No GPU and no Docker needed. A 24 GiB simulated GPU, a fake Ollama and a fake ComfyUI
run on 127.0.0.1 (ephemeral ports); the real supervisor (loop, policy, actions, Ollama
gate) runs in this process against them, and its log lines are shown prefixed with
"supervisor |". Three steps: ComfyUI keeps a checkpoint in VRAM; a chat through the gate
gets its model wholly on the GPU because room is made before the load; a model that
spilled to the CPU is healed. Then a summary. Exit 0 when every step did what it says,
1 when one did not (the reason is printed), 130 on Ctrl-C. Runs in well under a minute.

Output goes to stdout, plain ASCII; colour only on a terminal without NO_COLOR.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence

from loguru import logger

from supervisor import __version__
from supervisor.demo.console import Console, SupervisorLog, gib
from supervisor.demo.scenario import Scenario, big_model, checkpoint, run_steps
from supervisor.demo.world import CHECK_INTERVAL_S, TIME_SCALE, DemoFailure, World

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _introduce(console: Console, world: World) -> None:
    g = world.gpu()
    catalog = world.host.catalog
    console.line(console.bold(f"vram-supervisor {__version__} demo"))
    console.say(
        "One GPU, two hungry services: Ollama (chat models) and ComfyUI (image generation). "
        "Each grabs VRAM as if it were alone. This demo runs the real supervisor against a "
        "simulated machine, so no GPU and no Docker are needed:",
        indent="",
    )
    console.line(f"  - a simulated GPU: {g.name}, {gib(g.total)}")
    console.line(
        f"  - a fake Ollama at {world.host.ollama_url} "
        f"({len(catalog.models)} models installed, {big_model(world.host.profile)} among them; "
        f"it plays Ollama {world.host.ollama_config.version})"
    )
    console.line(
        f"  - a fake ComfyUI at {world.host.comfyui_url} (with {checkpoint(world.host.profile)})"
    )
    console.line(
        f"  - simulated time runs at {1 / TIME_SCALE:.1f}x speed; the supervisor checks "
        f"every {CHECK_INTERVAL_S:g} s"
    )
    console.say(
        "Lines starting with 'supervisor |' are the supervisor's own log, as `vram-supervisor "
        "run` would print it.",
        indent="",
    )
    console.line()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; the exit code says whether every step did what it claims."""
    del argv  # no options: colour follows the terminal and NO_COLOR
    started = time.monotonic()
    console = Console()
    log = SupervisorLog(console)
    logger.remove()  # the demo shows the supervisor's log its own way
    sink = logger.add(log, level="INFO", format="{message}", backtrace=False, diagnose=False)
    failure: str | None = None
    code = EXIT_OK
    try:
        with World() as world:
            world.start_host()
            _introduce(console, world)
            world.start_supervisor()
            world.wait_next_pass()
            scenario = Scenario(world, console, log)
            try:
                run_steps(scenario)
            except DemoFailure as exc:
                failure, code = str(exc), EXIT_FAILED
            except KeyboardInterrupt:
                failure, code = "interrupted", EXIT_INTERRUPTED
            except Exception as exc:  # noqa: BLE001 - a bug: in the summary, traceback kept
                traceback.print_exc()
                failure, code = f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED
            scenario.summary(time.monotonic() - started, failure)
    except (DemoFailure, OSError) as exc:  # the world itself could not start
        console.line(console.red(f"Demo FAILED before the first step: {exc}"))
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        logger.remove(sink)
        logger.add(sys.stderr, level="INFO")
    return code


if __name__ == "__main__":
    sys.exit(main())
