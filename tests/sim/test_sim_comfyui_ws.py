"""The fake ComfyUI's /ws, direct: the routing of api-facts 2.5."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from tests.gate.wsclient import WsClient


@pytest.fixture
def host() -> Iterator[SimHost]:
    with SimHost(time_scale=0.05, start_ollama=False) as sim:
        yield sim


def job() -> dict[str, Any]:
    inputs = {"ckpt_name": "sim-2.safetensors", "model_gib": 2.0, "seconds": 1.0, "steps": 2}
    return {"prompt": {"9": {"class_type": "SimJob", "inputs": inputs}}}


def port(host: SimHost) -> int:
    return int(host.comfyui_url.rsplit(":", 1)[1])


def rest(ws: WsClient) -> list[dict[str, Any]]:
    seen = []
    while (frame := ws.next_frame(0.5)) is not None:
        seen.append(json.loads(frame[1]))
    return seen


def test_a_prompt_without_client_id_reaches_every_socket_in_part(host: SimHost) -> None:
    """No client_id: executing/progress/executed go to every socket, execution_start and
    execution_success to none."""
    a, b = WsClient(port(host), "/ws?clientId=a"), WsClient(port(host), "/ws?clientId=b")
    try:
        for ws in (a, b):
            ws.messages_until(lambda m: m["type"] == "status")
        assert httpx.post(f"{host.comfyui_url}/prompt", json=job()).status_code == 200
        for ws in (a, b):
            got = ws.messages_until(
                lambda m: m["type"] == "executing" and m["data"]["node"] is None
            )
            kinds = {m["type"] for m in got + rest(ws)}
            assert {"status", "executing", "progress", "executed"} <= kinds
            assert not kinds & {"execution_start", "execution_success", "execution_cached"}
    finally:
        a.close()
        b.close()


def test_events_of_a_prompt_go_to_its_client_only(host: SimHost) -> None:
    a, b = WsClient(port(host), "/ws?clientId=a"), WsClient(port(host), "/ws?clientId=b")
    try:
        for ws in (a, b):
            ws.messages_until(lambda m: m["type"] == "status")
        body = {**job(), "client_id": "a"}
        assert httpx.post(f"{host.comfyui_url}/prompt", json=body).status_code == 200
        got = a.messages_until(lambda m: m["type"] == "execution_success")
        assert "execution_start" in {m["type"] for m in got}
        assert all("timestamp" in m["data"] for m in got if m["type"] == "execution_start")
        a.messages_until(lambda m: m["type"] == "executing" and m["data"]["node"] is None)
        assert {m["type"] for m in rest(b)} == {"status"}
    finally:
        a.close()
        b.close()


def test_a_plain_get_is_refused(host: SimHost) -> None:
    assert httpx.get(f"{host.comfyui_url}/ws").status_code == 400
