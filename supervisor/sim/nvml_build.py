"""Build the fake `libnvidia-ml.so.1` (fake_nvml.c) that reports the simulated GPU.

Put the output directory on LD_LIBRARY_PATH and point SIM_GPU_STATE at the file-backed GPU
(`--gpu-state`); the real `pynvml` bindings then read the simulated card. Needs a C
compiler (`cc`/`gcc`); nothing else. Policy: a failed build raises with the compiler's
output, it never falls back silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "SIM_GPU_STATE"


class BuildError(RuntimeError):
    pass


def build_fake_nvml(out_dir: str | os.PathLike[str], compiler: str | None = None) -> Path:
    """Compile fake_nvml.c into `out_dir/libnvidia-ml.so.1`; returns the library path."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / LIBRARY_NAME
    source = resources.files("supervisor.sim").joinpath("fake_nvml.c")
    with resources.as_file(source) as src:
        cmd = [
            cc,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Wextra",
            f"-Wl,-soname,{LIBRARY_NAME}",
            "-o",
            str(target),
            str(src),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return target
