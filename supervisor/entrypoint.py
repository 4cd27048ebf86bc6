"""The container image's entrypoint: socket access with no configuration, then uid 10001.

`vram-supervisor-entrypoint [ARGS...]` runs `vram-supervisor ARGS...` (default `run`).

Started as root (the image's default user), it reads the group that owns the Docker socket
(`DOCKER_HOST=unix://PATH`, else /var/run/docker.sock), then drops to uid/gid 10001 with
that group as its only supplementary group, through `setpriv` (util-linux, in every Debian
base): no capabilities kept, no-new-privs set. A `DOCKER_GID` that is set wins over the
socket's group. Nothing to look up and no `.env` to write: `group_add` is no longer needed.

Started as any other user (`user:` in a compose file, or after the drop above), it checks
that it may use the socket. When it may not, it logs ONE line saying why and what to do,
and waits (rechecking every few seconds, silently) instead of exiting: the container stays
up and its healthcheck fails, rather than a restart policy turning the error into a crash
loop. Once the socket is usable it starts the supervisor. Only `run` waits; `doctor`,
`status`, `healthcheck` and the rest start at once, so `doctor` can say what is wrong.

With no socket (fixed URLs, or `DOCKER_HOST=tcp://...` to a socket proxy) there is nothing
to check: it drops to 10001 without a supplementary group and runs.

Started as root WITHOUT the capabilities the drop needs (SETUID, SETGID: a `cap_drop:
[ALL]` with no `cap_add`, or `docker run --cap-drop ALL`), setpriv could only fail, and a
restart policy would make that a crash loop. Instead it logs ONE line naming the fix and,
for `run`, waits until stopped (the healthcheck fails meanwhile), like the socket case;
other commands exit 2 with that line.

Standard library only. It runs before the container's command (`run`, or the arguments of
`docker run IMAGE ...`); Docker's HEALTHCHECK and `docker exec` do not pass through the
ENTRYPOINT, so they run as the image's user, root. For the healthcheck that does not
matter: it only sends GET /healthz to the local HTTP port and touches neither the socket
nor the GPU. For other commands in a running container, use `docker exec -u 10001 ...` or
`docker exec CONTAINER vram-supervisor-entrypoint COMMAND`.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import FrameType

RUN_AS_UID = 10001
RUN_AS_GID = 10001
DEFAULT_SOCKET = "/var/run/docker.sock"
RECHECK_S = 5.0
CLI = "vram-supervisor"
ENTRYPOINT = "vram-supervisor-entrypoint"
EXIT_CONFIG = 2


class EntrypointError(Exception):
    """Bad input to the entrypoint (the message names the variable)."""


def socket_path(env: Mapping[str, str]) -> str | None:
    """The socket the Docker SDK will use, or None when it talks TCP/SSH (no file to read)."""
    host = env.get("DOCKER_HOST", "").strip()
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host.removeprefix("unix://") or DEFAULT_SOCKET
    return None


def docker_gid(env: Mapping[str, str]) -> int | None:
    """DOCKER_GID when set and not empty; a clear error when it is not a group id."""
    raw = env.get("DOCKER_GID", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 2**32 - 2:
        raise EntrypointError(
            f"DOCKER_GID={raw!r} is not a group id: use a number such as the output of "
            "`stat -c %g /var/run/docker.sock`, or leave DOCKER_GID unset to use the "
            "socket's own group"
        )
    return int(raw)


@dataclass(frozen=True)
class SocketInfo:
    path: str
    uid: int
    gid: int
    mode: int  # permission bits only


def inspect_socket(path: str | None) -> SocketInfo | None:
    """Owner, group and mode of the socket, or None when there is no socket there."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return SocketInfo(path, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))


def groups_for(env_gid: int | None, sock: SocketInfo | None) -> list[int]:
    """Supplementary groups of the dropped process: DOCKER_GID wins, else the socket's."""
    if env_gid is not None:
        return [env_gid]
    if sock is not None and sock.gid != RUN_AS_GID:
        return [sock.gid]
    return []


def drop_command(groups: Sequence[int], args: Sequence[str]) -> list[str]:
    """setpriv to uid/gid 10001 with `groups`, then this entrypoint again (as non-root)."""
    group_option = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
    return [
        "setpriv",
        f"--reuid={RUN_AS_UID}",
        f"--regid={RUN_AS_GID}",
        group_option,
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        ENTRYPOINT,
        *args,
    ]


def cannot_use(sock: SocketInfo, env_gid: int | None, groups: Sequence[int]) -> str:
    """The one line logged when the socket is not usable by this process."""
    if env_gid is not None:
        fix = (
            f"DOCKER_GID={env_gid} is set and the socket's group is {sock.gid}: set "
            f"DOCKER_GID={sock.gid}, or unset it to use the socket's own group"
        )
    elif os.getuid() != 0 and sock.gid not in groups:
        fix = (
            "this container was started as a non-root user without the socket's group: "
            "remove `user:` to let the image pick the group, or add `group_add: "
            f'["{sock.gid}"]`'
        )
    else:
        fix = (
            "the socket grants its group no read/write access: give the group rw "
            "(chmod 660) or set DOCKER_GID to a group that has it"
        )
    return (
        f"Cannot use the Docker socket {sock.path} as uid {os.getuid()} with groups "
        f"{list(groups)} (socket owner {sock.uid}:{sock.gid}, mode {sock.mode:04o}): {fix}. "
        f"Not starting until it is usable (rechecked every {RECHECK_S:g} s; the "
        "healthcheck fails meanwhile)."
    )


def log_line(level: str, message: str, env: Mapping[str, str]) -> None:
    """One line in the supervisor's own log format (VRAM_LOG_FORMAT=text|json)."""
    now = datetime.now().astimezone()
    if env.get("VRAM_LOG_FORMAT", "").strip().lower() == "json":
        line = json.dumps({"time": now.isoformat(), "level": level, "message": message})
    else:
        line = f"{now:%Y-%m-%d %H:%M:%S}.{now.microsecond // 1000:03d} | {level:<7} | {message}"
    print(line, file=sys.stderr, flush=True)


def usable(path: str) -> bool:
    # Connecting to a unix socket needs write permission on it; reading the API, read.
    return os.access(path, os.R_OK | os.W_OK)


def wait_until_usable(
    sock: SocketInfo,
    env: Mapping[str, str],
    *,
    check: Callable[[str], bool] = usable,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Log once, then recheck silently until the socket is usable."""
    if check(sock.path):
        return
    env_gid = docker_gid(env)
    log_line("ERROR", cannot_use(sock, env_gid, os.getgroups()), env)
    while not check(sock.path):
        sleep(RECHECK_S)
    log_line("INFO", f"The Docker socket {sock.path} is usable now; starting", env)


# Capability bits setpriv needs to change uid and gid (linux/capability.h).
DROP_CAPS = {6: "SETGID", 7: "SETUID"}


def missing_drop_caps(proc_status: str) -> list[str]:
    """Capabilities the drop needs that CapEff in /proc/self/status lacks (none when the
    line cannot be read: then setpriv itself says what is wrong)."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            try:
                eff = int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return []
            return [name for bit, name in sorted(DROP_CAPS.items()) if not eff >> bit & 1]
    return []


def cannot_drop(missing: Sequence[str], args: Sequence[str]) -> str:
    """The one line logged when root may not drop to uid 10001."""
    caps = ", ".join(missing)
    then = (
        "Not starting (waiting until stopped; the healthcheck fails meanwhile)."
        if args[0] == "run"
        else "Not running it."
    )
    return (
        f"Started as root without the capabilities {caps}, so it cannot drop to uid "
        f"{RUN_AS_UID}: add `cap_add: [SETUID, SETGID]` next to `cap_drop: [ALL]` "
        f"(docker run: --cap-add SETUID --cap-add SETGID), or run it as "
        f'`user: "{RUN_AS_UID}:{RUN_AS_GID}"` with `group_add: ["<the socket\'s group>"]`. '
        f"{then}"
    )


def _read_proc_status() -> str:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _stop(_signum: int, _frame: FrameType | None) -> None:
    # PID 1 ignores SIGTERM unless it asks for it: `docker stop` must end the wait at once.
    raise SystemExit(0)


def main(
    argv: Sequence[str] | None = None,
    *,
    read_status: Callable[[], str] = _read_proc_status,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["run"]
    env = os.environ
    try:
        env_gid = docker_gid(env)
    except EntrypointError as exc:
        print(f"{CLI}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sock = inspect_socket(socket_path(env))
    if os.getuid() == 0:
        missing = missing_drop_caps(read_status())
        if missing:
            log_line("ERROR", cannot_drop(missing, args), env)
            if args[0] != "run":
                return EXIT_CONFIG
            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
            while True:  # no crash loop: the capabilities cannot come back in this process
                sleep(3600)
        os.execvp("setpriv", drop_command(groups_for(env_gid, sock), args))
    if sock is not None and args[0] == "run":
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        wait_until_usable(sock, env)  # exec below restores the default signal handlers
    os.execvp(CLI, [CLI, *args])


if __name__ == "__main__":
    sys.exit(main())
