#!/usr/bin/env bash
# Rollout control on a GPU (issue #16's benchmark): benchmarks/rl_rollout.py against random
# weights in the Llama-3.1-8B and Llama-3.2-1B shapes (bf16, SmolLM2's tokenizer): CUDA IPC
# weight updates through /update_weights against the device's copy bandwidth, release/resume,
# and a GRPO-shaped rollout (64 prompts x n=8 x 256 new tokens) against model.generate_batch.
#
#   WHEELS=dir-of-wheels TOKENIZER=dir-with-tokenizer.json OUT=results-dir benchmarks/gpu_rl.sh
#
# WHEELS (optional): wheels installed first with `pip --target` (the lent GPU machine has no
# network; its transformers is older than tensorgate's floor; the rollout client needs aiohttp).
# ROUTER_SO: the built router extension to put into the tree (the lent machine cannot build it).
# SHAPES (default 8b,1b), ROLLOUT (default 1b) and ARGS (more rl_rollout.py arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -n "${ROUTER_SO:-}" ]]; then
    cp "$ROUTER_SO" backends/trtllm/tensorgate/_router.abi3.so
fi
export PYTHONPATH="$PWD/backends/trtllm:$PWD/benchmarks:${PYTHONPATH:-}"
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, aiohttp; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# shellcheck disable=SC2086
python3 benchmarks/rl_rollout.py --device cuda --shapes "${SHAPES:-8b,1b}" \
    --rollout "${ROLLOUT:-1b}" --tokenizer "${TOKENIZER:?set TOKENIZER}" --out "$OUT" ${ARGS:-}
