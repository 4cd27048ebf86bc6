"""A labelled speaches container beside a labelled ComfyUI on the real engine.

The simulated speaches (`python -m supervisor.sim speaches`) holds a Whisper model; a
ComfyUI job takes the shared 24 GiB GPU over the threshold. speaches itself refuses (409)
to unload a model that serves a request: the supervisor's unload is refused while the
transcription runs (the request is answered), and goes through once it ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.harness import Sims, Supervisor, comfy_submit, wait_until

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
WHISPER = "Systran/faster-whisper-large-v3"


def test_speaches_unloads_an_idle_model_for_comfyui_and_never_cuts_a_transcription(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    # A transcription takes 60 s of simulated time: 6 s at the harness's time scale.
    speaches = sims.start("speaches", extra=("--request-seconds", "60"))
    comfy = sims.comfyui()
    sup = start_supervisor()
    sup.wait_for(f"Discovered speaches container {speaches.name}")
    key = f"speaches/{speaches.name}"

    out: dict[str, Any] = {}

    def transcribe() -> None:
        out["answer"] = httpx.post(
            f"{speaches.url}/v1/audio/transcriptions",
            files={"file": ("a.wav", b"RIFF....", "audio/wav")},
            data={"model": WHISPER},
            timeout=60,
        )

    thread = threading.Thread(target=transcribe, daemon=True)
    thread.start()
    wait_until(
        lambda: speaches.get("/sim/stats")["ref_counts"].get(WHISPER) == 1, 10, "a transcription"
    )
    comfy_submit(comfy, model_gib=16, seconds=200)  # 20 s at the harness's time scale
    refused = sup.wait_for(f"Could not unload model {WHISPER} on {key}", timeout_s=30)
    assert f"model {WHISPER} is in use: the server refuses to unload it (HTTP 409" in (
        refused.message
    )
    thread.join(30)
    ended = time.monotonic()
    assert out["answer"].status_code == 200, out
    assert out["answer"].json() == {"text": "simulated transcription"}

    unloaded = sup.wait_for(f"Unloaded model {WHISPER} on {key}", timeout_s=30)
    assert unloaded.at > ended - 0.1
    stats = speaches.get("/sim/stats")
    assert stats["held"] == 0 and stats["unloads"] == 1 and stats["refused"] >= 1
    assert stats["requests_done"] == 1
    assert speaches.get("/api/ps") == {"models": []}
    # Refused unloads are retried at the rate limit, not in a storm.
    assert stats["refused"] <= 12, stats
    assert sup.errors() == [], sup.log()
