"""NvmlReader against a hand-written stand-in for pynvml that behaves as api-facts §4 says,
plus checks that the stand-in matches the real nvidia-ml-py module it imitates."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pynvml
import pytest

from supervisor.errors import NvmlUnavailable
from supervisor.model import GpuMemory
from supervisor.ports import GpuProcess
from supervisor.vram.nvml import NvmlReader, nvml_available

GIB = 1024**3


# --------------------------------------------------------------------------- the stand-in


class NVMLError(Exception):
    """Like pynvml: `.value` is the return code; one subclass per code."""

    value = 999
    _strings: ClassVar[dict[int, str]] = {
        1: "Uninitialized",
        3: "Not Supported",
        4: "Insufficient Permissions",
        9: "Driver Not Loaded",
        12: "NVML Shared Library Not Found",
        13: "Function Not Found",
        15: "GPU is lost",
        999: "Unknown Error",
    }

    def __str__(self) -> str:
        return self._strings.get(self.value, f"NVML Error with code {self.value}")


def _code(name: str, value: int) -> type[NVMLError]:
    return type(name, (NVMLError,), {"value": value})


class NVMLLibraryMismatchError(Exception):
    """Not an NVMLError (gotcha 20)."""


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class Device:
    uuid: str
    name: str
    total: int
    free: int
    reserved: int = 300 * 1024**2
    procs: list[Proc] = field(default_factory=list)
    processes_supported: bool = True


@dataclass
class Memory:
    total: int
    free: int
    used: int
    reserved: int | None = None
    version: int | None = None


class FakePynvml:
    """The names NvmlReader uses, with pynvml's behaviour: calls before nvmlInit raise
    Uninitialized; the unversioned process call raises NVMLLibraryMismatchError when the
    driver lacks _v3; GetMemoryInfo(version=v2) raises FunctionNotFound without _v2."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = _code("NVMLError_Uninitialized", 1)
    NVMLError_NotSupported = _code("NVMLError_NotSupported", 3)
    NVMLError_NoPermission = _code("NVMLError_NoPermission", 4)
    NVMLError_DriverNotLoaded = _code("NVMLError_DriverNotLoaded", 9)
    NVMLError_LibraryNotFound = _code("NVMLError_LibraryNotFound", 12)
    NVMLError_FunctionNotFound = _code("NVMLError_FunctionNotFound", 13)
    NVMLError_GpuIsLost = _code("NVMLError_GpuIsLost", 15)
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        devices: list[Device] | None = None,
        *,
        init_error: BaseException | None = None,
        has_memory_v2: bool = True,
        has_processes_v3: bool = True,
    ) -> None:
        self.devices = devices if devices is not None else []
        self.init_error = init_error
        self.has_memory_v2 = has_memory_v2
        self.has_processes_v3 = has_processes_v3
        self.refcount = 0
        self.memory_calls: list[str] = []
        self.fail_next: BaseException | None = None

    def _check(self) -> None:
        if self.refcount == 0:
            raise self.NVMLError_Uninitialized()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        self._check()
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle: Device) -> str:
        self._check()
        return handle.uuid

    def nvmlDeviceGetName(self, handle: Device) -> str:
        self._check()
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: Device, version: int | None = None) -> Memory:
        self._check()
        if version:
            self.memory_calls.append("v2")
            if not self.has_memory_v2:
                raise self.NVMLError_FunctionNotFound()
            used = handle.total - handle.free - handle.reserved
            return Memory(handle.total, handle.free, used, handle.reserved, version)
        self.memory_calls.append("v1")
        return Memory(handle.total, handle.free, handle.total - handle.free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Device) -> list[Proc]:
        self._check()
        if not self.has_processes_v3:
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match"
            )
        return self._procs(handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Device) -> list[Proc]:
        self._check()
        return self._procs(handle)

    def _procs(self, handle: Device) -> list[Proc]:
        if not handle.processes_supported:
            raise self.NVMLError_NotSupported()
        return list(handle.procs)


def two_gpus() -> list[Device]:
    return [
        Device(
            "GPU-6f1a0c3e-0000-4000-8000-000000000001",
            "NVIDIA GeForce RTX 4090",
            total=24 * GIB,
            free=10 * GIB,
            procs=[Proc(4242, 9 * GIB), Proc(5151, None)],
        ),
        Device(
            "GPU-6f1a0c3e-0000-4000-8000-000000000002",
            "NVIDIA RTX A4000",
            total=16 * GIB,
            free=16 * GIB,
        ),
    ]


# --------------------------------------------------------------------------- readings


def test_gpus_are_keyed_by_uuid_with_index_and_name() -> None:
    nvml = FakePynvml(two_gpus())
    with NvmlReader(nvml) as reader:
        assert reader.gpus() == (
            GpuMemory(
                uuid="GPU-6f1a0c3e-0000-4000-8000-000000000001",
                index=0,
                name="NVIDIA GeForce RTX 4090",
                total_bytes=24 * GIB,
                used_bytes=14 * GIB,  # total - free: includes the driver's reserved part
                free_bytes=10 * GIB,
            ),
            GpuMemory(
                uuid="GPU-6f1a0c3e-0000-4000-8000-000000000002",
                index=1,
                name="NVIDIA RTX A4000",
                total_bytes=16 * GIB,
                used_bytes=0,
                free_bytes=16 * GIB,
            ),
        )
    assert nvml.memory_calls == ["v2", "v2"]
    assert nvml.refcount == 0  # closed


def test_memory_falls_back_to_v1_once_when_the_driver_lacks_v2() -> None:
    nvml = FakePynvml(two_gpus(), has_memory_v2=False)
    reader = NvmlReader(nvml)
    first = reader.gpus()
    second = reader.gpus()
    assert first == second
    assert first[0].free_bytes == 10 * GIB and first[0].used_bytes == 14 * GIB
    assert nvml.memory_calls == ["v2", "v1", "v1", "v1", "v1"]  # v2 is tried only once
    reader.close()


def test_processes_with_unknown_memory_stay_unknown() -> None:
    reader = NvmlReader(FakePynvml(two_gpus()))
    assert reader.processes() == (
        GpuProcess(
            pid=4242, gpu_uuid="GPU-6f1a0c3e-0000-4000-8000-000000000001", used_bytes=9 * GIB
        ),
        GpuProcess(pid=5151, gpu_uuid="GPU-6f1a0c3e-0000-4000-8000-000000000001", used_bytes=None),
    )
    reader.close()


def test_processes_fall_back_to_v2_on_a_library_mismatch() -> None:
    reader = NvmlReader(FakePynvml(two_gpus(), has_processes_v3=False))
    assert [p.pid for p in reader.processes()] == [4242, 5151]
    assert [p.pid for p in reader.processes()] == [4242, 5151]
    reader.close()


def test_a_library_mismatch_without_v2_is_nvml_unavailable() -> None:
    nvml = FakePynvml(two_gpus(), has_processes_v3=False)
    module = types.SimpleNamespace(
        **{name: getattr(nvml, name) for name in dir(nvml) if not name.startswith("_")}
    )
    del module.nvmlDeviceGetComputeRunningProcesses_v2
    reader = NvmlReader(module)
    with pytest.raises(NvmlUnavailable, match="does not match the driver") as caught:
        reader.processes()
    assert isinstance(caught.value.__cause__, NVMLLibraryMismatchError)


def test_a_device_without_process_support_lists_none() -> None:
    devices = two_gpus()
    devices[0].processes_supported = False
    devices[1].procs = [Proc(77, GIB)]
    reader = NvmlReader(FakePynvml(devices))
    assert reader.processes() == (GpuProcess(77, "GPU-6f1a0c3e-0000-4000-8000-000000000002", GIB),)


def test_no_gpus() -> None:
    reader = NvmlReader(FakePynvml([]))
    assert reader.gpus() == ()
    assert reader.processes() == ()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            FakePynvml.NVMLError_LibraryNotFound(),
            r"libnvidia-ml.so.1 was not found .*--gpus.*NVML Shared Library Not Found",
        ),
        (
            FakePynvml.NVMLError_DriverNotLoaded(),
            r"NVIDIA kernel driver is not loaded \(Driver Not Loaded\)",
        ),
        (FakePynvml.NVMLError_NoPermission(), r"no permission to use NVML"),
        (
            NVMLLibraryMismatchError("mismatch"),
            r"does not match the driver's libnvidia-ml .*mismatch",
        ),
        (
            OSError("libnvidia-ml.so.1: cannot open shared object file"),
            r"libnvidia-ml.so.1 was not found",
        ),
        (
            FakePynvml.NVMLError_GpuIsLost(),
            r"fell off the bus or stopped answering \(GPU is lost\)$",
        ),
        (NVMLError(), r"NVMLError: Unknown Error"),
    ],
)
def test_init_failures_say_why(error: BaseException, message: str) -> None:
    with pytest.raises(NvmlUnavailable, match=r"^NVML could not start: .*" + message) as caught:
        NvmlReader(FakePynvml(init_error=error))
    assert caught.value.__cause__ is error
    assert nvml_available(FakePynvml(init_error=error)) is False


def test_nvml_available_initialises_and_shuts_down() -> None:
    nvml = FakePynvml(two_gpus())
    assert nvml_available(nvml) is True
    assert nvml.refcount == 0


def test_errors_while_reading_become_nvml_unavailable() -> None:
    nvml = FakePynvml(two_gpus())
    reader = NvmlReader(nvml)
    nvml.fail_next = nvml.NVMLError_GpuIsLost()
    with pytest.raises(NvmlUnavailable, match="could not read GPU memory: a GPU fell off the bus"):
        reader.gpus()
    nvml.fail_next = nvml.NVMLError_NoPermission()
    with pytest.raises(NvmlUnavailable, match="could not list GPU processes: no permission"):
        reader.processes()
    assert reader.gpus()[0].free_bytes == 10 * GIB  # the next pass reads again


def test_reading_after_close_is_an_error_and_close_is_idempotent() -> None:
    nvml = FakePynvml(two_gpus())
    reader = NvmlReader(nvml)
    reader.close()
    reader.close()
    assert nvml.refcount == 0
    with pytest.raises(NvmlUnavailable, match="closed"):
        reader.gpus()


def test_a_failing_shutdown_is_not_raised() -> None:
    nvml = FakePynvml(two_gpus())
    reader = NvmlReader(nvml)
    nvml.fail_next = nvml.NVMLError_GpuIsLost()
    reader.close()


# --------------------------------------------------------------------------- the real module


def test_the_stand_in_matches_the_real_pynvml() -> None:
    # The reader reaches for these names; if nvidia-ml-py renames one, this fails here
    # instead of on a GPU host.
    for name in [n for n in vars(FakePynvml) if n.startswith(("nvml", "NVML"))]:
        assert hasattr(pynvml, name), name
    assert hasattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2")
    assert pynvml.nvmlMemory_v2 == FakePynvml.nvmlMemory_v2
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)
    for name in (
        "NVMLError_LibraryNotFound",
        "NVMLError_FunctionNotFound",
        "NVMLError_NotSupported",
    ):
        real = getattr(pynvml, name)
        assert issubclass(real, pynvml.NVMLError)
        assert real().value == getattr(FakePynvml, name)().value
        assert str(real()) == str(getattr(FakePynvml, name)())


def test_real_pynvml_without_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process boundary: loading libnvidia-ml.so.1 fails as on a host without a driver.
    def no_library(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)
    with pytest.raises(NvmlUnavailable, match=r"libnvidia-ml\.so\.1 was not found") as caught:
        NvmlReader()
    assert isinstance(caught.value.__cause__, pynvml.NVMLError_LibraryNotFound)
    assert nvml_available() is False
