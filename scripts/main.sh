#!/usr/bin/env bash
# The main job, offline: install, build the pbmc68k_reduced corpus, train the demo Cell2Text and its
# Cell2Sentence baseline, evaluate against the baselines and write the report (about 20-30 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m training.demo "$@"
