# syntax=docker/dockerfile:1
# Engine image: the GPU engine service with torch (CUDA build), Triton and flash-attn 4.
# Build from the repository root:
#   docker build -f deploy/docker/engine.Dockerfile -t ghcr.io/llmserve/llmserve-engine:0.1.0 .
# The CUDA base, the torch index and torch itself move together: change them with build args.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# e.g. --build-arg TORCH_SPEC="torch==X.Y.Z" to pin; the default takes the newest build on the index.
ARG TORCH_SPEC=torch
ARG FLASH_ATTN_SPEC=flash-attn-4==4.0.0b36
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 is whatever the CUDA base's release ships; the base tag pins it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# A venv: Ubuntu's system Python refuses pip installs (PEP 668), and /opt/venv copies as one unit.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, so the engine extra finds its torch requirement already met
# instead of pulling the default (PyPI) build. Versions come from the build args above.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY . .
# Our wheel, built as tests/test_packaging.py builds and serves it, then installed by its path
# (not by name, which an index's "llmserve" could answer) with the engine extra.
# hadolint ignore=DL3013
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && set -- /wheels/llmserve-*.whl \
 && pip install --no-cache-dir "$1[engine]" "${FLASH_ATTN_SPEC}"

FROM ${CUDA_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Triton compiles a small C launcher per kernel at run time: it needs a C compiler and the
# Python headers in the image, not only in the builder.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 llmserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin llmserve
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 50053 9401
ENTRYPOINT ["llmserve-engine"]
