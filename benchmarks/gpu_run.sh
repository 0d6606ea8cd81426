#!/usr/bin/env bash
# Runs benchmarks/gpu.py on one GPU machine (Python 3.12, torch + CUDA, no network), from the repository root, with
# the git-ignored .gpu/ folder that benchmarks/gpu_prepare.sh made here carried along.
#   bash benchmarks/gpu_run.sh [paper|smoke] [more gpu.py options]
# paper: the full measurement (under 6 minutes on one H200 when it timed 3 steps a setting and 4 generation modes; now
# 5 steps and 6 modes within gpu.py's --time-budget of 420 s from its start: leave 9 minutes, not measured yet; the
# compiled mode is the one a budget cut drops). Run it on an H200 (the device tool's kind nvidia-h200): 32 x 1
# without checkpointing needs about 112 GB and is skipped on a smaller GPU. smoke: the same shapes, fewer steps
# (about 2 minutes).
# Writes gpu_<size>.log, gpu_<size>.json and smi.csv (time, GPU utilisation and memory every second:
# each generation mode's start time is in the JSON) into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-paper}
shift || true
OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target .gpu/site .gpu/whl/*.whl \
        || exit 1
    export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, transformers, trl, peft, datasets; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, \
'| cuda', torch.cuda.is_available())" || exit 1
tokenizer=()
[ -d .gpu/tokenizer ] && tokenizer=(--tokenizer .gpu/tokenizer)
sampler=""
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/smi.csv" 2>&1 &
    sampler=$!
fi
python3 benchmarks/gpu.py --size "$SIZE" "${tokenizer[@]}" --json "$OUT/gpu_$SIZE.json" "$@" 2>&1 \
    | grep --line-buffered -vE "Loading weights|Writing model shards|Saving the dataset" | tee "$OUT/gpu_$SIZE.log"
rc=${PIPESTATUS[0]}
if [ -n "$sampler" ]; then
    kill "$sampler"
    awk -F', ' '{u += $2; n++; if ($3 > m) m = $3} END {if (n) printf "GPU busy %.0f%% on average over %d s, at most %.1f GiB used\n", u / n, n, m / 1024}' "$OUT/smi.csv"
fi
exit "$rc"
