"""Unload an idle model of a model server of a registry kind (llama-server's router,
llama-swap ...), verified.

Policy:
- Never cut a request off: these servers' unloads do not wait for in-flight requests
  (tenants.md §1-2), so the model's busy state is read again at the moment of acting
  (`ModelServerApi.busy`, right before the unload, under the actor's lock). Busy, or
  busy unknown (no slots endpoint, a read that failed): no unload, a FAILED outcome
  that says why.
- Verified like every action: the model must leave the server's list of running models
  within VRAM_VERIFY_TIMEOUT (llama-server's router unloads asynchronously: the child
  exits after its stop timeout), and the free VRAM of the GPUs the server uses is read
  before and after (reported as the freed bytes in the log line).
- VRAM_DRY_RUN: log "DRY RUN: would ..." and send nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from supervisor.errors import ServiceError
from supervisor.model import Outcome, UnloadModel
from supervisor.units import format_bytes

if TYPE_CHECKING:
    from supervisor.actions import Actor
    from supervisor.ports import ModelServerApi


def unload(actor: Actor, action: UnloadModel) -> Outcome:
    start = actor.clock()
    target = actor.targets().model_servers.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="the model server is not running")
    spec, server = target
    what = f"model {action.model} on {spec.key}"
    if actor.settings.dry_run:
        return actor.dry(action, f"unload {what}")
    log = logger.bind(target=action.target, model=action.model)

    def failed(detail: str) -> Outcome:
        return Outcome(action, start, ok=False, detail=detail, duration_s=actor.clock() - start)

    try:
        busy = server.busy(action.model)
    except ServiceError as exc:
        busy, error = None, str(exc)
    else:
        error = ""
    if busy is not False:
        why = "it is serving a request" if busy else "whether it serves a request is unknown"
        log.info(f"Not unloading {what}: {why}{f' ({error})' if error else ''}")
        return failed(f"not unloaded: {why}")
    gpus = spec.gpu_uuids
    before = actor.probe.free_bytes(gpus)
    try:
        actor.announce_unload(action.model)
        server.unload(action.model)
    except ServiceError as exc:
        log.warning(f"Could not unload {what}: {exc}")
        return failed(str(exc))
    deadline = start + actor.settings.verify_timeout_s
    gone = _wait_gone(actor, server, action.model, deadline)
    after = actor.probe.free_bytes(gpus)
    took = actor.clock() - start
    freed = after - before if after is not None and before is not None else None
    if gone:
        log.info(
            f"Unloaded {what} in {took:.1f} s"
            + (f" ({format_bytes(max(0, freed))} of VRAM came back)" if freed is not None else "")
            + f": {action.reason}"
        )
    else:
        log.warning(f"{what} is still running {took:.1f} s after the unload")
    return Outcome(
        action,
        start,
        ok=gone,
        before_bytes=before,
        after_bytes=after,
        detail="" if gone else "still running",
        duration_s=took,
    )


def _wait_gone(actor: Actor, server: ModelServerApi, model: str, deadline: float) -> bool:
    """Poll the server until `model` no longer holds VRAM there (True) or `deadline`."""
    while True:
        try:
            resident = any(m.name == model and m.is_resident for m in server.served().models)
        except ServiceError as exc:
            logger.debug(f"Reading the model server after an unload failed: {exc}")
            resident = True
        if not resident:
            return True
        if actor.clock() >= deadline or not actor.wait(actor.poll_s):
            return False
