#!/usr/bin/env bash
# A private Docker engine for the test suite.
#
#   tests/lib/dockerd.sh start    start it (no-op when it already answers)
#   tests/lib/dockerd.sh stop     SIGTERM, wait up to 30 s, SIGKILL, unmount leftovers
#   tests/lib/dockerd.sh status   exit 0 when it answers
#   tests/lib/dockerd.sh env      print exports:  eval "$(tests/lib/dockerd.sh env)"
#
# Why a private daemon: the CI machines have a Docker *client* only, no systemd, and apt
# may not start services. The daemon keeps everything under one directory
# ($VRAM_DOCKERD_DIR, default /tmp/vram-supervisor-dockerd): socket, pidfile, data, exec
# root, log. Its data survives `stop`, so the offline base image and the build cache are
# kept between runs.
#
# Network policy: `--bridge=none --iptables=false --ip-masq=false --ip-forward=false`. The
# daemon creates no bridge, touches no firewall rule, and a container started without
# `--network host` has loopback only. Tests use host networking on 127.0.0.1.
#
# What it never does: start a second daemon beside one that already runs on this machine
# (a `--bridge=none` daemon deletes docker0 at start, breaking the other one); kill any
# process but the one named in its own pidfile.
#
# Own network namespace: with VRAM_DOCKERD_NETNS=NAME (and its own VRAM_DOCKERD_DIR), the
# daemon runs in the network namespace /run/netns/NAME (created when missing, loopback up;
# `stop` keeps it, delete it with `ip netns del NAME`). There it touches no interface of
# the host's, so it may run beside another engine; its host-network containers bind that
# namespace's 127.0.0.1, so reach them through `nsenter --net=/run/netns/NAME`.
# Tests that restart the engine or make it a swarm node use this on an engine they must not
# change (tests/integration/namespaced_engine.py).
set -euo pipefail

D="${VRAM_DOCKERD_DIR:-/tmp/vram-supervisor-dockerd}"
SOCK="unix://$D/docker.sock"
PIDFILE="$D/docker.pid"
LOG="$D/dockerd.log"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
START_TIMEOUT_S="${VRAM_DOCKERD_START_TIMEOUT_S:-30}"
NETNS="${VRAM_DOCKERD_NETNS:-}"
STOP_TIMEOUT_S="${VRAM_DOCKERD_STOP_TIMEOUT_S:-30}"

say() { printf '[dockerd] %s\n' "$*" >&2; }

answers() {
    DOCKER_HOST="$SOCK" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

our_pid() {
    # Prints the pid from our pidfile when that process is alive.
    [[ -s "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && printf '%s\n' "$pid"
}

dockerd_pids() {
    # Every dockerd on the machine (from /proc: procps may be missing on a fresh machine).
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == dockerd ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

unmount_leftovers() {
    # dockerd leaves exec/netns/default mounted on every shutdown, and after a SIGKILL the
    # data-root (overlay) mounts too. Deepest first.
    local mp
    awk -v d="$D/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || say "could not unmount $mp"
    done
}

cmd_start() {
    if answers; then
        say "already running at $SOCK"
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        say "dockerd is not installed. On Debian: apt-get install -y --no-install-recommends docker.io"
        return 1
    fi
    if [[ "$(id -u)" != 0 ]]; then
        say "starting dockerd needs root (or run your own engine and export DOCKER_HOST)"
        return 1
    fi
    local others mine="" launcher=()
    mine="$(our_pid || true)"
    others="$(dockerd_pids | grep -vx "${mine:-none}" || true)"
    if [[ -n "$NETNS" ]]; then
        # A namespace of its own: the other daemons' interfaces are out of its reach.
        others=""
        [[ -e "/run/netns/$NETNS" ]] || ip netns add "$NETNS"
        ip netns exec "$NETNS" ip link set lo up
        launcher=(nsenter "--net=/run/netns/$NETNS")
    fi
    if [[ -n "$others" ]]; then
        say "another dockerd runs on this machine (pid $(echo "$others" | tr '\n' ' '))."
        say "Reuse it (export DOCKER_HOST to its socket) instead of starting a second one:"
        say "a --bridge=none daemon would delete the docker0 bridge that one relies on."
        return 1
    fi
    if [[ -n "$mine" ]]; then
        say "dockerd pid $mine exists but does not answer; stopping it first"
        cmd_stop
    fi
    mkdir -p "$D"
    unmount_leftovers
    rm -f "$D/docker.sock" "$PIDFILE"
    # An empty config file: ignore whatever /etc/docker/daemon.json says.
    printf '{}\n' >"$D/daemon.json"
    say "starting dockerd ($(dockerd --version 2>/dev/null)) under $D${NETNS:+ in network namespace $NETNS}"
    # The launcher writes its own pid before exec'ing dockerd, so the pid is right whether
    # or not setsid had to fork (it forks when started as a process-group leader).
    rm -f "$D/launch.pid"
    setsid "${launcher[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$D/launch.pid" dockerd \
        --config-file "$D/daemon.json" \
        --host "$SOCK" \
        --pidfile "$PIDFILE" \
        --data-root "$D/data" \
        --exec-root "$D/exec" \
        --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
        </dev/null >"$LOG" 2>&1 &
    local pid="" deadline=$((SECONDS + START_TIMEOUT_S))
    while [[ ! -s "$D/launch.pid" ]] && ((SECONDS < deadline)); do
        sleep 0.05
    done
    pid="$(cat "$D/launch.pid" 2>/dev/null || true)"
    while ! answers; do
        if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited during start-up; last lines of $LOG:"
            tail -n 40 "$LOG" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            say "dockerd did not answer within ${START_TIMEOUT_S}s; last lines of $LOG:"
            tail -n 40 "$LOG" >&2 || true
            kill -TERM "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.1
    done
    say "ready: DOCKER_HOST=$SOCK (pid $pid)"
}

cmd_stop() {
    local pid
    if pid="$(our_pid)"; then
        say "stopping dockerd pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT_S))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd did not stop within ${STOP_TIMEOUT_S}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    else
        say "no dockerd of ours is running"
    fi
    unmount_leftovers
    rm -f "$D/docker.sock" "$PIDFILE"
}

cmd_env() {
    printf 'export DOCKER_HOST=%q\n' "$SOCK"
    # Compose v2 is linked as a CLI plugin here by tests/lib/compose-plugin.sh.
    printf 'export DOCKER_CONFIG=%q\n' "${DOCKER_CONFIG_DIR:-$REPO/.cache/docker-config}"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) answers && say "running at $SOCK" || { say "not answering at $SOCK"; exit 1; } ;;
env) cmd_env ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
