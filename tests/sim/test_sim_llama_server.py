"""The fake llama.cpp llama-server (tenants.md section 1): single-model and router modes,
over real HTTP against a SimHost on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB, MIB
from supervisor.sim.llama_server import LlamaServerConfig

MakeHost = Callable[..., SimHost]
WaitUntil = Callable[..., None]

SMALL = "llama3.2:latest"
MID = "llama3.1:8b"
BIG = "qwen2.5:14b"


def single(make_host: MakeHost, **config: Any) -> SimHost:
    config.setdefault("model", SMALL)
    return make_host(
        start_ollama=False, start_comfyui=False, llama_server=LlamaServerConfig(**config)
    )


def router(make_host: MakeHost, **config: Any) -> SimHost:
    config.setdefault("models", (SMALL, MID, BIG))
    config.setdefault("ctx_size", 4096)
    return make_host(
        start_ollama=False, start_comfyui=False, llama_server=LlamaServerConfig(**config)
    )


def models(client: httpx.Client, host: SimHost) -> dict[str, dict[str, Any]]:
    data = client.get(f"{host.llama_server_url}/models").json()["data"]
    return {m["id"]: m for m in data}


def status(client: httpx.Client, host: SimHost, model: str) -> str:
    value: str = models(client, host)[model]["status"]["value"]
    return value


def chat(client: httpx.Client, url: str, model: str | None = None, **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **body}
    if model is not None:
        payload["model"] = model
    return client.post(f"{url}/v1/chat/completions", json=payload)


def vram_of(host: SimHost, pid: int) -> int:
    return dict(host.gpu.processes()).get(pid, 0)


def error(resp: httpx.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    assert err["code"] == resp.status_code
    return resp.status_code, err["message"], err["type"]


# --------------------------------------------------------------------------- single mode


def test_single_mode_health_is_503_while_loading_then_200(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, load_base_s=50.0)  # 0.5 s real
    url = host.llama_server_url
    resp = client.get(f"{url}/health")
    assert error(resp) == (503, "Loading model", "unavailable_error")
    assert error(client.get(f"{url}/props")) == (503, "Loading model", "unavailable_error")
    listed = client.get(f"{url}/v1/models").json()  # answers while loading, meta null
    assert listed["data"][0]["id"] == SMALL and listed["data"][0]["meta"] is None
    wait_until(lambda: client.get(f"{url}/health").status_code == 200, what="loaded")
    assert client.get(f"{url}/health").json() == {"status": "ok"}


def test_single_mode_props_models_and_slots_have_the_real_shapes(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, alias="chat", ctx_size=8192, parallel=2)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    props = client.get(f"{url}/props").json()
    assert props["total_slots"] == 2
    assert props["model_path"] == SMALL
    assert props["is_sleeping"] is False
    assert props["default_generation_settings"]["n_ctx"] == 8192
    assert isinstance(props["build_info"], str) and props["build_info"]
    listed = client.get(f"{url}/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["chat"]
    assert listed["data"][0]["owned_by"] == "llamacpp"
    slots = client.get(f"{url}/slots").json()
    assert [s["id"] for s in slots] == [0, 1]
    for slot in slots:
        assert slot["n_ctx"] == 8192 and slot["is_processing"] is False
        assert slot["id_task"] == -1 and "n_decoded" in slot["next_token"]
        assert isinstance(slot["params"], dict)


def test_the_model_path_is_the_id_without_an_alias(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, model="/models/llama3.2.gguf", ctx_size=4096)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    assert client.get(f"{url}/v1/models").json()["data"][0]["id"] == "/models/llama3.2.gguf"


def test_a_generation_shows_in_slots_and_metrics_while_it_runs(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, metrics=True, token_s=2.0, ctx_size=4096)  # 20 ms a token
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    result: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: result.append(chat(httpx.Client(timeout=30), url, max_tokens=40))
    )
    worker.start()

    def busy() -> bool:
        return any(s["is_processing"] for s in client.get(f"{url}/slots").json())

    wait_until(busy, what="a slot processing")
    metrics = client.get(f"{url}/metrics").text
    assert "llamacpp:requests_processing 1" in metrics
    assert "llamacpp:requests_deferred 0" in metrics
    worker.join(10)
    answer = result[0].json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 40
    assert not busy()
    assert "llamacpp:tokens_predicted_total 40" in client.get(f"{url}/metrics").text


def test_metrics_are_501_without_the_flag(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, ctx_size=4096)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    status_code, message, kind = error(client.get(f"{url}/metrics"))
    assert status_code == 501 and kind == "not_supported_error"
    assert message == "This server does not support metrics endpoint."


def test_streamed_chat_and_completion_are_sse_like_the_real_server(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, ctx_size=4096)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    with client.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    with client.stream(
        "POST", f"{url}/completion", json={"prompt": "hi", "stream": True, "n_predict": 3}
    ) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    parsed = [json.loads(e) for e in events]
    assert [p["stop"] for p in parsed] == [False, False, False, True]
    plain = client.post(f"{url}/completion", json={"prompt": "hi", "n_predict": 3}).json()
    assert plain["stop"] is True and plain["tokens_predicted"] == 3 and plain["content"]


def test_the_model_is_allocated_under_its_own_process(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, ctx_size=4096)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[SMALL]
    assert child.pid != 0 and vram_of(host, child.pid) >= child.need_bytes
    assert child.offloaded_bytes == 0


def test_sleep_frees_the_model_keeps_a_context_and_a_request_wakes_it(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, ctx_size=4096, sleep_idle_s=50.0)  # 0.5 s real
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[SMALL]
    loaded = vram_of(host, child.pid)

    def sleeping() -> bool:
        return bool(client.get(f"{url}/props").json()["is_sleeping"])

    wait_until(sleeping, what="is_sleeping")
    assert vram_of(host, child.pid) == 256 * MIB < loaded
    assert client.get(f"{url}/health").status_code == 200  # health does not wake it
    assert sleeping()
    assert chat(client, url, max_tokens=2).status_code == 200  # blocks until reloaded
    assert not sleeping()
    assert vram_of(host, child.pid) == loaded
    assert child.stats.wakes == 1


# --------------------------------------------------------------------------- --fit


@pytest.fixture
def held_host() -> Iterator[Callable[..., SimHost]]:
    """A host whose GPU has `held` bytes taken by another owner before llama-server starts."""
    hosts: list[SimHost] = []

    def make(held: int, **config: Any) -> SimHost:
        host = SimHost(
            time_scale=0.01,
            start_ollama=False,
            start_comfyui=False,
            llama_server=LlamaServerConfig(**config),
        )
        hosts.append(host)
        assert host.gpu.allocate("other:comfyui", 4242, held)
        return host.start()

    yield make
    for host in hosts:
        host.stop()


def test_fit_lowers_the_context_when_another_owner_holds_vram(
    held_host: Callable[..., SimHost], client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = held_host(10 * GIB, model=MID)  # no -c: fit may lower the context
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[MID]
    n_ctx = client.get(f"{url}/props").json()["default_generation_settings"]["n_ctx"]
    assert 4096 <= n_ctx < child.spec.context_length  # shrunk, not below --fit-ctx
    assert child.offloaded_bytes == 0
    assert host.gpu.free_bytes() >= 1024 * MIB  # the fit target stays free


def test_fit_offloads_weights_when_even_the_fit_context_does_not_fit(
    held_host: Callable[..., SimHost], client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = held_host(21 * GIB, model=MID)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[MID]
    props = client.get(f"{url}/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert child.offloaded_bytes > 0  # partial offload, which the API does not report
    assert 0 < vram_of(host, child.pid) < child.need_bytes  # NVML per PID shows it
    assert host.gpu.free_bytes() >= 1024 * MIB
    assert chat(client, url, max_tokens=2).status_code == 200
    host.stop_llama_server()
    assert vram_of(host, child.pid) == 0


def test_fit_off_fails_to_load_when_the_model_does_not_fit(
    held_host: Callable[..., SimHost], client: httpx.Client
) -> None:
    host = held_host(22 * GIB, model=MID, fit=False, ctx_size=4096)
    url = host.llama_server_url
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[MID]
    assert child.wait_state("failed", timeout_s=5) == "failed"
    assert child.exit_code == 1
    with pytest.raises(httpx.TransportError):
        client.get(f"{url}/health")  # the process is gone
    assert host.gpu.used_bytes() == 22 * GIB


# --------------------------------------------------------------------------- router mode


def test_router_lists_models_unloaded_and_answers_router_props(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = router(make_host, models_max=2)
    url = host.llama_server_url
    assert client.get(f"{url}/health").json() == {"status": "ok"}
    listed = client.get(f"{url}/v1/models").json()
    assert listed["object"] == "list"
    entry = {m["id"]: m for m in listed["data"]}[SMALL]
    assert entry["owned_by"] == "llamacpp" and entry["status"]["value"] == "unloaded"
    assert {"aliases", "tags", "created", "architecture", "source", "can_remove"} <= set(entry)
    props = client.get(f"{url}/props").json()
    assert props["role"] == "router" and props["max_instances"] == 2
    assert props["models_autoload"] is True
    assert host.gpu.used_bytes() == 0  # the router itself never touches the GPU


def test_router_load_is_asynchronous_and_children_have_their_own_pids(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, load_base_s=50.0)  # 0.5 s real
    url = host.llama_server_url
    assert client.post(f"{url}/models/load", json={"model": SMALL}).json() == {"success": True}
    assert status(client, host, SMALL) == "loading"  # the answer came before the load ended
    assert client.post(f"{url}/models/load", json={"model": MID}).status_code == 200
    wait_until(lambda: status(client, host, SMALL) == "loaded", what="loaded")
    wait_until(lambda: status(client, host, MID) == "loaded", what="loaded")
    args = models(client, host)[SMALL]["status"]["args"]
    assert isinstance(args, list) and args[0] == "llama-server"
    assert host.fake_llama_server is not None
    kids = host.fake_llama_server.children()
    pids = {kids[SMALL].pid, kids[MID].pid}
    assert len(pids) == 2 and host.fake_llama_server.config.pid is None
    for name in (SMALL, MID):
        assert vram_of(host, kids[name].pid) >= kids[name].need_bytes
    again = client.post(f"{url}/models/load", json={"model": SMALL})
    assert error(again) == (400, "model is already running", "invalid_request_error")
    missing = client.post(f"{url}/models/load", json={"model": "nope"})
    assert error(missing) == (404, "model is not found", "not_found_error")


def test_router_unload_is_asynchronous_and_a_reload_gets_a_new_pid(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, child_exit_s=50.0)  # the child takes 0.5 s real to exit
    url = host.llama_server_url
    client.post(f"{url}/models/load", json={"model": SMALL})
    wait_until(lambda: status(client, host, SMALL) == "loaded")
    assert host.fake_llama_server is not None
    first = host.fake_llama_server.children()[SMALL].pid
    held = vram_of(host, first)
    resp = client.post(f"{url}/models/unload", json={"model": SMALL})
    assert resp.json() == {"success": True}
    assert vram_of(host, first) == held  # answered before the memory came back
    assert status(client, host, SMALL) == "loaded"
    wait_until(lambda: status(client, host, SMALL) == "unloaded", what="unloaded")
    assert vram_of(host, first) == 0
    not_running = client.post(f"{url}/models/unload", json={"model": SMALL})
    assert error(not_running) == (400, "model is not running", "invalid_request_error")
    unknown = client.post(f"{url}/models/unload", json={"model": "nope"})
    assert error(unknown) == (400, "model is not found", "invalid_request_error")
    client.post(f"{url}/models/load", json={"model": SMALL})
    wait_until(lambda: status(client, host, SMALL) == "loaded")
    assert host.fake_llama_server.children()[SMALL].pid != first


def test_router_evicts_the_least_recently_used_model_at_models_max(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, models_max=2)
    url = host.llama_server_url
    for name in (SMALL, MID):
        client.post(f"{url}/models/load", json={"model": name})
        wait_until(lambda name=name: status(client, host, name) == "loaded")
    assert chat(client, url, SMALL, max_tokens=1).status_code == 200  # SMALL used last
    assert host.fake_llama_server is not None
    mid_pid = host.fake_llama_server.children()[MID].pid
    client.post(f"{url}/models/load", json={"model": BIG})
    # The eviction waited for MID's child to exit before BIG's started.
    assert status(client, host, MID) == "unloaded"
    assert vram_of(host, mid_pid) == 0
    wait_until(lambda: status(client, host, BIG) == "loaded")
    assert status(client, host, SMALL) == "loaded"


def test_router_autoloads_on_a_request_and_blocks_until_loaded(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = router(make_host, load_base_s=30.0)
    url = host.llama_server_url
    resp = chat(client, url, SMALL, max_tokens=3)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    assert status(client, host, SMALL) == "loaded"
    slots = client.get(f"{url}/slots", params={"model": SMALL}).json()
    assert len(slots) == 4  # -np default
    child_props = client.get(f"{url}/props", params={"model": SMALL}).json()
    assert child_props["total_slots"] == 4 and child_props["is_sleeping"] is False


def test_router_request_errors(make_host: MakeHost, client: httpx.Client) -> None:
    host = router(make_host, metrics=True)
    url = host.llama_server_url
    unknown = chat(client, url, "nope")
    assert error(unknown) == (400, "model 'nope' not found", "invalid_request_error")
    missing = chat(client, url)
    assert error(missing) == (
        400,
        "model name is missing from the request",
        "invalid_request_error",
    )
    for path in ("/slots", "/metrics"):
        resp = client.get(f"{url}{path}")
        assert error(resp) == (
            400,
            "model name is missing from the request",
            "invalid_request_error",
        )
    off = client.post(
        f"{url}/v1/chat/completions",
        params={"autoload": "false"},
        json={"model": SMALL, "messages": []},
    )
    assert error(off) == (400, "model is not loaded", "invalid_request_error")
    assert status(client, host, SMALL) == "unloaded"
    metrics = client.get(f"{url}/metrics", params={"model": SMALL})
    assert "llamacpp:requests_processing 0" in metrics.text


def test_router_unload_cuts_off_an_in_flight_request(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, token_s=1.0)  # 10 ms real a token
    url = host.llama_server_url
    client.post(f"{url}/models/load", json={"model": SMALL})
    wait_until(lambda: status(client, host, SMALL) == "loaded")
    outcome: list[object] = []

    def stream() -> None:
        try:
            with (
                httpx.Client(timeout=30) as c,
                c.stream(
                    "POST",
                    f"{url}/v1/chat/completions",
                    json={"model": SMALL, "messages": [], "stream": True, "max_tokens": 500},
                ) as resp,
            ):
                outcome.append([line for line in resp.iter_lines() if line])
        except httpx.TransportError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=stream)
    worker.start()
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[SMALL]
    wait_until(lambda: child.inflight == 1, what="in flight")
    client.post(f"{url}/models/unload", json={"model": SMALL})
    worker.join(10)
    assert isinstance(outcome[0], httpx.TransportError)  # no [DONE]: cut off
    assert child.stats.cut_off == 1


def test_router_sleeping_child_reports_sleeping_and_keeps_its_context(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, sleep_idle_s=50.0)
    url = host.llama_server_url
    client.post(f"{url}/models/load", json={"model": SMALL})
    wait_until(lambda: status(client, host, SMALL) == "sleeping", what="sleeping")
    assert host.fake_llama_server is not None
    child = host.fake_llama_server.children()[SMALL]
    assert vram_of(host, child.pid) == 256 * MIB
    assert chat(client, url, SMALL, max_tokens=1).status_code == 200
    assert status(client, host, SMALL) == "loaded"


def test_a_request_beyond_the_slots_is_deferred(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = single(make_host, parallel=1, metrics=True, token_s=2.0, ctx_size=4096)
    url = host.llama_server_url
    wait_until(lambda: client.get(f"{url}/health").status_code == 200)
    workers = [
        threading.Thread(target=lambda: chat(httpx.Client(timeout=30), url, max_tokens=50))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()

    def deferred() -> bool:
        return "llamacpp:requests_deferred 1" in client.get(f"{url}/metrics").text

    wait_until(deferred, what="one request deferred")
    assert "llamacpp:requests_processing 1" in client.get(f"{url}/metrics").text
    full = client.get(f"{url}/slots", params={"fail_on_no_slot": 1})
    assert error(full) == (503, "no slot available", "unavailable_error")
    for worker in workers:
        worker.join(10)
    assert "llamacpp:tokens_predicted_total 100" in client.get(f"{url}/metrics").text


def test_router_unloading_a_loading_model_kills_it_at_once(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = router(make_host, load_base_s=300.0, child_exit_s=300.0)  # 3 s real each
    url = host.llama_server_url
    client.post(f"{url}/models/load", json={"model": SMALL})
    assert status(client, host, SMALL) == "loading"
    assert client.post(f"{url}/models/unload", json={"model": SMALL}).status_code == 200
    wait_until(lambda: status(client, host, SMALL) == "unloaded", timeout_s=2.0)
    assert host.gpu.used_bytes() == 0


def test_router_a_failed_load_shows_failed_and_exit_code(
    held_host: Callable[..., SimHost], client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = held_host(22 * GIB, models=(MID,), fit=False, ctx_size=4096)
    url = host.llama_server_url
    resp = chat(client, url, MID)  # autoload, and the child dies out of memory
    assert error(resp) == (500, f"model name={MID} failed to load", "server_error")
    wait_until(lambda: status(client, host, MID) == "unloaded")
    entry = models(client, host)[MID]["status"]
    assert entry["failed"] is True and entry["exit_code"] == 1
    assert host.gpu.used_bytes() == 22 * GIB
