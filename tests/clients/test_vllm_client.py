"""The vLLM client against the fake vLLM (supervisor/sim/vllm.py) over real HTTP.

What the supervisor must get right (tenants.md §3): whether the server has sleep mode at
all, whether its engine queues requests that arrive while asleep (else it is never put to
sleep), requests running and waiting from /metrics, and a sleep that never cuts a request
off.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from supervisor.clients._http import ShapeError
from supervisor.clients.vllm import VllmClient, parse_requests
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState
from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.vllm import FakeVllm, VllmConfig

MODEL = "Qwen/Qwen2.5-7B-Instruct"
Start = Callable[..., tuple[FakeVllm, VllmClient]]


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[tuple[SimServer, FakeVllm, VllmClient]] = []

    def _start(**config: Any) -> tuple[FakeVllm, VllmClient]:
        options = {"enable_sleep_mode": True, "dev_mode": True, "time_scale": 0.05, **config}
        fake = FakeVllm(MemoryGpu(24 * GIB), VllmConfig(**options))
        server = fake.serve()
        client = VllmClient(server.url, timeout_s=5.0)
        servers.append((server, fake, client))
        return fake, client

    yield _start
    for server, fake, client in servers:
        client.close()
        server.stop()
        fake.close()


def send(fake: FakeVllm, url: str, max_tokens: int) -> tuple[threading.Thread, dict[str, Any]]:
    """A completion in a thread; its answer lands in the returned dict."""
    out: dict[str, Any] = {}

    def go() -> None:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens}
        out["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_an_idle_server_with_sleep_mode(start: Start) -> None:
    _, client = start()
    assert client.served() == ServedState(
        (ServedModel(MODEL, "loaded", busy=False),),
        can_unload=True,
        mode="sleep mode",
        busy=False,
        waiting=0,
        can_wake=True,
    )
    assert client.busy(MODEL) is False
    assert client.models() == (MODEL,)


def test_without_dev_mode_there_is_no_sleep_mode_and_no_unload(start: Start) -> None:
    _, client = start(dev_mode=False)
    state = client.served()
    assert (state.mode, state.can_unload, state.can_wake) == ("no sleep mode", False, False)
    assert state.models == (ServedModel(MODEL, "loaded", busy=False),)
    with pytest.raises(ServiceError, match=r"--enable-sleep-mode.*VLLM_SERVER_DEV_MODE=1"):
        client.unload(MODEL)


def test_an_old_engine_is_never_put_to_sleep(start: Start) -> None:
    _, client = start(engine="old")
    state = client.served()
    assert not state.can_unload
    assert state.mode == "sleep mode not used: vLLM 0.11.0 crashes on a request while asleep"
    assert state.can_wake  # if something else put it to sleep, it can still be woken


def test_running_and_queued_requests_make_it_busy(start: Start) -> None:
    fake, client = start(max_num_seqs=1, tokens_per_s=10.0, time_scale=1.0)
    url = client.base_url
    first, _ = send(fake, url, 50)  # 5 s
    until(lambda: fake.running == 1, "a running request")
    state = client.served()
    assert state.busy is True and state.models[0].busy is True and state.waiting == 0
    assert client.busy(MODEL) is True
    second, _ = send(fake, url, 1)
    until(lambda: fake.waiting == 1, "a queued request")
    assert client.served().waiting == 1
    assert client.busy(MODEL) is True
    assert client.busy("another/model") is None  # not what this server serves
    first.join()
    second.join()
    assert client.busy(MODEL) is False


def test_unload_puts_it_to_sleep_and_wake_brings_it_back(start: Start) -> None:
    fake, client = start()
    before = fake.held_bytes()
    assert before == int(24 * GIB * 0.9)
    client.unload(MODEL)
    asleep = client.served()
    assert asleep.models == (ServedModel(MODEL, "sleeping", busy=False),)
    assert asleep.can_unload and asleep.can_wake and asleep.waiting == 0
    assert fake.held_bytes() == fake.context_bytes < before // 50
    client.unload(MODEL)  # already asleep: nothing sent, no error
    assert fake.sleeps == 1
    client.wake(MODEL)
    assert client.served().models[0].state == "loaded"
    assert fake.held_bytes() == before


def test_a_sleep_lets_a_request_that_slipped_in_finish(start: Start) -> None:
    """The busy check comes first, but a request may arrive just after it: the sleep is
    sent with mode=wait, so the request finishes instead of being aborted."""
    fake, client = start(tokens_per_s=20.0, time_scale=1.0)
    thread, out = send(fake, client.base_url, 40)  # 2 s
    until(lambda: fake.running == 1, "a running request")
    client.unload(MODEL)
    thread.join()
    assert out["response"].status_code == 200
    assert out["response"].json()["choices"][0]["finish_reason"] == "length"
    assert fake.aborted == 0 and client.served().models[0].state == "sleeping"


def test_a_request_while_asleep_waits_and_shows_as_waiting(start: Start) -> None:
    fake, client = start()
    client.unload(MODEL)
    thread, out = send(fake, client.base_url, 1)
    until(lambda: fake.waiting == 1, "a queued request")
    state = client.served()
    assert state.models[0].state == "sleeping" and state.waiting == 1
    client.wake(MODEL)
    thread.join()
    assert out["response"].status_code == 200


def test_a_server_that_is_down_is_a_service_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = VllmClient(f"http://127.0.0.1:{port}", timeout_s=1.0, attempts=1)
    with client, pytest.raises(ServiceError, match=r"vLLM at http://127\.0\.0\.1:\d+.*connect"):
        client.served()


def test_metrics_parsing() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
    )
    requests = parse_requests(text)
    assert (requests.running, requests.waiting) == (3, 4)
    with pytest.raises(ShapeError, match="no vllm:num_requests_waiting"):
        parse_requests(text.split("# TYPE vllm:num_requests_waiting")[0])
    with pytest.raises(ShapeError):
        parse_requests("this is { not prometheus\n")
