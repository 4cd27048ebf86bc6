#!/usr/bin/env bash
# Fill .cache/wheelhouse with everything an offline image build needs.
#
#   tests/lib/wheelhouse.sh [PYTHON] [DIR]
#
# Contents: the project's own wheel, every runtime dependency as a wheel for CPython 3.11
# on this machine's architecture (the Python of the image's bookworm base, whatever Python
# the host runs), and the build backend (setuptools, wheel) so the Dockerfile can build the
# project from source with `pip install --no-index --find-links`.
# This is the air-gapped path too: run it on a connected machine, carry the folder over.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${1:-$REPO/.venv/bin/python}"
DIR="${2:-$REPO/.cache/wheelhouse}"
PY_VERSION="${VRAM_WHEEL_PYTHON:-3.11}"
arch="$(uname -m)"

mkdir -p "$DIR"
cd "$REPO"
# pip is chatty (build backend warnings); keep its output in a log, show it on failure.
LOG="$DIR.log"
: >"$LOG"
trap 'rc=$?; if ((rc)); then echo "[wheelhouse] failed; last lines of $LOG:" >&2; tail -n 40 "$LOG" >&2; fi' EXIT
# The project wheel, rebuilt every time (stale copies removed first).
rm -f "$DIR"/vram_supervisor-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --disable-pip-version-check . -w "$DIR" >>"$LOG" 2>&1
# Dependencies for the image's interpreter, not the host's: binary wheels only.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$DIR" \
    --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
    --platform "manylinux_2_36_$arch" --platform "manylinux_2_28_$arch" \
    --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
    --platform "linux_$arch" \
    "$DIR"/vram_supervisor-*.whl 'setuptools>=77' wheel >>"$LOG" 2>&1
echo "[wheelhouse] $(find "$DIR" -name '*.whl' | wc -l) wheels in $DIR" >&2
