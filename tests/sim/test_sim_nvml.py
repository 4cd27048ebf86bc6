"""The fake libnvidia-ml.so.1: the real `pynvml` bindings read the simulated GPU through it.

Each check runs pynvml in a fresh interpreter, because the dynamic loader resolves
libnvidia-ml.so.1 from LD_LIBRARY_PATH once per process.

The integration tests read the simulated GPU through this library, so in CI (`CI` set;
tests/run runs as root on Debian with gcc) a missing compiler or unshare(1) FAILS these
checks instead of skipping them. A developer without gcc outside CI gets a skip whose
reason `pytest -ra` shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import pytest

from supervisor.sim.gpu import GIB, MIB, FileGpu
from supervisor.sim.nvml_build import STATE_ENV, build_fake_nvml

REPO = Path(__file__).parents[2]


def unavailable(reason: str) -> NoReturn:
    """Skip for a developer's machine; fail in CI, where the fake NVML must be tested."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this check must run here, not be skipped)")
    pytest.skip(reason)


_PROBE = textwrap.dedent("""
    import json, pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    out = {
        "count": pynvml.nvmlDeviceGetCount(),
        "name": pynvml.nvmlDeviceGetName(h),
        "uuid": uuid,
        "by_uuid": pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)),
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "v1": [v1.total, v1.free, v1.used],
        "v2": [v2.total, v2.free, v2.used],
        "procs": sorted([p.pid, p.usedGpuMemory]
                        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)),
        "procs_v2": len(pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h)),
    }
    try:
        pynvml.nvmlDeviceGetHandleByIndex(1)
    except pynvml.NVMLError_InvalidArgument:
        out["second_gpu"] = "absent"
    pynvml.nvmlShutdown()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def libdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        unavailable("no C compiler (CC, cc or gcc) on this machine: the fake NVML cannot be built")
    out = tmp_path_factory.mktemp("fake-nvml")
    build_fake_nvml(out)
    return out


def probe(libdir: Path, state: Path) -> dict[str, Any]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir), STATE_ENV: str(state)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_pynvml_reads_the_simulated_gpu(libdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    gpu = FileGpu(state, 16 * GIB, name="Sim Card", uuid="GPU-11111111-2222-3333-4444-sim")
    try:
        gpu.allocate("ollama:llama3.2:latest", 4100, 3 * GIB)
        gpu.allocate("comfyui:context", 4200, 384 * MIB)
        gpu.allocate("comfyui:model:sdxl", 4200, 6 * GIB)
        seen = probe(libdir, state)
    finally:
        gpu.close()
    used = 9 * GIB + 384 * MIB
    assert seen["count"] == 1 and seen["second_gpu"] == "absent"
    assert (seen["name"], seen["uuid"]) == ("Sim Card", "GPU-11111111-2222-3333-4444-sim")
    assert seen["by_uuid"] == 0
    assert seen["v1"] == [16 * GIB, 16 * GIB - used, used]
    assert seen["v2"] == seen["v1"]
    # One row per process, as NVML lists them: ComfyUI's allocations add up.
    assert seen["procs"] == [[4100, 3 * GIB], [4200, 6 * GIB + 384 * MIB]]
    assert seen["procs_v2"] == 2
    assert seen["driver"]


def test_no_processes_and_a_dead_process_is_not_listed(libdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    alive = FileGpu(state, 8 * GIB)
    try:
        assert probe(libdir, state)["procs"] == []
        leaver = FileGpu(state)
        leaver.allocate("x", 777, GIB)
        assert probe(libdir, state)["procs"] == [[777, GIB]]
        # Drop the lease without tidying the file, as a SIGKILL would.
        os.close(leaver._lease_fd)
        seen = probe(libdir, state)
        assert seen["procs"] == []
        assert seen["v1"][1] == 8 * GIB
    finally:
        alive.close()


def test_pids_from_another_pid_namespace_are_reported_as_host_pids(
    libdir: Path, tmp_path: Path
) -> None:
    """NVML reports host PIDs for processes in containers (api-facts 4)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        missing = [
            what for what, ok in (("root", os.geteuid() == 0), ("unshare(1)", unshare)) if not ok
        ]
        unavailable(
            f"needs root and unshare(1) to create a PID namespace; missing: {', '.join(missing)}"
        )
    state = tmp_path / "gpu.json"
    child_code = textwrap.dedent(f"""
        import os, time
        from supervisor.sim.gpu import FileGpu, GIB
        gpu = FileGpu({str(state)!r}, 8 * GIB)
        gpu.allocate("comfyui:model", os.getpid(), 2 * GIB)
        print(os.getpid(), flush=True)
        time.sleep(30)
    """)
    child = subprocess.Popen(
        [
            unshare,
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            child_code,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        inner_pid = int(child.stdout.readline())
        assert inner_pid == 1  # the first process of its namespace, as in a container
        [[pid, used]] = probe(libdir, state)["procs"]
        assert used == 2 * GIB
        assert pid != inner_pid
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(pid), "1"]
    finally:
        child.kill()
        child.wait()


_FAULT_PROBE = textwrap.dedent("""
    import json, pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    for step in ("before", "lost", "unknown", "after"):
        input()  # the test sets the fault file before each step
        try:
            seen = pynvml.nvmlDeviceGetMemoryInfo(h).used
        except pynvml.NVMLError as exc:
            seen = type(exc).__name__
        print(json.dumps([step, seen]), flush=True)
""")


def test_the_fault_file_makes_readings_fail_while_it_exists(libdir: Path, tmp_path: Path) -> None:
    """SIM_NVML_FAULT: "lost" gives GPU_IS_LOST, anything else UNKNOWN; gone: readings again."""
    state, fault = tmp_path / "gpu.json", tmp_path / "nvml-fault"
    gpu = FileGpu(state, 8 * GIB)
    try:
        gpu.allocate("x", 4100, GIB)
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": str(libdir),
            STATE_ENV: str(state),
            "SIM_NVML_FAULT": str(fault),
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _FAULT_PROBE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdin is not None and proc.stdout is not None
        seen = []
        for content in (None, "lost", "error", None):
            if content is None:
                fault.unlink(missing_ok=True)
            else:
                fault.write_text(content)
            proc.stdin.write("\n")
            proc.stdin.flush()
            seen.append(json.loads(proc.stdout.readline()))
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        gpu.close()
    assert seen == [
        ["before", GIB],
        ["lost", "NVMLError_GpuIsLost"],
        ["unknown", "NVMLError_Unknown"],
        ["after", GIB],
    ]
