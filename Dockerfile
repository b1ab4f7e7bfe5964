# Two stages: build the wheel with a compiler, run it on a slim image without one.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir -w /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --no-create-home octo \
    && mkdir -p /run/octo-proxy /etc/octo-proxy && chown octo /run/octo-proxy
COPY examples/container.yaml /etc/octo-proxy/config.yaml
USER octo
# SIGUSR2 hot-restarts in place; the hot-restart socket lives in /run/octo-proxy,
# which a standby container can share (run --hot-restart-from) for a handover.
STOPSIGNAL SIGTERM
ENTRYPOINT ["octo-proxy"]
CMD ["run", "-c", "/etc/octo-proxy/config.yaml"]
