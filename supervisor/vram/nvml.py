"""GPU and per-process memory from NVML (`pynvml`, package nvidia-ml-py; api-facts §4).

Policy:
- Every NVML failure raises `errors.NvmlUnavailable` from its cause, with a sentence that
  says why: `NVMLError` (and its per-code subclasses), `NVMLLibraryMismatchError` (a plain
  Exception, not an NVMLError: gotcha 20) and `OSError` from loading the library.
- GPUs are keyed by UUID; the NVML index is reported but is not an identity (gotcha 19).
- Memory: the versioned `nvmlDeviceGetMemoryInfo_v2` is preferred; a driver without it
  (`NVMLError_FunctionNotFound`) falls back to v1 for the life of the reader. `used_bytes`
  is `total - free` for both, so it includes the driver's reserved memory (v1 counts it
  in `used`; v2 reports it apart, and NVIDIA's docs disagree on whether v2 `used` has it).
  `free` is the figure that decides whether a load fits.
- Processes: compute processes only, with host PIDs (gotcha 18). `usedGpuMemory` may be
  None (not available); it stays None. A driver without the `_v3` process call gets the
  `_v2` one (same struct). A device that does not support the process query contributes
  no processes instead of failing the whole reading.
- No retries: NVML is a local library call; a failure this pass is a missing reading.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from supervisor.errors import NvmlUnavailable
from supervisor.model import GpuMemory
from supervisor.ports import GpuProcess


class _NeverRaised(Exception):
    """Stands in for an exception class the NVML module does not define."""


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable("the nvidia-ml-py package (module pynvml) is not installed") from exc
    return pynvml


def _why(nvml: Any, exc: BaseException) -> str:
    """A sentence for a user who wonders why GPU readings are missing."""

    def is_a(name: str) -> bool:
        cls = getattr(nvml, name, None)
        return isinstance(cls, type) and isinstance(exc, cls)

    if is_a("NVMLError_LibraryNotFound") or isinstance(exc, OSError):
        return (
            "libnvidia-ml.so.1 was not found or could not be loaded: no NVIDIA driver on this"
            " host, or the container was started without GPU access (--gpus / the NVIDIA"
            f" runtime with the 'utility' capability) ({exc})"
        )
    if is_a("NVMLError_DriverNotLoaded"):
        return f"the NVIDIA kernel driver is not loaded ({exc})"
    if is_a("NVMLError_NoPermission"):
        return f"no permission to use NVML ({exc})"
    if is_a("NVMLLibraryMismatchError") or is_a("NVMLError_FunctionNotFound"):
        return (
            "the installed nvidia-ml-py does not match the driver's libnvidia-ml"
            f" (a function is missing): {exc}"
        )
    if is_a("NVMLError_GpuIsLost"):
        return f"a GPU fell off the bus or stopped answering ({exc})"
    return f"{type(exc).__name__}: {exc}"


class NvmlReader:
    """Reads device and process memory through NVML (implements `ports.GpuReader`).

    `nvml` is the pynvml module, or a stand-in with the same names (tests); the default
    imports pynvml. The constructor initialises NVML and raises `NvmlUnavailable` when that
    fails. Call `close()` once done.
    """

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = _load_pynvml() if nvml is None else nvml
        self._errors = self._catchable()
        self._memory_v2 = True  # False once the driver turned out not to have it
        self._processes_v3 = True
        self._is_open = False
        try:
            self._nvml.nvmlInit()
        except self._errors as exc:
            raise NvmlUnavailable(f"NVML could not start: {_why(self._nvml, exc)}") from exc
        self._is_open = True

    def _catchable(self) -> tuple[type[BaseException], ...]:
        found: list[type[BaseException]] = [OSError]
        for name in ("NVMLError", "NVMLLibraryMismatchError"):
            cls = getattr(self._nvml, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
        return tuple(found)

    def _exc(self, name: str) -> type[BaseException]:
        """The module's exception class `name`, or one nothing raises (a sparse stand-in)."""
        cls = getattr(self._nvml, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls
        return _NeverRaised

    def close(self) -> None:
        """nvmlShutdown, once; errors while shutting down are only logged."""
        if not self._is_open:
            return
        self._is_open = False
        try:
            self._nvml.nvmlShutdown()
        except self._errors as exc:
            logger.debug("NVML shutdown failed: {}", _why(self._nvml, exc))

    def __enter__(self) -> NvmlReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ readings

    def gpus(self) -> tuple[GpuMemory, ...]:
        """Device-wide memory of every visible GPU, in NVML index order."""
        try:
            result = []
            for index, handle in self._handles():
                total, free = self._memory(handle)
                result.append(
                    GpuMemory(
                        uuid=_text(self._nvml.nvmlDeviceGetUUID(handle)),
                        index=index,
                        name=_text(self._nvml.nvmlDeviceGetName(handle)),
                        total_bytes=total,
                        used_bytes=max(0, total - free),
                        free_bytes=free,
                    )
                )
            return tuple(result)
        except self._errors as exc:
            raise NvmlUnavailable(
                f"NVML could not read GPU memory: {_why(self._nvml, exc)}"
            ) from exc

    def processes(self) -> tuple[GpuProcess, ...]:
        """Every compute process on every GPU (host PIDs; a PID on two GPUs appears twice)."""
        try:
            result = []
            for _, handle in self._handles():
                uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
                for proc in self._compute_processes(handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    result.append(
                        GpuProcess(
                            pid=int(proc.pid),
                            gpu_uuid=uuid,
                            used_bytes=None if used is None else int(used),
                        )
                    )
            return tuple(result)
        except self._errors as exc:
            raise NvmlUnavailable(
                f"NVML could not list GPU processes: {_why(self._nvml, exc)}"
            ) from exc

    # ------------------------------------------------------------------ helpers

    def _handles(self) -> list[tuple[int, Any]]:
        if not self._is_open:
            raise NvmlUnavailable("NVML reader is closed")
        count = int(self._nvml.nvmlDeviceGetCount())
        return [(i, self._nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]

    def _memory(self, handle: Any) -> tuple[int, int]:
        """(total, free) bytes, through v2 when the driver has it."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if self._memory_v2 and version is not None:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                return int(info.total), int(info.free)
            except self._exc("NVMLError_FunctionNotFound"):
                logger.debug("NVML has no nvmlDeviceGetMemoryInfo_v2; using v1 from now on")
                self._memory_v2 = False
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)

    def _compute_processes(self, handle: Any) -> list[Any]:
        nvml = self._nvml
        try:
            if self._processes_v3:
                try:
                    return list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
                except self._exc("NVMLLibraryMismatchError"):
                    # The unversioned call is _v3; older drivers export _v2 (same fields).
                    fallback = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v2", None)
                    if fallback is None:
                        raise
                    logger.debug("NVML has no process query _v3; using _v2 from now on")
                    self._processes_v3 = False
            return list(nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle))
        except self._exc("NVMLError_NotSupported"):
            return []


def _text(value: Any) -> str:
    # nvidia-ml-py decodes to str on py3; older bindings returned bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def nvml_available(nvml: Any = None) -> bool:
    """Whether NVML can be initialised here (init + shutdown; no device is read)."""
    try:
        reader = NvmlReader(nvml)
    except NvmlUnavailable as exc:
        logger.debug("NVML is not available: {}", exc)
        return False
    reader.close()
    return True
