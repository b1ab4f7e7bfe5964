# syntax=docker/dockerfile:1
# octo-proxy's image.  Two stages: the first compiles the wheel, the second
# runs it on the same base without a compiler.  docs/operating.md "In a
# container" tells how to build and run it; ci/container.sh is what CI runs.
#
# BASE is any Debian-like image with Python 3.11+, its `venv` module and
# apt-get: python:3.11-slim from a registry (the default), or, with no
# registry, a base built from Debian's packages (ci/container.sh base).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# A C compiler, libc and OpenSSL headers (the core links libcrypto for
# service authentication, docs/auth.md) and, where the base lacks them,
# Python's headers.
RUN set -eu; \
    pkgs="gcc libc6-dev libssl-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
      || pkgs="$pkgs python3-dev"; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*
# The runtime venv, and a second one with the build tools, kept apart so
# that nothing of the build (Cython, setuptools) reaches the image.
RUN python3 -m venv /opt/octo-proxy && python3 -m venv /opt/build-tools
WORKDIR /src
# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
# pip trusts the CA bundle passed as the build secret `pip_cert` when there
# is one (a proxy that re-signs TLS): --secret id=pip_cert,src=<CA bundle>.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1; \
    /opt/build-tools/bin/python -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(d["project"]["dependencies"]))' > /tmp/requirements.txt; \
    /opt/build-tools/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' > /tmp/build-requirements.txt; \
    /opt/octo-proxy/bin/pip install -q -r /tmp/requirements.txt; \
    /opt/build-tools/bin/pip install -q -r /tmp/build-requirements.txt
COPY setup.py README.md ./
COPY src ./src
RUN set -eu; \
    /opt/build-tools/bin/pip wheel -q --no-deps --no-build-isolation -w /wheels .; \
    /opt/octo-proxy/bin/pip install -q --no-deps --no-index /wheels/octo_proxy-*.whl; \
    /opt/octo-proxy/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
# One fixed uid for every version of the image: two proxy containers of a pod
# (the serving one and its standby from a newer image) must be the same user
# to hand the listening sockets over (the hot-restart socket is owner-only).
ARG OCTO_UID=10001
RUN set -eu; \
    groupadd --system --gid "$OCTO_UID" octo; \
    useradd --system --uid "$OCTO_UID" --gid octo --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin octo; \
    mkdir -p /run/octo-proxy /etc/octo-proxy; \
    chown octo:octo /run/octo-proxy
COPY --from=build /opt/octo-proxy /opt/octo-proxy
COPY examples/container.yaml /etc/octo-proxy/config.yaml
# Identifies this build (ci/container.sh sets it to the version + commit):
# a standby container takes over when its image differs from the one its
# slot ran before (docs/operating.md, "Two proxy containers in one pod").
ARG OCTO_IMAGE_ID=dev
# XDG_RUNTIME_DIR: the proxy's derived state (the subscriptions file, the
# default hot-restart socket) goes to $XDG_RUNTIME_DIR/octo-proxy, made 0700
# by the proxy, on the writable volume (the user has no home, the root
# file system may be read-only).
ENV PATH=/opt/octo-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_RUNTIME_DIR=/run/octo-proxy \
    OCTO_PROXY_IMAGE_ID=$OCTO_IMAGE_ID
LABEL org.opencontainers.image.title="octo-proxy" \
      org.opencontainers.image.description="OCTO RPC service-mesh sidecar" \
      io.octo-proxy.image-id=$OCTO_IMAGE_ID
USER octo
WORKDIR /run/octo-proxy
# The UDS, the hot-restart socket and the pid file: share this directory
# with the app container(s) and with the standby proxy container.
VOLUME ["/run/octo-proxy"]
# Docker reads this; podman keeps it with `build --format docker`.
HEALTHCHECK --interval=5s --timeout=10s --start-period=10s --retries=3 \
    CMD ["octo-proxy-init", "ready"]
# octo-proxy-init is PID 1: it forwards signals to the proxy's process group
# and reaps, and exits only when no generation is left, so SIGUSR2 (a new
# generation replaces the old one) works in place.  SIGTERM drains.
STOPSIGNAL SIGTERM
ENTRYPOINT ["octo-proxy-init", "--"]
CMD ["octo-proxy", "run", "-c", "/etc/octo-proxy/config.yaml"]
