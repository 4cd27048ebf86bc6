"""The fake InvokeAI behaves as tenants.md §5 says: the queue status shape, a run locks its
model, empty_model_cache waits for the cache lock and drops only unlocked models, stats is
`null` before the first load, FastAPI's error bodies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.invokeai import CONTEXT_BYTES, FakeInvokeAI, InvokeConfig


@dataclass
class Invoke:
    fake: FakeInvokeAI
    gpu: MemoryGpu
    url: str
    http: httpx.Client


@pytest.fixture
def invoke() -> Iterator[Invoke]:
    gpu = MemoryGpu(24 * GIB)
    fake = FakeInvokeAI(gpu, InvokeConfig(time_scale=0.05, model_gib=6.0, load_seconds=2.0))
    server = fake.serve()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield Invoke(fake, gpu, server.url, http)
    server.stop()
    fake.close()


def batch(*models: tuple[str, float], seconds: float = 2.0, runs: int = 1) -> dict[str, object]:
    nodes = {
        f"n{i}": {
            "id": f"n{i}",
            "type": "main_model_loader",
            "model": {"key": key, "name": key, "base": "sdxl", "type": "main", "sim_gib": gib},
        }
        for i, (key, gib) in enumerate(models)
    }
    return {
        "batch": {
            "graph": {"id": "g", "nodes": nodes, "edges": []},
            "runs": runs,
            "sim_seconds": seconds,
        }
    }


def status(inv: Invoke) -> dict[str, object]:
    r = inv.http.get("/api/v1/queue/default/status")
    assert r.status_code == 200
    data: dict[str, object] = r.json()
    return data


def wait(pred: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_idle_status_has_the_documented_shape(invoke: Invoke) -> None:
    data = status(invoke)
    assert set(data["queue"]) == {  # type: ignore[arg-type]
        "queue_id",
        "item_id",
        "batch_id",
        "session_id",
        "pending",
        "in_progress",
        "waiting",
        "completed",
        "failed",
        "canceled",
        "total",
        "user_pending",
        "user_in_progress",
    }
    assert data["processor"] == {"is_started": True, "is_processing": False}
    assert invoke.http.get("/api/v2/models/stats").json() is None  # nothing loaded yet
    assert invoke.gpu.used_bytes() == 0  # no CUDA context before the first load


def test_a_run_loads_its_model_which_stays_cached_after(invoke: Invoke) -> None:
    r = invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("sdxl", 6.0)))
    assert r.status_code == 200 and r.json()["enqueued"] == 1
    wait(lambda: status(invoke)["processor"]["is_processing"])  # type: ignore[index]
    wait(lambda: status(invoke)["queue"]["completed"] == 1)  # type: ignore[index]
    assert status(invoke)["processor"]["is_processing"] is False  # type: ignore[index]
    assert invoke.gpu.used_bytes() == 6 * GIB + CONTEXT_BYTES
    stats = invoke.http.get("/api/v2/models/stats").json()
    assert stats["loaded_model_sizes"] == {"sdxl": 6 * GIB} and stats["misses"] == 1


def test_empty_model_cache_drops_unlocked_models_and_answers_null(invoke: Invoke) -> None:
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("sdxl", 6.0)))
    wait(lambda: status(invoke)["queue"]["completed"] == 1)  # type: ignore[index]
    r = invoke.http.post("/api/v2/models/empty_model_cache")
    assert r.status_code == 200 and r.json() is None
    assert invoke.gpu.used_bytes() == CONTEXT_BYTES  # the context stays until exit
    assert invoke.http.get("/api/v2/models/stats").json()["loaded_model_sizes"] == {}


def test_empty_during_a_run_keeps_the_locked_model(invoke: Invoke) -> None:
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("a", 4.0)))
    wait(lambda: status(invoke)["queue"]["completed"] == 1)  # type: ignore[index]
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("b", 5.0), seconds=100))
    wait(lambda: "b" in invoke.http.get("/sim/state").json()["cache"])
    wait(lambda: invoke.http.get("/sim/state").json()["cache"]["b"]["locked"])
    assert status(invoke)["queue"]["in_progress"] == 1  # type: ignore[index]
    invoke.http.post("/api/v2/models/empty_model_cache")
    cache = invoke.http.get("/sim/state").json()["cache"]
    assert list(cache) == ["b"]  # "a" was unlocked and dropped; "b" runs
    assert invoke.gpu.used_bytes() == 5 * GIB + CONTEXT_BYTES


def test_empty_waits_for_the_cache_lock_of_a_load(invoke: Invoke) -> None:
    # load_seconds=2 at time_scale 0.05: a load holds the cache lock for 0.1 s
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("a", 4.0), seconds=0.0))
    wait(lambda: status(invoke)["processor"]["is_processing"])  # type: ignore[index]
    started = time.monotonic()
    invoke.http.post("/api/v2/models/empty_model_cache")
    took = time.monotonic() - started
    # It returned after the load (the model was then locked or already done) ...
    assert took >= 0.03
    wait(lambda: status(invoke)["queue"]["completed"] == 1)  # type: ignore[index]
    assert invoke.fake.empty_calls == 1


def test_pending_items_wait_while_the_processor_is_paused(invoke: Invoke) -> None:
    r = invoke.http.put("/api/v1/queue/default/processor/pause")
    assert r.json() == {"is_started": False, "is_processing": False}
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("a", 1.0), runs=2))
    time.sleep(0.1)
    data = status(invoke)
    assert data["queue"]["pending"] == 2 and data["processor"]["is_started"] is False  # type: ignore[index]
    invoke.http.put("/api/v1/queue/default/processor/resume")
    wait(lambda: status(invoke)["queue"]["completed"] == 2)  # type: ignore[index]


def test_errors_look_like_fastapi(invoke: Invoke) -> None:
    r = invoke.http.get("/api/v9/nothing")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = invoke.http.get("/api/v2/models/empty_model_cache")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
    r = invoke.http.post("/api/v1/queue/default/enqueue_batch", json={"batch": {}})
    assert r.status_code == 422


def test_concurrent_empty_calls_are_serialised(invoke: Invoke) -> None:
    invoke.http.post("/api/v1/queue/default/enqueue_batch", json=batch(("a", 4.0)))
    wait(lambda: status(invoke)["queue"]["completed"] == 1)  # type: ignore[index]
    threads = [
        threading.Thread(target=lambda: httpx.post(f"{invoke.url}/api/v2/models/empty_model_cache"))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert invoke.fake.empty_calls == 4 and invoke.gpu.used_bytes() == CONTEXT_BYTES
