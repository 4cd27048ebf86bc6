"""The llama-server and llama-swap clients against the simulator's fakes over real HTTP.

The fakes follow tenants.md §1-2 (shapes, status codes, error texts, the asynchronous
router unload, llama-swap's blocking unload that cuts requests off). What a user would
notice: `served()` names each model with its state; `busy()` says True only while a
generation runs, False when idle, and None when it cannot tell, and never loads or wakes
a model to find out; `unload()` frees the model (the router later, llama-swap before it
answers) and an unload of what is already gone is no error; every failure is a
`ServiceError`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tenacity import wait_none

from supervisor.clients.llama_server import LlamaServerClient
from supervisor.clients.llama_swap import LlamaSwapClient
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState
from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB
from supervisor.sim.llama_server import LlamaServerConfig
from supervisor.sim.llama_swap import parse_swap_config

SMALL = "llama3.2:latest"
MID = "llama3.1:8b"

MakeHost = Callable[..., SimHost]


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@pytest.fixture
def make_host() -> Iterator[MakeHost]:
    hosts: list[SimHost] = []

    def make(held: int = 0, **kwargs: Any) -> SimHost:
        kwargs.setdefault("time_scale", 0.01)
        host = SimHost(start_ollama=False, start_comfyui=False, **kwargs)
        hosts.append(host)
        if held:
            assert host.gpu.allocate("other:comfyui", 4242, held)
        return host.start()

    yield make
    for host in hosts:
        host.stop()


def router(make_host: MakeHost, held: int = 0, **config: Any) -> SimHost:
    config.setdefault("models", (SMALL, MID))
    config.setdefault("ctx_size", 4096)
    return make_host(held, llama_server=LlamaServerConfig(**config))


def single(make_host: MakeHost, **config: Any) -> SimHost:
    config.setdefault("model", SMALL)
    config.setdefault("ctx_size", 4096)
    return make_host(llama_server=LlamaServerConfig(**config))


def swap(make_host: MakeHost, **extra: Any) -> SimHost:
    parsed = parse_swap_config(
        {"models": {"chat": {"model": MID, "aliases": ["gpt-4o"]}, "small": {"model": SMALL}}}
    )
    for key, value in extra.items():
        setattr(parsed, key, value)
    return make_host(llama_swap=parsed)


def server_client(host: SimHost) -> LlamaServerClient:
    return LlamaServerClient(host.llama_server_url, 10.0, retry_wait=wait_none())


def swap_client(host: SimHost) -> LlamaSwapClient:
    return LlamaSwapClient(host.llama_swap_url, 10.0, retry_wait=wait_none())


def states(served: ServedState) -> dict[str, str]:
    return {m.name: m.state for m in served.models}


def by_name(served: ServedState, name: str) -> ServedModel:
    return next(m for m in served.models if m.name == name)


def generate_in_background(url: str, model: str | None, tokens: int) -> list[object]:
    """A chat completion of `tokens` tokens in a thread; its response (or error) lands in
    the returned list when it ends."""
    out: list[object] = []
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    if model is not None:
        body["model"] = model

    def run() -> None:
        try:
            with httpx.Client(timeout=60) as c:
                out.append(c.post(f"{url}/v1/chat/completions", json=body))
        except httpx.TransportError as exc:
            out.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return out


def vram_of(host: SimHost, pid: int) -> int:
    return dict(host.gpu.processes()).get(pid, 0)


# --------------------------------------------------------------------------- router


def test_router_served_lists_every_model_with_its_state(make_host: MakeHost) -> None:
    host = router(make_host, load_base_s=100.0)  # 1 s real to load
    with server_client(host) as c:
        first = c.served()
        assert (first.mode, first.can_unload) == ("router", True)
        assert states(first) == {SMALL: "unloaded", MID: "unloaded"}
        assert all(m.busy is None for m in first.models)  # a read never touches /slots
        assert set(c.models()) == {SMALL, MID}  # what it would serve, loaded or not
        assert states(c.served()) == {SMALL: "unloaded", MID: "unloaded"}  # listing loads none
        assert host.fake_llama_server is not None
        host.fake_llama_server.load(SMALL)
        loading = by_name(c.served(), SMALL)
        assert loading.state == "loading" and loading.is_resident and loading.is_loading
        wait_until(lambda: by_name(c.served(), SMALL).state == "loaded", what="loaded")
        loaded = by_name(c.served(), SMALL)
        child = host.fake_llama_server.children()[SMALL]
        assert loaded.size_bytes == child.spec.size_bytes  # meta.size, merged while it runs
        assert by_name(c.served(), MID).size_bytes is None


def test_router_served_shows_a_sleeping_and_a_failed_model(make_host: MakeHost) -> None:
    host = router(make_host, sleep_idle_s=30.0)  # sleeps after 0.3 s real
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        host.fake_llama_server.load(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "sleeping", what="sleeping")
        asleep = by_name(c.served(), SMALL)
        assert not asleep.is_resident  # what it keeps is a context, nothing to unload
    failing = router(make_host, held=22 * GIB, fit=False)
    assert failing.fake_llama_server is not None
    with server_client(failing) as c:
        failing.fake_llama_server.load(MID)  # the child dies out of memory
        wait_until(lambda: by_name(c.served(), MID).state == "failed", what="failed")
        assert not by_name(c.served(), MID).is_resident


def test_router_busy_while_a_generation_runs_and_idle_after(make_host: MakeHost) -> None:
    host = router(make_host, token_s=2.0)  # 20 ms real a token
    url = host.llama_server_url
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        host.fake_llama_server.load(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "loaded")
        assert c.busy(SMALL) is False
        out = generate_in_background(url, SMALL, 100)  # 2 s real
        child = host.fake_llama_server.children()[SMALL]
        wait_until(lambda: child.inflight == 1, what="in flight")
        assert c.busy(SMALL) is True
        wait_until(lambda: out, what="the generation to end")
        assert isinstance(out[0], httpx.Response) and out[0].status_code == 200
        assert c.busy(SMALL) is False


def test_router_busy_never_loads_or_wakes_a_model(make_host: MakeHost) -> None:
    host = router(make_host, sleep_idle_s=30.0)
    assert host.fake_llama_server is not None
    fake = host.fake_llama_server
    with server_client(host) as c:
        assert c.busy(MID) is None  # unloaded: `/slots?model=` would autoload it
        time.sleep(0.2)
        assert by_name(c.served(), MID).state == "unloaded" and MID not in fake.children()
        assert host.gpu.used_bytes() == 0
        assert c.busy("no-such-model") is None
        fake.load(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "sleeping", what="sleeping")
        wakes = fake.children()[SMALL].stats.wakes
        assert c.busy(SMALL) is None  # sleeping: `/slots` would wake it
        time.sleep(0.1)
        assert by_name(c.served(), SMALL).state == "sleeping"
        assert fake.children()[SMALL].stats.wakes == wakes


def test_router_busy_is_unknown_without_slots(make_host: MakeHost) -> None:
    host = router(make_host, slots=False)
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        host.fake_llama_server.load(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "loaded")
        assert c.busy(SMALL) is None  # 501: never unloaded on a guess


def test_router_unload_is_asynchronous_and_verified_by_reading_again(
    make_host: MakeHost,
) -> None:
    host = router(make_host, child_exit_s=100.0)  # the child takes 1 s real to exit
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        host.fake_llama_server.load(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "loaded")
        pid = host.fake_llama_server.children()[SMALL].pid
        held = vram_of(host, pid)
        assert held > 0
        c.unload(SMALL)
        assert vram_of(host, pid) == held  # the answer came before the memory
        assert by_name(c.served(), SMALL).is_resident
        wait_until(lambda: not by_name(c.served(), SMALL).is_resident, what="unloaded")
        assert vram_of(host, pid) == 0
        c.unload(SMALL)  # "model is not running": already what was asked for
        with pytest.raises(ServiceError, match=r"llama-server at .*HTTP 400: model is not found"):
            c.unload("no-such-model")


def test_router_unload_of_a_loading_model_is_no_error(make_host: MakeHost) -> None:
    host = router(make_host, load_base_s=300.0)
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        host.fake_llama_server.load(SMALL)
        assert by_name(c.served(), SMALL).state == "loading"
        c.unload(SMALL)
        wait_until(lambda: by_name(c.served(), SMALL).state == "unloaded", timeout_s=3)
        assert host.gpu.used_bytes() == 0


# --------------------------------------------------------------------------- single model


def test_single_served_while_loading_loaded_and_sleeping(make_host: MakeHost) -> None:
    host = single(make_host, alias="chat", load_base_s=100.0, sleep_idle_s=100.0)
    with server_client(host) as c:
        loading = c.served()  # /props and /health answer 503 while it loads
        assert (loading.mode, loading.can_unload) == ("single-model", False)
        assert [(m.name, m.state) for m in loading.models] == [("chat", "loading")]
        wait_until(lambda: c.served().models[0].state == "loaded", what="loaded")
        wait_until(lambda: c.served().models[0].state == "sleeping", what="sleeping")
        assert c.served().models[0].state == "sleeping"  # reading does not wake it
        assert c.models() == ("chat",)  # nor does listing
        assert c.served().models[0].state == "sleeping"


def test_single_busy_while_a_generation_runs(make_host: MakeHost) -> None:
    host = single(make_host, token_s=2.0)
    url = host.llama_server_url
    assert host.fake_llama_server is not None
    with server_client(host) as c:
        wait_until(lambda: c.served().models[0].state == "loaded")
        assert c.busy(SMALL) is False
        out = generate_in_background(url, None, 100)
        child = host.fake_llama_server.children()[SMALL]
        wait_until(lambda: child.inflight == 1, what="in flight")
        assert c.busy(SMALL) is True
        wait_until(lambda: out, what="the generation to end")
        assert c.busy(SMALL) is False


def test_single_without_slots_busy_is_unknown_and_it_has_no_unload(make_host: MakeHost) -> None:
    host = single(make_host, slots=False)
    with server_client(host) as c:
        wait_until(lambda: c.served().models[0].state == "loaded")
        assert c.busy(SMALL) is None
        with pytest.raises(ServiceError, match="llama-server at"):
            c.unload(SMALL)
        with pytest.raises(ServiceError, match="no wake call"):
            c.wake(SMALL)


# --------------------------------------------------------------------------- llama-swap


def test_swap_served_shows_starting_then_ready(make_host: MakeHost) -> None:
    host = swap(make_host, load_base_s=100.0)
    url = host.llama_swap_url
    with swap_client(host) as c:
        empty = c.served()
        assert empty.models == () and empty.can_unload is True
        assert set(c.models()) == {"chat", "small"}  # its configuration, nothing running
        assert c.served().models == ()  # listing starts nothing
        out = generate_in_background(url, "gpt-4o", 1)  # by alias: runs "chat"
        wait_until(lambda: c.served().models, what="starting")
        [starting] = c.served().models
        assert (starting.name, starting.state) == ("chat", "starting")
        assert starting.is_resident and starting.is_loading
        wait_until(lambda: out, what="the request to end")
        [ready] = c.served().models
        assert (ready.name, ready.state, ready.is_loading) == ("chat", "ready", False)


def test_swap_busy_while_a_generation_runs_and_never_loads(make_host: MakeHost) -> None:
    host = swap(make_host, token_s=2.0)
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    fake = host.fake_llama_swap
    with swap_client(host) as c:
        assert c.busy("chat") is None  # not running: `/upstream/chat/...` would start it
        time.sleep(0.1)
        assert fake.state("chat") == "stopped" and host.gpu.used_bytes() == 0
        assert c.busy("no-such-model") is None
        out = generate_in_background(url, "chat", 1)
        wait_until(lambda: out, what="loaded")
        assert c.busy("chat") is False
        out = generate_in_background(url, "chat", 100)
        wait_until(lambda: fake.inflight("chat") == 1, what="in flight")
        assert c.busy("chat") is True
        wait_until(lambda: out, what="the generation to end")
        assert isinstance(out[0], httpx.Response) and out[0].status_code == 200
        child = fake.child("chat")
        assert c.busy("chat") is False
        assert child is not None and child.stats.cut_off == 0


def test_swap_unload_blocks_until_stopped_and_gone_is_no_error(make_host: MakeHost) -> None:
    host = swap(make_host, child_exit_s=50.0)  # 0.5 s real to exit
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    fake = host.fake_llama_swap
    with swap_client(host) as c:
        out = generate_in_background(url, "chat", 1)
        wait_until(lambda: out, what="loaded")
        child = fake.child("chat")
        assert child is not None and vram_of(host, child.pid) > 0
        c.unload("chat")
        assert vram_of(host, child.pid) == 0  # it answered once the process stopped
        assert c.served().models == ()
        c.unload("chat")  # not running: OK
        c.unload("no-such-model")  # 404 model not found: nothing to unload


# --------------------------------------------------------------------------- errors


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("cls", [LlamaServerClient, LlamaSwapClient])
def test_a_server_that_is_down_is_a_service_error(
    cls: type[LlamaServerClient] | type[LlamaSwapClient],
) -> None:
    with cls(f"http://127.0.0.1:{closed_port()}", 2.0, retry_wait=wait_none()) as c:
        with pytest.raises(ServiceError, match="cannot connect"):
            c.served()
        with pytest.raises(ServiceError, match="cannot connect"):
            c.unload("x")


def garbage(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/props":
        return httpx.Response(200, json={"role": "router"})
    if request.url.path in ("/models", "/running"):
        return httpx.Response(200, json={"data": [{"id": "m"}], "running": [{"model": "m"}]})
    return httpx.Response(200, text="<html>not json</html>")


@pytest.mark.parametrize("cls", [LlamaServerClient, LlamaSwapClient])
def test_a_body_of_the_wrong_shape_is_a_service_error(
    cls: type[LlamaServerClient] | type[LlamaSwapClient],
) -> None:
    with (
        cls("http://tenant.test", 2.0, transport=httpx.MockTransport(garbage)) as c,
        pytest.raises(ServiceError, match="unexpected shape"),
    ):
        c.served()
