#!/usr/bin/env bash
# Debian's prometheus and promtool for the monitoring tests, WITHOUT a system service.
#
#   tests/lib/prometheus-tools.sh DIR      -> DIR/usr/bin/{prometheus,promtool}
#
# `apt-get install prometheus` runs the package's postinst, which on a systemd host enables
# and starts prometheus.service (listening on *:9090, started again at every boot). The
# tests start their own Prometheus on 127.0.0.1, so only the binaries are needed: the
# package is downloaded (`apt-get download`) and unpacked with `dpkg-deb -x` into DIR; no
# maintainer script runs. Both binaries need only libc. Kept once unpacked (idempotent).
# Needs apt-get and dpkg-deb; `apt-get update` is run first when root and asked to
# (APT_UPDATE=1). Exit 1 with a message when the package cannot be had.
set -euo pipefail

dir="${1:?usage: prometheus-tools.sh DIR}"
log() { printf '[prometheus-tools] %s\n' "$*" >&2; }

if [[ -x "$dir/usr/bin/prometheus" && -x "$dir/usr/bin/promtool" ]]; then
    log "kept: $dir/usr/bin/prometheus and promtool"
    exit 0
fi
for cmd in apt-get dpkg-deb; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        log "no $cmd: install prometheus and promtool yourself"
        exit 1
    fi
done
if [[ "${APT_UPDATE:-0}" == 1 && "$(id -u)" == 0 ]]; then
    apt-get update -q </dev/null >&2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to the _apt user when root: let it write there.
chmod 0777 "$work"
(cd "$work" && apt-get download -q prometheus </dev/null >&2)
debs=("$work"/prometheus_*.deb)
if [[ ! -f "${debs[0]}" ]]; then
    log "apt-get download prometheus gave no package"
    exit 1
fi
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
dpkg-deb -x "${debs[0]}" "$dir.tmp"
for bin in prometheus promtool; do
    if [[ ! -x "$dir.tmp/usr/bin/$bin" ]]; then
        log "the package has no usr/bin/$bin"
        exit 1
    fi
done
rm -rf "$dir"
mv "$dir.tmp" "$dir"
log "unpacked $(basename "${debs[0]}") into $dir (no service installed)"
