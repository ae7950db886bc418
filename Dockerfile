# jacobian-service server image.
#
# Image names are fully qualified, so podman finds them without a short-name search list.
#
# CPU (default):
#   docker build -t localhost/jacobian-service:cpu .
# CUDA (PyTorch's CUDA wheels bring their own CUDA runtime; the host needs the NVIDIA
# driver and the NVIDIA Container Toolkit):
#   docker build -t localhost/jacobian-service:cu128 --build-arg TORCH_VARIANT=cu128 .
# Without an image registry: make a base image locally (any Debian/Ubuntu with python3 and
# python3-venv, e.g. with debootstrap; see scripts/container-smoke) and name it:
#   podman build --format docker --build-arg BASE_IMAGE=localhost/debian-python:bookworm .
# Without PyTorch's index: put the torch wheel into deploy/wheels/ and pass
#   --build-arg TORCH_INDEX_URL=   (empty: PyPI and deploy/wheels only)
#
# Build arguments:
#   BASE_IMAGE       image with python3 (>= 3.10) and its venv module, for both stages
#   TORCH_VERSION    torch release to install
#   TORCH_VARIANT    cpu | cu126 | cu128 | ... : which PyTorch wheel index to use
#   TORCH_INDEX_URL  that index (derived from TORCH_VARIANT; empty to use PyPI only)
#   WHEELS_DIR       folder in the build context with local wheels (searched first)
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG WHEELS_DIR=deploy/wheels

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1

# One virtual environment, copied whole into the runtime stage.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. torch: the biggest layer, and the one that changes least. Local wheels first.
#    Its C++ test programs (~130 MB) are not needed to serve.
COPY ${WHEELS_DIR}/ /wheels/
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install --no-cache-dir --find-links /wheels "torch==${TORCH_VERSION}" \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 2. The other dependencies, from pyproject.toml alone (stub packages stand in for the
#    code: one per entry of its `packages` list), so that editing the code does not
#    reinstall them.
WORKDIR /src
COPY pyproject.toml ./
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && mkdir -p service/jacobian_service/engine service/jacobian_service/sparsity client/jacobian_client \
 && touch README.md service/jacobian_service/__init__.py service/jacobian_service/engine/__init__.py \
          service/jacobian_service/sparsity/__init__.py client/jacobian_client/__init__.py \
 && pip install --no-cache-dir --find-links /wheels "./[server]" \
 && pip uninstall -y jacobian-service \
 && rm -rf service client build ./*.egg-info README.md

# 3. The code.
COPY README.md ./
COPY service/ service/
COPY client/ client/
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && pip install --no-cache-dir --no-deps . \
 && jacobian-service --help >/dev/null

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="jacobian-service" \
      org.opencontainers.image.description="Jacobians of registered PyTorch functions over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A fixed, unprivileged user (uid 10001) that owns nothing but its home.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --home-dir /home/app --create-home \
      --shell /usr/sbin/nologin app \
 && mkdir -p /functions

COPY --from=builder /opt/venv /opt/venv

# Settings come from the environment (SPEC 5); these are the image's defaults.
# User function modules: mount them at /functions (on PYTHONPATH) and name them, e.g.
#   -v ./my_functions:/functions:ro -e JACOBIAN_SERVICE_FUNCTIONS=my_module
# Empty JACOBIAN_SERVICE_FUNCTIONS serves the built-in examples.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/functions \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    JACOBIAN_SERVICE_FUNCTIONS="" \
    JACOBIAN_SERVICE_DEVICE=auto \
    JACOBIAN_SERVICE_LOG_FORMAT=json \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /home/app
EXPOSE 8000

# Liveness only: /readyz is for load balancers and Kubernetes. No curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# SIGTERM starts the server's drain (readyz 503, in-flight work finishes, then exit).
STOPSIGNAL SIGTERM
CMD ["jacobian-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
