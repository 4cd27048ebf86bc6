"""The soak's faults: a seeded schedule, and how each one is done and undone on the host.

Faults come one after another (gaps drawn from an exponential distribution), in rounds:
each round is every kind once, in a seeded random order, so even a short soak sees each
kind. Times and durations are simulated seconds; `delay_s` of a slow service and the clock
step are real seconds (what the supervisor's own timeouts and wall clock see).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.soak.host import GpuFaults
from tests.soak.proxy import FaultProxy

GIB = 1024**3

KINDS: dict[str, str] = {
    "crash": "the service's process dies (port refuses, VRAM released), then a fresh one starts",
    "hang": "the service accepts connections and never answers, then recovers",
    "garbage": "the service answers 200 with a body that is not its API's",
    "error": "the service answers every request with 500",
    "slow": "the service answers every request after a delay",
    "nvml_error": "NVML calls fail with NVML_ERROR_UNKNOWN",
    "nvml_lost": "NVML calls fail with NVML_ERROR_GPU_IS_LOST (the card disappears)",
    "outsider": "a process outside every tenant takes VRAM, then exits",
    "clock_jump": "the supervisor's wall clock steps (monotonic time does not)",
}
SERVICE_KINDS = ("crash", "hang", "garbage", "error", "slow")
# The Ollama faults that make the upstream of the gate "not up" (a slow Ollama is up).
OLLAMA_DOWN_KINDS = ("crash", "hang", "garbage", "error")

# The Docker-backed form's faults (tests/soak/docker_soak.py).
DOCKER_KINDS: dict[str, str] = {
    "recreate": "the container is removed and created again: same name, new id",
    "rename": "the container is renamed, later renamed back",
    "user_stop": "the user stops the container, later starts it again",
    "unlabel": "the container is recreated without its role label, later with it",
    "event_burst": "short-lived containers, labelled and not: hundreds of Docker events",
    "daemon_restart": "the Docker engine stops (its containers with it) and starts again; "
    "their restart policy brings the containers back",
}
# Faults that leave the gate without an Ollama to forward to (a daemon restart stops both
# containers: its fault names no target).
DOCKER_DOWN_KINDS = ("recreate", "user_stop", "unlabel", "daemon_restart")
# Faults of no length of their own that take a service down while they are done (the
# Docker-backed form's: the schedule waits until the service answers again).
MOMENTARY_DOWN_KINDS = ("recreate", "crash")
DAEMON_RESTART_NOT_RUN = "not run, the engine is not the private test engine"
# Real seconds the supervisor may take, after a restarted engine answers, to show both
# services running and reachable again (a target of the Docker-backed form).
FOUND_LIMIT_S = 30.0


@dataclass
class Fault:
    at_s: float
    kind: str
    target: str = ""  # "ollama" / "comfyui" for the service kinds
    duration_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    real_start: float | None = None  # time.monotonic() when it was done and undone
    real_end: float | None = None

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def describe(self) -> str:
        what = self.kind + (f" {self.target}" if self.target else "")
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return what + (f" ({extra})" if extra else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "at_s": self.at_s,
            "kind": self.kind,
            "target": self.target,
            "duration_s": self.duration_s,
            "params": self.params,
        }


def draw_fault(rng: random.Random, t: float, kind: str) -> Fault:
    """A fault of one of KINDS at simulated `t`: its target and lengths drawn from `rng`."""
    fault = Fault(round(t, 1), kind)
    if kind in SERVICE_KINDS:
        fault.target = rng.choice(["ollama", "comfyui"])
    if kind == "clock_jump":
        sign = rng.choice([-1, 1])
        fault.params["step_s"] = sign * rng.randint(600, 3 * 3600)
    elif kind == "outsider":
        fault.duration_s = round(rng.uniform(120, 1200), 1)
        fault.params["gib"] = rng.randint(2, 12)
    elif kind == "slow":
        fault.duration_s = round(rng.uniform(120, 900), 1)
        fault.params["delay_s"] = round(rng.uniform(0.5, 7.0), 1)
    else:
        fault.duration_s = round(rng.uniform(60, 600), 1)
    return fault


def make_faults(seed: int, duration_s: float, mean_gap_s: float) -> list[Fault]:
    rng = random.Random(f"faults-{seed}")
    faults: list[Fault] = []
    t = rng.expovariate(1 / mean_gap_s) + 60.0
    order: list[str] = []
    while True:
        if not order:
            order = list(KINDS)
            rng.shuffle(order)
        fault = draw_fault(rng, t, order.pop())
        if fault.end_s > duration_s - 120:
            break
        faults.append(fault)
        t = fault.end_s + rng.expovariate(1 / mean_gap_s) + 30.0
    return faults


class FaultHost(Protocol):
    """What the faults of KINDS need of a host: the fixed-URL form's `SoakHost`, or the
    Docker-backed form's (tests/soak/docker_soak.py), whose "crash" is a killed process
    that its restart policy brings back, so `come_back` has nothing left to do."""

    gpu_faults: GpuFaults

    def crash(self, service: str) -> None: ...
    def come_back(self, service: str) -> None: ...
    def proxy(self, service: str) -> FaultProxy: ...


class Injector:
    """Starts and ends faults of KINDS on a host (and the supervisor's clock file)."""

    def __init__(self, host: FaultHost, clock_file: Path) -> None:
        self.host = host
        self.clock_file = clock_file
        self.clock_offset_s = 0.0
        clock_file.write_text("0")

    def start(self, fault: Fault) -> None:
        h = self.host
        if fault.kind == "crash":
            h.crash(fault.target)
        elif fault.kind in ("hang", "garbage", "error", "slow"):
            h.proxy(fault.target).set(fault.kind, float(fault.params.get("delay_s", 0.0)))
        elif fault.kind == "nvml_error":
            h.gpu_faults.nvml_fail("error")
        elif fault.kind == "nvml_lost":
            h.gpu_faults.nvml_fail("lost")
        elif fault.kind == "outsider":
            fault.params["took_gib"] = round(
                h.gpu_faults.outsider_fill(int(fault.params["gib"]) * GIB) / GIB, 1
            )
        elif fault.kind == "clock_jump":
            self.clock_offset_s += float(fault.params["step_s"])
            self.clock_file.write_text(f"{self.clock_offset_s:g}")

    def end(self, fault: Fault) -> None:
        h = self.host
        if fault.kind == "crash":
            h.come_back(fault.target)
        elif fault.kind in ("hang", "garbage", "error", "slow"):
            h.proxy(fault.target).set("pass")
        elif fault.kind in ("nvml_error", "nvml_lost"):
            h.gpu_faults.nvml_ok()
        elif fault.kind == "outsider":
            h.gpu_faults.outsider_leave()
