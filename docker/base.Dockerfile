# Offline stand-in for Flower's official base images (flwr/superlink, flwr/supernode, flwr/superexec)
# on machines that cannot reach Docker Hub. Same layout as the official images: a venv at
# /python/venv on PATH owned by user `app` (uid 49999), WORKDIR /app, HOME=/app.
#
# ROOTFS_IMAGE is a minimal Debian with python3, python3-venv and ca-certificates that
# `feda2v deploy images --offline-base` makes with debootstrap + `docker import` from Debian's
# package mirror. Flower comes from the wheelhouse served at WHEELHOUSE_URL (no package index).
ARG ROOTFS_IMAGE=feda2v/debian-python:bookworm
FROM ${ROOTFS_IMAGE}
ARG FLWR_VERSION=1.41.0
ARG WHEELHOUSE_URL
RUN set -e; \
    host=$(echo "$WHEELHOUSE_URL" | cut -d/ -f3 | cut -d: -f1); \
    groupadd --gid 49999 app; \
    useradd --uid 49999 --gid 49999 --no-create-home --home-dir /app --shell /usr/sbin/nologin app; \
    mkdir -p /app; \
    python3 -m venv /python/venv; \
    /python/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links "$WHEELHOUSE_URL" --trusted-host "$host" "flwr==${FLWR_VERSION}"; \
    chown -R app:app /app /python/venv
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    HOME=/app
WORKDIR /app
USER app
