"""The views of every model server that triggers 1 and 4 loop over (policy/servers.py):
which of a server's models count as resident (a model that appears frees ComfyUI), which
loaded models an unload may take for a busy ComfyUI, what each gives back, in which order,
and which action unloads it: Ollama's and the other kinds' alike."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from test_policy_builders import NOW, gpu, model, ollama

from supervisor.config import Settings
from supervisor.model import (
    ModelServerObservation,
    Observation,
    OllamaObservation,
    PolicyState,
    ServedModel,
    ServedState,
    ServiceSpec,
    ServiceStatus,
    UnloadModel,
    UnloadOllama,
    VramSource,
)
from supervisor.policy.scratch import Pass, start_pass
from supervisor.policy.servers import (
    ResidentModels,
    UnloadCandidate,
    ollama_candidates,
    ollama_resident,
    resident_models,
    server_candidates,
    server_resident,
    unload_candidates,
)
from supervisor.units import GIB

WALL = datetime(2026, 8, 21, 18, 10, tzinfo=UTC).timestamp()
EARLY, LATE = "2026-08-21T18:05:00Z", "2026-08-21T18:20:00Z"
FOREVER = "2318-04-11T23:47:16Z"


def server(
    *models: ServedModel,
    name: str = "swap",
    running: bool = True,
    reachable: bool = True,
    readable: bool = True,
    can_unload: bool = True,
    vram: float | None = None,
    gpus: tuple[str, ...] = (),
) -> ModelServerObservation:
    spec = ServiceSpec("llama-swap", name, "http://127.0.0.1:8080", f"id-{name}", gpu_uuids=gpus)
    status = ServiceStatus(spec, is_running=running, is_reachable=running and reachable)
    state = ServedState(tuple(models), can_unload=can_unload) if readable else None
    vram_bytes = int(vram * GIB) if vram is not None else None
    return ModelServerObservation(status, "llama-swap", state, vram_bytes)


def served(
    name: str, state: str = "ready", busy: bool | None = None, size: float | None = None
) -> ServedModel:
    return ServedModel(name, state, busy, int(size * GIB) if size else None)


def gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


# --------------------------------------------------------------------------- trigger 1

RESIDENT_CASES = [
    pytest.param(
        ollama_resident(ollama(model("a:1"), model("b:1"), model("a:1")), many=False),
        (True, ("a:1", "b:1"), "", ""),
        id="ollama-each-name-once-in-order",
    ),
    pytest.param(
        ollama_resident(ollama(model("a:1", vram=0), model("b:1", size=0)), many=False),
        (True, ("a:1", "b:1"), "", ""),  # on the CPU or garbage: still resident in /api/ps
        id="ollama-every-listed-model",
    ),
    pytest.param(
        ollama_resident(ollama(model("a:1")), many=True),
        (True, ("a:1",), " on ollama/ollama", ""),  # notes name it, reasons never do
        id="ollama-among-several",
    ),
    pytest.param(
        ollama_resident(ollama(reachable=False), many=False),
        (True, None, "", ""),
        id="ollama-unreachable-unread",
    ),
    pytest.param(
        ollama_resident(ollama(unreadable=True), many=False),
        (True, None, "", ""),
        id="ollama-api-ps-failed-unread",
    ),
    pytest.param(
        ollama_resident(ollama(running=False), many=False),
        (False, None, "", ""),
        id="ollama-stopped",
    ),
    pytest.param(
        server_resident(
            server(
                served("a", "loaded"),
                served("b", "loading"),
                served("c", "sleeping"),
                served("d", "stopping"),
                served("e", "starting"),
            )
        ),
        (True, ("a", "b", "e"), " on llama-swap/swap", " on llama-swap/swap"),
        id="server-loading-or-loaded",
    ),
    pytest.param(
        server_resident(server(readable=False)),
        (True, None, " on llama-swap/swap", " on llama-swap/swap"),
        id="server-unread",
    ),
    pytest.param(
        server_resident(server(served("a"), reachable=False)),
        (True, None, " on llama-swap/swap", " on llama-swap/swap"),
        id="server-unreachable-unread",
    ),
    pytest.param(
        server_resident(server(served("a"), running=False)),
        (False, None, " on llama-swap/swap", " on llama-swap/swap"),
        id="server-stopped",
    ),
]


@pytest.mark.parametrize(("view", "expected"), RESIDENT_CASES)
def test_resident_models_of_one_server(
    view: ResidentModels, expected: tuple[bool, tuple[str, ...] | None, str, str]
) -> None:
    assert (view.is_running, view.names, view.note_where, view.reason_where) == expected


def test_only_ollama_resident_models_are_healed_and_titled_by_their_kind() -> None:
    o, s = ollama_resident(ollama(), many=False), server_resident(server())
    assert (o.title, o.heals, o.key) == ("Ollama", True, "ollama/ollama")
    assert (s.title, s.heals, s.key) == ("llama-swap", False, "llama-swap/swap")


def a_pass(
    *services: OllamaObservation | ModelServerObservation, wall_at: float | None = WALL
) -> Pass:
    observation = Observation(
        at=NOW,
        source=VramSource.NVML,
        gpus=(gpu(used=20),),
        ollamas=tuple(s for s in services if isinstance(s, OllamaObservation)),
        model_servers=tuple(s for s in services if isinstance(s, ModelServerObservation)),
        docker_ok=True,
        wall_at=wall_at,
    )
    return start_pass(observation, PolicyState(is_initialised=True), Settings(), NOW)


def test_resident_models_lists_the_ollamas_first() -> None:
    p = a_pass(server(served("q"), name="s1"), ollama(name="o1"), ollama(name="o2"))
    assert [r.key for r in resident_models(p)] == [
        "ollama/o1",
        "ollama/o2",
        "llama-swap/s1",
    ]
    # Two Ollamas: their notes name them.
    assert [r.note_where for r in resident_models(p)][:2] == [
        " on ollama/o1",
        " on ollama/o2",
    ]


# --------------------------------------------------------------------------- trigger 4

OLLAMA_CASES = [
    pytest.param(ollama(model("a:1", 5)), [("a:1", 5.0, False)], id="wholly-on-the-gpu"),
    pytest.param(ollama(model("a:1", 6, vram=2)), [("a:1", 2.0, False)], id="spilled-its-vram"),
    pytest.param(ollama(model("a:1", 6, vram=0)), [], id="on-the-cpu-gives-nothing"),
    pytest.param(ollama(model("a:1", 0, vram=0)), [], id="garbage-size"),
    pytest.param(
        ollama(model("a:1", expires=EARLY), model("b:1", expires=LATE)),
        [("a:1", 5.0, True), ("b:1", 5.0, False)],  # listed past its expiry: in use
        id="seems-busy-past-expires-at",
    ),
    pytest.param(ollama(model("a:1"), gpus=("GPU-1",)), [], id="another-gpu"),
    pytest.param(ollama(model("a:1"), gpus=("GPU-0", "GPU-1")), [("a:1", 5.0, False)], id="both"),
    pytest.param(ollama(model("a:1"), reachable=False), [], id="unreachable"),
    pytest.param(ollama(model("a:1"), unreadable=True), [], id="api-ps-failed"),
    pytest.param(ollama(model("a:1"), running=False), [], id="stopped"),
]


@pytest.mark.parametrize(("o", "expected"), OLLAMA_CASES)
def test_ollama_unload_candidates(
    o: OllamaObservation, expected: list[tuple[str, float, bool]]
) -> None:
    found = ollama_candidates(o, "GPU-0", WALL)
    assert [(c.model, gib(c.gives_back), c.seems_busy) for c in found] == expected
    for c in found:
        assert (c.key, c.title, c.named_in_skips, c.spills_without_gate) == (
            "ollama/ollama",
            "Ollama",
            True,
            True,
        )


SERVER_CASES = [
    pytest.param(server(served("q", size=9)), [("q", 9.0)], id="loaded-its-size"),
    pytest.param(server(served("q", "loaded", busy=False, size=9)), [("q", 9.0)], id="idle"),
    pytest.param(server(served("q", busy=None, size=9)), [("q", 9.0)], id="busy-unknown"),
    pytest.param(server(served("q", busy=True, size=9)), [], id="never-a-busy-one"),
    pytest.param(server(served("q", "loading", size=9)), [], id="never-a-loading-one"),
    pytest.param(server(served("q", "starting", size=9)), [], id="nor-a-starting-one"),
    pytest.param(server(served("q", "sleeping", size=9)), [], id="a-sleeping-one-holds-none"),
    pytest.param(
        server(served("q"), served("g", "loading"), vram=12),
        [("q", 6.0)],  # no size: an even share of the server's NVML figure
        id="share-of-the-server",
    ),
    pytest.param(server(served("q")), [("q", None)], id="unknown"),
    pytest.param(server(served("q", size=9), can_unload=False), [], id="no-unload-call"),
    pytest.param(server(served("q", size=9), reachable=False), [], id="unreachable"),
    pytest.param(server(readable=False), [], id="unread"),
    pytest.param(server(served("q", size=9), running=False), [], id="stopped"),
    pytest.param(server(served("q", size=9), gpus=("GPU-1",)), [], id="another-gpu"),
]


@pytest.mark.parametrize(("m", "expected"), SERVER_CASES)
def test_server_unload_candidates(
    m: ModelServerObservation, expected: list[tuple[str, float | None]]
) -> None:
    found = server_candidates(m, "GPU-0")
    assert [(c.model, gib(c.gives_back)) for c in found] == expected
    for c in found:
        assert (c.key, c.title, c.seems_busy, c.named_in_skips, c.spills_without_gate) == (
            "llama-swap/swap",
            "llama-swap",
            False,
            False,
            False,
        )


def test_unload_order_ollama_by_expiry_then_the_others_largest_first() -> None:
    o = ollama(
        model("inuse:1", expires=EARLY),  # listed past its expiry: last of Ollama's
        model("forever:1", expires=FOREVER),
        model("unknown:1"),
        model("soon:1", expires=LATE),
    )
    s1 = server(served("small", size=2), served("nosize"), served("big", size=9), name="s1")
    s2 = server(served("mid", size=5), name="s2")
    p = a_pass(s1, o, s2)
    order = [(c.key, c.model) for c in unload_candidates(p, "GPU-0")]
    assert order == [
        ("ollama/ollama", "soon:1"),
        ("ollama/ollama", "unknown:1"),
        ("ollama/ollama", "forever:1"),
        ("ollama/ollama", "inuse:1"),
        ("llama-swap/s1", "big"),
        ("llama-swap/s2", "mid"),
        ("llama-swap/s1", "small"),
        ("llama-swap/s1", "nosize"),
    ]


def test_unload_order_without_the_time_of_the_pass_keeps_a_past_expiry_first() -> None:
    o = ollama(model("b:1", expires=LATE), model("a:1", expires=EARLY))
    p = a_pass(o, wall_at=None)
    found = unload_candidates(p, "GPU-0")
    assert [(c.model, c.seems_busy) for c in found] == [("a:1", False), ("b:1", False)]


def test_a_model_healed_this_pass_is_no_candidate() -> None:
    o = ollama(model("a:1"), model("b:1"))
    p = a_pass(o)
    p.healed.add(("ollama/ollama", "a:1"))
    assert [c.model for c in unload_candidates(p, "GPU-0")] == ["b:1"]


@pytest.mark.parametrize(
    ("candidate", "action"),
    [
        pytest.param(
            ollama_candidates(ollama(model("a:1")), "GPU-0", WALL)[0],
            UnloadOllama("ollama/ollama", "a:1", "why"),
            id="ollama-keep-alive-0",
        ),
        pytest.param(
            server_candidates(server(served("q", size=9)), "GPU-0")[0],
            UnloadModel("llama-swap/swap", "q", "why"),
            id="other-kinds-unload-call",
        ),
    ],
)
def test_each_candidate_builds_its_kinds_unload(
    candidate: UnloadCandidate, action: UnloadOllama | UnloadModel
) -> None:
    assert candidate.action("why") == action
