"""ComfyUI >= 0.15 with Dynamic VRAM: its weights are outside torch's figures, so after a
job `torch_vram_total` is near 0 while it holds GiBs. What a /free could return comes from
NVML (minus the CUDA context) or, without NVML, from the device bound; the torch figures
alone never make it look empty (api-facts-2026 sections 2 and 3)."""

from __future__ import annotations

import pytest
from test_policy_builders import (
    GIB,
    NOW,
    OLLAMA,
    baseline,
    comfy,
    episode,
    gpu,
    model,
    obs,
    ollama,
    run,
    settings,
    skipped,
    summary,
)

from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    Episode,
    FreeResult,
    FreeStage,
    GpuMemory,
    Observation,
    PolicyState,
    VramSource,
)
from supervisor.policy import CUDA_CONTEXT_BYTES, estimate_reclaimable
from supervisor.units import MIB

DYN = ComfyMode.DYNAMIC
CTX = CUDA_CONTEXT_BYTES / GIB  # 0.375 GiB


@pytest.mark.parametrize(
    ("c", "expected_gib"),
    [
        pytest.param(comfy(held=8), 8, id="classic-api-torch-reserved"),
        pytest.param(comfy(held=8, vram=8 + CTX, measured=True), 8, id="classic-nvml-agrees"),
        pytest.param(comfy(held=0.1, mode=DYN, vram=6 + CTX, measured=True), 6, id="dyn-nvml"),
        pytest.param(comfy(held=0, mode=DYN, vram=6), 6, id="dyn-no-nvml-device-bound"),
        pytest.param(comfy(held=1.5, mode=DYN, vram=0.5), 1.5, id="dyn-mid-job-torch-larger"),
        pytest.param(comfy(held=0, mode=DYN, vram=CTX, measured=True), 0, id="dyn-only-context"),
        pytest.param(comfy(held=0, mode=DYN), 0, id="dyn-nothing-but-torch-known"),
        pytest.param(comfy(held=64, device="cpu", vram=64), 0, id="cpu-ram-is-not-vram"),
        pytest.param(comfy(stats=False, vram=8 + CTX), 8, id="no-stats-nvml"),
        pytest.param(comfy(stats=False), 0, id="nothing-known"),
    ],
)
def test_estimate_reclaimable(c: ComfyObservation, expected_gib: float) -> None:
    assert abs(estimate_reclaimable(c) - expected_gib * GIB) < 1 * MIB


def test_the_builder_describes_a_dynamic_vram_comfyui() -> None:
    c = comfy(held=0, mode=DYN, vram=6)
    assert c.mode is DYN and c.stats is not None and c.stats.mode is DYN
    assert comfy().mode is ComfyMode.CLASSIC


LLAMA = model("llama3:8b", 5)
QWEN = model("qwen2.5:14b", 9)
OLD = ollama(LLAMA)


@pytest.mark.parametrize(
    ("o", "expected", "why"),
    [
        pytest.param(
            obs(ollama(LLAMA, QWEN), comfy(held=0, mode=DYN, vram=8 + CTX, measured=True)),
            ["free:soft:comfyui"],
            "",
            id="new-model-frees-dynamic-comfy-seen-by-nvml",
        ),
        pytest.param(
            obs(ollama(LLAMA, QWEN), comfy(held=0, mode=DYN, vram=8)),
            ["free:soft:comfyui"],
            "",
            id="new-model-frees-dynamic-comfy-bounded-from-device",
        ),
        pytest.param(
            obs(ollama(LLAMA, QWEN), comfy(held=0, mode=DYN, vram=0.1)),
            [],
            "holds only",
            id="dynamic-comfy-that-really-holds-nothing",
        ),
        pytest.param(
            obs(ollama(LLAMA, QWEN), comfy(held=0, mode=DYN, vram=CTX + 0.1, measured=True)),
            [],
            "holds only",
            id="dynamic-comfy-with-only-its-context",
        ),
        pytest.param(
            obs(ollama(LLAMA, QWEN), comfy(held=0, device="cpu", vram=0)),
            [],
            "",
            id="comfy-on-cpu-is-never-freed",
        ),
        pytest.param(
            obs(ollama(LLAMA), comfy(held=0, mode=DYN, vram=8), gpus=(gpu(20),)),
            ["free:soft:comfyui"],
            "",
            id="gpu-over-threshold-frees-dynamic-comfy",
        ),
    ],
)
def test_triggers_free_a_dynamic_vram_comfyui(
    o: Observation, expected: list[str], why: str
) -> None:
    d = run(o, baseline(OLD))
    assert summary(d) == expected
    assert why in skipped(d)


# A 12 GiB model with 4 GiB on the GPU; GPU 17 of 24 GiB used, ComfyUI holds 8 GiB of it.
SPILLED = model("big:12b", 12, vram=4)
OL = ollama(SPILLED)


@pytest.mark.parametrize(
    ("c", "expected", "why"),
    [
        pytest.param(
            comfy(held=0, mode=DYN, vram=8 + CTX, measured=True),
            ["heal:big:12b[comfyui]"],
            "",
            id="heal-counts-nvml-weights",
        ),
        pytest.param(
            comfy(held=0, mode=DYN, vram=8),
            ["heal:big:12b[comfyui]"],
            "",
            id="heal-counts-the-device-bound",
        ),
        pytest.param(
            comfy(held=0, mode=DYN),
            [],
            "could be made free",
            id="torch-figures-alone-show-no-room",
        ),
    ],
)
def test_heal_counts_dynamic_vram_weights_as_room(
    c: ComfyObservation, expected: list[str], why: str
) -> None:
    d = run(obs(OL, c, gpus=(gpu(17),)), baseline(OL), settings())
    assert summary(d) == expected
    assert why in skipped(d)
    if expected:
        assert d.actions[0].target == f"{OLLAMA}"


# Without NVML a Dynamic-VRAM ComfyUI's figure is bounded from the whole device: memory of
# any other GPU user counts in it. It may start a soft free (which releases Dynamic VRAM
# weights), never a hard free or a restart.
HOT = gpu(21)  # 87.5 %: above both thresholds
COOL = gpu(10)
ALLOW = settings(restart_fallback=True)
FOREIGN = comfy(held=0, mode=DYN, vram=1.5, restart=True)  # idle; 1.5 GiB is another app's
TWO = (
    comfy("comfy-a", held=0, mode=DYN, vram=8, gpus=("GPU-0",)),
    comfy("comfy-b", held=0, mode=DYN, vram=8, gpus=("GPU-0",)),
)


def _state(*eps: Episode) -> PolicyState:
    return baseline(OLD, episodes=eps, last_episode_at=NOW - 6)


@pytest.mark.parametrize(
    ("services", "ep", "gpus", "expected", "why"),
    [
        pytest.param(
            (FOREIGN,), None, (HOT,), ["free:soft:comfyui"], "", id="foreign-memory-soft-free"
        ),
        pytest.param(
            (FOREIGN,),
            episode(FreeStage.SOFT, FreeResult.PINNED),
            (HOT,),
            [],
            "cannot tell",
            id="foreign-memory-soft-pinned-no-hard",
        ),
        pytest.param(
            (FOREIGN,),
            episode(FreeStage.SOFT, FreeResult.FREED),
            (HOT,),
            [],
            "cannot tell",
            id="foreign-memory-gpu-still-hot-no-hard",
        ),
        pytest.param(
            (FOREIGN,),
            episode(FreeStage.HARD, FreeResult.PINNED),
            (HOT,),
            [],
            "cannot tell",
            id="estimate-never-restarts",
        ),
        pytest.param(
            (comfy(held=0, mode=DYN, vram=1.5, measured=True, restart=True),),
            episode(FreeStage.SOFT, FreeResult.PINNED),
            (HOT,),
            ["free:hard:comfyui"],
            "",
            id="nvml-measured-still-escalates",
        ),
        pytest.param(
            (comfy(held=0, mode=DYN, vram=None, restart=True),),
            None,
            (HOT,),
            [],
            "",
            id="ollama-ps-failed-no-figure-no-free",
        ),
        pytest.param(
            TWO,
            episode(FreeStage.SOFT, FreeResult.PINNED, target="comfyui/comfy-a"),
            (HOT,),
            [],
            "cannot tell",
            id="two-dynamic-comfyuis-each-soft-only",
        ),
    ],
)
def test_an_estimate_never_escalates_past_a_soft_free(
    services: tuple[ComfyObservation, ...],
    ep: Episode | None,
    gpus: tuple[GpuMemory, ...],
    expected: list[str],
    why: str,
) -> None:
    state = _state(ep) if ep is not None else baseline(OLD)
    d = run(obs(OLD, *services, gpus=gpus, source=VramSource.API), state, ALLOW)
    assert summary(d) == expected
    assert why in skipped(d)
