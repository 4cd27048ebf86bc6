"""The fake llama-swap (tenants.md section 2) over real HTTP, on a SimHost's GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.gpu import MIB
from supervisor.sim.llama_swap import ConfigError, go_float, parse_swap_config

MakeHost = Callable[..., SimHost]
WaitUntil = Callable[..., None]
REPO = Path(__file__).resolve().parents[2]

MODELS: dict[str, Any] = {
    "chat": {
        "model": "llama3.1:8b",
        "aliases": ["gpt-4o"],
        "name": "Chat",
        "description": "the chat model",
    },
    "small": {"model": "llama3.2:latest"},
    "embed": {"model": "nomic-embed-text:latest"},
}


def swap_host(make_host: MakeHost, config: dict[str, Any] | None = None, **extra: Any) -> SimHost:
    parsed = parse_swap_config(config or {"models": MODELS})
    for key, value in extra.items():
        setattr(parsed, key, value)
    return make_host(start_ollama=False, start_comfyui=False, llama_swap=parsed)


def running(client: httpx.Client, host: SimHost) -> dict[str, dict[str, Any]]:
    rows = client.get(f"{host.llama_swap_url}/running").json()["running"]
    return {r["model"]: r for r in rows}


def chat(client: httpx.Client, url: str, model: str, **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post(f"{url}/v1/chat/completions", json=payload)


def in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except httpx.TransportError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def vram_of(host: SimHost, pid: int) -> int:
    return dict(host.gpu.processes()).get(pid, 0)


def test_health_models_and_running_have_the_real_shapes(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    health = client.get(f"{url}/health")
    assert health.status_code == 200 and health.text == "OK"
    listed = client.get(f"{url}/v1/models").json()
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    assert set(by_id) == {"chat", "small", "embed"}
    assert by_id["chat"]["owned_by"] == "llama-swap"
    assert by_id["chat"]["name"] == "Chat" and by_id["chat"]["description"] == "the chat model"
    assert all(m["status"] == {"value": "unloaded"} for m in by_id.values())
    assert client.get(f"{url}/models").json() == listed
    assert client.get(f"{url}/running").json() == {"running": []}


def test_a_request_blocks_until_the_model_is_ready_and_runs_under_its_own_pid(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = swap_host(make_host, load_base_s=60.0)  # 0.6 s real to load
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    swap = host.fake_llama_swap
    first, out1 = in_background(lambda: chat(httpx.Client(timeout=30), url, "chat"))
    second, out2 = in_background(lambda: chat(httpx.Client(timeout=30), url, "chat"))
    wait_until(lambda: "chat" in running(client, host), what="starting")
    row = running(client, host)["chat"]
    assert row["state"] == "starting"
    assert set(row) == {"model", "state", "cmd", "proxy", "ttl", "name", "description"}
    models = {m["id"]: m for m in client.get(f"{url}/v1/models").json()["data"]}
    assert models["chat"]["status"]["value"] == "unloaded"  # still unloaded while starting
    assert not out1 and not out2  # both callers wait
    first.join(10)
    second.join(10)
    assert [r.status_code for r in (out1[0], out2[0])] == [200, 200]  # type: ignore[attr-defined]
    child = swap.child("chat")
    assert child is not None and child.stats.loads == 1  # the callers joined one start
    assert running(client, host)["chat"]["state"] == "ready"
    models = {m["id"]: m for m in client.get(f"{url}/v1/models").json()["data"]}
    assert models["chat"]["status"]["value"] == "loaded"
    assert child.pid != os.getpid() and vram_of(host, child.pid) >= child.need_bytes


def test_by_default_one_model_runs_at_a_time(make_host: MakeHost, client: httpx.Client) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    assert chat(client, url, "chat").status_code == 200
    assert host.fake_llama_swap is not None
    chat_child = host.fake_llama_swap.child("chat")
    assert chat_child is not None
    assert chat(client, url, "small").status_code == 200
    assert set(running(client, host)) == {"small"}
    assert vram_of(host, chat_child.pid) == 0  # the swap waited for the old process to exit


def test_a_swap_waits_for_the_busy_model_to_drain(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = swap_host(make_host, token_s=1.0)  # 10 ms real a token
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    swap = host.fake_llama_swap
    assert chat(client, url, "chat", max_tokens=1).status_code == 200
    busy, busy_out = in_background(
        lambda: chat(httpx.Client(timeout=30), url, "chat", max_tokens=200)
    )
    wait_until(lambda: swap.inflight("chat") == 1, what="in flight")
    other, other_out = in_background(lambda: chat(httpx.Client(timeout=30), url, "small"))
    wait_until(lambda: swap.waiting() == 1, what="the swap queued")
    # A later request for the busy model queues behind the swap (FIFO).
    late, late_out = in_background(
        lambda: chat(httpx.Client(timeout=30), url, "chat", max_tokens=1)
    )
    wait_until(lambda: swap.waiting() == 2, what="the late request queued")
    assert swap.state("chat") == "ready" and swap.state("small") == "stopped"
    busy.join(10)
    other.join(10)
    assert busy_out[0].status_code == 200  # type: ignore[attr-defined]
    assert other_out[0].status_code == 200  # type: ignore[attr-defined]
    late.join(10)
    assert late_out[0].status_code == 200  # type: ignore[attr-defined]
    assert set(running(client, host)) == {"chat"}


def test_groups_without_swap_run_members_together_and_exclusive_stops_other_groups(
    make_host: MakeHost, client: httpx.Client
) -> None:
    config = {
        "models": MODELS,
        "groups": {
            "pair": {"swap": False, "exclusive": True, "members": ["small", "embed"]},
            "solo": {"members": ["chat"]},
        },
    }
    host = swap_host(make_host, config)
    url = host.llama_swap_url
    assert chat(client, url, "small").status_code == 200
    emb = client.post(f"{url}/v1/embeddings", json={"model": "embed", "input": "x"})
    assert emb.status_code == 200 and emb.json()["data"][0]["object"] == "embedding"
    assert set(running(client, host)) == {"small", "embed"}
    assert chat(client, url, "chat").status_code == 200  # exclusive: the pair goes
    assert set(running(client, host)) == {"chat"}


def test_a_persistent_group_is_not_unloaded_by_others(
    make_host: MakeHost, client: httpx.Client
) -> None:
    config = {
        "models": MODELS,
        "groups": {
            "always": {"persistent": True, "exclusive": False, "members": ["embed"]},
            "rest": {"members": ["chat", "small"]},
        },
    }
    host = swap_host(make_host, config)
    url = host.llama_swap_url
    assert client.post(f"{url}/v1/embeddings", json={"model": "embed", "input": "x"}).is_success
    assert chat(client, url, "chat").status_code == 200
    assert chat(client, url, "small").status_code == 200
    assert set(running(client, host)) == {"embed", "small"}


def test_explicit_unload_cuts_off_an_in_flight_request(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = swap_host(make_host, token_s=1.0)
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    swap = host.fake_llama_swap
    assert chat(client, url, "chat", max_tokens=1).status_code == 200
    pid = swap.child("chat").pid  # type: ignore[union-attr]
    plain, plain_out = in_background(
        lambda: chat(httpx.Client(timeout=30), url, "chat", max_tokens=500)
    )

    def stream() -> object:
        with (
            httpx.Client(timeout=30) as c,
            c.stream(
                "POST",
                f"{url}/v1/chat/completions",
                json={"model": "chat", "messages": [], "stream": True, "max_tokens": 500},
            ) as resp,
        ):
            return list(resp.iter_lines())

    streamed, streamed_out = in_background(stream)
    wait_until(lambda: swap.inflight("chat") == 2, what="two in flight")
    resp = client.post(f"{url}/api/models/unload/gpt-4o")  # by alias
    assert resp.status_code == 200 and resp.text == "OK"
    assert swap.state("chat") == "stopped" and vram_of(host, pid) == 0  # blocked until stopped
    plain.join(10)
    streamed.join(10)
    assert plain_out[0].status_code == 502  # type: ignore[attr-defined]
    assert isinstance(streamed_out[0], httpx.TransportError)
    assert running(client, host) == {}


def test_unload_endpoints_and_their_answers(make_host: MakeHost, client: httpx.Client) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    assert chat(client, url, "chat").status_code == 200
    everything = client.get(f"{url}/unload")
    assert everything.status_code == 200 and everything.text == "OK"
    assert running(client, host) == {}
    assert chat(client, url, "small").status_code == 200
    assert client.post(f"{url}/api/models/unload").json() == {"msg": "ok"}
    assert running(client, host) == {}
    missing = client.post(f"{url}/api/models/unload/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "model not found"
    assert client.post(f"{url}/api/models/unload/chat").text == "OK"  # not running: fine


def test_unknown_or_missing_models_are_404(make_host: MakeHost, client: httpx.Client) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    bodies: list[dict[str, Any]] = [{"model": "nope", "messages": []}, {"messages": []}]
    for body in bodies:
        resp = client.post(f"{url}/v1/chat/completions", json=body)
        assert resp.status_code == 404
        assert resp.json() == {"src": "llama-swap", "error": "no model id could be identified"}
    text = client.post(
        f"{url}/v1/chat/completions",
        json={"model": "nope"},
        headers={"Accept": "text/plain"},
    )
    assert text.text == "llama-swap: no model id could be identified"
    assert client.get(f"{url}/props").status_code == 404
    assert client.get(f"{url}/upstream/nope/health").status_code == 404
    assert running(client, host) == {}


def test_aliases_and_upstream_reach_the_model(make_host: MakeHost, client: httpx.Client) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    assert chat(client, url, "gpt-4o").status_code == 200
    assert set(running(client, host)) == {"chat"}
    health = client.get(f"{url}/upstream/chat/health")
    assert health.json() == {"status": "ok"}
    props = client.get(f"{url}/upstream/small/props")  # loads/swaps like any request
    assert props.status_code == 200 and props.json()["total_slots"] == 4
    assert set(running(client, host)) == {"small"}
    by_query = client.get(f"{url}/props", params={"model": "gpt-4o"}).json()
    assert by_query["model_alias"] == "chat"


def test_ttl_unloads_an_idle_model_but_not_a_busy_one(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    config = {"models": {"chat": {**MODELS["chat"], "ttl": 100}}}  # 1 s real
    host = swap_host(make_host, config, token_s=5.0)  # 50 ms real a token
    url = host.llama_swap_url
    assert host.fake_llama_swap is not None
    swap = host.fake_llama_swap
    assert running(client, host) == {}
    resp = chat(client, url, "chat", max_tokens=30)  # 1.5 s in flight, longer than the ttl
    assert resp.status_code == 200
    assert swap.state("chat") == "ready"  # not unloaded while it ran
    assert running(client, host)["chat"]["ttl"] == 100
    wait_until(lambda: swap.state("chat") == "stopped", what="ttl unload")


def test_metrics_report_the_whole_gpu(make_host: MakeHost, client: httpx.Client) -> None:
    host = swap_host(make_host)
    url = host.llama_swap_url
    assert host.gpu.allocate("other:comfyui", 4242, 3 * 1024 * MIB)
    text = client.get(f"{url}/metrics").text
    snap = host.gpu.snapshot()
    labels = f'{{id="0",name="{snap.name}",uuid="{snap.uuid}"}}'
    assert f"llamaswap_gpu_memory_used_bytes{labels} 3.221225472e+09" in text
    assert f"llamaswap_gpu_memory_total_bytes{labels} {go_float(snap.total_bytes)}" in text
    assert "# TYPE llamaswap_gpu_memory_used_bytes gauge" in text


def test_go_float_matches_gos_shortest_format() -> None:
    assert go_float(32656850944.0) == "3.2656850944e+10"
    assert go_float(70.0) == "70"
    assert go_float(95.51323335480112) == "95.51323335480112"
    assert go_float(0.0) == "0"
    assert go_float(123456.0) == "123456" and go_float(1234567.0) == "1.234567e+06"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"models": []}, "'models' must be a mapping"),
        ({"models": {"a": {"ttl": "x"}}}, "models.a.ttl: expected a number"),
        ({"models": {"a": {"bogus": 1}}}, "models.a: unknown key"),
        ({"models": {"a": {}}, "groups": {"g": {"swap": "yes", "members": []}}}, "groups.g.swap"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_swap_config(config)


def test_cli_llama_swap_mode_rejects_a_bad_config() -> None:
    run = [sys.executable, "-m", "supervisor.sim", "llama-swap", "--port", "0"]
    bad = subprocess.run([*run, "--config", "{"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    unknown = subprocess.run(
        [*run, "--config", '{"models": {"a": {"model": "nope"}}}'],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "'nope' is not in the simulator's catalog" in unknown.stderr
