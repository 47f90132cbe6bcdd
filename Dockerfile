# syntax=docker/dockerfile:1
# spacesync in a container: the bot only (no Synapse, no test tools).
#   docker build -t spacesync .
#   docker run -d --name spacesync -v "$PWD/data:/data" -p 127.0.0.1:9090:9090 spacesync
# /data holds config.yaml (and the SQLite database with the bot's encryption keys, if you use SQLite). In config.yaml set
#   web: {listen: "0.0.0.0:9090"}
# or the health check, Prometheus and `docker run -p` cannot reach the endpoints. See docs/deployment.md.
#
# For fully reproducible builds, pin the base image by digest as well (python:3.12-slim-bookworm@sha256:…).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- builder: a virtual environment with spacesync and its dependencies, from wheels only ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/spacesync
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spacesync ./spacesync
# Build spacesync's own wheel, then install it with binary wheels only: no compiler is needed (or present),
# and matrix-synapse (a test/demo extra) is not installed. python-olm (end-to-end encryption) comes as a
# manylinux wheel too; the import check fails the build if the encryption dependencies are missing.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/spacesync/bin/pip install --only-binary=:all: /wheels/spacesync-*.whl \
 && /opt/spacesync/bin/python -c "import olm, mautrix.crypto" \
 && /opt/spacesync/bin/spacesync --version

# --- final: the venv on a clean slim image, run as an unprivileged user ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="spacesync" \
      org.opencontainers.image.description="Keeps a Matrix Space's child rooms in step with the Space" \
      org.opencontainers.image.licenses="AGPL-3.0-or-later"
RUN groupadd --gid 1000 spacesync \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /data --shell /usr/sbin/nologin spacesync \
 && mkdir -p /data \
 && chown spacesync:spacesync /data
COPY --from=builder /opt/spacesync /opt/spacesync
COPY config.example.yaml /usr/share/doc/spacesync/config.example.yaml
ENV PATH=/opt/spacesync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPACESYNC_CONFIG=/data/config.yaml
WORKDIR /data
VOLUME /data
USER spacesync
EXPOSE 9090
# slim images have no curl: ask Python. Adjust the port if web.listen uses another one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/spacesync/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"]
# spacesync is PID 1 and handles SIGTERM itself: `docker stop` finishes in-flight actions and exits.
ENTRYPOINT ["spacesync"]
CMD ["run"]
