"""The fake ComfyUI: what a client or a supervisor would notice (api-facts section 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB, MIB

MakeHost = Callable[..., SimHost]
WaitUntil = Callable[..., None]


def job(seconds: float = 1.0, model_gib: float = 6.0, steps: int = 10) -> dict[str, Any]:
    inputs = {
        "ckpt_name": f"sim-{model_gib:g}.safetensors",
        "model_gib": model_gib,
        "workspace_gib": 1.0,
        "seconds": seconds,
        "steps": steps,
    }
    return {"prompt": {"9": {"class_type": "SimJob", "inputs": inputs}}}


def comfy_bytes(host: SimHost, prefix: str = "comfyui:") -> int:
    return sum(a.bytes for a in host.gpu.allocations() if a.owner.startswith(prefix))


def model_bytes(host: SimHost) -> int:
    return comfy_bytes(host, "comfyui:model:")


def remaining(client: httpx.Client, host: SimHost) -> int:
    info: int = client.get(f"{host.comfyui_url}/prompt").json()["exec_info"]["queue_remaining"]
    return info


def submit(client: httpx.Client, host: SimHost, body: dict[str, Any]) -> str:
    r = client.post(f"{host.comfyui_url}/prompt", json=body)
    assert r.status_code == 200, r.text
    prompt_id: str = r.json()["prompt_id"]
    return prompt_id


def finish(client: httpx.Client, host: SimHost, body: dict[str, Any], wait: WaitUntil) -> str:
    prompt_id = submit(client, host, body)
    wait(lambda: remaining(client, host) == 0, what="the prompt to finish")
    return prompt_id


# --------------------------------------------------------------------------- shapes


def test_system_stats_reports_bytes_and_counts_torch_cache_as_free(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2025")  # classic memory: the weights are in torch's figures
    finish(client, host, job(), wait_until)
    stats = client.get(f"{host.comfyui_url}/system_stats").json()
    assert stats["system"]["os"] == "posix"
    [dev] = stats["devices"]
    assert dev["type"] == "cuda" and dev["index"] == 0
    assert dev["vram_total"] == host.gpu.total_bytes
    cache = comfy_bytes(host, "comfyui:workspace")
    assert cache == 1 * GIB  # the job's activations stay in torch's cache
    assert dev["torch_vram_free"] == cache
    assert dev["vram_free"] == host.gpu.free_bytes() + cache
    assert dev["torch_vram_total"] == model_bytes(host) + cache  # reserved, not a total
    assert client.get(f"{host.comfyui_url}/api/system_stats").json()["devices"][0] == dev


def test_queue_items_have_five_fields_and_prompt_counts_remaining(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(time_scale=0.1)
    first = submit(client, host, job(seconds=10))
    second = submit(client, host, {**job(seconds=1), "client_id": "me"})
    wait_until(lambda: client.get(f"{host.comfyui_url}/queue").json()["queue_running"])
    queue = client.get(f"{host.comfyui_url}/api/queue").json()
    [running] = queue["queue_running"]
    [pending] = queue["queue_pending"]
    assert len(running) == 5 and running[1] == first
    assert pending[1] == second and pending[3] == {"client_id": "me"} and pending[4] == ["9"]
    assert remaining(client, host) == 2
    client.post(f"{host.comfyui_url}/interrupt")
    wait_until(lambda: remaining(client, host) == 0)
    history = client.get(f"{host.comfyui_url}/history").json()
    assert history[first]["status"]["status_str"] == "error"  # interrupted
    assert history[second]["status"] == {
        "status_str": "success",
        "completed": True,
        "messages": history[second]["status"]["messages"],
    }
    assert history[second]["outputs"]["9"]["images"][0]["type"] == "output"
    one = client.get(f"{host.comfyui_url}/history/{second}").json()
    assert list(one) == [second]
    assert list(client.get(f"{host.comfyui_url}/history?max_items=1").json()) == [second]


def test_a_prompt_without_outputs_is_rejected(host: SimHost, client: httpx.Client) -> None:
    r = client.post(
        f"{host.comfyui_url}/prompt", json={"prompt": {"1": {"class_type": "KSampler"}}}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "prompt_no_outputs"
    r = client.post(f"{host.comfyui_url}/prompt", json={"nothing": 1})
    assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"


def test_unknown_path_and_wrong_method_answer_like_the_real_server(
    host: SimHost, client: httpx.Client
) -> None:
    """api-facts-2026 section 4, measured on a real 0.3.64."""
    for method, path in [("GET", "/nope"), ("POST", "/nope"), ("GET", "/free")]:
        r = client.request(method, f"{host.comfyui_url}{path}")
        assert (r.status_code, r.content) == (404, b""), (method, path)
    r = client.get(f"{host.comfyui_url}/interrupt")
    assert (r.status_code, r.content) == (404, b"")
    assert r.headers["content-type"] == "application/octet-stream"
    r = client.post(f"{host.comfyui_url}/system_stats")
    assert r.status_code == 405 and r.headers["allow"] == "GET,HEAD"
    r = client.delete(f"{host.comfyui_url}/queue")
    assert r.status_code == 405 and set(r.headers["allow"].split(",")) == {"GET", "HEAD", "POST"}


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]"])
def test_free_needs_a_json_object_body(host: SimHost, client: httpx.Client, body: bytes) -> None:
    r = client.post(f"{host.comfyui_url}/free", content=body)
    assert r.status_code == 500


# --------------------------------------------------------------------------- /free


def test_free_when_idle_releases_vram_but_keeps_the_cuda_context(
    host: SimHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    finish(client, host, job(model_gib=6), wait_until)
    assert model_bytes(host) == 6 * GIB  # smart memory: still loaded after the job
    r = client.post(f"{host.comfyui_url}/free", json={"unload_models": True})
    assert (r.status_code, r.content) == (200, b"")
    wait_until(lambda: comfy_bytes(host) == comfy_bytes(host, "comfyui:context"))
    [(pid, held)] = host.gpu.processes()
    assert pid > 0
    assert 100 * MIB < held < 1 * GIB  # the process still shows, with its context


def test_free_during_a_prompt_waits_for_it_to_finish(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(time_scale=0.2)  # a 3 s job runs 0.6 s
    prompt_id = submit(client, host, job(seconds=3))
    wait_until(lambda: model_bytes(host) == 6 * GIB, what="the model to load")
    r = client.post(f"{host.comfyui_url}/free", json={"unload_models": True, "free_memory": True})
    assert r.status_code == 200
    # Not interrupted, nothing released while the prompt runs.
    running = client.get(f"{host.comfyui_url}/queue").json()["queue_running"]
    assert running and running[0][1] == prompt_id
    assert model_bytes(host) == 6 * GIB
    wait_until(lambda: remaining(client, host) == 0, what="the prompt")
    wait_until(lambda: model_bytes(host) == 0, what="the deferred free")
    history = client.get(f"{host.comfyui_url}/history/{prompt_id}").json()
    assert history[prompt_id]["status"]["status_str"] == "success"


def test_unload_models_alone_keeps_vram_under_highvram(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(highvram=True)
    finish(client, host, job(model_gib=6), wait_until)
    client.post(f"{host.comfyui_url}/free", json={"unload_models": True})
    wait_until(lambda: client.get(f"{host.comfyui_url}/sim/stats").json()["frees_handled"] == 1)
    assert model_bytes(host) == 6 * GIB  # offloaded to the GPU itself
    assert comfy_bytes(host, "comfyui:workspace") == 0  # the cache was emptied
    client.post(f"{host.comfyui_url}/free", json={"free_memory": True})
    wait_until(lambda: model_bytes(host) == 0, what="free_memory to drop the model")


def test_pinned_comfyui_ignores_free_until_restarted(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(pinned=True)
    finish(client, host, job(model_gib=6), wait_until)
    client.post(f"{host.comfyui_url}/free", json={"unload_models": True, "free_memory": True})
    stats = f"{host.comfyui_url}/sim/stats"
    wait_until(lambda: client.get(stats).json()["frees_ignored"] == 1)
    assert model_bytes(host) == 6 * GIB
    url = host.comfyui_url
    host.restart_comfyui()
    assert host.comfyui_url == url
    assert model_bytes(host) == 0
    assert client.get(f"{url}/system_stats").status_code == 200


def test_pinned_switch_over_http(
    host: SimHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    url = f"{host.comfyui_url}/sim/pinned"
    assert client.post(url, json={"pinned": True}).json() == {"pinned": True}
    finish(client, host, job(model_gib=2), wait_until)
    client.post(f"{host.comfyui_url}/free", json={"free_memory": True})
    stats = f"{host.comfyui_url}/sim/stats"
    wait_until(lambda: client.get(stats).json()["frees_ignored"] == 1)
    assert model_bytes(host) == 2 * GIB
    assert client.post(url, json={"pinned": False}).json() == {"pinned": False}
    client.post(f"{host.comfyui_url}/free", json={"free_memory": True})
    wait_until(lambda: model_bytes(host) == 0)


# --------------------------------------------------------------------------- memory


def test_a_job_that_does_not_fit_loads_partly_and_still_finishes(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(gpu_total_gib=24, profile="2025")  # Ollama at 4096 ctx fits fully
    gen = f"{host.ollama_url}/api/generate"
    client.post(gen, json={"model": "qwen2.5:32b", "keep_alive": -1})  # ~20 GiB
    prompt_id = finish(client, host, job(model_gib=6), wait_until)
    history = client.get(f"{host.comfyui_url}/history/{prompt_id}").json()
    assert history[prompt_id]["status"]["completed"] is True
    assert 0 < model_bytes(host) < 6 * GIB  # lowvram: the rest stayed in RAM
    stats = client.get(f"{host.comfyui_url}/sim/stats").json()
    assert stats["jobs_lowvram"] == 1 and stats["jobs_done"] == 1
    # Ollama's model was not touched: ComfyUI cannot evict another process.
    [model] = client.get(f"{host.ollama_url}/api/ps").json()["models"]
    assert model["size_vram"] == model["size"]

    # Unlike Ollama, ComfyUI loads more of the model once room comes back.
    client.post(gen, json={"model": "qwen2.5:32b", "keep_alive": 0})
    wait_until(lambda: host.gpu.free_bytes() > 12 * GIB, what="Ollama's unload")
    finish(client, host, job(model_gib=6), wait_until)
    assert model_bytes(host) == 6 * GIB


def test_a_new_checkpoint_pushes_out_the_old_one(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(gpu_total_gib=12)
    finish(client, host, job(model_gib=6), wait_until)
    finish(client, host, job(model_gib=7), wait_until)
    held = {a.owner: a.bytes for a in host.gpu.allocations()}
    assert held.get("comfyui:model:sim-7.safetensors") == 7 * GIB
    assert "comfyui:model:sim-6.safetensors" not in held


def test_sim_stats_record_jobs_and_latencies(
    host: SimHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    for _ in range(2):
        finish(client, host, job(seconds=2), wait_until)
    stats = client.get(f"{host.comfyui_url}/sim/stats").json()
    assert stats["jobs_done"] == 2
    assert len(stats["latencies_s"]) == 2 and all(t >= 2 for t in stats["latencies_s"])
    client.post(f"{host.comfyui_url}/sim/reset")
    assert client.get(f"{host.comfyui_url}/sim/stats").json()["jobs_done"] == 0
