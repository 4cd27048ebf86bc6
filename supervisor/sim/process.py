"""A stand-in child process whose real PID NVML shows, for fakes that run children.

The fake Ollama's 2026 runners, the fake llama-server's router children and the fake
llama-swap's upstreams are each a real child process (`cat` reading a pipe from this
process), so per-PID attribution through the fake NVML works as with the real servers,
and every child ends when the simulator dies, however it dies. The work itself (loading,
generating) is simulated in this process; only the PID is real.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys


class StandInProcess:
    """One child process; `pid` is its real PID, `stop()` kills it and reaps it."""

    def __init__(self) -> None:
        cat = shutil.which("cat")
        argv = [cat] if cat else [sys.executable, "-c", "import sys; sys.stdin.read()"]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.pid = self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
