"""Model servers as triggers 1 and 4 read them, whatever their kind (pure).

Ollama and the model servers of the other registry kinds (llama-server, llama-swap ...,
capability `LOADS_MODELS`) take part in the same two triggers. Each kind has a producer
here that turns its reading into two views, and the triggers loop over the views, never
over the kinds:
- `ResidentModels` (trigger 1): the names of the models a server holds, or None when it
  could not be read this pass. Ollama's: every model in /api/ps; the other kinds': the
  models listed as loading or loaded.
- `UnloadCandidate` (trigger 4): one idle loaded model on a GPU that an unload could give
  back, with what the unload gives back, its place in the order and the action that
  unloads it. Ollama's: models in /api/ps with a sane size and VRAM on the GPU, ordered by
  expiry (`guards.expiry_key`); the other kinds': loaded models not known to be busy of a
  server with an unload call, largest first (`held`).

A new kind that loads models on request needs no change here: its client reports
`ServedModel`s and it arrives among `Pass.servers`. A kind whose reading says more (as
Ollama's does) gets its own producer, and `resident_models` and `unload_candidates` list
its views with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.model import (
    ModelServerObservation,
    OllamaObservation,
    ServedModel,
    ServiceSpec,
    UnloadModel,
    UnloadOllama,
)
from supervisor.policy.guards import expiry_key, model_ok, seems_busy, service_gpus, shares_gpu
from supervisor.policy.scratch import Pass, usable_ollama

# How a candidate sorts: (kind, then what orders that kind's models). Ollama's come first
# (0, then `expiry_key`: rank, expiry, name); the other kinds' after (1, then the largest
# first, server key, name). Ties keep the order the servers and models were read in.
Order = tuple[int, int, float, str, str]


@dataclass(frozen=True)
class ResidentModels:
    """One model server's resident models at one reading (trigger 1)."""

    spec: ServiceSpec
    title: str  # how notes and reasons name its kind ("Ollama", "llama-swap" ...)
    gpus: tuple[str, ...]  # `service_gpus`: () = all
    is_running: bool
    names: tuple[str, ...] | None  # each once, in the order listed; None: not read this pass
    # What follows the model names in the "New ... model(s) detected" note and in the
    # reason of the frees it starts: " on <key>", or "" where the key goes unsaid (Ollama's
    # reasons, and its notes while there is only one Ollama).
    note_where: str
    reason_where: str
    # Its spilled models are healed (trigger 3, `heal.py`; Ollama's): a new load of one
    # that was healed before starts without that heal's cooldown.
    heals: bool = False

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass(frozen=True)
class UnloadCandidate:
    """One loaded model that trigger 4 may unload for a job server with work."""

    spec: ServiceSpec  # its server
    title: str  # its server's kind ("Ollama", "llama-swap" ...)
    gpus: tuple[str, ...]  # its server's GPUs (`service_gpus`)
    model: str
    gives_back: int | None  # bytes an unload gives back; None: unknown
    order: Order  # unload order, smallest first (see `Order`)
    seems_busy: bool  # it looks in use (an Ollama model listed past its expires_at)
    # Skips that name the kind ("Not unloading Ollama models ...") are logged for it: the
    # kinds whose candidates are judged by the rules below (Ollama's).
    named_in_skips: bool
    # A reload of it during a job would spill to the CPU unless the gate in front of its
    # server (VRAM_GATE_PORT) holds the load until there is room, so without that gate it
    # stays loaded for a job that pages instead (`triggers.pages_rather_than_spill`).
    spills_without_gate: bool
    unload: type[UnloadOllama] | type[UnloadModel]  # the action that unloads it

    @property
    def key(self) -> str:
        return self.spec.key

    def action(self, reason: str) -> UnloadOllama | UnloadModel:
        return self.unload(self.spec.key, self.model, reason)


def ollama_resident(o: OllamaObservation, many: bool) -> ResidentModels:
    """An Ollama's models from /api/ps; `many`: more than one Ollama is known (its notes
    then name it)."""
    names = None
    if usable_ollama(o) and o.models is not None:
        names = tuple(dict.fromkeys(m.name for m in o.models))
    where = f" on {o.status.spec.key}"
    return ResidentModels(
        o.status.spec,
        "Ollama",
        service_gpus(o),
        o.status.is_running,
        names,
        note_where=where if many else "",
        reason_where="",
        heals=True,
    )


def server_resident(m: ModelServerObservation) -> ResidentModels:
    """A model server of another kind: its models listed as loading or loaded."""
    readable = m.state is not None and m.status.is_reachable
    names = tuple(dict.fromkeys(x.name for x in m.models if x.is_resident))
    where = f" on {m.status.spec.key}"
    return ResidentModels(
        m.status.spec,
        m.title,
        service_gpus(m),
        m.status.is_running,
        names if readable else None,
        note_where=where,
        reason_where=where,
    )


def resident_models(p: Pass) -> list[ResidentModels]:
    """Every model server of the pass: the Ollamas first, then the other kinds."""
    many = len(p.ollamas) > 1
    found = [ollama_resident(o, many) for o in p.ollamas.values()]
    return found + [server_resident(m) for m in p.servers.values()]


def ollama_candidates(
    o: OllamaObservation, gpu_uuid: str, wall_at: float | None
) -> list[UnloadCandidate]:
    """An Ollama's models on this GPU that an unload could give VRAM back from: read this
    pass, a sane size (`model_ok`) and some of it on the GPU. `wall_at`: the pass's Unix
    time, to judge expires_at (`expiry_key`, `seems_busy`)."""
    if not usable_ollama(o) or not shares_gpu(service_gpus(o), (gpu_uuid,)):
        return []
    return [
        UnloadCandidate(
            o.status.spec,
            "Ollama",
            service_gpus(o),
            m.name,
            m.size_vram_bytes,
            (0, *expiry_key(m, wall_at), ""),
            seems_busy(m, wall_at),
            named_in_skips=True,
            spills_without_gate=True,
            unload=UnloadOllama,
        )
        for m in o.models or ()
        if model_ok(m) and m.size_vram_bytes > 0
    ]


def server_candidates(m: ModelServerObservation, gpu_uuid: str) -> list[UnloadCandidate]:
    """A model server's idle loaded models on this GPU that can be unloaded: loaded (not
    loading or sleeping), not known to be busy (the actor checks again right before the
    unload), the server answered and has an unload call."""
    if not (
        m.status.is_running
        and m.status.is_reachable
        and m.state is not None
        and m.state.can_unload
        and shares_gpu(service_gpus(m), (gpu_uuid,))
    ):
        return []
    key = m.status.spec.key
    found = []
    for x in m.models:
        if not x.is_resident or x.is_loading or x.busy is True:
            continue
        gives = held(m, x)
        found.append(
            UnloadCandidate(
                m.status.spec,
                m.title,
                service_gpus(m),
                x.name,
                gives,
                (1, -(gives or 0), 0.0, key, x.name),
                seems_busy=False,
                named_in_skips=False,
                spills_without_gate=False,
                unload=UnloadModel,
            )
        )
    return found


def unload_candidates(p: Pass, gpu_uuid: str) -> list[UnloadCandidate]:
    """Every model server's candidates on this GPU in unload order (`Order`), less the
    models healed this pass (a heal reloads them)."""
    found: list[UnloadCandidate] = []
    for o in p.ollamas.values():
        found += ollama_candidates(o, gpu_uuid, p.obs.wall_at)
    for m in p.servers.values():
        found += server_candidates(m, gpu_uuid)
    found = [c for c in found if (c.key, c.model) not in p.healed]
    return sorted(found, key=lambda c: c.order)


def held(server: ModelServerObservation, model: ServedModel) -> int | None:
    """What unloading `model` gives back: its size as the server reports it, else an
    even share of what NVML attributes to the server; None when neither is known."""
    if model.size_bytes:
        return model.size_bytes
    resident = [x for x in server.models if x.is_resident]
    if server.vram_bytes is not None and resident:
        return server.vram_bytes // len(resident)
    return None
