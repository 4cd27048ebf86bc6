"""The sd-webui client against the fake web UI over HTTP in its three variants (tenants.md
§4, §6): which one it is, busy from /progress (Forge: and pending tasks; SD.Next: /status),
its own torch figure, the free, A1111's parked weights and their reload, and errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tenacity import wait_none

from supervisor.clients._http import ShapeError
from supervisor.clients.sd_webui import (
    SdWebUiClient,
    parse_memory,
    parse_progress,
    parse_sdnext_status,
)
from supervisor.errors import ServiceError
from supervisor.model import JobState
from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.sdwebui import CONTEXT_BYTES, FakeSdWebUI, SdConfig

Make = Callable[..., tuple[FakeSdWebUI, MemoryGpu, str]]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[tuple[FakeSdWebUI, Any]] = []

    def build(variant: str, api: bool = True) -> tuple[FakeSdWebUI, MemoryGpu, str]:
        gpu = MemoryGpu(24 * GIB)
        fake = FakeSdWebUI(gpu, SdConfig(variant=variant, api=api, time_scale=0.05))
        server = fake.serve()
        made.append((fake, server))
        return fake, gpu, server.url

    yield build
    for fake, server in made:
        server.stop()
        fake.close()


def until(pred: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def generate(url: str, steps: int) -> threading.Thread:
    t = threading.Thread(
        target=lambda: httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": steps}, timeout=30)
    )
    t.start()
    return t


@pytest.mark.parametrize("variant", ["a1111", "forge", "sdnext"])
def test_tells_the_variants_apart_and_reads_idle(make: Make, variant: str) -> None:
    fake, _, url = make(variant)
    with SdWebUiClient(url, retry_wait=wait_none()) as client:
        state = client.jobs()
    loaded = fake.weights_bytes if variant != "forge" else 0
    assert state == JobState(busy=False, can_free=True, queued=0, mode=variant, vram_bytes=loaded)


@pytest.mark.parametrize("variant", ["a1111", "forge", "sdnext"])
def test_busy_while_a_job_runs(make: Make, variant: str) -> None:
    fake, _, url = make(variant)
    with SdWebUiClient(url) as client:
        t = generate(url, steps=40)
        until(lambda: client.jobs().busy)
        assert client.jobs().queued == 1
        # Its weights plus the job's workspace (Forge loads the weights as the job starts)
        until(lambda: (client.jobs().vram_bytes or 0) > fake.weights_bytes)
        t.join()
        assert client.jobs().busy is False


def test_forge_counts_tasks_waiting_for_the_queue_lock(make: Make) -> None:
    _, _, url = make("forge")
    with SdWebUiClient(url) as client:
        first = generate(url, steps=40)
        until(lambda: client.jobs().queued == 1)
        second = generate(url, steps=40)
        until(lambda: client.jobs().queued == 2)
        assert client.jobs().busy is True
        first.join()
        second.join()


def test_a1111_free_parks_the_weights_and_reload_puts_them_back(make: Make) -> None:
    fake, gpu, url = make("a1111")
    with SdWebUiClient(url) as client:
        client.free()
        assert gpu.used_bytes() == CONTEXT_BYTES
        state = client.jobs()
        assert state.parked_bytes == fake.weights_bytes and state.vram_bytes == 0
        client.reload()
        assert gpu.used_bytes() == CONTEXT_BYTES + fake.weights_bytes
        assert client.jobs().parked_bytes is None


def test_a1111_parked_weights_are_forgotten_once_back_on_the_gpu(make: Make) -> None:
    _, _, url = make("a1111")
    with SdWebUiClient(url) as client:
        client.free()
        assert client.jobs().parked_bytes is not None
        httpx.post(f"{url}/sdapi/v1/reload-checkpoint")  # the user did it from the UI
        assert client.jobs().parked_bytes is None


@pytest.mark.parametrize("variant", ["forge", "sdnext"])
def test_forge_and_sdnext_frees_park_nothing(make: Make, variant: str) -> None:
    fake, gpu, url = make(variant)
    httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": 2})
    assert gpu.used_bytes() == CONTEXT_BYTES + fake.weights_bytes
    with SdWebUiClient(url) as client:
        client.free()  # SD.Next answers 204, the others 200 {}
        assert gpu.used_bytes() == CONTEXT_BYTES
        assert client.jobs().parked_bytes is None


@pytest.mark.parametrize("variant", ["a1111", "forge"])
def test_without_api_the_error_says_so(make: Make, variant: str) -> None:
    _, _, url = make(variant, api=False)
    with (
        SdWebUiClient(url) as client,
        pytest.raises(ServiceError, match="serves no API \\(start it with --api"),
    ):
        client.jobs()


def test_down_is_a_service_error() -> None:
    with (
        SdWebUiClient("http://127.0.0.1:9", retry_wait=wait_none()) as client,
        pytest.raises(ServiceError, match=r"^sd-webui at http://127.0.0.1:9: .*cannot connect"),
    ):
        client.jobs()


def test_parsers_refuse_wrong_shapes() -> None:
    with pytest.raises(ShapeError, match=r"progress\.state has no 'job_count'"):
        parse_progress({"progress": 0, "state": {}})
    with pytest.raises(ShapeError, match="expected 'running' or 'idle'"):
        parse_sdnext_status({"status": "busy"})
    assert parse_sdnext_status({"status": "idle", "queued": 2}) == (True, 2)
    assert parse_memory({"ram": {}, "cuda": {"error": "no CUDA"}}) is None
    assert parse_progress({"state": {"job_count": -1}}) == 0


def test_a_garbage_progress_is_a_service_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sdapi/v1/status":
            return httpx.Response(404, json={"detail": "Not Found"})
        if request.url.path == "/sdapi/v1/options":
            return httpx.Response(200, json={"sd_model_checkpoint": "x"})
        return httpx.Response(200, text="<html>")

    client = SdWebUiClient("http://sd.test:7860", transport=httpx.MockTransport(handler))
    with pytest.raises(ServiceError, match=r"GET /sdapi/v1/progress.* not JSON"):
        client.jobs()
    assert client.mode() == "a1111"
