"""Which generation of the services the simulator plays: `2026` (default) or `2025`.

`2026`: Ollama >= 0.30 and ComfyUI >= 0.15 (Dynamic VRAM on by default), as most hosts run
now. `2025`: Ollama and ComfyUI 0.3.64 as they were in 2025. Chosen by the environment
variable VRAM_SIM_PROFILE or the `--profile` flag of `python -m supervisor.sim`.
"""

from __future__ import annotations

from collections.abc import Mapping

PROFILES = ("2026", "2025")
DEFAULT_PROFILE = "2026"
PROFILE_VARIABLE = "VRAM_SIM_PROFILE"


def parse_profile(value: str, where: str = PROFILE_VARIABLE) -> str:
    """`value` if it names a profile; else ValueError naming `where` and the choices."""
    if value.strip() not in PROFILES:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(PROFILES)}")
    return value.strip()


def sim_profile(environ: Mapping[str, str]) -> str:
    """The profile VRAM_SIM_PROFILE names; `2026` when it is unset or empty."""
    value = environ.get(PROFILE_VARIABLE, "")
    return parse_profile(value) if value.strip() else DEFAULT_PROFILE
