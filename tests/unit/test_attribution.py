"""attribute(): NVML host PIDs joined with each service's `docker top` PIDs."""

from __future__ import annotations

import pytest

from supervisor.ports import GpuProcess
from supervisor.vram.attribution import OTHER, Attribution, attribute

GIB = 1024**3
GPU0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
GPU1 = "GPU-bbbbbbbb-0000-4000-8000-000000000001"
OLLAMA = "ollama/ollama"
COMFY = "comfyui/comfyui"


def test_memory_is_summed_per_service() -> None:
    processes = [
        GpuProcess(1001, GPU0, 4 * GIB),  # ollama runner
        GpuProcess(2002, GPU0, 6 * GIB),  # comfyui python
        GpuProcess(1005, GPU0, 1 * GIB),  # a second ollama runner
    ]
    result = attribute(processes, {OLLAMA: [1000, 1001, 1005], COMFY: [2000, 2002]})
    assert result == {
        OLLAMA: Attribution(vram_bytes=5 * GIB, gpu_uuids=(GPU0,), pids=(1001, 1005)),
        COMFY: Attribution(vram_bytes=6 * GIB, gpu_uuids=(GPU0,), pids=(2002,)),
    }


def test_a_service_on_no_gpu_is_reported_with_zero() -> None:
    result = attribute([GpuProcess(2002, GPU0, GIB)], {OLLAMA: [1000], COMFY: [2002]})
    assert result[OLLAMA] == Attribution(0, (), ())


def test_unknown_memory_counts_zero_but_marks_the_gpu() -> None:
    processes = [GpuProcess(1001, GPU1, None), GpuProcess(1001, GPU0, 2 * GIB)]
    assert attribute(processes, {OLLAMA: [1001]}) == {
        OLLAMA: Attribution(vram_bytes=2 * GIB, gpu_uuids=(GPU0, GPU1), pids=(1001,))
    }


def test_processes_of_no_service_go_under_other() -> None:
    processes = [
        GpuProcess(1001, GPU0, GIB),
        GpuProcess(9999, GPU1, 3 * GIB),
        GpuProcess(8888, GPU1, None),
    ]
    result = attribute(processes, {OLLAMA: [1001]})
    assert result[OTHER] == Attribution(vram_bytes=3 * GIB, gpu_uuids=(GPU1,), pids=(8888, 9999))
    assert OTHER == ""


def test_other_is_absent_when_everything_is_accounted_for() -> None:
    assert OTHER not in attribute([GpuProcess(1001, GPU0, GIB)], {OLLAMA: [1001]})


def test_no_services_means_everything_is_other() -> None:
    assert attribute([GpuProcess(5, GPU0, GIB)], {}) == {OTHER: Attribution(GIB, (GPU0,), (5,))}
    assert attribute([], {}) == {}


def test_a_pid_claimed_twice_counts_once_for_the_first_service() -> None:
    result = attribute([GpuProcess(7, GPU0, GIB)], {COMFY: [7], OLLAMA: [7]})
    assert result[COMFY].vram_bytes == GIB
    assert result[OLLAMA].vram_bytes == 0


def test_the_other_key_cannot_be_a_service() -> None:
    with pytest.raises(ValueError, match="reserved"):
        attribute([], {OTHER: [1]})
