# vram-supervisor container image.
#
# Ordinary build (needs the Python package index):
#     docker build -t vram-supervisor:local .
#
# Offline / air-gapped build (no index, no registry):
#   1. On a connected machine, fill the wheelhouse: every runtime dependency as a CPython
#      3.11 wheel, the build backend, and the project's own wheel:
#          tests/lib/wheelhouse.sh            # writes .cache/wheelhouse/
#      Carry the repository, including .cache/wheelhouse/, to the air-gapped machine.
#   2. Any local image with Python 3.11 and the venv module serves as the base; without a
#      registry, make one from Debian packages (tests/lib/base-image.sh does this):
#          mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates \
#              bookworm - | docker import - vram-supervisor-base:bookworm
#   3. Build with no network at all:
#          DOCKER_BUILDKIT=0 docker build --network none \
#              --build-arg BASE_IMAGE=vram-supervisor-base:bookworm -t vram-supervisor:local .
# When .cache/wheelhouse/ holds wheels, pip installs from it with --no-index and never
# touches the network (a missing wheel fails the build instead of downloading it).
#
# Running: ENTRYPOINT is in exec form and execs (through setpriv) the CLI as uid 10001, so
# the supervisor is PID 1 and `docker stop` (SIGTERM) reaches Python directly: it shuts
# down cleanly. The same image runs the simulated GPU
# host by overriding the entrypoint:
#     docker run --entrypoint python vram-supervisor:local -m supervisor.sim --help

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# python3 is /usr/local/bin/python3 on python:*-slim and /usr/bin/python3 on the offline
# Debian base; the venv links to whichever the base has, and the final stage has the same.
RUN python3 -m venv /opt/venv

# .dockerignore lets through only what the build needs: pyproject.toml, README.md,
# supervisor/ and .cache/wheelhouse/ (which may be absent).
COPY . /src

RUN set -eu; \
    if ls /src/.cache/wheelhouse/*.whl >/dev/null 2>&1; then \
        echo "Installing offline from the wheelhouse"; \
        /opt/venv/bin/pip install --no-index --find-links /src/.cache/wheelhouse /src; \
    else \
        echo "No wheelhouse; installing from the package index"; \
        /opt/venv/bin/pip install /src; \
    fi; \
    /opt/venv/bin/python -c 'import supervisor'

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="vram-supervisor" \
      org.opencontainers.image.description="Keeps Ollama and ComfyUI sharing one GPU without spilling models to the CPU." \
      org.opencontainers.image.licenses="MIT"

# The supervisor runs as a fixed non-root uid, 10001. The container starts as root only
# for the entrypoint (supervisor/entrypoint.py): it reads the Docker socket's group, then
# setpriv drops to 10001 with that group (DOCKER_GID, when set, wins), with no capabilities
# and no-new-privs, and execs the CLI. So no group id has to be looked up or configured.
# /etc/passwd is written directly: the minimal offline base has no useradd.
# /var/lib/vram-sim holds the simulated GPU's state file when the image runs the simulator;
# owned by 10001 so that a named volume mounted there starts out writable.
RUN echo 'vram:x:10001:10001:vram-supervisor:/nonexistent:/usr/sbin/nologin' >>/etc/passwd \
    && echo 'vram:x:10001:' >>/etc/group \
    && mkdir -p /var/lib/vram-sim \
    && chown 10001:10001 /var/lib/vram-sim \
    && setpriv --version >/dev/null

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

EXPOSE 9105

# `vram-supervisor healthcheck` asks GET http://127.0.0.1:$VRAM_HTTP_PORT/healthz (default
# port 9105) and exits 0 on 200. Compose files may tighten the timings.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["vram-supervisor", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["vram-supervisor-entrypoint"]
CMD ["run"]
