"""The image's entrypoint: which socket, which group, what the drop runs, the one line."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from supervisor import entrypoint
from supervisor.entrypoint import (
    DEFAULT_SOCKET,
    EntrypointError,
    SocketInfo,
    docker_gid,
    drop_command,
    groups_for,
    inspect_socket,
    socket_path,
    wait_until_usable,
)


@pytest.mark.parametrize(
    ("docker_host", "expected"),
    [
        (None, DEFAULT_SOCKET),
        ("", DEFAULT_SOCKET),
        ("unix:///run/user/1000/docker.sock", "/run/user/1000/docker.sock"),
        ("tcp://socket-proxy:2375", None),
        ("ssh://gpu-host", None),
    ],
)
def test_socket_path_follows_docker_host(docker_host: str | None, expected: str | None) -> None:
    env = {} if docker_host is None else {"DOCKER_HOST": docker_host}
    assert socket_path(env) == expected


def test_docker_gid_unset_or_empty_means_the_sockets_group() -> None:
    assert docker_gid({}) is None
    assert docker_gid({"DOCKER_GID": ""}) is None  # what the compose files pass
    assert docker_gid({"DOCKER_GID": " 999 "}) == 999


@pytest.mark.parametrize("raw", ["docker", "-1", "9.5", "99999999999"])
def test_a_bad_docker_gid_is_named(raw: str) -> None:
    with pytest.raises(EntrypointError, match=r"DOCKER_GID=.* is not a group id.*stat -c %g"):
        docker_gid({"DOCKER_GID": raw})


def test_docker_gid_wins_over_the_sockets_group() -> None:
    sock = SocketInfo("/var/run/docker.sock", 0, 999, 0o660)
    assert groups_for(None, sock) == [999]
    assert groups_for(4242, sock) == [4242]
    assert groups_for(None, None) == []
    assert groups_for(None, SocketInfo("/s", 0, 10001, 0o660)) == []  # its own primary group


def test_drop_command_keeps_no_capabilities_and_runs_the_entrypoint_again() -> None:
    assert drop_command([999], ["run"]) == [
        "setpriv", "--reuid=10001", "--regid=10001", "--groups=999", "--inh-caps=-all",
        "--no-new-privs", "--", "vram-supervisor-entrypoint", "run",
    ]  # fmt: skip
    assert "--clear-groups" in drop_command([], ["doctor"])


def test_inspect_socket_sees_only_sockets(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        os.chmod(path, 0o600)
        info = inspect_socket(str(path))
        assert info is not None and info.mode == 0o600 and info.gid == os.stat(path).st_gid
    assert inspect_socket(str(tmp_path / "missing")) is None
    plain = tmp_path / "plain"
    plain.write_text("")
    assert inspect_socket(str(plain)) is None
    assert inspect_socket(None) is None


def test_an_unusable_socket_is_logged_once_then_rechecked_silently(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = iter([False, False, False, True])
    sleeps: list[float] = []
    sock = SocketInfo("/var/run/docker.sock", 0, 999, 0o660)
    wait_until_usable(
        sock,
        {"DOCKER_GID": "4242", "VRAM_LOG_FORMAT": "json"},
        check=lambda _path: next(answers),
        sleep=sleeps.append,
    )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["level"] for line in lines] == ["ERROR", "INFO"]
    assert "Cannot use the Docker socket /var/run/docker.sock" in lines[0]["message"]
    assert "DOCKER_GID=4242 is set and the socket's group is 999" in lines[0]["message"]
    assert "usable now" in lines[1]["message"]
    assert sleeps == [entrypoint.RECHECK_S] * 2


def test_a_usable_socket_logs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    sock = SocketInfo("/var/run/docker.sock", 0, 999, 0o660)
    wait_until_usable(sock, {}, check=lambda _path: True, sleep=lambda _s: None)
    assert capsys.readouterr().err == ""


def test_a_bad_docker_gid_exits_2_with_the_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOCKER_GID", "docker")
    assert entrypoint.main(["run"]) == entrypoint.EXIT_CONFIG
    assert "configuration error: DOCKER_GID='docker' is not a group id" in capsys.readouterr().err


# CapEff of `docker run --cap-drop ALL` (none) and of the compose files' drop (SETUID+SETGID).
NO_CAPS = "Name:\tpython\nCapEff:\t0000000000000000\n"
DROP_ONLY = "Name:\tpython\nCapEff:\t00000000000000c0\n"


@pytest.mark.parametrize(
    ("status", "missing"),
    [
        (NO_CAPS, ["SETGID", "SETUID"]),
        ("CapEff:\t0000000000000080\n", ["SETGID"]),
        (DROP_ONLY, []),
        ("CapEff:\t000001ffffffffff\n", []),
        ("", []),  # unreadable: setpriv says what is wrong
    ],
)
def test_missing_drop_caps(status: str, missing: list[str]) -> None:
    assert entrypoint.missing_drop_caps(status) == missing


def _as_root(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    execs: list[list[str]] = []
    monkeypatch.setattr(entrypoint.os, "getuid", lambda: 0)
    monkeypatch.setattr(entrypoint.os, "execvp", lambda _f, a: execs.append(list(a)))
    monkeypatch.delenv("DOCKER_GID", raising=False)
    monkeypatch.setenv("VRAM_LOG_FORMAT", "json")
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")  # no socket to check here
    return execs


def test_root_without_setuid_setgid_logs_one_line_and_waits_instead_of_crash_looping(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    execs = _as_root(monkeypatch)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:
            raise SystemExit(0)  # docker stop

    with pytest.raises(SystemExit):
        entrypoint.main(["run"], read_status=lambda: NO_CAPS, sleep=sleep)
    [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert line["level"] == "ERROR"
    assert "without the capabilities SETGID, SETUID" in line["message"]
    assert "cap_add: [SETUID, SETGID]" in line["message"]
    assert execs == [] and len(sleeps) == 3  # no setpriv, no exit: it waits


def test_root_without_the_caps_exits_2_for_other_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    execs = _as_root(monkeypatch)
    assert entrypoint.main(["doctor"], read_status=lambda: NO_CAPS) == entrypoint.EXIT_CONFIG
    assert "cap_add: [SETUID, SETGID]" in capsys.readouterr().err and execs == []


def test_root_with_the_caps_drops_through_setpriv(monkeypatch: pytest.MonkeyPatch) -> None:
    execs = _as_root(monkeypatch)
    entrypoint.main(["run"], read_status=lambda: DROP_ONLY, sleep=lambda _s: None)
    assert execs and execs[0][0] == "setpriv" and f"--reuid={entrypoint.RUN_AS_UID}" in execs[0]
