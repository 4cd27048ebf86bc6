"""Act on the tenants of the registry's other kinds, verified: unload (or put to sleep) an
idle model of a model server (llama-server's router, llama-swap, vLLM ...), wake a
sleeping one, free an idle job server (A1111/Forge, InvokeAI ...).

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
- A job server's free does not wait for a running job either (A1111's unload moves the
  weights away under it): its state is read again at the moment of acting, and only a
  known-idle server is freed. Verified by the free VRAM of its GPUs (and its own figure,
  when it reports one): FREED when VRAM came back within VRAM_VERIFY_TIMEOUT, PINNED when
  nothing did, FAILED when the call failed or it was busy.
- A wake is verified by the model leaving the "sleeping" state.
- VRAM_DRY_RUN: log "DRY RUN: would ..." and send nothing.
"""

from __future__ import annotations

from loguru import logger

from supervisor.errors import ServiceError
from supervisor.model import FreeJobs, FreeResult, Outcome, ReloadJobs, UnloadModel, WakeModel
from supervisor.ports import ActorPort, ModelServerApi
from supervisor.units import format_bytes

# A rise of the free VRAM smaller than this is noise, not a free (as `actions`).
MIN_RISE_BYTES = 256 * 1024**2


def execute(actor: ActorPort, action: UnloadModel | WakeModel | FreeJobs | ReloadJobs) -> Outcome:
    """Carry out one action on a tenant of the other kinds (the Actor checked the safety
    limit and holds its lock)."""
    if isinstance(action, UnloadModel):
        return unload(actor, action)
    if isinstance(action, WakeModel):
        return wake(actor, action)
    if isinstance(action, ReloadJobs):
        return reload_jobs(actor, action)
    return free_jobs(actor, action)


def unload(actor: ActorPort, action: UnloadModel) -> Outcome:
    start = actor.clock()
    target = actor.targets().model_servers.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="the model server is not running")
    spec, server = target
    what = f"model {action.model} on {spec.key}"
    if actor.settings.dry_run:
        return actor.dry(action, f"unload {what}")
    log = logger.bind(target=action.target, model=action.model)

    def failed(detail: str, sent: bool = True) -> Outcome:
        took = actor.clock() - start
        return Outcome(action, start, ok=False, detail=detail, duration_s=took, sent=sent)

    in_flight = actor.serving(action.target)
    if in_flight is None:
        log.info(f"Not unloading {what}: a gate could not say whether it serves a request")
        return failed("not unloaded: whether it serves a request is unknown", sent=False)
    if action.model in in_flight:
        log.info(f"Not unloading {what}: it is serving a request (through the gate)")
        return failed("not unloaded: it is serving a request (through the gate)", sent=False)
    try:
        busy = server.busy(action.model)
    except ServiceError as exc:
        busy, error = None, str(exc)
    else:
        error = ""
    if busy is not False:
        why = "it is serving a request" if busy else "whether it serves a request is unknown"
        log.info(f"Not unloading {what}: {why}{f' ({error})' if error else ''}")
        return failed(f"not unloaded: {why}", sent=False)
    gpus = spec.gpu_uuids
    before = actor.probe.free_bytes(gpus)
    try:
        actor.announce_unload(action.model)
        with actor.sending(action.target):
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


def _wait_gone(actor: ActorPort, server: ModelServerApi, model: str, deadline: float) -> bool:
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


def wake(actor: ActorPort, action: WakeModel) -> Outcome:
    start = actor.clock()
    target = actor.targets().model_servers.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="the model server is not running")
    spec, server = target
    what = f"model {action.model} on {spec.key}"
    if actor.settings.dry_run:
        return actor.dry(action, f"wake {what}")
    log = logger.bind(target=action.target, model=action.model)
    try:
        with actor.sending(action.target):
            server.wake(action.model)
    except ServiceError as exc:
        log.warning(f"Could not wake {what}: {exc}")
        return Outcome(action, start, ok=False, detail=str(exc), duration_s=actor.clock() - start)
    deadline = start + actor.settings.verify_timeout_s
    while True:
        try:
            awake = not any(
                m.name == action.model and m.state == "sleeping" for m in server.served().models
            )
        except ServiceError:
            awake = False
        if awake or actor.clock() >= deadline or not actor.wait(actor.poll_s):
            break
    took = actor.clock() - start
    if awake:
        log.info(f"Woke {what} in {took:.1f} s: {action.reason}")
    else:
        log.warning(f"{what} still sleeps {took:.1f} s after the wake")
    return Outcome(
        action, start, ok=awake, detail="" if awake else "still sleeping", duration_s=took
    )


def free_jobs(actor: ActorPort, action: FreeJobs) -> Outcome:
    start = actor.clock()
    target = actor.targets().job_servers.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, result=FreeResult.FAILED, detail="not running")
    spec, server = target
    if actor.settings.dry_run:
        return actor.dry(action, f"free {spec.key}")
    log = logger.bind(target=action.target)

    def report(
        result: FreeResult,
        detail: str = "",
        before: int | None = None,
        after: int | None = None,
        sent: bool = True,
    ) -> Outcome:
        return Outcome(
            action,
            start,
            ok=result is FreeResult.FREED,
            result=result,
            before_bytes=before,
            after_bytes=after,
            detail=detail,
            duration_s=actor.clock() - start,
            sent=sent,
        )

    try:
        state = server.jobs()
    except ServiceError as exc:
        return report(FreeResult.FAILED, str(exc))
    if state.busy is not False:
        why = "it has work" if state.busy else "its queue is unknown"
        log.info(f"Not freeing {spec.key}: {why}")
        return report(FreeResult.FAILED, f"not freed: {why}", sent=False)
    gpus = (action.gpu_uuid,) if action.gpu_uuid else spec.gpu_uuids
    before = actor.probe.free_bytes(gpus)
    try:
        with actor.sending(action.target):
            server.free()
    except ServiceError as exc:
        log.warning(f"Could not free {spec.key}: {exc}")
        return report(FreeResult.FAILED, str(exc))
    deadline = start + actor.settings.verify_timeout_s
    after = before
    while True:
        after = actor.probe.free_bytes(gpus)
        if before is None or after is None or after - before >= MIN_RISE_BYTES:
            break
        if actor.clock() >= deadline or not actor.wait(actor.poll_s):
            break
    if before is None or after is None:
        log.info(f"Freed {spec.key} (VRAM could not be read to verify): {action.reason}")
        return report(FreeResult.FREED, "not verified: no VRAM reading", before, after)
    rose = after - before
    if rose >= MIN_RISE_BYTES:
        log.info(
            f"Freed {spec.key}: {format_bytes(rose)} of VRAM came back in "
            f"{actor.clock() - start:.1f} s: {action.reason}"
        )
        return report(FreeResult.FREED, "", before, after)
    log.warning(f"Freed {spec.key}, but no VRAM came back within the verify timeout")
    return report(FreeResult.PINNED, "no VRAM came back", before, after)


def reload_jobs(actor: ActorPort, action: ReloadJobs) -> Outcome:
    """Put back the weights a free parked in CPU RAM (A1111's reload-checkpoint): only while
    the job server is still known idle; verified by its state no longer saying parked."""
    start = actor.clock()
    target = actor.targets().job_servers.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="not running")
    spec, server = target
    if actor.settings.dry_run:
        return actor.dry(action, f"reload {spec.key}")
    log = logger.bind(target=action.target)

    def report(ok: bool, detail: str = "", sent: bool = True) -> Outcome:
        took = actor.clock() - start
        return Outcome(action, start, ok=ok, detail=detail, duration_s=took, sent=sent)

    reload = getattr(server, "reload", None)
    if not callable(reload):
        return report(False, "it has no reload call")
    try:
        state = server.jobs()
    except ServiceError as exc:
        return report(False, str(exc))
    if state.busy is not False:
        why = "it has work" if state.busy else "its queue is unknown"
        log.info(f"Not reloading {spec.key}: {why}")
        return report(False, f"not reloaded: {why}", sent=False)
    if state.parked_bytes is None:
        return report(True, "nothing parked any more")
    try:
        with actor.sending(action.target):
            reload()
        after = server.jobs()
    except ServiceError as exc:
        log.warning(f"Could not reload {spec.key}: {exc}")
        return report(False, str(exc))
    if after.parked_bytes is not None:
        log.warning(f"Reloaded {spec.key}, but it still reports its weights parked")
        return report(False, "still parked")
    log.info(
        f"Reloaded {spec.key}'s weights to the GPU in {actor.clock() - start:.1f} s: "
        f"{action.reason}"
    )
    return report(True)
