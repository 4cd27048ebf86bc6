"""The supervisor finds its services through Docker labels and follows their lifecycle.

Real engine, real supervisor process (`python -m supervisor run` on the host), simulated
Ollama / ComfyUI in host-network containers on 127.0.0.1 (see harness.py). What a user
would check: the "Discovered ..." and "Lost ..." lines in the log, and /status.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.harness import (
    Sim,
    Sims,
    Supervisor,
    comfy_held,
    comfy_hold_vram,
    freed_on,
    ollama_load,
    unique_name,
    wait_until,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
# What the supervisor asks a ComfyUI (clients/comfyui.py); the harness never uses these.
SUPERVISOR_COMFY_PATHS = ("/system_stats", "/queue", "/free", "/interrupt")


def discovered(role: str, name: str, url: str) -> str:
    return f"Discovered {role} container {name} at {url}"


def test_labelled_services_are_discovered_and_an_unlabelled_twin_is_never_contacted(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    ollama = sims.ollama()
    comfy = sims.comfyui()
    twin = sims.comfyui(labelled=False)  # the same ComfyUI, without vram-supervisor.role
    comfy_hold_vram(comfy, 8)
    twin_held = comfy_hold_vram(twin, 4)

    sup = start_supervisor()
    sup.wait_for(discovered("ollama", ollama.name, ollama.url))
    sup.wait_for(discovered("comfyui", comfy.name, comfy.url))

    # Something to act on: a model load makes the supervisor free the labelled ComfyUI.
    ollama_load(ollama, "llama3.1:8b")
    sup.wait_for(freed_on(comfy.name))
    sup.wait_passes(3)

    status = sup.status()
    assert [c["name"] for c in status["comfyui"] if c["name"] in (comfy.name, twin.name)] == [
        comfy.name
    ]
    # The twin answered only the harness: no request the supervisor makes reached it.
    assert twin.access_log(), "the twin logs requests (else the next check proves nothing)"
    contacted = [
        line for line in twin.access_log() if any(p in line for p in SUPERVISOR_COMFY_PATHS)
    ]
    assert contacted == [], f"the unlabelled twin was contacted:\n{contacted}\n{sup.log()}"
    assert twin.get("/sim/stats")["frees_requested"] == 0
    assert comfy_held(twin) == twin_held  # nobody freed it
    everything = "\n".join(r.message for r in sup.snapshot())
    assert twin.name not in everything and f"127.0.0.1:{twin.port}" not in everything
    # The labelled one, on the other hand, was read and freed (the check above can fail).
    asked = comfy.access_log()
    assert any("/system_stats" in line for line in asked)
    assert any("POST /free" in line for line in asked)
    assert comfy.get("/sim/stats")["frees_requested"] >= 1


def test_stop_and_start_are_followed(sims: Sims, start_supervisor: StartSupervisor) -> None:
    comfy = sims.comfyui()
    sup = start_supervisor()
    sup.wait_for(discovered("comfyui", comfy.name, comfy.url))

    mark = sup.mark()
    comfy.container.stop(timeout=5)
    sup.wait_for(f"Lost comfyui container {comfy.name} (not running)", since=mark)
    sup.wait_service("comfyui", comfy.name, running=False, reachable=False)

    mark = sup.mark()
    comfy.container.start()
    comfy.wait_ready()
    sup.wait_for(discovered("comfyui", comfy.name, comfy.url), since=mark)
    sup.wait_service("comfyui", comfy.name, running=True, reachable=True)


def recreate(sims: Sims, old: Sim) -> Sim:
    """What `docker compose up --force-recreate` does: stop the old container, rename it out
    of the way, create and start the new one under the name, remove the old one."""
    old.container.stop(timeout=5)
    old.container.rename(f"{old.name}-old")
    new = sims.comfyui(name=old.name, port=old.port)
    old.container.remove(force=True)
    assert new.container.id != old.container.id
    return new


def test_a_recreated_container_is_followed_to_its_new_id(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    old = sims.comfyui()
    sup = start_supervisor()
    sup.wait_for(discovered("comfyui", old.name, old.url))
    sup.wait_service("comfyui", old.name, container_id=old.container.id)

    new = recreate(sims, old)
    sup.wait_service("comfyui", new.name, container_id=new.container.id, reachable=True)
    wait_until(
        lambda: sup.service("comfyui", f"{old.name}-old") is None,
        10,
        "the old container to leave /status",
    )


def test_a_container_recreated_while_the_supervisor_is_busy_is_discovered_again(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    """The recreate happens while the loop is busy (a verify or a reload can hold it for
    seconds), so no listing ever sees the name without a running container. The new
    container (new id, new process, fresh state) must still count as a new discovery: its
    own "Discovered" line, and no failed checks inherited from the old one."""
    old = sims.comfyui()
    sup = start_supervisor()
    sup.wait_for(discovered("comfyui", old.name, old.url))
    mark = sup.mark()
    with sup.frozen():
        new = recreate(sims, old)
    sup.wait_for(discovered("comfyui", new.name, new.url), since=mark, timeout_s=10)
    sup.wait_service("comfyui", new.name, container_id=new.container.id)


def test_a_rename_is_followed(sims: Sims, start_supervisor: StartSupervisor) -> None:
    comfy = sims.comfyui()
    sup = start_supervisor()
    sup.wait_for(discovered("comfyui", comfy.name, comfy.url))

    renamed = f"{comfy.name}-renamed"
    mark = sup.mark()
    comfy.container.rename(renamed)
    sup.wait_for(discovered("comfyui", renamed, comfy.url), since=mark)
    sup.wait_for(f"Lost comfyui container {comfy.name}", since=mark)
    sup.wait_service("comfyui", renamed, container_id=comfy.container.id, running=True)
    wait_until(
        lambda: sup.service("comfyui", comfy.name) is None, 10, "the old name to leave /status"
    )


def test_health_changes_show_in_status(sims: Sims, start_supervisor: StartSupervisor) -> None:
    flag = f"sick-{unique_name('flag')}"
    comfy = sims.comfyui(health_flag=flag)
    sup = start_supervisor()
    sup.wait_for(discovered("comfyui", comfy.name, comfy.url))

    def health() -> str | None:
        entry = sup.service("comfyui", comfy.name)
        return entry["health"] if entry else None

    wait_until(lambda: health() == "healthy", 15, "health 'healthy' in /status")
    (sims.state_dir / flag).touch()
    wait_until(lambda: health() == "unhealthy", 15, "health 'unhealthy' in /status")
    assert comfy.reload().attrs["State"]["Health"]["Status"] == "unhealthy"
    (sims.state_dir / flag).unlink()
    wait_until(lambda: health() == "healthy", 15, "health 'healthy' again in /status")
    assert sup.is_alive()
