"""The fake Ollama's 2026 profile (Ollama >= 0.30, api-facts-2026 section 1) and the
profile selector shared by both fake services."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim import Catalog, ModelSpec, SimHost, ollama_config
from supervisor.sim.gpu import GIB, MIB
from supervisor.sim.profiles import ProfileError, sim_profile

MakeHost = Callable[..., SimHost]
WaitUntil = Callable[..., None]
REPO = Path(__file__).resolve().parents[2]


def ps(client: httpx.Client, host: SimHost) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = client.get(f"{host.ollama_url}/api/ps").json()["models"]
    return models


def load(client: httpx.Client, host: SimHost, model: str, **body: Any) -> httpx.Response:
    return client.post(
        f"{host.ollama_url}/api/generate", json={"model": model, "keep_alive": -1, **body}
    )


def hold(host: SimHost, nbytes: int) -> None:
    """Another process (ComfyUI, say) takes `nbytes` of the GPU."""
    assert host.gpu.allocate("other:holder", 4242, nbytes)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


# --------------------------------------------------------------------------- selector


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "2026"),
        ({"VRAM_SIM_PROFILE": "2025"}, "2025"),
        ({"VRAM_SIM_PROFILE": " 2026 "}, "2026"),
    ],
)
def test_profile_selector_reads_the_environment(env: dict[str, str], expected: str) -> None:
    assert sim_profile(env) == expected


def test_a_bad_profile_names_the_variable_and_the_accepted_values() -> None:
    with pytest.raises(ProfileError, match=r"VRAM_SIM_PROFILE='2024'.*2026, 2025"):
        sim_profile({"VRAM_SIM_PROFILE": "2024"})
    run = subprocess.run(
        [sys.executable, "-m", "supervisor.sim", "ollama", "--port", "0"],
        cwd=REPO,
        env={"VRAM_SIM_PROFILE": "new", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "VRAM_SIM_PROFILE='new'" in run.stderr


def test_the_default_host_is_2026_and_2025_stays_selectable(
    make_host: MakeHost, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VRAM_SIM_PROFILE", raising=False)
    new = make_host()
    assert client.get(f"{new.ollama_url}/api/version").json()["version"] == "0.33.0"
    old = make_host(profile="2025")
    assert client.get(f"{old.ollama_url}/api/version").json()["version"].startswith("0.12.")
    monkeypatch.setenv("VRAM_SIM_PROFILE", "2025")
    assert make_host().profile == "2025"


# --------------------------------------------------------------------------- runners


def test_each_load_runs_in_its_own_child_process_with_a_new_pid(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(profile="2026")
    load(client, host, "llama3.2")
    [first] = ollama_pids(host)
    assert parent_pid(first) == host.fake_ollama.sched.pid  # type: ignore[union-attr]
    load(client, host, "llama3.2", options={"num_ctx": 2048})  # another context: a reload
    wait_until(lambda: len(ollama_pids(host)) == 1 and ollama_pids(host)[0] != first)
    wait_until(lambda: not Path(f"/proc/{first}").exists() or _is_zombie(first))


def ollama_pids(host: SimHost) -> list[int]:
    return [a.pid for a in host.gpu.allocations() if a.owner.startswith("ollama:")]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("total_gib", "model", "expected"),
    [
        (24, "llama3.1:8b", 32768),
        (48, "llama3.1:8b", 131072),  # 262144, capped at the trained context
        (48, "qwen2.5:14b", 32768),  # trained 32768
        (16, "llama3.1:8b", 4096),
    ],
)
def test_the_default_context_follows_the_gpus_total_memory(
    make_host: MakeHost, client: httpx.Client, total_gib: int, model: str, expected: int
) -> None:
    host = make_host(profile="2026", gpu_total_gib=total_gib)
    load(client, host, model)
    [row] = ps(client, host)
    assert row["context_length"] == expected


def test_ollama_context_length_overrides_the_tier(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(ollama=ollama_config("2026", num_ctx=8192, context_by_vram=False))
    load(client, host, "llama3.1:8b")
    assert ps(client, host)[0]["context_length"] == 8192


@pytest.mark.parametrize("profile", ["2026", "2025"])
def test_a_modelfile_num_ctx_beats_the_default_and_a_request_beats_both(
    make_host: MakeHost, client: httpx.Client, profile: str
) -> None:
    """Request options, then the Modelfile's PARAMETER num_ctx, then the server's default
    (the VRAM tier or OLLAMA_CONTEXT_LENGTH) (api-facts 1.5)."""
    model = ModelSpec("tuned:8b", 4 * GIB, num_ctx=8192)
    host = make_host(profile=profile, catalog=Catalog(models=(model,)))
    shown = client.post(f"{host.ollama_url}/api/show", json={"model": "tuned:8b"}).json()
    assert shown["parameters"].split() == ["num_ctx", "8192"]
    assert "PARAMETER num_ctx 8192" in shown["modelfile"]
    load(client, host, "tuned:8b")
    assert ps(client, host)[0]["context_length"] == 8192
    asked = {"model": "tuned:8b", "prompt": "hi", "stream": False, "options": {"num_ctx": 2048}}
    assert client.post(f"{host.ollama_url}/api/generate", json=asked).status_code == 200
    assert ps(client, host)[0]["context_length"] == 2048  # reloaded with the request's


@pytest.mark.parametrize(("version", "has_it"), [("0.9.6", False), ("0.9.7", True)])
def test_ps_has_context_length_from_0_9_7_on(
    make_host: MakeHost, client: httpx.Client, version: str, has_it: bool
) -> None:
    host = make_host(ollama=ollama_config("2025", version=version))
    load(client, host, "llama3.1:8b")
    assert ("context_length" in ps(client, host)[0]) is has_it


def test_fitting_keeps_the_fit_target_free_and_spills_the_rest(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2026", gpu_total_gib=24)
    hold(host, 14 * GIB)
    load(client, host, "llama3.1:8b")  # about 9 GiB at 32768 tokens, 10 GiB free
    [row] = ps(client, host)
    assert 0 < row["size_vram"] < row["size"]
    assert 1 * GIB - row["size"] // 33 <= host.gpu.free_bytes() and host.gpu.free_bytes() >= GIB


def test_llama_arg_fit_target_changes_what_is_kept_free(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(ollama=ollama_config("2026", fit_margin_bytes=3 * GIB))
    hold(host, 14 * GIB)
    load(client, host, "llama3.1:8b")
    assert host.gpu.free_bytes() >= 3 * GIB


def test_an_explicit_num_gpu_that_does_not_fit_fails_with_oom_instead_of_spilling(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2026", gpu_total_gib=24)
    hold(host, 20 * GIB)
    r = load(client, host, "llama3.1:8b", options={"num_gpu": 99})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]
    assert ps(client, host) == []
    assert not any(a.owner.startswith("ollama:") for a in host.gpu.allocations())
    # The retry dropped the automatic context to 4096: 5.4 GiB fits once 6 GiB are free.
    host.gpu.release("other:holder", 3 * GIB)
    assert load(client, host, "llama3.1:8b", options={"num_gpu": 99}).status_code == 200
    [row] = ps(client, host)
    assert row["size_vram"] == row["size"] and row["context_length"] == 4096


def test_oom_evicts_ollamas_other_models_before_its_one_retry(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2026", gpu_total_gib=24)
    load(client, host, "llama3.2")
    hold(host, 13 * GIB)
    r = load(client, host, "llama3.1:8b", options={"num_gpu": 99, "num_ctx": 4096})
    assert r.status_code == 200
    assert [m["name"] for m in ps(client, host)] == ["llama3.1:8b"]


def test_a_second_model_loads_beside_the_first_and_spills_rather_than_evicting(
    make_host: MakeHost, client: httpx.Client
) -> None:
    # 2025 would evict llama3.1 so that qwen fits fully; 2026 predicts qwen's need against
    # its free figure and, under 80 %, loads it beside and lets llama-server spill.
    host = make_host(profile="2026", gpu_total_gib=24)
    load(client, host, "llama3.2", options={"num_ctx": 4096})  # ~2.7 GiB; ~21 GiB free
    hold(host, 15 * GIB)  # ComfyUI grows after that load: Ollama's figure does not see it
    figure = host.fake_ollama.sched.free_figure()  # type: ignore[union-attr]
    assert figure is not None and figure > host.gpu.free_bytes() + 14 * GIB
    # Predicted ~5.8 GiB: over 80 % of the real free (~6.3 GiB), under 80 % of the figure.
    load(client, host, "llama3.1:8b", options={"num_ctx": 4096})
    rows = {m["name"]: m for m in ps(client, host)}
    assert set(rows) == {"llama3.2:latest", "llama3.1:8b"}
    assert 0 < rows["llama3.1:8b"]["size_vram"] < rows["llama3.1:8b"]["size"]


def test_a_prediction_above_80_percent_of_the_figure_evicts_its_own_runner(
    make_host: MakeHost, client: httpx.Client
) -> None:
    host = make_host(profile="2026", gpu_total_gib=24)
    load(client, host, "llama3.1:8b")  # ~9 GiB at 32768 tokens; ~15 GiB left
    load(client, host, "qwen2.5:14b")  # predicted ~15.4 GiB > 80 % of 15: evicts
    [row] = ps(client, host)
    assert row["name"] == "qwen2.5:14b"
    stats = client.get(f"{host.ollama_url}/sim/stats").json()
    assert stats["models"]["llama3.1:8b"]["evictions"] == 1


def test_an_unload_gives_most_memory_back_first_and_the_tail_later(
    make_host: MakeHost, client: httpx.Client, wait_until: WaitUntil
) -> None:
    host = make_host(
        ollama=ollama_config("2026", unload_delay_s=10, unload_tail_s=100)  # 0.1 s, 1 s real
    )
    load(client, host, "llama3.1:8b")
    size = ps(client, host)[0]["size_vram"]
    load(client, host, "llama3.1:8b", keep_alive=0)
    assert ps(client, host) == []
    wait_until(lambda: host.gpu.used_bytes() < size * 0.25 + 512 * MIB, what="the bulk")
    assert host.gpu.used_bytes() > 0  # NVML still shows the tail
    wait_until(lambda: host.gpu.used_bytes() <= 400 * MIB, what="the tail")
