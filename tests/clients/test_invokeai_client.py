"""The InvokeAI client against the fake InvokeAI over HTTP (tenants.md §5): busy from the
queue status, the RAM cache's models, the free that keeps a running model, and errors
(bad shapes, 403 in multi-user mode, a server that is down) as ServiceError."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tenacity import wait_none

from supervisor.clients._http import ShapeError
from supervisor.clients.invokeai import InvokeAIClient, parse_queue_status
from supervisor.errors import ServiceError
from supervisor.model import JobState
from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.invokeai import CONTEXT_BYTES, FakeInvokeAI, InvokeConfig


@pytest.fixture
def fake() -> Iterator[tuple[FakeInvokeAI, MemoryGpu, str]]:
    gpu = MemoryGpu(24 * GIB)
    invoke = FakeInvokeAI(gpu, InvokeConfig(time_scale=0.05, load_seconds=0.2))
    server = invoke.serve()
    yield invoke, gpu, server.url
    server.stop()
    invoke.close()


def enqueue(url: str, key: str, gib: float, seconds: float) -> None:
    model = {"key": key, "name": key, "base": "sdxl", "type": "main", "sim_gib": gib}
    body = {"batch": {"graph": {"nodes": {"m": {"model": model}}}, "sim_seconds": seconds}}
    assert httpx.post(f"{url}/api/v1/queue/default/enqueue_batch", json=body).status_code == 200


def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_idle_then_busy_then_idle(fake: tuple[FakeInvokeAI, MemoryGpu, str]) -> None:
    _, gpu, url = fake
    with InvokeAIClient(url, retry_wait=wait_none()) as client:
        assert client.jobs() == JobState(busy=False, can_free=True, queued=0)
        enqueue(url, "sdxl", 6.0, seconds=40)  # 2 s at time_scale 0.05
        state = client.jobs()
        assert state.busy is True and state.queued == 1 and state.vram_bytes is None
        until(lambda: client.jobs().busy is False)
        assert client.jobs() == JobState(busy=False, can_free=True, queued=0, models=("sdxl",))
        assert gpu.used_bytes() == 6 * GIB + CONTEXT_BYTES
        client.free()
        assert gpu.used_bytes() == CONTEXT_BYTES
        assert client.jobs().models == ()


def test_pending_items_of_a_paused_processor_are_work(
    fake: tuple[FakeInvokeAI, MemoryGpu, str],
) -> None:
    _, _, url = fake
    httpx.put(f"{url}/api/v1/queue/default/processor/pause")
    enqueue(url, "a", 1.0, seconds=0)
    with InvokeAIClient(url) as client:
        state = client.jobs()
    assert state.busy is True and state.queued == 1


def test_free_during_a_run_keeps_the_running_model(
    fake: tuple[FakeInvokeAI, MemoryGpu, str],
) -> None:
    _, gpu, url = fake
    enqueue(url, "a", 3.0, seconds=0)
    with InvokeAIClient(url) as client:
        until(lambda: client.jobs() == JobState(False, True, 0, models=("a",)))
        enqueue(url, "b", 5.0, seconds=200)
        until(lambda: client.jobs().models == ("a", "b"))
        client.free()  # a caller that did not check jobs() first: the locked model stays
        assert client.jobs().models == ("b",)
        assert client.jobs().busy is True
    assert gpu.used_bytes() == 5 * GIB + CONTEXT_BYTES


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "status is a list, expected an object"),
        ({"queue": {}, "processor": {"is_processing": False}}, "status.queue has no 'pending'"),
        (
            {"queue": {"pending": 0, "in_progress": 0}, "processor": {"is_processing": "no"}},
            "is_processing is not a boolean",
        ),
    ],
)
def test_bad_queue_shapes(body: Any, message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        parse_queue_status(body)


class _Answer:
    """A server that answers every request with one fixed status and body."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body, self.paths = status, body, []  # type: ignore[var-annotated]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(f"{request.method} {request.url.path}")
        return httpx.Response(self.status, json=self.body)


def test_multi_user_mode_403_is_explained() -> None:
    answer = _Answer(403, {"detail": "Admin privileges required"})
    client = InvokeAIClient("http://invoke.test:9090", transport=httpx.MockTransport(answer))
    with pytest.raises(ServiceError, match="multi-user mode, where only an admin"):
        client.free()
    assert answer.paths == ["POST /api/v2/models/empty_model_cache"]  # sent once


def test_a_500_and_garbage_are_service_errors() -> None:
    client = InvokeAIClient(
        "http://invoke.test:9090", transport=httpx.MockTransport(_Answer(500, "boom"))
    )
    with pytest.raises(
        ServiceError,
        match=r"^invokeai at http://invoke.test:9090: GET "
        r"/api/v1/queue/default/status returned HTTP 500",
    ):
        client.jobs()


def test_stats_that_fail_only_leave_the_models_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status"):
            queue = {"pending": 0, "in_progress": 0}
            return httpx.Response(200, json={"queue": queue, "processor": {"is_processing": False}})
        return httpx.Response(404, json={"detail": "Not Found"})

    client = InvokeAIClient("http://invoke.test:9090", transport=httpx.MockTransport(handler))
    assert client.jobs() == JobState(busy=False, can_free=True, queued=0)


def test_down_is_a_service_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        InvokeAIClient(f"http://127.0.0.1:{port}", retry_wait=wait_none()) as client,
        pytest.raises(ServiceError, match="cannot connect"),
    ):
        client.jobs()
