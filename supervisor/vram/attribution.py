"""Who holds which GPU memory: NVML processes joined with each service's host PIDs.

Pure. NVML reports host PIDs (gotcha 18) and `docker top` lists host PIDs too (api-facts
3.5), so the join is a plain PID match; nothing here reads /proc or talks to Docker.

Rules:
- A process whose PID belongs to a service adds its memory to that service and marks its
  GPU. A PID that two services claim (it should not happen) counts for the first service
  in `pids_by_service` order, never twice.
- `used_bytes` None (NVML "not available") counts as 0 bytes but still marks the GPU: the
  service is on that GPU even if we cannot say how much it holds.
- Processes that match no service are reported under the key `OTHER` ("") so `status`
  can show memory held by something else. That key is present only when such processes
  exist; every service key is always present (0 bytes when it holds nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from supervisor.ports import GpuProcess

OTHER = ""  # the key for processes that belong to no known service


@dataclass(frozen=True)
class Attribution:
    """GPU memory held by one service (or by `OTHER`)."""

    vram_bytes: int  # sum over its processes on all GPUs; unknown amounts count as 0
    gpu_uuids: tuple[str, ...]  # sorted; GPUs where it has a process
    pids: tuple[int, ...]  # sorted; its PIDs that NVML lists (not every PID it has)


def attribute(
    processes: Sequence[GpuProcess], pids_by_service: Mapping[str, Sequence[int]]
) -> dict[str, Attribution]:
    """Sum NVML process memory per service key. See the module doc for the rules."""
    if OTHER in pids_by_service:
        raise ValueError("the service key '' is reserved for processes of no known service")
    owner: dict[int, str] = {}
    for key, pids in pids_by_service.items():
        for pid in pids:
            owner.setdefault(pid, key)

    vram: dict[str, int] = {key: 0 for key in pids_by_service}
    gpus: dict[str, set[str]] = {key: set() for key in pids_by_service}
    seen: dict[str, set[int]] = {key: set() for key in pids_by_service}
    for proc in processes:
        key = owner.get(proc.pid, OTHER)
        vram[key] = vram.get(key, 0) + (proc.used_bytes or 0)
        gpus.setdefault(key, set()).add(proc.gpu_uuid)
        seen.setdefault(key, set()).add(proc.pid)

    return {
        key: Attribution(
            vram_bytes=vram[key],
            gpu_uuids=tuple(sorted(gpus[key])),
            pids=tuple(sorted(seen[key])),
        )
        for key in vram
    }
