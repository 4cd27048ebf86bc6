"""The fake Ollama: what a client or a supervisor would notice (api-facts section 1)."""

from __future__ import annotations

import json
import socket
import threading
import time
import types
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from supervisor.sim import Catalog, ModelSpec, OllamaConfig, SimHost, ollama_sched
from supervisor.sim.gpu import GIB
from supervisor.sim.ollama_sched import Runner

MakeHost = Callable[..., SimHost]
WaitUntil = Callable[..., None]

SDXL_JOB = {
    "1": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
    },
    "2": {"class_type": "KSampler", "inputs": {"steps": 20}},
    "3": {"class_type": "SaveImage", "inputs": {}},
}


def ps(client: httpx.Client, host: SimHost) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = client.get(f"{host.ollama_url}/api/ps").json()["models"]
    return models


def ollama_bytes(host: SimHost) -> int:
    return sum(a.bytes for a in host.gpu.allocations() if a.owner.startswith("ollama:"))


def run_comfy_job(client: httpx.Client, host: SimHost, wait_until: WaitUntil) -> None:
    r = client.post(f"{host.comfyui_url}/prompt", json={"prompt": SDXL_JOB})
    assert r.status_code == 200
    url = f"{host.comfyui_url}/prompt"
    wait_until(lambda: client.get(url).json()["exec_info"]["queue_remaining"] == 0)


# --------------------------------------------------------------------------- basics


def test_health_version_and_not_found(host: SimHost, client: httpx.Client) -> None:
    root = client.get(host.ollama_url)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert client.head(host.ollama_url).status_code == 200
    assert "version" in client.get(f"{host.ollama_url}/api/version").json()
    assert client.get(f"{host.ollama_url}/api/nothing").status_code == 404


def test_tags_and_show_describe_installed_models(host: SimHost, client: httpx.Client) -> None:
    tags = client.get(f"{host.ollama_url}/api/tags").json()["models"]
    names = [m["name"] for m in tags]
    assert "llama3.2:latest" in names and "nomic-embed-text:latest" in names
    assert all(len(m["digest"]) == 64 and m["size"] > 0 for m in tags)

    show = client.post(f"{host.ollama_url}/api/show", json={"model": "llama3.1:8b"}).json()
    info = show["model_info"]
    arch = info["general.architecture"]
    for key in ("block_count", "context_length", "embedding_length"):
        assert info[f"{arch}.{key}"] > 0
    assert info[f"{arch}.attention.head_count_kv"] <= info[f"{arch}.attention.head_count"]
    assert "completion" in show["capabilities"]


def test_unknown_and_missing_model_errors(host: SimHost, client: httpx.Client) -> None:
    url = host.ollama_url
    for path in ("/api/generate", "/api/chat", "/api/show", "/api/embed"):
        r = client.post(f"{url}{path}", json={"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    r = client.post(f"{url}/api/generate", json={"prompt": "hi"})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = client.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    # Unloading a model that is not installed is an error too; one not loaded is a no-op.
    r = client.post(f"{url}/api/generate", json={"model": "nope", "keep_alive": 0})
    assert r.status_code == 404
    r = client.post(f"{url}/api/generate", json={"model": "llama3.2", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"


def test_bad_keep_alive_is_rejected(host: SimHost, client: httpx.Client) -> None:
    r = client.post(
        f"{host.ollama_url}/api/generate", json={"model": "llama3.2", "keep_alive": "300"}
    )
    assert r.status_code == 400
    assert "missing unit" in r.json()["error"]


# --------------------------------------------------------------------------- /api/ps


def test_ps_shows_the_loaded_model_with_a_normalised_name(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2025")  # 2026's context tiers: test_sim_ollama_2026.py
    r = client.post(f"{host.ollama_url}/api/generate", json={"model": "llama3.2"})
    assert r.json()["done_reason"] == "load"
    assert r.json()["response"] == ""
    [model] = ps(client, host)
    assert model["name"] == model["model"] == "llama3.2:latest"
    assert model["size_vram"] == model["size"] > 2 * GIB  # weights + KV cache + graph
    assert model["context_length"] == 4096
    assert len(model["digest"]) == 64
    assert set(model["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    assert datetime.fromisoformat(model["expires_at"]) > datetime.now().astimezone()
    assert ollama_bytes(host) == model["size_vram"]


def test_ps_sorts_by_expiry_and_forever_is_centuries_away(
    host: SimHost, client: httpx.Client
) -> None:
    url = f"{host.ollama_url}/api/generate"
    client.post(url, json={"model": "llama3.2", "keep_alive": "10m"})
    embed = url.replace("generate", "embed")
    client.post(embed, json={"model": "nomic-embed-text", "keep_alive": "5m"})
    client.post(url.replace("generate", "chat"), json={"model": "llama3.1:8b", "keep_alive": -1})
    names = [m["name"] for m in ps(client, host)]
    assert names == ["llama3.1:8b", "llama3.2:latest", "nomic-embed-text:latest"]
    forever = datetime.fromisoformat(ps(client, host)[0]["expires_at"])
    assert forever.year > 2300


def test_a_model_is_listed_only_once_its_load_finished(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(ollama=OllamaConfig(load_base_s=60))  # 0.6 s real
    answer: dict[str, Any] = {}
    loader = threading.Thread(
        target=lambda: answer.update(
            client.post(f"{host.ollama_url}/api/generate", json={"model": "llama3.2"}).json()
        )
    )
    loader.start()
    wait_until(lambda: ollama_bytes(host) > 0, what="the load to start taking VRAM")
    assert ps(client, host) == []
    loader.join()
    assert answer["done_reason"] == "load"
    assert [m["name"] for m in ps(client, host)] == ["llama3.2:latest"]


# --------------------------------------------------------------------------- placement


def test_a_model_loaded_while_comfyui_holds_vram_spills_and_stays_spilled(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(gpu_total_gib=16)
    run_comfy_job(client, host, wait_until)  # SDXL stays loaded: smart memory
    gen = f"{host.ollama_url}/api/generate"
    client.post(gen, json={"model": "qwen2.5:14b", "keep_alive": "1h"})
    [spilled] = ps(client, host)
    assert 0 < spilled["size_vram"] < spilled["size"]

    client.post(f"{host.comfyui_url}/free", json={"unload_models": True, "free_memory": True})
    wait_until(
        lambda: host.gpu.free_bytes() > spilled["size"] - spilled["size_vram"],
        what="ComfyUI to free",
    )
    client.post(gen, json={"model": "qwen2.5:14b", "prompt": "still slow?"})
    [after] = ps(client, host)
    assert after["size_vram"] == spilled["size_vram"]  # nothing moves layers back
    stats = client.get(f"{host.ollama_url}/sim/stats").json()["models"]["qwen2.5:14b"]
    assert stats["tokens"] > 0 and stats["tokens_full_gpu"] == 0

    # Only an unload and a fresh load put it fully on the GPU.
    client.post(gen, json={"model": "qwen2.5:14b", "keep_alive": 0})
    wait_until(lambda: ollama_bytes(host) == 0, what="the unload")
    client.post(gen, json={"model": "qwen2.5:14b"})
    [healed] = ps(client, host)
    assert healed["size_vram"] == healed["size"]
    stats = client.get(f"{host.ollama_url}/sim/stats").json()["models"]["qwen2.5:14b"]
    assert (stats["loads"], stats["loads_full_gpu"]) == (2, 1)
    assert stats["spilled_s"] > 0


def test_a_second_model_evicts_ollamas_own_idle_model_but_never_comfyui(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(gpu_total_gib=24, profile="2025")  # requireFull (2026: spills)
    run_comfy_job(client, host, wait_until)
    comfy_before = host.gpu.used_bytes()
    gen = f"{host.ollama_url}/api/generate"
    client.post(gen, json={"model": "qwen2.5:14b"})
    assert ps(client, host)[0]["size_vram"] == ps(client, host)[0]["size"]
    client.post(gen, json={"model": "qwen2.5:32b"})
    [only] = ps(client, host)
    assert only["name"] == "qwen2.5:32b"
    assert only["size_vram"] < only["size"]  # ComfyUI's share stayed taken
    comfy_now = sum(a.bytes for a in host.gpu.allocations() if a.owner.startswith("comfyui:"))
    assert comfy_now == comfy_before
    stats = client.get(f"{host.ollama_url}/sim/stats").json()["models"]
    assert stats["qwen2.5:14b"]["evictions"] == 1


def test_models_that_fit_together_stay_loaded_together(host: SimHost, client: httpx.Client) -> None:
    gen = f"{host.ollama_url}/api/generate"
    client.post(gen, json={"model": "llama3.2"})
    client.post(gen, json={"model": "llama3.1:8b"})
    models = ps(client, host)
    assert len(models) == 2 and all(m["size_vram"] == m["size"] for m in models)


def test_only_one_model_loads_at_a_time(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(ollama=OllamaConfig(load_base_s=40))
    gen = f"{host.ollama_url}/api/generate"
    threads = [
        threading.Thread(target=client.post, args=(gen,), kwargs={"json": {"model": m}})
        for m in ("llama3.2", "llama3.1:8b")
    ]
    for t in threads:
        t.start()
    seen_two = threading.Event()

    def second_started() -> bool:
        owners = [a.owner for a in host.gpu.allocations() if a.owner.startswith("ollama:")]
        if len(owners) == 2:
            # The second load takes VRAM only after the first one finished and is listed.
            assert len(ps(client, host)) == 1
            seen_two.set()
        return seen_two.is_set()

    wait_until(second_started, what="the second load")
    for t in threads:
        t.join()
    assert len(ps(client, host)) == 2


def test_cpu_share_slows_generation(host: SimHost) -> None:
    assert host.fake_ollama is not None
    sched = host.fake_ollama.sched
    spec = host.catalog.model("llama3.1:8b")
    assert spec is not None

    def runner(vram_share: float) -> Runner:
        size = 1000
        return Runner(
            spec, 4096, -1, size, int(size * vram_share), 300, "x", 0.0, threading.Semaphore()
        )

    full, spilled, cpu = (sched.seconds_per_token(runner(f)) for f in (1.0, 0.71, 0.0))
    # Ollama #14258: 29 % of layers on CPU made generation about 3.3x slower.
    assert 2.8 < spilled / full < 3.8
    assert cpu / full == pytest.approx(OllamaConfig().cpu_slowdown)


def test_tokens_never_sleep_a_negative_time_on_a_busy_machine(
    host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the soak: the token loop read the clock twice, and a thread descheduled
    between the reads slept a negative time: ValueError, and the chat got a 500."""
    assert host.fake_ollama is not None
    sched = host.fake_ollama.sched
    spec = host.catalog.model("llama3.1:8b")
    assert spec is not None
    runner = Runner(spec, 4096, -1, 1000, 1000, 300, "x", 0.0, threading.Semaphore())
    per_token = sched.real_s(sched.seconds_per_token(runner))
    # Each token: a reading 5 ms before it is due, then one 5 ms after (a busy machine).
    readings = iter([0.0] + [k * per_token + d for k in range(1, 100) for d in (-0.005, 0.005)])
    slept: list[float] = []

    def monotonic() -> float:
        return next(readings)

    def sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        slept.append(seconds)

    fake_time = types.SimpleNamespace(monotonic=monotonic, sleep=sleep, time=time.time)
    monkeypatch.setattr(ollama_sched, "time", fake_time)
    assert list(sched.tokens(runner, 20)) == list(range(20))
    assert slept, "the check must have slept at least once"


# --------------------------------------------------------------------------- unload


def test_unload_answers_at_once_but_vram_returns_later(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(ollama=OllamaConfig(unload_delay_s=50))  # 0.5 s real
    chat = f"{host.ollama_url}/api/chat"
    client.post(chat, json={"model": "llama3.1:8b", "messages": []})
    r = client.post(chat, json={"model": "llama3.1:8b", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert r.json()["message"] == {"role": "assistant", "content": ""}
    assert ps(client, host) == []
    assert ollama_bytes(host) > 0  # the runner has not exited yet
    wait_until(lambda: ollama_bytes(host) == 0, what="VRAM to come back")


def test_unload_waits_for_the_running_generation(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    catalog = Catalog(models=(ModelSpec("slow:latest", GIB, gpu_tokens_per_s=10),))
    host = make_host(time_scale=1.0, catalog=catalog, ollama=OllamaConfig(unload_delay_s=0.05))
    gen = f"{host.ollama_url}/api/generate"
    done: dict[str, Any] = {}
    body = {"model": "slow", "prompt": "go", "stream": False, "options": {"num_predict": 8}}
    worker = threading.Thread(target=lambda: done.update(client.post(gen, json=body).json()))
    worker.start()
    wait_until(lambda: ps(client, host) != [], what="the load")
    r = client.post(gen, json={"model": "slow", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert [m["name"] for m in ps(client, host)] == ["slow:latest"]  # still serving
    worker.join()
    assert done["eval_count"] == 8  # the generation was not cut short
    wait_until(lambda: ps(client, host) == [] and ollama_bytes(host) == 0, what="the unload")


def test_keep_alive_expiry_unloads(
    host: SimHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    gen = f"{host.ollama_url}/api/generate"
    client.post(gen, json={"model": "llama3.2", "prompt": "hi", "keep_alive": 3})
    assert ps(client, host) != []
    wait_until(lambda: ps(client, host) == [] and ollama_bytes(host) == 0, what="expiry")
    assert (
        client.get(f"{host.ollama_url}/sim/stats").json()["models"]["llama3.2:latest"]["unloads"]
        == 1
    )


def test_a_load_dies_with_its_client(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(ollama=OllamaConfig(load_base_s=300))  # 3 s real
    port = int(host.ollama_url.rsplit(":", 1)[1])
    body = json.dumps({"model": "llama3.1:8b"}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_until(lambda: ollama_bytes(host) > 0, what="the load to start")
    sock.close()
    wait_until(lambda: ollama_bytes(host) == 0, timeout_s=2.5, what="the aborted load")
    assert ps(client, host) == []
    stats = client.get(f"{host.ollama_url}/sim/stats").json()["models"]["llama3.1:8b"]
    assert (stats["loads"], stats["loads_aborted"]) == (0, 1)


# --------------------------------------------------------------------------- streaming


def test_native_streaming_arrives_token_by_token(make_host: MakeHost, client: httpx.Client) -> None:
    catalog = Catalog(models=(ModelSpec("slow:latest", GIB, gpu_tokens_per_s=20),))
    host = make_host(time_scale=1.0, catalog=catalog)
    body = {"model": "slow", "prompt": "count", "options": {"num_predict": 12}}
    lines: list[dict[str, Any]] = []
    with client.stream("POST", f"{host.ollama_url}/api/generate", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            if not lines:
                # The first token is in our hands while the model is still generating.
                tokens = client.get(f"{host.ollama_url}/sim/stats").json()["totals"]["tokens"]
                assert tokens < 12
            lines.append(json.loads(line))
    assert len(lines) == 13
    assert all(not c["done"] and c["response"] for c in lines[:-1])
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 12


def test_chat_streams_messages(host: SimHost, client: httpx.Client) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    with client.stream("POST", f"{host.ollama_url}/api/chat", json=body) as r:
        chunks = [json.loads(line) for line in r.iter_lines()]
    assert chunks[0]["message"]["role"] == "assistant"
    assert chunks[-1]["done"] and chunks[-1]["done_reason"] == "stop"


def test_openai_chat_streams_server_sent_events(host: SimHost, client: httpx.Client) -> None:
    body = {
        "model": "llama3.2",
        "stream": True,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with client.stream("POST", f"{host.ollama_url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_non_streaming_and_models(host: SimHost, client: httpx.Client) -> None:
    url = host.ollama_url
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    r = client.post(f"{url}/v1/chat/completions", json=body).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"]
    assert r["usage"]["completion_tokens"] == 32
    r = client.post(f"{url}/v1/completions", json={"model": "llama3.2", "prompt": "a b"}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"]
    ids = [m["id"] for m in client.get(f"{url}/v1/models").json()["data"]]
    assert "llama3.2:latest" in ids
    assert client.get(f"{url}/v1/models/llama3.2:latest").json()["id"] == "llama3.2:latest"


def test_embeddings_native_legacy_and_openai(host: SimHost, client: httpx.Client) -> None:
    url = host.ollama_url
    r = client.post(f"{url}/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]})
    vectors = r.json()["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == 768
    assert client.post(f"{url}/api/embed", json={"model": "nomic-embed-text", "input": "a"}).json()[
        "embeddings"
    ] == [vectors[0]]  # same text, same vector
    legacy = client.post(f"{url}/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a"})
    assert legacy.json()["embedding"] == vectors[0]
    oa = client.post(f"{url}/v1/embeddings", json={"model": "nomic-embed-text", "input": "a"})
    assert oa.json()["data"][0]["embedding"] == vectors[0]
    gen = client.post(f"{url}/api/generate", json={"model": "nomic-embed-text", "prompt": "x"})
    assert gen.status_code == 400


def test_empty_embed_input_just_loads(host: SimHost, client: httpx.Client) -> None:
    r = client.post(f"{host.ollama_url}/api/embed", json={"model": "nomic-embed-text"})
    assert r.json()["embeddings"] == []
    assert [m["name"] for m in ps(client, host)] == ["nomic-embed-text:latest"]


def test_older_builds_list_a_model_while_it_loads(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    """`list_while_loading` mimics 2025 releases (api-facts 1.3)."""
    host = make_host(ollama=OllamaConfig(load_base_s=60, list_while_loading=True))
    loader = threading.Thread(
        target=client.post,
        args=(f"{host.ollama_url}/api/generate",),
        kwargs={"json": {"model": "llama3.2"}},
    )
    loader.start()
    wait_until(lambda: ollama_bytes(host) > 0, what="the load to start")
    [loading] = ps(client, host)
    assert loading["name"] == "llama3.2:latest"
    assert loading["size_vram"] == ollama_bytes(host)  # placement is already decided
    loader.join()


def test_a_generation_stops_when_its_client_leaves(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    catalog = Catalog(models=(ModelSpec("slow:latest", GIB, gpu_tokens_per_s=10),))
    host = make_host(time_scale=1.0, catalog=catalog)
    port = int(host.ollama_url.rsplit(":", 1)[1])
    body = json.dumps(
        {"model": "slow", "prompt": "go", "stream": False, "options": {"num_predict": 1000}}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    stats = f"{host.ollama_url}/sim/stats"
    wait_until(lambda: client.get(stats).json()["totals"]["tokens"] > 0, what="tokens")
    sock.close()
    # The runner is released (refcount 0) long before 1000 tokens (100 s) would be done.
    wait_until(
        lambda: client.get(stats).json()["loaded"][0]["refcount"] == 0,
        what="the generation to stop",
    )
    assert client.get(stats).json()["totals"]["tokens"] < 1000
