#!/usr/bin/env bash
# Build the offline base image vram-supervisor-base:bookworm (no registry needed).
#
#   tests/lib/base-image.sh [--force]
#
# mmdebstrap builds a minimal Debian bookworm root file system with python3, python3-venv
# and ca-certificates from the host's own apt sources, and `docker import` turns the tar
# stream into an image (about 17 s, 212 MB, Python 3.11). The suite is pinned to bookworm
# whatever the host runs: wheels are fetched for CPython 3.11 (tests/lib/wheelhouse.sh),
# and trixie would give Python 3.13. Cached: nothing happens when the image exists.
# Needs a running engine (DOCKER_HOST) and root for mmdebstrap.
set -euo pipefail

TAG="${VRAM_BASE_IMAGE:-vram-supervisor-base:bookworm}"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "[base-image] $TAG exists; skipping (pass --force to rebuild)" >&2
    exit 0
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "[base-image] installing mmdebstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2; }
fi
echo "[base-image] building $TAG with mmdebstrap" >&2
# pipefail: a failed mmdebstrap must not leave a half-imported image behind unnoticed.
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates bookworm - \
    | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --message "vram-supervisor offline base (mmdebstrap bookworm)" \
        - "$TAG" >/dev/null
docker image inspect "$TAG" --format '[base-image] {{index .RepoTags 0}} {{.Size}} bytes' >&2
