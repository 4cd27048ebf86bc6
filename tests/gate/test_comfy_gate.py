"""The image gate in front of the simulator's fake ComfyUI: the web UI's path (HTTP and
the /ws WebSocket) works as it does direct, prompts go in arrival order, a prompt that
needs room waits for it (bounded), and a prompt the gate cannot read passes untouched."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.gate.comfy import (
    DEFAULT_JOB_NEED_BYTES,
    ComfyCounters,
    ComfyGate,
    ModelFolder,
    PromptAdmission,
    PromptJob,
    files_need,
    learned_need,
    parse_prompt,
)
from supervisor.sim import SimHost
from supervisor.sim.websocket import CLOSE
from tests.gate.wsclient import WsClient

GIB = 1024**3


def job(model_gib: float = 6.0, seconds: float = 1.0, steps: int = 3) -> dict[str, Any]:
    inputs = {
        "ckpt_name": f"sim-{model_gib:g}.safetensors",
        "model_gib": model_gib,
        "workspace_gib": 1.0,
        "seconds": seconds,
        "steps": steps,
    }
    return {"prompt": {"9": {"class_type": "SimJob", "inputs": inputs}}}


class FakeRoom:
    """A RoomMaker whose room is `free`; make_room waits for `release` (or its deadline)
    and then reports `result`."""

    def __init__(self, free: int = 20 * GIB) -> None:
        self.free = free
        self.held = 0
        self.calls: list[tuple[int, str]] = []
        self.called = threading.Event()
        self.release = threading.Event()
        self.result = True

    def free_bytes(self) -> int | None:
        return self.free

    def held_bytes(self) -> int | None:
        return self.held

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        self.calls.append((need_bytes, reason))
        self.called.set()
        released = self.release.wait(deadline_s)
        return released and self.result


@pytest.fixture
def host() -> Iterator[SimHost]:
    with SimHost(time_scale=0.05, start_ollama=False) as sim:
        yield sim


@pytest.fixture
def room() -> FakeRoom:
    return FakeRoom()


@pytest.fixture
def gate(host: SimHost, room: FakeRoom) -> Iterator[ComfyGate]:
    g = ComfyGate(upstream_url=host.comfyui_url, room=room, port=0, wait_s=5.0)
    g.start()
    try:
        yield g
    finally:
        g.stop()


def url(gate: ComfyGate) -> str:
    return f"http://127.0.0.1:{gate.port}"


def test_the_web_ui_path_works_through_the_gate(gate: ComfyGate, host: SimHost) -> None:
    """What the browser does: load the page, read stats and queue, open /ws with its
    clientId, queue a prompt with that client_id, follow it to the end on the socket."""
    with httpx.Client(base_url=url(gate), timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and "ComfyUI" in page.text
        assert client.get("/api/system_stats").json()["devices"][0]["type"] == "cuda"
        assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        ws = WsClient(gate.port, "/ws?clientId=browser-1")
        try:
            assert ws.status == 101
            assert ws.header("Sec-WebSocket-Accept") == ws.expected_accept
            [hello] = ws.messages_until(lambda m: m["type"] == "status")
            assert hello["data"] == {
                "status": {"exec_info": {"queue_remaining": 0}},
                "sid": "browser-1",
            }
            ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            assert ws.messages_until(lambda m: True)[0]["type"] == "feature_flags"
            r = client.post("/prompt", json={**job(), "client_id": "browser-1"})
            assert r.status_code == 200, r.text
            prompt_id = r.json()["prompt_id"]
            got = ws.messages_until(
                lambda m: m["type"] == "executing" and m["data"]["node"] is None
            )
            kinds = [m["type"] for m in got]
            for kind in ("execution_start", "executing", "progress", "executed"):
                assert kind in kinds, kinds
            assert kinds.index("execution_start") < kinds.index("progress")
            assert kinds.index("executed") < kinds.index("execution_success")
            assert "status" in kinds  # queue changes are broadcast
            progress = [m["data"] for m in got if m["type"] == "progress"]
            assert [p["value"] for p in progress] == [1, 2, 3]
            assert all(p["prompt_id"] == prompt_id and p["max"] == 3 for p in progress)
            history = client.get(f"/history/{prompt_id}").json()
            assert history[prompt_id]["status"]["completed"] is True
            ws.send_close()
            frame = ws.next_frame()
            while frame is not None and frame[0] != CLOSE:  # a last status may come first
                frame = ws.next_frame()
            assert frame is not None and frame[0] == CLOSE
            assert ws.next_frame(2.0) is None and ws.closed  # the tunnel ends with it
        finally:
            ws.close()
    stats = gate.stats()
    assert stats.websockets_total == 1
    assert stats.prompts_total == 1


def test_a_socket_without_client_id_sees_only_what_comfyui_broadcasts(
    gate: ComfyGate,
) -> None:
    with httpx.Client(base_url=url(gate), timeout=10) as client:
        mine = WsClient(gate.port, "/ws?clientId=me")
        other = WsClient(gate.port, "/ws")
        try:
            [hello] = other.messages_until(lambda m: m["type"] == "status")
            sid = hello["data"]["sid"]
            assert len(sid) == 32 and sid != "me"  # a uuid hex made by the server
            mine.messages_until(lambda m: m["type"] == "status")
            assert client.post("/prompt", json={**job(), "client_id": "me"}).status_code == 200
            mine.messages_until(lambda m: m["type"] == "executing" and m["data"]["node"] is None)
            time.sleep(0.2)
            seen = other.messages_until(lambda m: True, timeout_s=2)
            while (frame := other.next_frame(0.3)) is not None:
                seen.append(json.loads(frame[1]))
            assert {m["type"] for m in seen} == {"status"}
        finally:
            mine.close()
            other.close()


def test_a_quiet_websocket_is_closed_after_the_idle_timeout(host: SimHost, room: FakeRoom) -> None:
    g = ComfyGate(upstream_url=host.comfyui_url, room=room, port=0, ws_idle_s=0.5)
    g.start()
    try:
        ws = WsClient(g.port, "/ws?clientId=quiet")
        ws.messages_until(lambda m: m["type"] == "status")
        started = time.monotonic()
        assert ws.next_frame(5.0) is None
        took = time.monotonic() - started
        assert ws.closed and 0.3 < took < 4
        ws.close()
    finally:
        g.stop()


def test_a_plain_get_of_ws_is_refused_as_comfyui_does(gate: ComfyGate) -> None:
    r = httpx.get(f"{url(gate)}/ws", timeout=10)
    assert r.status_code == 400


def test_a_prompt_waiting_for_room_holds_later_prompts(
    gate: ComfyGate, host: SimHost, room: FakeRoom
) -> None:
    room.free = 2 * GIB  # short of the default need: the first prompt waits for room
    answers: dict[str, httpx.Response] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        answers[name] = httpx.post(f"{url(gate)}/prompt", json=body, timeout=30)

    first = threading.Thread(target=send, args=("first", job(model_gib=6.0)))
    first.start()
    assert room.called.wait(10)
    second = threading.Thread(target=send, args=("second", job(model_gib=1.0)))
    second.start()
    time.sleep(0.5)
    # Neither reached ComfyUI while the room is being made.
    assert httpx.get(f"{host.comfyui_url}/prompt").json()["exec_info"]["queue_remaining"] == 0
    assert not answers
    room.release.set()
    first.join(10)
    second.join(10)
    assert answers["first"].status_code == answers["second"].status_code == 200
    assert answers["first"].json()["number"] < answers["second"].json()["number"]
    assert len(room.calls) == 2  # the second was short of room too, and asked in turn
    need, reason = room.calls[0]
    assert need == 8 * GIB and "sim-6.safetensors" in reason


def test_the_wait_for_room_is_bounded(host: SimHost) -> None:
    room = FakeRoom(free=0)  # make_room never gets the room
    g = ComfyGate(upstream_url=host.comfyui_url, room=room, port=0, wait_s=0.5)
    g.start()
    try:
        started = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{g.port}/prompt", json=job(), timeout=30)
        took = time.monotonic() - started
    finally:
        g.stop()
    assert r.status_code == 200
    assert 0.4 < took < 5
    stats = g.stats()
    assert (stats.waits_total, stats.forwarded_anyway_total) == (1, 1)


def test_a_prompt_with_room_goes_at_once(gate: ComfyGate, room: FakeRoom) -> None:
    r = httpx.post(f"{url(gate)}/api/prompt", json=job(), timeout=10)
    assert r.status_code == 200
    assert room.calls == []
    assert gate.stats().prompts_total == 1


def test_a_prompt_the_gate_cannot_read_passes_untouched(gate: ComfyGate, room: FakeRoom) -> None:
    no_prompt = httpx.post(f"{url(gate)}/prompt", json={"client_id": "x"}, timeout=10)
    assert no_prompt.status_code == 400
    assert no_prompt.json()["error"]["type"] == "no_prompt"
    not_json = httpx.post(f"{url(gate)}/prompt", content=b"{nope", timeout=10)
    assert not_json.status_code == 500  # what ComfyUI answers it
    assert room.calls == []
    assert gate.stats().prompts_total == 0


def test_comfyui_down_is_a_502(room: FakeRoom) -> None:
    g = ComfyGate(upstream_url="http://127.0.0.1:9", room=room, port=0)
    g.start()
    try:
        r = httpx.get(f"http://127.0.0.1:{g.port}/queue", timeout=10)
        ws_refused = WsClient(g.port, "/ws?clientId=a")
    finally:
        g.stop()
    assert r.status_code == 502 and "vram-supervisor gate" in r.json()["error"]
    assert ws_refused.status == 502
    ws_refused.close()


def test_the_prompt_parser_finds_the_model_files() -> None:
    body = {
        "prompt": {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
            "5": {"class_type": "LoraLoader", "inputs": {"lora_name": "a.SAFETENSORS", "x": 1}},
            "6": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
        }
    }
    assert parse_prompt(json.dumps(body).encode(), 1000) == PromptJob(
        ("a.SAFETENSORS", "b.safetensors")
    )
    assert parse_prompt(b"[1]", 1000) is None
    assert parse_prompt(b'{"prompt": 3}', 1000) is None
    assert parse_prompt(b"{" * 50, 10) is None  # too large to look into: not gated


def test_the_need_learned_is_the_largest_growth_with_a_margin() -> None:
    assert learned_need(None, 8 * GIB, 6 * GIB, is_squeezed=False) == int(6 * GIB * 1.15)
    # The models were already loaded: nothing to learn.
    assert learned_need(5 * GIB, 8 * GIB, 100 * 1024**2, is_squeezed=False) is None
    # A smaller run (part of it was resident) does not lower what was learned.
    assert learned_need(9 * GIB, 8 * GIB, 2 * GIB, is_squeezed=False) == 9 * GIB


def test_a_squeezed_run_teaches_only_a_floor() -> None:
    """A job that left the card nearly full took what it could (low-VRAM mode): its
    growth underestimates it, so the need is raised at each such run."""
    first = learned_need(None, 8 * GIB, 15 * GIB, is_squeezed=True)
    assert first == int(15 * GIB * 1.15) + 2 * GIB
    assert learned_need(first, 8 * GIB, 15 * GIB, is_squeezed=True) == first + 2 * GIB


def test_the_gate_learns_what_a_job_takes_while_it_runs(host: SimHost) -> None:
    """ComfyUI's VRAM grows by 6 GiB after the prompt went on: the next prompt with the
    same model file asks for that plus the margin, and gets room made for it."""
    room = FakeRoom(free=20 * GIB)
    room.release.set()
    g = ComfyGate(upstream_url=host.comfyui_url, room=room, port=0)
    g.start()
    try:
        assert httpx.post(f"http://127.0.0.1:{g.port}/prompt", json=job(), timeout=10).is_success
        room.held = 6 * GIB
        deadline = time.monotonic() + 10
        while not g.admission.learned and time.monotonic() < deadline:
            time.sleep(0.05)
        assert g.admission.learned == {("sim-6.safetensors",): int(6 * GIB * 1.15)}
        room.free = 6 * GIB + 1  # free VRAM 1 byte, ComfyUI's own 6 GiB: short of 6.9 GiB
        assert httpx.post(f"http://127.0.0.1:{g.port}/prompt", json=job(), timeout=10).is_success
    finally:
        g.stop()
    assert [need for need, _ in room.calls] == [int(6 * GIB * 1.15)]


def sparse(path: Path, size: int) -> Path:
    """A model file of `size` bytes that takes no disk (the gate only reads its size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_a_first_job_is_sized_from_its_files_in_the_models_folder(
    host: SimHost, tmp_path: Path
) -> None:
    """A job never run before whose checkpoint weighs 12 GiB: with 10 GiB of room the
    8 GiB default would let it go at once (and run in low-VRAM mode next to an idle LLM);
    sized from the file in the mounted models folder, room is made first."""
    sparse(tmp_path / "checkpoints" / "sim-6.safetensors", 12 * GIB)
    room = FakeRoom(free=10 * GIB)
    room.release.set()
    g = ComfyGate(upstream_url=host.comfyui_url, room=room, port=0, models_dir=tmp_path)
    g.start()
    try:
        assert httpx.post(f"http://127.0.0.1:{g.port}/prompt", json=job(), timeout=10).is_success
    finally:
        g.stop()
    assert [need for need, _ in room.calls] == [files_need([12 * GIB])]
    assert files_need([12 * GIB]) > 13 * GIB  # the weights plus a workspace


def test_the_models_folder_finds_files_by_type_folder_and_subfolder(tmp_path: Path) -> None:
    sparse(tmp_path / "checkpoints" / "SDXL" / "base.safetensors", 7 * GIB)
    sparse(tmp_path / "unet" / "flux.safetensors", 12 * GIB)
    sparse(tmp_path / "clip" / "flux.safetensors", 5 * GIB)  # same name: the larger counts
    sparse(tmp_path.parent / "outside.safetensors", GIB)
    folder = ModelFolder(tmp_path)
    assert folder.size_of("SDXL/base.safetensors") == 7 * GIB
    assert folder.size_of("SDXL\\base.safetensors") == 7 * GIB  # Windows-style, as sent
    assert folder.size_of("flux.safetensors") == 12 * GIB
    assert folder.size_of("none.safetensors") is None
    assert folder.size_of("../outside.safetensors") is None
    assert folder.size_of(str(tmp_path.parent / "outside.safetensors")) is None
    assert ModelFolder(tmp_path / "missing").size_of("flux.safetensors") is None


def test_the_need_prefers_what_was_learned_unless_it_is_below_the_weights(
    tmp_path: Path,
) -> None:
    sparse(tmp_path / "checkpoints" / "a.safetensors", 10 * GIB)
    admission = PromptAdmission(
        room=FakeRoom(),
        executor=ThreadPoolExecutor(1),
        stats=ComfyCounters(),
        wait_s=1,
        models=ModelFolder(tmp_path),
    )
    a = PromptJob(("a.safetensors",))
    assert admission.need_of(a) == (files_need([10 * GIB]), "its files' sizes")
    admission.learned[a.files] = 12 * GIB
    assert admission.need_of(a) == (12 * GIB, "learned from its earlier runs")
    admission.learned[a.files] = 4 * GIB  # the readings missed the job's peak
    assert admission.need_of(a)[0] == files_need([10 * GIB])
    # Several files: a run that needed less than their sum (a text encoder leaves the GPU
    # after encoding) is believed, as long as it held at least the largest of them.
    sparse(tmp_path / "clip" / "t5.safetensors", 9 * GIB)
    flux = PromptJob(("a.safetensors", "t5.safetensors"))
    admission.learned[flux.files] = 13 * GIB
    assert admission.need_of(flux) == (13 * GIB, "learned from its earlier runs")
    admission.learned[flux.files] = 9 * GIB  # below the 10 GiB model: squeezed
    assert admission.need_of(flux)[0] == files_need([10 * GIB, 9 * GIB])
    # A file not in the folder: no less than the default.
    both = PromptJob(("a.safetensors", "b.safetensors"))
    assert admission.need_of(both) == (
        max(files_need([10 * GIB]), DEFAULT_JOB_NEED_BYTES),
        "its files' sizes, some not found",
    )
    assert admission.need_of(PromptJob(("b.safetensors",))) == (
        DEFAULT_JOB_NEED_BYTES,
        "the default",
    )
