"""The benchmark's own tests.

By default only a smoke test runs: a tiny seeded workload in the no-supervisor mode, checking
that the accounting adds up (every request answered and counted once, tokens as asked,
every image job done) and that the report renders. It asserts no timing.

`pytest tests/bench -m bench -s` runs the whole benchmark (the same as
`python -m tests.bench.run`, writing its documents to a temporary folder) and prints it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.bench import run
from tests.bench.llama_swap import run_swap_mode, swap_table
from tests.bench.modes import ModeResult, run_mode
from tests.bench.report import (
    ROWS,
    estimates_table,
    generations_table,
    results_table,
    svg_chart,
)
from tests.bench.vllm_workload import run_vllm_mode, vllm_table
from tests.bench.workload import ChatEvent, ImageEvent, make_workload


def test_a_tiny_seeded_workload_is_accounted_for_exactly() -> None:
    events = make_workload(3, 60.0, chat_gap_s=8.0, image_gap_s=25.0)
    chats = [e for e in events if isinstance(e, ChatEvent)]
    images = [e for e in events if isinstance(e, ImageEvent)]
    assert chats and images, "the seed should give both kinds of work"
    assert make_workload(3, 60.0, chat_gap_s=8.0, image_gap_s=25.0) == events

    result = run_mode("none", events, 60.0, time_scale=0.02, drain_s=300.0)

    assert result.errors == []
    assert result.chats_ok == result.chats_sent == len(chats)
    assert result.sim_requests == len(chats)  # no supervisor: nobody else asks Ollama
    assert result.tokens == sum(e.num_predict for e in chats)
    assert 0 <= result.tokens_full <= result.tokens
    assert len({e.model for e in chats}) <= result.loads <= len(chats)
    assert 0 <= result.loads_full <= result.loads
    assert result.client_loads == result.loads  # no heal reloads without a supervisor
    assert result.images_done == result.images_sent == len(images)
    assert result.comfy_frees == 0 and result.restarts == 0

    table = results_table([[result]]).splitlines()
    assert len(table) == len(ROWS) + 2
    svg = ET.fromstring(svg_chart([[result]], "smoke"))
    assert svg.tag.endswith("svg")


def test_the_bound_gives_each_service_a_gpu_of_its_own_under_either_profile() -> None:
    events = make_workload(3, 60.0, chat_gap_s=8.0, image_gap_s=25.0)
    by_profile: dict[str, list[list[ModeResult]]] = {}
    for profile in ("2025", "2026"):
        bound = run_mode("isolated", events, 60.0, time_scale=0.02, drain_s=300.0, profile=profile)
        assert bound.profile == profile and bound.errors == []
        assert bound.chats_ok == bound.chats_sent and bound.images_done == bound.images_sent
        # Nothing shares its GPU: every load lands whole, ComfyUI is never asked to free.
        assert bound.loads_full == bound.loads and bound.comfy_frees == 0
        assert bound.images_lowvram == 0
        by_profile[profile] = [[bound]]
    table = generations_table(by_profile)
    assert "1.00x / 1.00x" in table and "(2026)" in table and "(2025)" in table
    assert "| 2025 | 0 |" in estimates_table(by_profile)  # no gate: no estimate to check


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_full_benchmark(tmp_path: Path) -> None:
    code = run.main(["--docs", str(tmp_path), "--results", str(tmp_path / "raw")])
    assert code == 0
    print((tmp_path / "benchmarks.md").read_text())


def test_the_llama_swap_workload_is_accounted_for_exactly() -> None:
    """`--workload llama-swap`: the same events, chats through the fake llama-swap; every
    chat answered with the tokens asked, every upstream's tokens counted once, every image
    job done; the bound loads every upstream wholly on the GPU."""
    events = make_workload(3, 60.0, chat_gap_s=8.0, image_gap_s=25.0)
    chats = [e for e in events if isinstance(e, ChatEvent)]
    images = [e for e in events if isinstance(e, ImageEvent)]
    results = [
        run_swap_mode(mode, events, 60.0, time_scale=0.02, drain_s=300.0)
        for mode in ("none", "isolated")
    ]
    for result in results:
        assert result.errors == [], result.errors
        assert result.chats_ok == result.chats_sent == len(chats)
        assert result.tokens == sum(e.num_predict for e in chats)
        assert 0 <= result.tokens_full <= result.tokens
        assert 1 <= result.loads <= len(chats) and 0 <= result.loads_full <= result.loads
        assert result.images_done == len(images) and result.cut_off == 0
    bound = results[1]
    assert bound.loads_full == bound.loads and bound.images_lowvram == 0
    table = swap_table(results)
    assert "1.00x / 1.00x" in table and table.count("\n") == 12


def test_the_vllm_workload_sleeps_and_wakes_without_losing_a_chat() -> None:
    """`--workload vllm`: every chat to one vLLM with sleep mode, image jobs to ComfyUI on
    the same GPU. With the supervisor every chat is answered, none aborted, vLLM never
    dies, and every sleep is matched by a wake once chats come back; without it vLLM never
    sleeps."""
    events = make_workload(3, 60.0, chat_gap_s=8.0, image_gap_s=25.0)
    chats = [e for e in events if isinstance(e, ChatEvent)]
    images = [e for e in events if isinstance(e, ImageEvent)]
    results = [
        run_vllm_mode(mode, events, 60.0, time_scale=0.02, drain_s=300.0)
        for mode in ("none", "supervisor")
    ]
    for result in results:
        assert result.errors == [], result.errors
        assert result.chats_ok == result.chats_sent == len(chats)
        assert result.images_done == len(images)
        assert result.aborted == 0 and result.deaths == 0
    none, sup = results
    assert none.sleeps == none.wakes == 0
    assert sup.wakes <= sup.sleeps <= sup.wakes + 1
    table = vllm_table(results)
    assert table.count("\n") == 10
