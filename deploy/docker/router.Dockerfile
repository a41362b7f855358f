# syntax=docker/dockerfile:1
# Router image: the router, its tokenizer tier and the `llmserve` client CLI (used by `helm test`).
# No torch: routers are small CPU pods. Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t ghcr.io/llmserve/llmserve-router:0.1.0 .

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# The whole tree (minus router.Dockerfile.dockerignore): setup.py maps several top-level
# folders into the llmserve namespace, and this stage is thrown away anyway.
COPY . .
# Our wheel plus wheels of every dependency, so the runtime stage installs offline and cannot
# pick up an unrelated "llmserve" from an index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[router]"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 llmserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin llmserve
# Offline from the builder's wheels, whose versions the builder resolved.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "llmserve[router]"
# Numeric, so kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9400
ENTRYPOINT ["llmserve-router"]
