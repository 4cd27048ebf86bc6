"""ollama_profile.py: which Ollama, and what it changes for the estimate and the room
(api-facts-2026 sections 1 and 3), table by table."""

from __future__ import annotations

import pytest

from supervisor.estimate import estimate_need
from supervisor.model import Resident, evictable_bytes
from supervisor.ollama_profile import (
    FIT_TARGET_BYTES,
    LAYER_ESTIMATE_HEADROOM_BYTES,
    env_subset,
    ollama_profile,
    parse_version,
)
from supervisor.ports import ModelFacts

GIB = 1024**3
MIB = 1024**2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.33.0", (0, 33, 0)),
        ("0.30.0-rc1", (0, 30, 0)),  # a pre-release counts as its release
        ("v0.15.5", (0, 15, 5)),
        ("0.12.6", (0, 12, 6)),
        ("0.0.0", None),  # a development build says nothing
        ("", None),
        (None, None),
        ("latest", None),
    ],
)
def test_parse_version(text: str | None, expected: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("version", "env", "headroom"),
    [
        ("0.33.0", {}, FIT_TARGET_BYTES),  # llama-server keeps its fit target free
        ("0.33.0", {"LLAMA_ARG_FIT_TARGET": "2048"}, 2 * GIB),
        ("0.33.0", {"LLAMA_ARG_FIT_TARGET": "0"}, 0),  # told to keep nothing: exact
        (None, {}, FIT_TARGET_BYTES),  # unknown: llama-server's rules
        # Before 0.30 no fit target, but Ollama's own layer estimate keeps memory free and
        # offloads whole layers: a load that fits to the byte spills (found by the soak).
        ("0.29.9", {}, LAYER_ESTIMATE_HEADROOM_BYTES),
        ("0.12.6", {}, LAYER_ESTIMATE_HEADROOM_BYTES),
        ("0.12.6", {"LLAMA_ARG_FIT_TARGET": "2048"}, LAYER_ESTIMATE_HEADROOM_BYTES),
    ],
)
def test_load_headroom_is_what_a_load_keeps_free(
    version: str | None, env: dict[str, str], headroom: int
) -> None:
    assert ollama_profile(version, env, 24 * GIB).load_headroom_bytes == headroom


@pytest.mark.parametrize(
    ("version", "llama_server", "by_vram", "fit"),
    [
        ("0.33.0", True, True, FIT_TARGET_BYTES),
        ("0.30.0-rc1", True, True, FIT_TARGET_BYTES),
        ("0.29.9", False, True, 0),
        ("0.15.5", False, True, 0),
        ("0.15.4", False, False, 0),
        ("0.12.6", False, False, 0),
        (None, True, True, FIT_TARGET_BYTES),  # unknown: the newer, more demanding rules
    ],
)
def test_generation_by_version(
    version: str | None, llama_server: bool, by_vram: bool, fit: int
) -> None:
    profile = ollama_profile(version, {}, 24 * GIB)
    assert (profile.is_llama_server, profile.is_context_by_vram) == (llama_server, by_vram)
    assert profile.fit_target_bytes == fit


@pytest.mark.parametrize(
    ("version", "env", "total_gib", "ctx"),
    [
        ("0.33.0", {}, 24, 32768),
        ("0.33.0", {}, 48, 262144),
        ("0.33.0", {}, 16, 4096),
        ("0.33.0", {}, None, 32768),  # GPUs unknown: the commonest tier
        ("0.33.0", {"OLLAMA_CONTEXT_LENGTH": "8192"}, 48, 8192),
        # the overhead lowers the tier: 24 GiB - 2 GiB < 23 GiB
        ("0.33.0", {"OLLAMA_GPU_OVERHEAD": str(2 * GIB)}, 24, 4096),
        ("0.12.6", {}, 48, 4096),
        ("0.12.6", {"OLLAMA_CONTEXT_LENGTH": "16384"}, 24, 16384),
        ("0.33.0", {"OLLAMA_CONTEXT_LENGTH": "lots"}, 24, 32768),  # bad: the default
    ],
)
def test_default_context(
    version: str, env: dict[str, str], total_gib: int | None, ctx: int
) -> None:
    total = None if total_gib is None else total_gib * GIB
    assert ollama_profile(version, env, total).params.default_num_ctx == ctx


def test_bad_settings_are_noted_by_name() -> None:
    profile = ollama_profile("0.33.0", {"OLLAMA_NUM_PARALLEL": "x", "OLLAMA_KV_CACHE_TYPE": "q3"})
    assert any("OLLAMA_NUM_PARALLEL" in n for n in profile.notes)
    assert any("OLLAMA_KV_CACHE_TYPE" in n for n in profile.notes)
    assert profile.params.num_parallel == 1 and profile.params.kv_bytes_per_element == 2.0


@pytest.mark.parametrize(
    ("env", "parallel", "kv", "fit"),
    [
        ({}, 1, 2.0, FIT_TARGET_BYTES),
        ({"OLLAMA_NUM_PARALLEL": "4"}, 4, 2.0, FIT_TARGET_BYTES),
        ({"OLLAMA_KV_CACHE_TYPE": "q8_0"}, 1, 2.0, FIT_TARGET_BYTES),  # no flash attention
        (
            {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"},
            1,
            1.0625,
            FIT_TARGET_BYTES,
        ),
        (
            {"OLLAMA_KV_CACHE_TYPE": "q4_0", "OLLAMA_FLASH_ATTENTION": "true"},
            1,
            0.5625,
            FIT_TARGET_BYTES,
        ),
        ({"LLAMA_ARG_FIT_TARGET": "2048"}, 1, 2.0, 2 * GIB),
        ({"LLAMA_ARG_FIT_TARGET": "0"}, 1, 2.0, 0),
    ],
)
def test_settings_from_the_container_environment(
    env: dict[str, str], parallel: int, kv: float, fit: int
) -> None:
    profile = ollama_profile("0.33.0", env, 24 * GIB)
    assert profile.params.num_parallel == parallel
    assert profile.params.kv_bytes_per_element == kv
    assert profile.fit_target_bytes == fit


def test_env_subset_keeps_only_the_settings_that_change_the_need() -> None:
    env = ["PATH=/bin", "OLLAMA_NUM_PARALLEL=2", "SECRET=x", "LLAMA_ARG_FIT_TARGET=512", "BAD"]
    assert env_subset(env) == (("LLAMA_ARG_FIT_TARGET", "512"), ("OLLAMA_NUM_PARALLEL", "2"))
    assert env_subset({"OLLAMA_HOST": "x", "OLLAMA_CONTEXT_LENGTH": "1"}) == (
        ("OLLAMA_CONTEXT_LENGTH", "1"),
    )


# llama3.1:8b: 32 layers, 8 KV heads of 128; KV per token 32 x 8 x 256 x 2 = 128 KiB.
LLAMA31 = ModelFacts(
    name="llama3.1:8b",
    context_length=131072,
    block_count=32,
    embedding_length=4096,
    head_count=32,
    head_count_kv=8,
)
LLAMA31_WEIGHTS = 4_920_753_328


@pytest.mark.parametrize(
    ("version", "total_gib", "ctx", "kv_gib", "min_overhead"),
    [
        ("0.12.6", 24, 4096, 0.5, 0),
        ("0.33.0", 24, 32768, 4.0, 768 * MIB),
        ("0.33.0", 48, 131072, 16.0, 2 * GIB),  # 262144 capped at the trained 131072
    ],
)
def test_first_load_estimate_follows_the_generation(
    version: str, total_gib: int, ctx: int, kv_gib: float, min_overhead: int
) -> None:
    params = ollama_profile(version, {}, total_gib * GIB).params
    est = estimate_need(
        weights_bytes=LLAMA31_WEIGHTS, facts=LLAMA31, request_num_ctx=None, seen=None, params=params
    )
    assert est is not None and est.num_ctx == ctx
    assert est.kv_bytes == int(kv_gib * GIB)
    assert est.overhead_bytes >= min_overhead
    assert est.need_bytes == LLAMA31_WEIGHTS + est.kv_bytes + est.overhead_bytes


A = Resident("a", 3 * GIB)
B = Resident("b", 8 * GIB)


@pytest.mark.parametrize(
    ("version", "need_gib", "free_gib", "residents", "expected_gib"),
    [
        ("0.12.6", 10, 4, (A, B), 11),  # requireFull: Ollama evicts what it must
        ("0.12.6", 1, 20, (A,), 3),
        ("0.33.0", 10, 20, (A, B), 0),  # 10 <= 80 % of 20: loads beside them
        ("0.33.0", 10, 10, (A, B), 3),  # 10 > 8: evicts A (smallest first); 10 <= 10.4
        ("0.33.0", 10, 4, (A, B), 11),  # 10 > 3.2, 10 > 5.6: both
        ("0.33.0", 10, 4, (), 0),
    ],
)
def test_room_counts_ollamas_models_only_where_its_rule_evicts_them(
    version: str, need_gib: int, free_gib: int, residents: tuple[Resident, ...], expected_gib: int
) -> None:
    profile = ollama_profile(version, {}, 24 * GIB)
    got = evictable_bytes(profile.is_llama_server, need_gib * GIB, free_gib * GIB, residents)
    assert got == expected_gib * GIB


def test_describe_names_the_generation_and_settings() -> None:
    text = ollama_profile("0.33.0", {}, 24 * GIB).describe()
    assert "llama-server" in text and "32768" in text and "1024 MiB" in text
    assert "unknown" in ollama_profile(None).generation
