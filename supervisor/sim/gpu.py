"""A simulated GPU: total memory and allocations by owner, shared by the fake services.

Two backends behind one interface (`SimGpu`):

* `MemoryGpu`: state in this process, guarded by a lock. The fake Ollama and the fake
  ComfyUI of a `SimHost` run as threads and share one instance.
* `FileGpu`: state in a JSON file guarded by `fcntl.flock`, so fake services in different
  processes or containers that bind-mount the same file see the same GPU, and so can the
  fake `libnvidia-ml.so.1` (`fake_nvml.c`).

A real driver frees a process's memory when the process dies. `FileGpu` mimics that with a
lease: each instance holds an open-file-description lock on one byte far past the end of
the state file (`F_OFD_SETLK`), which the kernel drops when the process exits, however it
exits. Every operation first drops allocations whose lease is no longer held, so killing or
restarting a container gives its VRAM back, as on real hardware.

Policy: no operation blocks except on the state lock; an allocation that does not fit is
refused (`allocate`) or trimmed (`allocate_partial`), never forced. Owners are strings such
as "ollama:llama3.2:latest" or "comfyui:model:sdxl"; one owner's allocations add up.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

GIB = 1024**3
MIB = 1024**2

DEFAULT_TOTAL_BYTES = 24 * GIB
DEFAULT_NAME = "NVIDIA GeForce RTX 4090 (simulated)"
DEFAULT_UUID = "GPU-5151a7e0-0000-4000-8000-00000000051a"
STATE_FORMAT = "vram-sim-gpu/1"

# Lease bytes live far past the JSON so they never overlap real content; fake_nvml.c uses
# the same numbers.
LEASE_BASE_OFFSET = 1 << 30
LEASE_SLOTS = 4096

_T = TypeVar("_T")


@dataclass(frozen=True)
class Allocation:
    """One owner's memory on the GPU. `lease` is None for the in-memory backend."""

    owner: str
    pid: int
    bytes: int
    pid_ns: int | None = None
    lease: int | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    name: str
    uuid: str
    total_bytes: int
    allocations: tuple[Allocation, ...]

    @property
    def used_bytes(self) -> int:
        return sum(a.bytes for a in self.allocations)

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)

    def processes(self) -> list[tuple[int, int]]:
        """(pid, bytes) per process, like NVML's compute process list, sorted by pid."""
        by_pid: dict[int, int] = {}
        for alloc in self.allocations:
            by_pid[alloc.pid] = by_pid.get(alloc.pid, 0) + alloc.bytes
        return sorted(by_pid.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "processes": [{"pid": p, "bytes": b} for p, b in self.processes()],
            "allocations": [
                {"owner": a.owner, "pid": a.pid, "bytes": a.bytes} for a in self.allocations
            ],
        }


@dataclass
class _State:
    name: str
    uuid: str
    total_bytes: int
    allocations: list[Allocation] = field(default_factory=list)

    def used(self) -> int:
        return sum(a.bytes for a in self.allocations)

    def free(self) -> int:
        return max(0, self.total_bytes - self.used())


def own_pid_namespace() -> int | None:
    """Inode of this process's PID namespace (the same number seen from the host)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


class SimGpu:
    """Operations shared by both backends; subclasses provide `_transact`."""

    def __init__(self) -> None:
        self._pid_ns = own_pid_namespace()

    # Backends run `fn` on the current state atomically and persist what it changed.
    def _transact(self, fn: Callable[[_State], _T]) -> _T:
        raise NotImplementedError

    def _lease(self) -> int | None:
        return None

    def _mine(self, alloc: Allocation, owner: str) -> bool:
        return alloc.owner == owner and alloc.lease == self._lease()

    def _add(self, state: _State, owner: str, pid: int, nbytes: int) -> None:
        for i, alloc in enumerate(state.allocations):
            if self._mine(alloc, owner):
                state.allocations[i] = Allocation(
                    owner, pid, alloc.bytes + nbytes, self._pid_ns, self._lease()
                )
                return
        state.allocations.append(Allocation(owner, pid, nbytes, self._pid_ns, self._lease()))

    def allocate(self, owner: str, pid: int, nbytes: int) -> bool:
        """Take `nbytes` for `owner` if they all fit; otherwise take nothing."""

        def op(state: _State) -> bool:
            if nbytes > state.free():
                return False
            if nbytes > 0:
                self._add(state, owner, pid, nbytes)
            return True

        return self._transact(op)

    def allocate_partial(
        self,
        owner: str,
        pid: int,
        nbytes: int,
        *,
        keep_free_bytes: int = 0,
        step_bytes: int = 1,
    ) -> int:
        """Take as much of `nbytes` as fits, leaving `keep_free_bytes` free, in whole steps.

        Returns the bytes granted (possibly 0). Read and grant happen under one lock, so two
        processes loading at once cannot both count the same free memory.
        """
        step = max(1, step_bytes)

        def op(state: _State) -> int:
            room = max(0, state.free() - keep_free_bytes)
            granted = min(nbytes, room)
            if granted < nbytes:
                granted -= granted % step
            if granted > 0:
                self._add(state, owner, pid, granted)
            return granted

        return self._transact(op)

    def release(self, owner: str, nbytes: int | None = None) -> int:
        """Give back `nbytes` of `owner` (all of it by default); returns bytes released."""

        def op(state: _State) -> int:
            for i, alloc in enumerate(state.allocations):
                if self._mine(alloc, owner):
                    if nbytes is None or nbytes >= alloc.bytes:
                        del state.allocations[i]
                        return alloc.bytes
                    state.allocations[i] = Allocation(
                        alloc.owner, alloc.pid, alloc.bytes - nbytes, alloc.pid_ns, alloc.lease
                    )
                    return nbytes
            return 0

        return self._transact(op)

    def release_prefix(self, prefix: str) -> int:
        """Give back every allocation of this instance whose owner starts with `prefix`."""

        def op(state: _State) -> int:
            lease = self._lease()
            gone = [a for a in state.allocations if a.owner.startswith(prefix) and a.lease == lease]
            state.allocations = [a for a in state.allocations if a not in gone]
            return sum(a.bytes for a in gone)

        return self._transact(op)

    def snapshot(self) -> GpuSnapshot:
        def op(state: _State) -> GpuSnapshot:
            return GpuSnapshot(state.name, state.uuid, state.total_bytes, tuple(state.allocations))

        return self._transact(op)

    @property
    def name(self) -> str:
        return self.snapshot().name

    @property
    def uuid(self) -> str:
        return self.snapshot().uuid

    @property
    def total_bytes(self) -> int:
        return self.snapshot().total_bytes

    def free_bytes(self) -> int:
        return self.snapshot().free_bytes

    def used_bytes(self) -> int:
        return self.snapshot().used_bytes

    def processes(self) -> list[tuple[int, int]]:
        return self.snapshot().processes()

    def allocations(self) -> list[Allocation]:
        return list(self.snapshot().allocations)

    def close(self) -> None:
        """Called when the owning process ends: a driver frees a dead process's memory."""


class MemoryGpu(SimGpu):
    """A GPU shared by threads of one process."""

    def __init__(
        self,
        total_bytes: int = DEFAULT_TOTAL_BYTES,
        *,
        name: str = DEFAULT_NAME,
        uuid: str = DEFAULT_UUID,
    ) -> None:
        super().__init__()
        self._state = _State(name, uuid, total_bytes)
        self._lock = threading.Lock()

    def _transact(self, fn: Callable[[_State], _T]) -> _T:
        with self._lock:
            return fn(self._state)


def _flock_struct(lock_type: int, start: int) -> bytes:
    # struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
    # pid_t l_pid, padded to 32 bytes. OFD locks need l_pid = 0.
    packed = struct.pack("@hhqqi", lock_type, os.SEEK_SET, start, 1, 0)
    return packed + b"\0" * (32 - len(packed))


def _lease_held(fd: int, slot: int) -> bool:
    """True if some open file description holds the lease byte of `slot`."""
    answer = fcntl.fcntl(
        fd, fcntl.F_OFD_GETLK, _flock_struct(fcntl.F_WRLCK, LEASE_BASE_OFFSET + slot)
    )
    (lock_type,) = struct.unpack_from("@h", answer)
    return bool(lock_type != fcntl.F_UNLCK)


class FileGpu(SimGpu):
    """A GPU whose state lives in a JSON file shared between processes.

    The first process to open a missing or empty file writes its name, uuid and total.
    Later ones adopt the file's values, unless no live allocation remains, in which case the
    given values replace the old ones (a stale file from an earlier run does not win).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        total_bytes: int | None = None,
        *,
        name: str | None = None,
        uuid: str | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened once and kept: its lease lock lives as long as this descriptor.
        self._lease_fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self._slot: int | None = None
        defaults = (
            name or DEFAULT_NAME,
            uuid or DEFAULT_UUID,
            total_bytes if total_bytes is not None else DEFAULT_TOTAL_BYTES,
        )
        explicit = total_bytes is not None or name is not None or uuid is not None
        self._init(defaults, explicit)

    def _lease(self) -> int | None:
        return self._slot

    def _init(self, defaults: tuple[str, str, int], explicit: bool) -> None:
        with self._locked_file() as fd:
            state, _ = self._read(fd, defaults)
            for slot in range(LEASE_SLOTS):
                try:
                    fcntl.fcntl(
                        self._lease_fd,
                        fcntl.F_OFD_SETLK,
                        _flock_struct(fcntl.F_WRLCK, LEASE_BASE_OFFSET + slot),
                    )
                except OSError:
                    continue
                self._slot = slot
                break
            else:
                raise RuntimeError(f"no free lease slot in {self.path}")
            # Whatever still names our slot belonged to a process that died before us.
            state.allocations = [a for a in state.allocations if a.lease != self._slot]
            if explicit and not state.allocations:
                state.name, state.uuid, state.total_bytes = defaults
            self._write(fd, state)

    def _locked_file(self) -> _LockedFile:
        return _LockedFile(self.path)

    def _read(self, fd: int, defaults: tuple[str, str, int]) -> tuple[_State, bool]:
        """The state with dead processes' allocations dropped, and whether any were."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 1 << 16):
            raw += chunk
        if not raw.strip():
            return _State(*defaults), True
        data = json.loads(raw)
        allocations = [
            Allocation(
                owner=str(a["owner"]),
                pid=int(a["pid"]),
                bytes=int(a["bytes"]),
                pid_ns=a.get("pid_ns"),
                lease=a.get("lease"),
            )
            for a in data.get("allocations", [])
        ]
        live = [a for a in allocations if a.lease is None or _lease_held(fd, a.lease)]
        state = _State(str(data["name"]), str(data["uuid"]), int(data["total_bytes"]), live)
        return state, len(live) != len(allocations)

    def _write(self, fd: int, state: _State) -> None:
        # One allocation per line with fixed key order: fake_nvml.c scans it line by line.
        lines = [
            "{",
            f'"format": "{STATE_FORMAT}",',
            f'"name": {json.dumps(state.name)},',
            f'"uuid": {json.dumps(state.uuid)},',
            f'"total_bytes": {state.total_bytes},',
            '"allocations": [',
        ]
        rows = [
            f'{{"owner": {json.dumps(a.owner)}, "pid": {a.pid}, '
            f'"pid_ns": {json.dumps(a.pid_ns)}, "lease": {json.dumps(a.lease)}, '
            f'"bytes": {a.bytes}}}'
            for a in state.allocations
        ]
        lines.append(",\n".join(rows))
        lines.append("]}\n")
        payload = "\n".join(lines).encode()
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, payload)
        os.ftruncate(fd, len(payload))

    def _transact(self, fn: Callable[[_State], _T]) -> _T:
        with self._lock, self._locked_file() as fd:
            state, pruned = self._read(fd, (DEFAULT_NAME, DEFAULT_UUID, DEFAULT_TOTAL_BYTES))
            before = list(state.allocations)
            result = fn(state)
            if pruned or state.allocations != before:
                self._write(fd, state)
            return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.release_prefix("")
        os.close(self._lease_fd)


class _LockedFile:
    """Open the state file and hold an exclusive flock on it for one operation."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> int:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self._fd

    def __exit__(self, *exc: object) -> None:
        # Closing drops the flock; OFD lease locks belong to other descriptors and stay.
        os.close(self._fd)


def open_gpu(
    state_path: str | os.PathLike[str] | None,
    total_bytes: int | None = None,
    *,
    name: str | None = None,
    uuid: str | None = None,
) -> SimGpu:
    """A file-backed GPU when a path is given, else an in-memory one."""
    if state_path is not None:
        return FileGpu(state_path, total_bytes, name=name, uuid=uuid)
    return MemoryGpu(
        total_bytes if total_bytes is not None else DEFAULT_TOTAL_BYTES,
        name=name or DEFAULT_NAME,
        uuid=uuid or DEFAULT_UUID,
    )


def add_gpu_args(parser: argparse.ArgumentParser) -> None:
    """The simulated GPU's options, the same for every fake's command line."""
    parser.add_argument("--gpu-state", help="JSON state file shared by processes")
    parser.add_argument("--gpu-total-gib", type=float, default=None)
    parser.add_argument("--gpu-name")
    parser.add_argument("--gpu-uuid")


def gpu_from_args(args: argparse.Namespace) -> SimGpu:
    """The GPU `add_gpu_args`' options describe."""
    total = int(args.gpu_total_gib * GIB) if args.gpu_total_gib is not None else None
    return open_gpu(args.gpu_state, total, name=args.gpu_name, uuid=args.gpu_uuid)
