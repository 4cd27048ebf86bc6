"""The gate makes room before a load, and only then: resident models, unloads, CPU-only
requests and everything else go straight through; slow room never blocks forever."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from loguru import logger

from supervisor.estimate import EstimateParams, estimate_need
from supervisor.gate import admission
from supervisor.gate.stats import Counters
from supervisor.ollama_profile import (
    FIT_TARGET_BYTES,
    LAYER_ESTIMATE_HEADROOM_BYTES,
    ollama_profile,
)
from tests.gate.fakes import GIB, MIB, Env, FakeOllamaApi, Timeline, Upstream, make_env


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


def _generate(env: Env, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "stream": False, **extra}
    return httpx.post(f"{env.url}/api/generate", json=body, timeout=20)


def test_resident_model_is_forwarded_without_making_room(env: Env) -> None:
    env.upstream.resident.add("llama3.2:latest")

    r = _generate(env, "llama3.2")

    assert r.status_code == 200 and r.json()["response"] == "hi"
    assert env.room.calls == []
    assert env.gate.stats().gated_total == 0


def test_missing_model_gets_room_before_ollama_sees_the_request(env: Env) -> None:
    r = _generate(env, "llama3.2")

    assert r.status_code == 200
    [call] = env.room.calls
    assert call.reason == "gate: load of llama3.2:latest"
    assert call.deadline_s == 5.0
    # tags 2 GiB + KV at the default 4k context + overhead (llama3.2's shape in conftest).
    facts = FakeOllamaApi(env.upstream).show("llama3.2")
    expected = estimate_need(weights_bytes=2 * GIB, facts=facts, request_num_ctx=None, seen=None)
    assert expected is not None and call.need_bytes == expected.need_bytes
    assert 2 * GIB < call.need_bytes < 4 * GIB
    tl = env.timeline
    assert tl.index("room_made") < tl.index("upstream", "POST /api/generate")
    stats = env.gate.stats()
    assert (stats.gated_total, stats.waits_total, stats.forwarded_anyway_total) == (1, 1, 0)


def test_enough_free_vram_means_no_make_room(env: Env) -> None:
    env.room.free = 10 * GIB

    assert _generate(env, "llama3.2").status_code == 200

    assert env.room.calls == []
    assert "llama3.2:latest" in env.upstream.resident
    assert env.gate.stats().gated_total == 1 and env.gate.stats().waits_total == 0


def test_requested_num_ctx_grows_the_need(timeline: Timeline, upstream: Upstream) -> None:
    env = make_env(timeline, upstream, ps_ttl_s=0.0, ps_max_stale_s=0.0)
    env.gate.start()
    try:
        _generate(env, "qwen3:8b", options={"num_ctx": 4096})
        upstream.resident.clear()
        env.room.free = 0

        _generate(env, "qwen3:8b", options={"num_ctx": 32768})
    finally:
        env.gate.stop()

    small, big = (c.need_bytes for c in env.room.calls)
    # 28 layers x 8 KV heads x 256 x 2 bytes per token: 28672 more tokens is 3.06 GiB
    # of KV cache, plus the 10 % overhead margin on it.
    assert big - small == pytest.approx(1.1 * 28 * 8 * 256 * 2 * (32768 - 4096), abs=2)


def test_a_model_seen_in_ps_is_sized_by_what_ollama_reported(
    timeline: Timeline, upstream: Upstream
) -> None:
    env = make_env(timeline, upstream, ps_ttl_s=0.0, ps_max_stale_s=0.0)
    env.gate.start()
    try:
        upstream.resident.add("qwen3:8b")  # ps says 6 GiB at 8k for it
        assert _generate(env, "qwen3:8b").status_code == 200
        upstream.resident.clear()  # unloaded (keep-alive expired)

        assert _generate(env, "qwen3:8b").status_code == 200

        [call] = env.room.calls
        assert call.need_bytes == 6 * GIB
    finally:
        env.gate.stop()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        ),
        ("/v1/completions", {"model": "llama3.2:latest", "prompt": "x"}),
        ("/v1/embeddings", {"model": "llama3.2", "input": "x"}),
        ("/v1/responses", {"model": "llama3.2", "input": "x"}),
        ("/v1/messages", {"model": "llama3.2", "max_tokens": 5, "messages": []}),
        ("/api/chat", {"model": "llama3.2", "messages": [], "stream": False}),
        ("/api/embed", {"model": "llama3.2", "input": []}),
        ("/api/embeddings", {"model": "llama3.2", "prompt": ""}),
    ],
)
def test_every_load_endpoint_is_gated_by_its_model_field(
    env: Env, path: str, body: dict[str, object]
) -> None:
    r = httpx.post(f"{env.url}{path}", json=body, timeout=20)

    assert r.status_code == 200
    assert [c.reason for c in env.room.calls] == ["gate: load of llama3.2:latest"]
    assert env.timeline.index("room_made") < env.timeline.index("upstream", f"POST {path}")


def test_audio_transcription_model_comes_from_the_form(env: Env) -> None:
    r = httpx.post(
        f"{env.url}/v1/audio/transcriptions",
        data={"model": "llama3.2"},
        files={"file": ("a.wav", b"RIFF....WAVE", "audio/wav")},
        timeout=20,
    )

    assert r.status_code == 200
    assert [c.reason for c in env.room.calls] == ["gate: load of llama3.2:latest"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/api/generate", {"model": "llama3.2", "keep_alive": 0}, id="unload generate"),
        pytest.param(
            "/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": "0s"}, id="unload chat"
        ),
        pytest.param(
            "/api/generate",
            {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_gpu": 0}},
            id="cpu only",
        ),
        pytest.param("/api/generate", {"prompt": "x"}, id="no model"),
        pytest.param("/api/generate", "not json", id="not json"),
    ],
)
def test_requests_that_load_nothing_on_the_gpu_are_not_gated(
    env: Env, path: str, body: object
) -> None:
    if isinstance(body, str):
        r = httpx.post(f"{env.url}{path}", content=body, timeout=20)
    else:
        r = httpx.post(f"{env.url}{path}", json=body, timeout=20)

    assert r.status_code in (200, 400, 404)  # as Ollama: bad JSON 400, no model 404
    assert env.room.calls == []
    assert path in env.upstream.paths()


def test_model_not_installed_is_forwarded_and_ollama_answers_404(env: Env, logs: list[str]) -> None:
    r = _generate(env, "nonexistent")

    assert r.status_code == 404
    assert r.json() == {"error": "model 'nonexistent:latest' not found"}
    assert env.room.calls == []
    assert any("no VRAM estimate for nonexistent:latest" in line for line in logs)


def test_deadline_passes_then_the_request_is_forwarded_anyway(
    timeline: Timeline, upstream: Upstream, logs: list[str]
) -> None:
    env = make_env(timeline, upstream, wait_s=0.3)
    env.room.result = False
    env.room.sleep_to_deadline = True
    env.gate.start()
    try:
        started = time.monotonic()
        r = _generate(env, "llama3.2")
        elapsed = time.monotonic() - started
    finally:
        env.gate.stop()

    assert r.status_code == 200 and "llama3.2:latest" in upstream.resident
    assert env.room.calls[0].deadline_s == 0.3
    assert elapsed < 5
    assert any(
        line.startswith("Gate: forwarding llama3.2:latest without enough free VRAM after 0.")
        for line in logs
    ), logs
    stats = env.gate.stats()
    assert stats.forwarded_anyway_total == 1 and stats.waits_total == 1
    assert 0.25 < stats.wait_seconds_total < 5


def test_a_room_maker_that_overruns_its_deadline_is_not_waited_for(
    timeline: Timeline, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "MAKE_ROOM_GRACE_S", 0.1)
    env = make_env(timeline, upstream, wait_s=0.2)
    env.room.block = threading.Event()  # never set by the room itself
    env.gate.start()
    try:
        r = _generate(env, "llama3.2")
        assert r.status_code == 200
        assert env.gate.stats().forwarded_anyway_total == 1
    finally:
        env.room.block.set()
        env.gate.stop()


def test_a_room_maker_that_raises_does_not_fail_the_request(env: Env) -> None:
    def boom(need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        raise RuntimeError("comfy exploded")

    env.room.make_room = boom  # type: ignore[method-assign]

    assert _generate(env, "llama3.2").status_code == 200
    assert env.gate.stats().forwarded_anyway_total == 1


def test_resident_requests_do_not_wait_behind_a_gated_load(env: Env) -> None:
    env.upstream.resident.add("qwen3:8b")
    env.room.block = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        gated = pool.submit(_generate, env, "llama3.2")
        deadline = time.monotonic() + 10
        while not env.room.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert env.room.calls, "the gated load never reached make_room"

        r = _generate(env, "qwen3:8b")  # the room maker is still blocked

        assert r.status_code == 200
        assert not gated.done()
        env.room.block.set()
        assert gated.result(timeout=10).status_code == 200


def _wait_for(cond: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    assert cond(), what  # type: ignore[operator]


@pytest.mark.parametrize("version", ["0.12.6", "0.33.0"])
def test_a_model_ollama_evicts_for_a_gated_load_is_not_forwarded_as_resident(
    env: Env, version: str
) -> None:
    """Found by the soak: a gated load made Ollama evict another model, and a request for
    that model, arriving while the gate's /api/ps cache still listed it, went straight
    to Ollama "as resident" with no room judged; Ollama loaded it beside an idle ComfyUI
    and it spilled. It must wait for the load that evicts to be in, find the model gone,
    and get its room made like any load."""
    env.room.profile = ollama_profile(version)
    env.upstream.resident.add("qwen3:8b")
    env.upstream.max_resident = 1  # the next load evicts qwen3:8b
    env.upstream.load_s = 0.4
    assert _generate(env, "qwen3:8b").status_code == 200  # the cache lists qwen3:8b
    with ThreadPoolExecutor(2) as pool:
        gated = pool.submit(_generate, env, "llama3.2")
        _wait_for(lambda: "evicted" in env.timeline.whats(), "the gated load never started")

        again = _generate(env, "qwen3:8b")  # well within the cache's 0.5 s

        assert again.status_code == 200
        assert gated.result(timeout=10).status_code == 200
    reasons = [c.reason for c in env.room.calls]
    assert reasons == ["gate: load of llama3.2:latest", "gate: load of qwen3:8b"]
    # qwen3:8b's room was judged only once llama3.2 was in.
    assert env.timeline.index("loaded", "llama3.2:latest") < env.timeline.index(
        "make_room", "gate: load of qwen3:8b"
    )


@pytest.mark.parametrize(("version", "waits"), [("0.12.6", True), ("0.33.0", False)])
def test_a_model_ollama_keeps_goes_on_as_resident_after_a_fresh_look(
    env: Env, version: str, waits: bool
) -> None:
    """The doubt costs a request for a model Ollama keeps one fresh /api/ps read, and,
    before 0.30 (whose scheduler queues it behind the eviction anyway), the other
    model's load; from 0.30 it goes on at once. No room is made for it either way."""
    env.room.profile = ollama_profile(version)
    env.upstream.resident.add("qwen3:8b")
    env.upstream.load_s = 1.0
    assert _generate(env, "qwen3:8b").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        gated = pool.submit(_generate, env, "llama3.2")
        _wait_for(lambda: "load_start" in env.timeline.whats(), "the gated load never started")

        again = _generate(env, "qwen3:8b")
        loaded_by_then = "loaded" in env.timeline.whats()

        assert again.status_code == 200
        assert gated.result(timeout=10).status_code == 200
    assert loaded_by_then is waits
    assert [c.reason for c in env.room.calls] == ["gate: load of llama3.2:latest"]
    assert env.timeline.whats().count("load_start") == 1  # qwen3:8b was never reloaded


@pytest.mark.parametrize("room_made", [False, True])
def test_a_load_that_fits_in_free_vram_does_not_hold_resident_requests(
    env: Env, room_made: bool
) -> None:
    """With the free VRAM alone enough for the load (at once, or once ComfyUI was freed
    for it), Ollama evicts nothing for it, so a request for a resident model goes on at
    once while it loads."""
    if room_made:
        env.room.frees = 64 * GIB
    else:
        env.room.free = 64 * GIB
    env.upstream.resident.add("qwen3:8b")
    env.upstream.load_s = 2.0
    assert _generate(env, "qwen3:8b").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        gated = pool.submit(_generate, env, "llama3.2")
        _wait_for(lambda: "load_start" in env.timeline.whats(), "the gated load never started")

        again = _generate(env, "qwen3:8b")

        assert again.status_code == 200
        assert "loaded" not in env.timeline.whats(), "waited for the other model's load"
        assert gated.result(timeout=10).status_code == 200
    assert len(env.room.calls) == (1 if room_made else 0)


def test_loads_of_missing_models_are_serialised(env: Env) -> None:
    env.upstream.load_s = 0.3
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_generate, env, "llama3.2")
        second = pool.submit(_generate, env, "qwen3:8b")
        assert first.result(timeout=20).status_code == 200
        assert second.result(timeout=20).status_code == 200

    assert env.room.max_active == 1
    whats = env.timeline.entries
    makes = [i for i, (w, _) in enumerate(whats) if w == "make_room"]
    loaded = [i for i, (w, _) in enumerate(whats) if w == "loaded"]
    assert len(makes) == 2 and len(loaded) == 2
    # The second model's room is made only once the first model is in.
    assert loaded[0] < makes[1]


def test_a_second_request_for_a_loading_model_does_not_make_room_again(env: Env) -> None:
    env.upstream.load_s = 0.3
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(_generate, env, "llama3.2") for _ in range(2)]
        assert [r.result(timeout=20).status_code for r in runs] == [200, 200]

    assert len(env.room.calls) == 1


def test_unreadable_ps_means_no_gating(env: Env) -> None:
    env.api.fail = True

    assert _generate(env, "llama3.2").status_code == 200
    assert env.room.calls == []


def test_num_ctx_read_from_options_reaches_the_estimate(
    timeline: Timeline, upstream: Upstream
) -> None:
    env = make_env(
        timeline,
        upstream,
        estimate_params=EstimateParams(overhead_fixed_bytes=0, overhead_fraction=0.0),
    )
    env.gate.start()
    try:
        _generate(env, "nomic-embed-text", options={"num_ctx": 2048})
    finally:
        env.gate.stop()

    # 300 MiB weights + 28 layers x 2048 x 8 KV heads x 256 x 2 bytes.
    assert env.room.calls[0].need_bytes == 300 * MIB + 28 * 2048 * 8 * 256 * 2


def test_a_model_the_supervisor_unloads_is_not_resident_for_the_gate(env: Env) -> None:
    """The supervisor unloads a model (keep_alive 0) while /api/ps, and the gate's cache of
    it, still list it. A request for it must not be forwarded "to a resident model": it
    would reload the model next to whatever took the room meanwhile. It gets room made
    first, like any load."""
    env.upstream.resident.add("llama3.2:latest")
    assert _generate(env, "llama3.2").status_code == 200  # warm: resident, no room made
    assert env.room.calls == []

    env.gate.forget_resident("llama3.2")  # the supervisor is about to unload it
    time.sleep(0.05)  # the gate's loop takes the notice (call_soon_threadsafe)
    # Ollama has not dropped it yet (asynchronous unload): /api/ps still lists it.
    assert "llama3.2:latest" in env.upstream.resident
    r = _generate(env, "llama3.2")

    assert r.status_code == 200
    [call] = env.room.calls
    assert call.reason == "gate: load of llama3.2:latest"
    # Once it has been brought back with the room made, it is resident again: no more holds.
    assert _generate(env, "llama3.2").status_code == 200
    assert len(env.room.calls) == 1


def test_requests_for_a_model_the_supervisor_unloaded_are_all_answered(env: Env) -> None:
    """Several requests for a model the supervisor just unloaded wait for the same /api/ps
    read; each found it gone and cleared the notice, and all but the first raised
    KeyError: the gate closed their connections without an answer (seen in the benchmark
    under Ollama >= 0.30). Every request must be answered."""
    env.upstream.resident.add("llama3.2:latest")
    assert _generate(env, "llama3.2").status_code == 200
    env.gate.forget_resident("llama3.2")
    time.sleep(0.05)
    env.upstream.resident.clear()  # the unload is done: /api/ps no longer lists it
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: _generate(env, "llama3.2"), range(4)))
    assert [r.status_code for r in answers] == [200] * 4


def test_two_requests_for_a_doomed_model_that_left_ps_both_get_an_answer() -> None:
    """Found by the soak: two requests for a model the supervisor was unloading read /api/ps
    together (one shared read); both saw the model gone, and the second's bookkeeping raised
    KeyError, which dropped its client without an answer."""

    class GoneFromPs:
        def ps(self) -> list[object]:
            time.sleep(0.05)  # both requests wait on the same read
            return []

    async def both() -> list[bool | None]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            gate = admission.Admission(
                ollama=GoneFromPs(),  # type: ignore[arg-type]
                room=None,  # type: ignore[arg-type]
                executor=pool,
                stats=Counters(),
                wait_s=1.0,
                params=EstimateParams(),
                ps_ttl_s=0.5,
                ps_max_stale_s=2.0,
                load_hold_max_s=1.0,
            )
            gate.doom("llama3.2:latest")
            return list(
                await asyncio.gather(
                    gate.is_resident("llama3.2:latest"),
                    gate.is_resident("llama3.2:latest"),
                )
            )

    assert asyncio.run(both()) == [False, False]


def test_admission_ages_its_notices_on_the_clock_it_is_given() -> None:
    """The admission reads no clock of its own: a model the supervisor unloads counts as
    not resident until DOOMED_S on the injected clock, then /api/ps is believed again."""
    from supervisor.model import OllamaModel

    now = [1000.0]

    class StillListed:
        def ps(self) -> tuple[OllamaModel, ...]:
            return (OllamaModel("llama3.2:latest", 2 * 1024**3, 2 * 1024**3),)

    async def check() -> list[bool | None]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            gate = admission.Admission(
                ollama=StillListed(),  # type: ignore[arg-type]
                room=None,  # type: ignore[arg-type]
                executor=pool,
                stats=Counters(),
                wait_s=1.0,
                params=EstimateParams(),
                ps_ttl_s=0.5,
                ps_max_stale_s=2.0,
                load_hold_max_s=1.0,
                clock=lambda: now[0],
            )
            gate.doom("llama3.2:latest")
            seen = [await gate.is_resident("llama3.2:latest")]
            now[0] += admission.DOOMED_S - 1
            seen.append(await gate.is_resident("llama3.2:latest"))
            now[0] += 2  # past the notice: the listing is believed
            seen.append(await gate.is_resident("llama3.2:latest"))
            return seen

    assert asyncio.run(check()) == [False, False, True]


@pytest.mark.parametrize(
    ("version", "headroom"),
    [
        ("0.12.6", LAYER_ESTIMATE_HEADROOM_BYTES),  # Ollama's own layer estimate
        ("0.33.0", FIT_TARGET_BYTES),  # llama-server's fit target
    ],
)
def test_room_that_covers_only_the_bare_estimate_is_not_enough(
    env: Env, version: str, headroom: int
) -> None:
    """Found by the soak: the gate saw "needs about 17.03 GiB; room 17.16 GiB" for an
    Ollama 0.12 and forwarded at once, ComfyUI idle with 6.5 GiB; Ollama's placement keeps
    memory free and offloads whole layers, so the model spilled a layer to the CPU. The
    room must cover what Ollama keeps free as well, or ComfyUI is freed first."""
    profile = ollama_profile(version, {}, 24 * GIB)
    env.room.profile = profile
    facts = FakeOllamaApi(env.upstream).show("llama3.2")
    bare = estimate_need(
        weights_bytes=2 * GIB, facts=facts, request_num_ctx=None, seen=None, params=profile.params
    )
    assert bare is not None
    env.room.free = bare.need_bytes + 128 * MIB  # the model itself fits, with little to spare

    assert _generate(env, "llama3.2").status_code == 200

    [call] = env.room.calls
    assert call.need_bytes == bare.need_bytes + headroom
    env.upstream.resident.clear()
    env.room.calls.clear()
    env.room.free = bare.need_bytes + headroom  # now there is room: nothing to free
    assert _generate(env, "llama3.2").status_code == 200
    assert env.room.calls == []
