"""The simulated GPU: what a process sharing the card would observe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.sim.gpu import GIB, MIB, FileGpu, MemoryGpu, SimGpu


def test_an_allocation_that_does_not_fit_is_refused_whole() -> None:
    gpu = MemoryGpu(8 * GIB)
    assert gpu.allocate("comfyui:model", 10, 6 * GIB)
    assert not gpu.allocate("ollama:big", 20, 3 * GIB)
    assert gpu.used_bytes() == 6 * GIB
    assert gpu.free_bytes() == 2 * GIB


def test_a_partial_allocation_takes_whole_steps_and_leaves_the_margin() -> None:
    gpu = MemoryGpu(10 * GIB)
    gpu.allocate("other", 1, 5 * GIB)
    granted = gpu.allocate_partial(
        "ollama:m", 2, 8 * GIB, keep_free_bytes=512 * MIB, step_bytes=1 * GIB
    )
    assert granted == 4 * GIB  # 4.5 GiB of room, in 1 GiB layers
    assert gpu.free_bytes() == 1 * GIB


def test_processes_sum_allocations_per_pid_and_release_gives_memory_back() -> None:
    gpu = MemoryGpu(24 * GIB, name="Sim", uuid="GPU-test")
    gpu.allocate("comfyui:context", 100, 300 * MIB)
    gpu.allocate("comfyui:model", 100, 2 * GIB)
    gpu.allocate("ollama:a", 200, 1 * GIB)
    gpu.allocate("ollama:a", 200, 1 * GIB)  # one owner's allocations add up
    assert gpu.processes() == [(100, 300 * MIB + 2 * GIB), (200, 2 * GIB)]
    assert gpu.release("ollama:a") == 2 * GIB
    assert gpu.release("ollama:a") == 0
    assert gpu.release_prefix("comfyui:") == 300 * MIB + 2 * GIB
    assert gpu.used_bytes() == 0
    assert (gpu.name, gpu.uuid) == ("Sim", "GPU-test")


def test_two_file_backed_gpus_on_one_file_see_each_others_memory(tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    first = FileGpu(state, 12 * GIB)
    second = FileGpu(state)
    try:
        assert second.total_bytes == 12 * GIB
        assert first.allocate("comfyui:model", 111, 7 * GIB)
        assert second.free_bytes() == 5 * GIB
        # The same owner name in two processes is two allocations, as two CUDA contexts are.
        assert second.allocate("comfyui:model", 222, 1 * GIB)
        assert sorted(first.processes()) == [(111, 7 * GIB), (222, 1 * GIB)]
        first.release("comfyui:model")
        assert second.used_bytes() == 1 * GIB
    finally:
        first.close()
        second.close()


def test_a_closed_gpu_handle_frees_its_process_memory(tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    survivor = FileGpu(state, 8 * GIB)
    leaver = FileGpu(state)
    leaver.allocate("x", 5, 3 * GIB)
    leaver.close()
    assert survivor.used_bytes() == 0
    survivor.close()


def test_memory_of_a_killed_process_comes_back(tmp_path: Path) -> None:
    """A driver frees a dead process's VRAM; so does the file-backed GPU (lease lock)."""
    state = tmp_path / "gpu.json"
    watcher = FileGpu(state, 16 * GIB)
    child_code = textwrap.dedent(f"""
        import sys, time
        from supervisor.sim.gpu import FileGpu, GIB
        gpu = FileGpu({str(state)!r})
        gpu.allocate("comfyui:model", 4242, 6 * GIB)
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", child_code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert watcher.processes() == [(4242, 6 * GIB)]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert watcher.processes() == []
        assert watcher.free_bytes() == 16 * GIB
    finally:
        child.kill()
        child.wait()
        watcher.close()


def test_a_new_process_does_not_inherit_a_dead_one_s_allocations(tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    # Written by a process that died long ago, holding lease 0.
    state.write_text(
        json.dumps(
            {
                "name": "old",
                "uuid": "GPU-old",
                "total_bytes": 4 * GIB,
                "allocations": [
                    {"owner": "ghost", "pid": 1, "pid_ns": None, "lease": 0, "bytes": GIB}
                ],
            }
        )
    )
    gpu = FileGpu(state, 24 * GIB, name="new", uuid="GPU-new")
    try:
        assert gpu.used_bytes() == 0
        # No live allocation was left, so the stale file's figures give way to ours.
        assert (gpu.total_bytes, gpu.name, gpu.uuid) == (24 * GIB, "new", "GPU-new")
    finally:
        gpu.close()


def test_state_file_lists_one_allocation_per_line(tmp_path: Path) -> None:
    """fake_nvml.c scans the file line by line; keep the format it expects."""
    state = tmp_path / "gpu.json"
    gpu = FileGpu(state, 8 * GIB)
    try:
        gpu.allocate("a", 1, 10)
        gpu.allocate("b", 2, 20)
        lines = state.read_text().splitlines()
        rows = [line for line in lines if line.startswith('{"owner": ')]
        assert len(rows) == 2
        assert json.loads(state.read_text())["total_bytes"] == 8 * GIB
        assert any(line.startswith('"total_bytes": ') for line in lines)
    finally:
        gpu.close()


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_both_backends_answer_the_same(backend: str, tmp_path: Path) -> None:
    gpu: SimGpu = (
        MemoryGpu(4 * GIB) if backend == "memory" else FileGpu(tmp_path / "g.json", 4 * GIB)
    )
    try:
        assert gpu.allocate_partial("a", os.getpid(), 5 * GIB) == 4 * GIB
        snap = gpu.snapshot()
        assert (snap.used_bytes, snap.free_bytes) == (4 * GIB, 0)
        assert snap.to_json()["processes"] == [{"pid": os.getpid(), "bytes": 4 * GIB}]
    finally:
        gpu.close()
