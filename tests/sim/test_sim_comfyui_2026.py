"""The fake ComfyUI of the 2026 profile (ComfyUI >= 0.15, api-facts-2026 sections 2 and 4):
Dynamic VRAM, the CPU mode, the new /system_stats shape, and the real server's answers to
bad requests, interrupts and history."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from supervisor.sim import ComfyConfig, SimHost
from supervisor.sim.gpu import GIB, MIB
from supervisor.sim.profiles import sim_profile

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


def graph(ckpt: str = "sd_xl_base_1.0.safetensors", steps: int = 20) -> dict[str, Any]:
    """A real text-to-image graph: loader, prompt, latent, sampler, decode, save."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "width": 1024}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "steps": steps}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
    }


def held(host: SimHost, prefix: str = "comfyui:") -> int:
    return sum(a.bytes for a in host.gpu.allocations() if a.owner.startswith(prefix))


def stats(client: httpx.Client, host: SimHost) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"{host.comfyui_url}/system_stats").json()
    return body


def submit(client: httpx.Client, host: SimHost, body: dict[str, Any]) -> str:
    r = client.post(f"{host.comfyui_url}/prompt", json=body)
    assert r.status_code == 200, r.text
    prompt_id: str = r.json()["prompt_id"]
    return prompt_id


def remaining(client: httpx.Client, host: SimHost) -> int:
    n: int = client.get(f"{host.comfyui_url}/prompt").json()["exec_info"]["queue_remaining"]
    return n


def finish(client: httpx.Client, host: SimHost, body: dict[str, Any], wait: WaitUntil) -> str:
    prompt_id = submit(client, host, body)
    wait(lambda: remaining(client, host) == 0, what="the prompt to finish")
    return prompt_id


# --------------------------------------------------------------------------- profile


def test_the_profile_comes_from_vram_sim_profile_and_defaults_to_2026() -> None:
    assert sim_profile({}) == "2026"
    assert sim_profile({"VRAM_SIM_PROFILE": ""}) == "2026"
    assert sim_profile({"VRAM_SIM_PROFILE": "2025"}) == "2025"
    with pytest.raises(ValueError, match=r"VRAM_SIM_PROFILE='2024'.*2026, 2025"):
        sim_profile({"VRAM_SIM_PROFILE": "2024"})


def test_sim_host_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAM_SIM_PROFILE", "2025")
    assert SimHost().comfyui_config.version == "0.3.64"
    monkeypatch.delenv("VRAM_SIM_PROFILE")
    config = SimHost().comfyui_config
    assert (config.version, config.dynamic_vram) == ("0.38.1", True)
    assert SimHost(profile="2025").comfyui_config.dynamic_vram is False


# --------------------------------------------------------------------------- /system_stats


def test_system_stats_has_the_2026_shape(make_host: MakeHost, client: httpx.Client) -> None:
    host = make_host(profile="2026")
    body = stats(client, host)
    system = body["system"]
    assert system["os"] == sys.platform
    assert system["comfyui_version"] == "0.38.1"
    assert system["comfy_package_versions"]["comfy-aimdo"] == "0.5.5"
    assert "deploy_environment" in system
    assert system["argv"] == ["main.py", "--listen", "0.0.0.0"]
    assert system["python_version"] == sys.version  # the full sys.version, as measured
    [device] = body["devices"]
    assert (device["type"], device["index"]) == ("cuda", 0)


def test_system_stats_of_the_2025_profile_keeps_the_old_shape(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2025")
    system = stats(client, host)["system"]
    assert (system["os"], system["comfyui_version"]) == ("posix", "0.3.64")
    assert "comfy_package_versions" not in system


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"disable_dynamic_vram": True}, "--disable-dynamic-vram"),
        ({"highvram": True}, "--highvram"),
    ],
)
def test_flags_that_turn_dynamic_vram_off_show_in_argv_and_in_torch_figures(
    make_host: MakeHost,
    client: httpx.Client,
    wait_until: WaitUntil,
    fields: dict[str, bool],
    flag: str,
) -> None:
    host = make_host(comfyui=ComfyConfig(**fields), highvram=fields.get("highvram", False))
    finish(client, host, job(model_gib=6), wait_until)
    body = stats(client, host)
    assert flag in body["system"]["argv"]
    assert "comfy-aimdo" in body["system"]["comfy_package_versions"]  # installed, but off
    assert body["devices"][0]["torch_vram_total"] >= 6 * GIB  # classic: weights in torch


# --------------------------------------------------------------------------- Dynamic VRAM


def test_dynamic_vram_weights_stay_outside_the_torch_figures(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2026")
    finish(client, host, job(model_gib=6), wait_until)
    assert held(host, "comfyui:model:") == 6 * GIB  # the weights stay after the job
    [device] = stats(client, host)["devices"]
    assert device["torch_vram_total"] == 0  # ... but torch sees none of them
    assert device["torch_vram_free"] == 0  # and its cache was emptied after the node
    assert device["vram_free"] == host.gpu.free_bytes()
    assert held(host, "comfyui:workspace") == 0
    # NVML still sees them all: the process holds weights + context.
    [(_, process_bytes)] = host.gpu.processes()
    assert process_bytes == 6 * GIB + 384 * MIB


def test_dynamic_vram_shows_only_the_workspace_while_a_node_runs(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2026", time_scale=0.2)
    submit(client, host, job(seconds=5, model_gib=6))
    wait_until(lambda: stats(client, host)["devices"][0]["torch_vram_total"] > 0)
    device = stats(client, host)["devices"][0]
    assert device["torch_vram_total"] == 1 * GIB  # the sampler's workspace, not the weights
    wait_until(lambda: remaining(client, host) == 0)
    assert stats(client, host)["devices"][0]["torch_vram_total"] == 0


def test_an_idle_dynamic_vram_comfyui_releases_nothing_when_others_need_room(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2026", gpu_total_gib=24)
    finish(client, host, job(model_gib=12), wait_until)
    client.post(f"{host.ollama_url}/api/generate", json={"model": "qwen2.5:32b", "keep_alive": -1})
    wait_until(lambda: client.get(f"{host.ollama_url}/api/ps").json()["models"])
    assert held(host, "comfyui:model:") == 12 * GIB  # nothing given back while idle
    r = client.post(f"{host.comfyui_url}/free", json={"unload_models": True})
    assert (r.status_code, r.content) == (200, b"")
    wait_until(lambda: held(host, "comfyui:model:") == 0, what="/free to drop the pages")
    assert held(host) == 384 * MIB  # the CUDA context stays


def test_dynamic_vram_gives_back_weights_under_pressure_during_its_own_job(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2026", gpu_total_gib=12)
    finish(client, host, job(model_gib=6), wait_until)
    finish(client, host, job(model_gib=7), wait_until)
    owners = {a.owner: a.bytes for a in host.gpu.allocations()}
    assert "comfyui:model:sim-6.safetensors" not in owners
    assert owners["comfyui:model:sim-7.safetensors"] == 7 * GIB


def test_dynamic_vram_keeps_256_mib_plus_the_headroom_free(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(comfyui=ComfyConfig(headroom_bytes=2 * GIB), gpu_total_gib=8)
    assert stats(client, host)["system"]["argv"][-2:] == ["--vram-headroom", "2"]
    submit(client, host, job(model_gib=10, seconds=4))
    wait_until(lambda: held(host, "comfyui:model:") > 0)
    # During the job: weights + workspace leave 256 MiB + 2 GiB free, the rest is paged.
    wait_until(lambda: held(host, "comfyui:workspace") > 0)
    assert host.gpu.free_bytes() >= 2 * GIB + 256 * MIB - 64 * MIB
    assert host.gpu.free_bytes() < 2 * GIB + 256 * MIB + 64 * MIB
    wait_until(lambda: remaining(client, host) == 0)
    assert client.get(f"{host.comfyui_url}/sim/stats").json()["jobs_lowvram"] == 1


@pytest.mark.parametrize(("profile", "reserve"), [("2026", 400 * MIB), ("2025", 500 * MIB)])
def test_the_classic_reserve_is_400_mib_from_0_15_on(
    make_host: MakeHost,
    client: httpx.Client,
    wait_until: WaitUntil,
    profile: str,
    reserve: int,
) -> None:
    config = ComfyConfig.for_profile(profile, disable_dynamic_vram=True)
    host = make_host(comfyui=config, gpu_total_gib=8)
    submit(client, host, job(model_gib=10, seconds=4))
    wait_until(lambda: held(host, "comfyui:workspace") > 0)
    assert reserve - 64 * MIB <= host.gpu.free_bytes() <= reserve + 64 * MIB


# --------------------------------------------------------------------------- CPU


def test_cpu_mode_reports_ram_and_never_touches_the_gpu(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(comfyui=ComfyConfig(cpu=True))
    body = stats(client, host)
    assert "--cpu" in body["system"]["argv"]
    [device] = body["devices"]
    assert (device["type"], device["index"], device["name"]) == ("cpu", None, "cpu")
    ram = body["system"]["ram_total"]
    assert device["vram_total"] == device["torch_vram_total"] == ram
    assert device["vram_free"] == device["torch_vram_free"] == body["system"]["ram_free"]
    prompt_id = finish(client, host, job(model_gib=6), wait_until)
    history = client.get(f"{host.comfyui_url}/history/{prompt_id}").json()
    assert history[prompt_id]["status"]["completed"] is True
    assert held(host) == 0 and host.gpu.processes() == []


# --------------------------------------------------------------------------- /prompt errors


def test_prompt_errors_answer_like_the_real_server(host: SimHost, client: httpx.Client) -> None:
    url = f"{host.comfyui_url}/prompt"
    r = client.post(url, json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"
    assert client.post(url, json={"prompt": "x"}).status_code == 500
    r = client.post(url, json={})
    assert r.status_code == 400
    assert r.json()["error"]["details"] == "No prompt provided"
    assert r.json()["node_errors"] == {}
    bad_class = {"1": {"class_type": "NoSuchNode", "inputs": {}}, **graph()}
    r = client.post(url, json={"prompt": bad_class})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in r.json()["error"]["message"]


def test_an_invalid_input_value_fails_validation_per_node_and_is_never_queued(
    host: SimHost, client: httpx.Client
) -> None:
    r = client.post(f"{host.comfyui_url}/prompt", json={"prompt": graph(steps=0)})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [(node_id, errors)] = body["node_errors"].items()
    assert node_id == "3" and errors["class_type"] == "KSampler"
    assert errors["errors"][0]["type"] == "value_smaller_than_min"
    assert errors["dependent_outputs"] == ["9"]
    assert remaining(client, host) == 0
    assert client.get(f"{host.comfyui_url}/history").json() == {}


# --------------------------------------------------------------------------- interrupt, history


def test_an_interrupt_takes_effect_between_nodes(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    """The checkpoint load (6.5 GiB at 2 GiB/s: over 3 s) has no progress hook: it runs to
    its end, and the prompt stops before the next node, which the history names."""
    host = make_host(time_scale=0.3)
    prompt_id = submit(client, host, {"prompt": graph()})
    wait_until(lambda: held(host, "comfyui:model:") > 0, what="the load to start")
    client.post(f"{host.comfyui_url}/interrupt")
    wait_until(lambda: remaining(client, host) == 0, what="the prompt to stop")
    entry = client.get(f"{host.comfyui_url}/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error"
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_interrupted"
    assert (data["node_id"], data["node_type"]) == ("6", "CLIPTextEncode")
    assert data["executed"] == ["4"]  # the loader ran to its end
    assert (
        held(host, "comfyui:model:")
        == host.catalog.checkpoint("sd_xl_base_1.0.safetensors").size_bytes
    )  # type: ignore[union-attr]
    assert entry["outputs"] == {}


def test_history_has_cached_messages_meta_and_one_file_per_image(
    host: SimHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    prompt = graph()
    prompt["5"]["inputs"]["batch_size"] = 3
    prompt["9"]["inputs"]["filename_prefix"] = "cat"
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}
    prompt_id = finish(client, host, {"prompt": prompt}, wait_until)
    entry = client.get(f"{host.comfyui_url}/history/{prompt_id}").json()[prompt_id]
    events = [m[0] for m in entry["status"]["messages"]]
    assert events == ["execution_start", "execution_cached", "execution_success"]
    assert set(entry["meta"]) == {"9", "10"}
    assert entry["meta"]["9"]["node_id"] == "9"
    names = [i["filename"] for i in entry["outputs"]["9"]["images"]]
    assert names == ["cat_00001_.png", "cat_00002_.png", "cat_00003_.png"]
    assert entry["outputs"]["10"]["images"][0]["filename"] == "ComfyUI_00001_.png"
