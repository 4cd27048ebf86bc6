"""The fake SD web UI in its three variants behaves as tenants.md §4 and §6 say: `--api`
needed (A1111, Forge), /progress shows the running job, unload-checkpoint acts at once
(A1111 parks the weights in CPU RAM until reload-checkpoint, Forge and SD.Next reload on
demand, SD.Next answers 204), the /memory shape with this process's torch figures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.sdwebui import CONTEXT_BYTES, FakeSdWebUI, SdConfig


@dataclass
class Sd:
    fake: FakeSdWebUI
    gpu: MemoryGpu
    http: httpx.Client


@pytest.fixture
def make() -> Iterator[Callable[..., Sd]]:
    made: list[tuple[FakeSdWebUI, object, httpx.Client]] = []

    def build(variant: str, api: bool = True) -> Sd:
        gpu = MemoryGpu(24 * GIB)
        fake = FakeSdWebUI(gpu, SdConfig(variant=variant, api=api, time_scale=0.05))
        server = fake.serve()
        http = httpx.Client(base_url=server.url, timeout=10)
        made.append((fake, server, http))
        return Sd(fake, gpu, http)

    yield build
    for fake, server, http in made:
        http.close()
        server.stop()  # type: ignore[attr-defined]
        fake.close()


def until(pred: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def generate(sd: Sd, steps: int = 20) -> threading.Thread:
    results: list[int] = []
    t = threading.Thread(
        target=lambda: results.append(
            sd.http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": steps}).status_code
        )
    )
    t.start()
    t.results = results  # type: ignore[attr-defined]
    return t


def job_count(sd: Sd) -> int:
    count: int = sd.http.get("/sdapi/v1/progress").json()["state"]["job_count"]
    return count


@pytest.mark.parametrize("variant", ["a1111", "forge"])
def test_without_api_the_sdapi_routes_are_404(make: Callable[..., Sd], variant: str) -> None:
    sd = make(variant, api=False)
    r = sd.http.get("/sdapi/v1/progress")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert sd.http.post("/sdapi/v1/unload-checkpoint").status_code == 404


def test_sdnext_serves_its_api_without_the_flag(make: Callable[..., Sd]) -> None:
    sd = make("sdnext", api=False)
    assert sd.http.get("/sdapi/v1/status").json()["status"] == "idle"


@pytest.mark.parametrize("variant", ["a1111", "forge", "sdnext"])
def test_progress_and_memory_shapes(make: Callable[..., Sd], variant: str) -> None:
    sd = make(variant)
    data = sd.http.get("/sdapi/v1/progress").json()
    assert set(data) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert set(data["state"]) == {
        "skipped", "interrupted", "stopping_generation", "job", "job_count",
        "job_timestamp", "job_no", "sampling_step", "sampling_steps",
    }  # fmt: skip
    assert data["state"]["job_count"] == 0 and data["progress"] == 0
    mem = sd.http.get("/sdapi/v1/memory").json()
    assert set(mem["cuda"]) == {"system", "active", "allocated", "reserved", "inactive", "events"}
    assert mem["cuda"]["system"]["total"] == 24 * GIB
    loaded = variant != "forge"  # Forge loads its checkpoint at the first job
    assert mem["cuda"]["reserved"]["current"] == (sd.fake.weights_bytes if loaded else 0)
    assert sd.gpu.used_bytes() == CONTEXT_BYTES + mem["cuda"]["reserved"]["current"]


def test_a1111_unload_parks_the_weights_until_reload(make: Callable[..., Sd]) -> None:
    sd = make("a1111")
    r = sd.http.post("/sdapi/v1/unload-checkpoint")
    assert r.status_code == 200 and r.json() == {}
    assert sd.gpu.used_bytes() == CONTEXT_BYTES
    mem = sd.http.get("/sdapi/v1/memory").json()
    assert mem["cuda"]["reserved"]["current"] == 0
    # Its next job does not bring them back (device mismatch, UNVERIFIED upstream).
    r = sd.http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
    assert r.status_code == 500 and "same device" in r.json()["errors"]
    assert sd.http.post("/sdapi/v1/reload-checkpoint").json() == {}
    assert sd.gpu.used_bytes() == CONTEXT_BYTES + sd.fake.weights_bytes
    r = sd.http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
    assert r.status_code == 200


def test_forge_unloads_everything_and_reloads_on_demand(make: Callable[..., Sd]) -> None:
    sd = make("forge")
    assert sd.http.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200
    assert sd.gpu.used_bytes() == CONTEXT_BYTES + sd.fake.weights_bytes
    assert sd.http.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert sd.gpu.used_bytes() == CONTEXT_BYTES
    assert sd.http.post("/sdapi/v1/reload-checkpoint").json() == {}  # a no-op
    assert sd.gpu.used_bytes() == CONTEXT_BYTES
    assert sd.http.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200
    assert sd.gpu.used_bytes() == CONTEXT_BYTES + sd.fake.weights_bytes


def test_sdnext_answers_204_and_reloads_on_demand(make: Callable[..., Sd]) -> None:
    sd = make("sdnext")
    r = sd.http.post("/sdapi/v1/unload-checkpoint")
    assert r.status_code == 204 and r.content == b""
    assert sd.gpu.used_bytes() == CONTEXT_BYTES
    assert sd.http.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200
    assert sd.gpu.used_bytes() == CONTEXT_BYTES + sd.fake.weights_bytes


def test_progress_shows_only_the_running_job_and_forge_lists_waiting_ones(
    make: Callable[..., Sd],
) -> None:
    sd = make("forge")
    first, second = generate(sd, steps=40), None
    until(lambda: job_count(sd) == 1)
    second = generate(sd, steps=2)
    until(lambda: sd.http.get("/internal/pending-tasks").json()["size"] == 1)
    assert job_count(sd) == 1  # the waiting task does not show in /progress
    first.join()
    second.join()
    assert first.results == second.results == [200]  # type: ignore[attr-defined]
    assert job_count(sd) == 0
    assert sd.http.get("/internal/pending-tasks").json() == {"size": 0, "tasks": []}


def test_a1111_has_no_pending_tasks_route(make: Callable[..., Sd]) -> None:
    assert make("a1111").http.get("/internal/pending-tasks").status_code == 404


def test_sdnext_status_is_running_during_a_job(make: Callable[..., Sd]) -> None:
    sd = make("sdnext")
    t = generate(sd, steps=40)
    until(lambda: sd.http.get("/sdapi/v1/status").json()["status"] == "running")
    t.join()
    assert sd.http.get("/sdapi/v1/status").json()["status"] == "idle"


def test_unload_under_a_running_a1111_job_breaks_it(make: Callable[..., Sd]) -> None:
    sd = make("a1111")
    t = generate(sd, steps=60)
    until(lambda: job_count(sd) == 1)
    sd.http.post("/sdapi/v1/unload-checkpoint")  # it does not wait for the job
    t.join()
    assert t.results == [500]  # type: ignore[attr-defined]
