"""Job servers as triggers 1, 2 and 4 read them, whatever their kind (pure).

ComfyUI and the job servers of the other registry kinds (A1111/Forge, InvokeAI ...,
capability `RUNS_JOBS`) take part in the same three triggers. Each kind has a producer
here that turns its reading into one `JobServerView`, and the triggers loop over the
views, never over the kinds:
- triggers 1 and 2 (and a sleeping model that requests wait for) ask the idle job servers
  sharing a GPU to give their VRAM back, each through its view's `free`;
- trigger 4 unloads idle models for the job servers with work (`has_work`).

What a free is differs by kind and is the view's, not the triggers': ComfyUI's opens a
staged episode (`episodes.want_free`: soft, then hard, then a restart as the last resort,
at most one pass of new episodes per VRAM_MIN_FREE_INTERVAL); the other kinds' is one
`FreeJobs` while known idle, at most one per VRAM_MIN_FREE_INTERVAL each (`want_free_jobs`).

A new kind that runs jobs from a queue needs no change here: its client reports a
`JobState` and it arrives among `Pass.jobs`. A kind whose reading says more (as
ComfyUI's queue and Dynamic VRAM mode do) gets its own producer, and `job_servers` lists
its views with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    FreeJobs,
    GpuMemory,
    JobServerObservation,
    ServiceSpec,
)
from supervisor.policy.episodes import want_free
from supervisor.policy.guards import MIN_RECLAIMABLE_BYTES, has_work, service_gpus, shares_gpu
from supervisor.policy.scratch import Pass

# How a trigger asks a job server to give its VRAM back: (pass, reason, the GPU the free
# is for or None).
FreeCall = Callable[[Pass, str, str | None], None]


@dataclass(frozen=True)
class JobServerView:
    """One job server at one reading, as triggers 1, 2 and 4 see it."""

    spec: ServiceSpec
    title: str  # how its kind is named ("ComfyUI", "A1111" ...)
    gpus: tuple[str, ...]  # `service_gpus`: () = all
    has_work: bool  # it answered and a job runs or waits (trigger 4 unloads for it)
    # Its jobs page their weights when VRAM is short rather than fail, so trigger 4 may
    # leave an ungated model server's models loaded for it (`triggers.pages_rather_than_
    # spill`; ComfyUI under Dynamic VRAM).
    pages_when_short: bool
    # A free for a model server's load names the hottest GPU it shares with that server
    # (ComfyUI's: its episode judges that GPU afterwards). The other kinds' name none
    # there: the actor then verifies their free over all their GPUs.
    names_gpu: bool
    # How a free is asked for (ComfyUI's: `episodes.want_free`; others': `want_free_jobs`).
    ask_free: FreeCall = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.spec.key

    def shares(self, gpus: tuple[str, ...]) -> bool:
        """It may use one of these GPUs (() on either side: all)."""
        return shares_gpu(self.gpus, gpus)

    def free(self, p: Pass, reason: str, gpu_uuid: str | None = None) -> None:
        """Ask for its VRAM back, the way its kind frees (see `ask_free`)."""
        self.ask_free(p, reason, gpu_uuid)

    def gpu_for(self, gpus: Sequence[GpuMemory], near: tuple[str, ...]) -> str | None:
        """The GPU a free for a server on `near` names: of the read `gpus`, the one it
        shares with `near` that is the most used (the first read on a tie), or None."""
        if not self.names_gpu:
            return None
        shared = [g for g in gpus if self.shares((g.uuid,)) and shares_gpu(near, (g.uuid,))]
        g = max(shared, key=lambda g: g.used_percent, default=None)
        return g.uuid if g else None


def comfy_job_server(c: ComfyObservation) -> JobServerView:
    """A ComfyUI: its queue says whether it has work; its free is a staged episode."""

    def ask(p: Pass, reason: str, gpu_uuid: str | None) -> None:
        want_free(p, c, reason, gpu_uuid)

    return JobServerView(
        c.status.spec,
        "ComfyUI",
        service_gpus(c),
        has_work(c),
        pages_when_short=c.mode is ComfyMode.DYNAMIC,
        names_gpu=True,
        ask_free=ask,
    )


def other_job_server(j: JobServerObservation) -> JobServerView:
    """A job server of another kind: `JobState.busy` says whether it has work; its free
    is one `FreeJobs` while idle (`want_free_jobs`)."""

    def ask(p: Pass, reason: str, gpu_uuid: str | None) -> None:
        want_free_jobs(p, j, reason, gpu_uuid)

    return JobServerView(
        j.status.spec,
        j.title,
        service_gpus(j),
        j.has_work,
        pages_when_short=False,
        names_gpu=False,
        ask_free=ask,
    )


def job_servers(p: Pass) -> list[JobServerView]:
    """Every job server of the pass: the ComfyUIs first, then the other kinds, each in
    the order they were read."""
    found = [comfy_job_server(c) for c in p.comfys.values()]
    return found + [other_job_server(j) for j in p.jobs.values()]


def job_servers_on(p: Pass, gpu: GpuMemory) -> list[JobServerView]:
    """The job servers that may use this GPU, in `job_servers` order."""
    return [v for v in job_servers(p) if v.shares((gpu.uuid,))]


def want_free_jobs(p: Pass, j: JobServerObservation, reason: str, gpu: str | None = None) -> None:
    """Free an idle job server of the other kinds: only while it is known to be idle (its
    frees do not wait for a running job), when it can be freed, holds more than a free
    would be worth (when known), and at most once per VRAM_MIN_FREE_INTERVAL each."""
    key, st = j.status.spec.key, j.state
    if not (j.status.is_running and j.status.is_reachable) or st is None:
        return
    if not st.can_free:
        p.skip(f"Not freeing {key} ({reason}): {j.title} has no free call")
        return
    if st.busy is not False:
        what = "has work" if st.busy else "may have work (its queue is unknown)"
        p.skip(f"Not freeing {key} ({reason}): it {what}; it is freed only when idle")
        return
    if j.vram_bytes is not None and j.vram_bytes < MIN_RECLAIMABLE_BYTES:
        return
    last = p.job_free_at.get(key)
    if last is not None and p.now - last < p.settings.min_free_interval_s:
        left = p.settings.min_free_interval_s - (p.now - last)
        p.skip(f"Not freeing {key} yet ({reason}): rate limit, {left:.0f} s left")
        p.soon(left)
        return
    p.job_free_at[key] = p.now
    p.emit(FreeJobs(key, reason, gpu))
