"""The fake Ollama's wait for VRAM recovery after an unload (api-facts 1.3,
api-facts-2026 section 1; Ollama server/sched.go processCompleted, waitForVRAMRecovery):
polls every 250 ms until free memory grew by 80 % (2025) / 75 % (2026) of the runner's
VRAM, at most 5 s; a load that evicted waits for it, other loads do not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost, ollama_config
from supervisor.sim.gpu import GIB
from supervisor.sim.ollama_sched import RECOVER_WAIT_S

MakeHost = Callable[..., SimHost]
SCALE = 0.05  # 5 simulated seconds last 0.25 s


def load(client: httpx.Client, host: SimHost, model: str, **body: Any) -> float:
    """Load `model`; the real seconds the request took."""
    start = time.monotonic()
    r = client.post(
        f"{host.ollama_url}/api/generate", json={"model": model, "keep_alive": -1, **body}
    )
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def ps(client: httpx.Client, host: SimHost) -> dict[str, dict[str, Any]]:
    models = client.get(f"{host.ollama_url}/api/ps").json()["models"]
    return {m["name"]: m for m in models}


def evicting_host(make_host: MakeHost, profile: str, **changes: Any) -> SimHost:
    """A host where loading qwen2.5:14b after llama3.1:8b makes Ollama evict llama3.1:8b."""
    cfg = ollama_config(profile, **changes)
    return make_host(ollama=cfg, time_scale=SCALE, gpu_total_gib=24 if profile == "2026" else 14)


def take_what_ollama_frees(host: SimHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes every byte an Ollama runner gives back, at once."""
    gpu = host.gpu
    release = gpu.release

    def grabbed(owner: str, nbytes: int | None = None) -> int:
        freed = release(owner, nbytes)
        if owner.startswith("ollama:") and freed > 0:
            assert gpu.allocate("other:grabber", 4242, freed)
        return freed

    monkeypatch.setattr(gpu, "release", grabbed)


@pytest.mark.parametrize("profile", ["2025", "2026"])
def test_an_evicting_load_waits_5_s_at_most_when_the_memory_never_comes_back(
    make_host: MakeHost, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    host = evicting_host(make_host, profile)
    load(client, host, "llama3.1:8b")
    take_what_ollama_frees(host, monkeypatch)
    took = load(client, host, "qwen2.5:14b")
    assert set(ps(client, host)) == {"qwen2.5:14b"}
    # The freed memory never shows as free: Ollama waits the whole 5 s, then loads anyway.
    assert took >= RECOVER_WAIT_S * SCALE
    assert took < 4 * RECOVER_WAIT_S * SCALE


@pytest.mark.parametrize("profile", ["2025", "2026"])
def test_an_evicting_load_stops_waiting_at_5_s_while_the_memory_still_lags(
    make_host: MakeHost, client: httpx.Client, profile: str
) -> None:
    # NVML shows the memory free only 40 s after the runner exits: the wait ends at 5 s.
    host = evicting_host(make_host, profile, unload_delay_s=40)
    load(client, host, "llama3.1:8b")
    took = load(client, host, "qwen2.5:14b")
    assert RECOVER_WAIT_S * SCALE <= took < 40 * SCALE
    row = ps(client, host)["qwen2.5:14b"]
    assert row["size_vram"] < row["size"]  # it started while the memory was still held


@pytest.mark.parametrize("profile", ["2025", "2026"])
def test_an_evicting_load_waits_until_the_memory_is_back_and_lands_fully_on_the_gpu(
    make_host: MakeHost, client: httpx.Client, profile: str
) -> None:
    # The memory comes back 3 s after the runner exits: within the 5 s, so the load waits
    # for it and gets the whole GPU.
    host = evicting_host(make_host, profile, unload_delay_s=3, unload_tail_s=0.1)
    load(client, host, "llama3.1:8b")
    took = load(client, host, "qwen2.5:14b")
    assert 3 * SCALE <= took < RECOVER_WAIT_S * SCALE + 1.0
    row = ps(client, host)["qwen2.5:14b"]
    if profile == "2025":
        assert row["size_vram"] == row["size"]
    else:  # the 10 % tail may still be held when it starts; the rest is on the GPU
        assert row["size_vram"] >= 0.9 * row["size"]


def test_a_load_after_an_explicit_unload_is_not_held_back_by_its_recovery_wait(
    make_host: MakeHost, client: httpx.Client
) -> None:
    # Ollama runs the recovery wait in its completion loop; its pending loop waits for it
    # only after its own evictions. A load that needs no eviction starts at once and
    # places its layers in what is free then.
    host = make_host(
        ollama=ollama_config("2025", unload_delay_s=40), time_scale=SCALE, gpu_total_gib=14
    )
    load(client, host, "llama3.1:8b")
    r = client.post(
        f"{host.ollama_url}/api/generate", json={"model": "llama3.1:8b", "keep_alive": 0}
    )
    assert r.json()["done_reason"] == "unload"
    assert ps(client, host) == {}
    took = load(client, host, "qwen2.5:14b")
    assert took < RECOVER_WAIT_S * SCALE
    row = ps(client, host)["qwen2.5:14b"]
    assert row["size_vram"] < row["size"]
    assert host.gpu.free_bytes() < 14 * GIB
