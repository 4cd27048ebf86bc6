"""Which generation of the services the simulator plays: `2026` (default) or `2025`.

- `2026`: Ollama >= 0.30 (llama-server runners, api-facts-2026 section 1) and ComfyUI with
  Dynamic VRAM (section 2), the versions most hosts run now.
- `2025`: Ollama 0.12 and ComfyUI 0.3.64, as api-facts.md describes them.

One selector for both fake services, so a whole simulated host is of one generation: the
environment variable `VRAM_SIM_PROFILE`, or the flag `--profile` of `python -m
supervisor.sim` (the flag wins). `SimHost(profile=...)` takes the same names.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

PROFILE_VARIABLE = "VRAM_SIM_PROFILE"
PROFILES = ("2026", "2025")
DEFAULT_PROFILE = "2026"


class ProfileError(ValueError):
    """A profile name that is not one of PROFILES."""


def parse_profile(name: str, where: str = PROFILE_VARIABLE) -> str:
    value = name.strip()
    if value not in PROFILES:
        raise ProfileError(
            f"{where}={name!r} is not a simulator profile; accepted: {', '.join(PROFILES)}"
        )
    return value


def sim_profile(environ: Mapping[str, str]) -> str:
    """The profile `environ` selects: VRAM_SIM_PROFILE, else the default ("2026").
    ProfileError names the variable and the accepted values when it is anything else."""
    raw = environ.get(PROFILE_VARIABLE, "")
    return parse_profile(raw) if raw.strip() else DEFAULT_PROFILE


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """`--profile 2026|2025`; absent: VRAM_SIM_PROFILE, else 2026 (resolve with
    `profile_from_args`)."""
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help=f"the services' generation (default: ${PROFILE_VARIABLE}, else {DEFAULT_PROFILE})",
    )


def profile_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    flag = getattr(args, "profile", None)
    return parse_profile(flag, "--profile") if flag else sim_profile(environ)
