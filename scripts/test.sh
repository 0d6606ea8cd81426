#!/usr/bin/env bash
# Install (idempotent) and run the test suite. Slow end-to-end tests run in their short form.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# --durations: the slowest tests, so that a suite growing past its 15-minute budget shows where
python -m pytest -q --durations=15 "$@"
