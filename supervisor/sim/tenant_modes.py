"""The `python -m supervisor.sim` modes of the registry's other tenant kinds: each is a
function (gpu, args) -> (fake, started server) plus the options it adds to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from supervisor.sim.gpu import SimGpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.invokeai import VERSION as INVOKEAI_VERSION
from supervisor.sim.invokeai import FakeInvokeAI, InvokeConfig
from supervisor.sim.sdwebui import VARIANTS, VERSIONS, FakeSdWebUI, SdConfig


def _invokeai_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("invokeai")
    group.add_argument("--model-gib", type=float, default=6.5, help="InvokeAI: size of a model, GB")


def _invokeai(gpu: SimGpu, args: argparse.Namespace) -> tuple[Any, SimServer]:
    fake = FakeInvokeAI(gpu, InvokeConfig(time_scale=args.time_scale, model_gib=args.model_gib))
    server = fake.serve(args.host, args.port if args.port is not None else 9090, args.verbose)
    print(f"sim: fake InvokeAI {INVOKEAI_VERSION} listening on {server.url}", flush=True)
    return fake, server


def _sdwebui_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sd-webui")
    group.add_argument("--variant", choices=VARIANTS, default="a1111", help="sd-webui: which")
    group.add_argument(
        "--api", action="store_true", help="sd-webui: register /sdapi (A1111, Forge)"
    )
    group.add_argument(
        "--checkpoint-gib", type=float, default=6.5, help="sd-webui: checkpoint size, GB"
    )


def _sdwebui(gpu: SimGpu, args: argparse.Namespace) -> tuple[Any, SimServer]:
    config = SdConfig(
        variant=args.variant,
        api=args.api,
        time_scale=args.time_scale,
        checkpoint_gib=args.checkpoint_gib,
    )
    fake = FakeSdWebUI(gpu, config)
    server = fake.serve(args.host, args.port if args.port is not None else 7860, args.verbose)
    api = "API on" if config.api or config.variant == "sdnext" else "no --api"
    print(
        f"sim: fake sd-webui {config.variant} {VERSIONS[config.variant]} ({api}) "
        f"listening on {server.url}",
        flush=True,
    )
    return fake, server


EXTRA_MODES: dict[str, Callable[[SimGpu, argparse.Namespace], tuple[Any, SimServer]]] = {
    "invokeai": _invokeai,
    "sd-webui": _sdwebui,
}
EXTRA_ARGUMENTS: list[Callable[[argparse.ArgumentParser], None]] = [
    _invokeai_arguments,
    _sdwebui_arguments,
]
