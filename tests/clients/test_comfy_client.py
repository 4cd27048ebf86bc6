"""ComfyClient against the simulator's fake ComfyUI (api-facts §2), and against canned
answers of other generations and of broken servers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from supervisor.clients._http import resend_guard
from supervisor.clients.comfyui import ComfyClient
from supervisor.errors import ServiceError
from supervisor.model import ComfyMode, ComfyQueue, ComfyStats

URL = "http://comfy.test:8188"
GIB = 1024**3


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_system_stats_reads_the_device_in_bytes(fake_comfy: Any, comfy_client: Any) -> None:
    client = comfy_client(fake_comfy)
    fake_comfy.submit()  # a job loads its checkpoint: torch reserves memory
    wait_for(lambda: client.system_stats().torch_reserved_bytes > 2 * GIB)
    stats = client.system_stats()
    raw = httpx.get(f"{fake_comfy.url}/system_stats").json()
    device, system = raw["devices"][0], raw["system"]
    assert stats == ComfyStats(
        device_name=device["name"],
        device_type="cuda",
        vram_total_bytes=device["vram_total"],
        vram_free_bytes=device["vram_free"],
        torch_reserved_bytes=device["torch_vram_total"],
        torch_cached_bytes=device["torch_vram_free"],
        version="0.3.64",
        argv=tuple(system["argv"]),
        packages=(),
    )
    assert stats.vram_total_bytes == 24 * GIB
    assert stats.mode is ComfyMode.CLASSIC  # 0.3.64 has no Dynamic VRAM


def stats_2026(argv: list[str], *, version: str = "0.38.1", aimdo: bool = True) -> Any:
    """/system_stats of ComfyUI 0.15+ (api-facts-2026 section 2): every torch device listed,
    primary first; os is sys.platform; comfy_package_versions; a Linux reserve of 400 MiB."""
    packages = {"comfyui-frontend-package": "1.33.10", "comfyui-workflow-templates": "0.7.25"}
    if aimdo:
        packages["comfy-aimdo"] = "0.5.5"
    device = {
        "type": "cuda",
        "vram_total": 25393692672,
        "vram_free": 20 * GIB,
        "torch_vram_total": 0,  # after a job: torch's cache emptied, weights outside it
        "torch_vram_free": 0,
    }
    return {
        "system": {
            "os": "linux",
            "ram_total": 67108864000,
            "ram_free": 50000000000,
            "comfyui_version": version,
            "python_version": "3.12.3 (main, Feb  4 2025, 14:48:35) [GCC 13.3.0]",
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": False,
            "argv": argv,
            "comfy_package_versions": packages,
            "deploy_environment": "local",
        },
        "devices": [
            {**device, "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "index": 0},
            {**device, "name": "cuda:1 NVIDIA RTX A4000 : cudaMallocAsync", "index": 1},
        ],
    }


@pytest.mark.parametrize(
    ("argv", "version", "aimdo", "mode"),
    [
        (["main.py", "--listen"], "0.38.1", True, ComfyMode.DYNAMIC),
        (["main.py", "--listen"], "0.15.0", True, ComfyMode.DYNAMIC),
        (["main.py", "--disable-dynamic-vram"], "0.38.1", True, ComfyMode.CLASSIC),
        (["main.py", "--highvram"], "0.38.1", True, ComfyMode.CLASSIC),
        (["main.py", "--gpu-only"], "0.38.1", True, ComfyMode.CLASSIC),
        (["main.py", "--novram"], "0.38.1", True, ComfyMode.CLASSIC),
        (["main.py", "--listen"], "0.38.1", False, ComfyMode.CLASSIC),  # no comfy-aimdo
        (["main.py", "--listen"], "0.14.2", True, ComfyMode.CLASSIC),
        (["main.py", "--listen"], "v0.4.0", True, ComfyMode.CLASSIC),
        (["main.py", "--listen"], "1.2.0", True, ComfyMode.DYNAMIC),
        (["main.py", "--listen"], "", True, ComfyMode.CLASSIC),  # a fork without a version
    ],
)
def test_system_stats_2026_shape_tells_the_memory_mode(
    comfy_client: Any, argv: list[str], version: str, aimdo: bool, mode: ComfyMode
) -> None:
    body = stats_2026(argv, version=version, aimdo=aimdo)
    stats = comfy_client(lambda r: httpx.Response(200, json=body)).system_stats()
    # The primary device is the first one listed; the others are ignored.
    assert stats.device_name == "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync"
    assert (stats.torch_reserved_bytes, stats.vram_free_bytes) == (0, 20 * GIB)
    assert stats.version == version and stats.argv == tuple(argv)
    assert ("comfy-aimdo" in stats.packages) is aimdo
    assert stats.mode is mode


def test_system_stats_without_a_system_section_is_still_read(comfy_client: Any) -> None:
    body = stats_2026(["main.py"])
    del body["system"]
    stats = comfy_client(lambda r: httpx.Response(200, json=body)).system_stats()
    assert (stats.version, stats.argv, stats.packages) == ("", (), ())
    assert stats.mode is ComfyMode.CLASSIC and stats.vram_total_bytes == 25393692672


def test_system_stats_under_cpu_mode(comfy_client: Any) -> None:
    body = {
        "system": {"os": "posix"},
        "devices": [
            {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": 67108864000,
                "vram_free": 50000000000,
                "torch_vram_total": 67108864000,
                "torch_vram_free": 50000000000.0,
            }
        ],
    }
    stats = comfy_client(lambda r: httpx.Response(200, json=body)).system_stats()
    assert stats.device_type == "cpu"
    assert stats.torch_cached_bytes == 50000000000
    assert stats.mode is ComfyMode.CPU


def test_queue_counts_running_and_pending(fake_comfy: Any, comfy_client: Any) -> None:
    client = comfy_client(fake_comfy)
    assert client.queue() == ComfyQueue(running=0, pending=0)
    assert not client.queue().is_busy
    for _ in range(3):
        fake_comfy.submit()
    wait_for(lambda: client.queue() == ComfyQueue(running=1, pending=2))
    assert client.queue().is_busy


@pytest.mark.parametrize("unload_models", [True, False])
@pytest.mark.parametrize("free_memory", [True, False])
def test_free_sends_exactly_the_flags_given(
    fake_comfy: Any, comfy_client: Any, unload_models: bool, free_memory: bool
) -> None:
    comfy_client(fake_comfy).free(unload_models=unload_models, free_memory=free_memory)
    assert fake_comfy.received("/free") == [
        {"unload_models": unload_models, "free_memory": free_memory}
    ]


def test_free_with_an_empty_200_is_success(comfy_client: Any) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, content=b"", headers={"Content-Type": "application/octet-stream"}
        )

    comfy_client(handler).free(unload_models=True, free_memory=True)
    assert seen[0].headers["content-type"] == "application/json"


def test_interrupt_posts_to_interrupt(fake_comfy: Any, comfy_client: Any) -> None:
    comfy_client(fake_comfy).interrupt()
    assert [(m, p) for m, p, _ in fake_comfy.requests] == [("POST", "/interrupt")]


def _raise(exc_type: type[httpx.TransportError]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


def _stats_with(**device: Any) -> Any:
    base = {
        "name": "cuda:0",
        "type": "cuda",
        "index": 0,
        "vram_total": 10,
        "vram_free": 5,
        "torch_vram_total": 2,
        "torch_vram_free": 1,
    }
    base.update(device)
    return lambda r: httpx.Response(200, json={"system": {}, "devices": [base]})


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (
            lambda r: httpx.Response(
                500, text="500 Internal Server Error\n\nServer got itself in trouble"
            ),
            r"GET /system_stats returned HTTP 500: 500 Internal Server Error Server got itself",
        ),
        (lambda r: httpx.Response(404, text="404: Not Found"), r"HTTP 404: 404: Not Found"),
        (lambda r: httpx.Response(200, text="<!DOCTYPE html>"), r"not JSON: '<!DOCTYPE html>'"),
        (lambda r: httpx.Response(200, json={"system": {}}), r"the body has no 'devices'"),
        (
            lambda r: httpx.Response(200, json={"system": {}, "devices": []}),
            r"devices is an empty list",
        ),
        (_stats_with(vram_total=None), r"devices\[0\].vram_total is null, expected an integer"),
        (_stats_with(torch_vram_free="1"), r"devices\[0\].torch_vram_free is a string"),
        (_stats_with(type=None), r"devices\[0\].type is null, expected a string"),
        (_raise(httpx.ReadTimeout), r"GET /system_stats timed out after 5 s"),
        (_raise(httpx.ConnectError), r"GET /system_stats: cannot connect"),
    ],
)
def test_stats_failures_are_service_errors(comfy_client: Any, handler: Any, message: str) -> None:
    with pytest.raises(ServiceError, match=message) as caught:
        comfy_client(handler).system_stats()
    assert caught.value.service == f"comfyui at {URL}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"queue_running": []}, "the body has no 'queue_pending'"),
        ({"queue_running": 1, "queue_pending": []}, "queue_running is an integer, expected a list"),
        ([], "the body is a list"),
    ],
)
def test_queue_wrong_shape(comfy_client: Any, body: Any, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        comfy_client(lambda r: httpx.Response(200, json=body)).queue()


def test_free_failures(comfy_client: Any) -> None:
    with pytest.raises(ServiceError, match=r"POST /free returned HTTP 500"):
        comfy_client(lambda r: httpx.Response(500, text="boom")).free(
            unload_models=True, free_memory=False
        )
    with pytest.raises(ServiceError, match=r"POST /free: cannot connect"):
        comfy_client(_raise(httpx.ConnectError)).free(unload_models=True, free_memory=False)


def test_reads_and_free_are_retried(fake_comfy: Any, comfy_client: Any, flaky: Any) -> None:
    handler = flaky(fake_comfy, httpx.ReadTimeout)
    client = comfy_client(handler)
    client.queue()
    assert handler.calls == 2
    handler.errors.append(httpx.ReadTimeout)
    client.free(unload_models=True, free_memory=True)
    assert handler.calls == 4
    assert fake_comfy.received("/free") == [{"unload_models": True, "free_memory": True}]


def test_a_retry_asks_the_resend_guard_first(
    fake_comfy: Any, comfy_client: Any, flaky: Any
) -> None:
    """Found by the Docker-backed soak: a free whose first attempt met the container being
    removed was retried 0.25 s later and reached the container recreated without its role
    label at the same URL. Under `resend_guard` a retry is sent only while the guard allows
    it; the first attempt is sent unasked; a retry it allows goes out as before."""
    asked: list[str] = []

    def gone() -> str | None:
        asked.append("asked")
        return "its container is gone"

    handler = flaky(fake_comfy, httpx.RemoteProtocolError)
    client = comfy_client(handler)
    with (
        resend_guard(gone),
        pytest.raises(
            ServiceError,
            match=r"POST /free failed \(RemoteProtocolError: simulated\) and was not sent "
            r"again: its container is gone",
        ),
    ):
        client.free(unload_models=True, free_memory=False)
    assert handler.calls == 1 and asked == ["asked"]
    assert fake_comfy.received("/free") == []

    handler.errors.append(httpx.RemoteProtocolError)
    with resend_guard(lambda: None):
        client.free(unload_models=True, free_memory=False)
    assert handler.calls == 3
    assert fake_comfy.received("/free") == [{"unload_models": True, "free_memory": False}]

    # Outside the block nothing is asked (a read of the loop's, another thread's request).
    handler.errors.append(httpx.RemoteProtocolError)
    client.queue()
    assert handler.calls == 5 and asked == ["asked"]


def test_a_delivered_interrupt_is_not_repeated(
    fake_comfy: Any, comfy_client: Any, flaky: Any
) -> None:
    handler = flaky(fake_comfy, httpx.ReadTimeout)
    with pytest.raises(ServiceError, match="POST /interrupt timed out"):
        comfy_client(handler).interrupt()
    assert handler.calls == 1
    handler = flaky(fake_comfy, httpx.ConnectError)
    comfy_client(handler).interrupt()
    assert handler.calls == 2
    assert len(fake_comfy.received("/interrupt")) == 1


def test_api_prefixed_base_url_works(fake_comfy: Any, comfy_client: Any) -> None:
    # Every route is also served under /api (api-facts 2.1).
    client = comfy_client(fake_comfy, base_url=URL + "/api/")
    assert client.base_url == URL + "/api"
    assert client.queue() == ComfyQueue(0, 0)


def test_close_is_safe_to_repeat() -> None:
    client = ComfyClient(URL)
    client.close()
    client.close()
