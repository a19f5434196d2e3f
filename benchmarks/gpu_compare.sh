#!/usr/bin/env bash
# Same engine, two stacks, on a GPU: a random-weight llama-shaped model (1.17 B parameters,
# bf16, SmolLM2's vocabulary) served by tensorgate (transformers engine) and by
# `transformers serve`, both on transformers' continuous batching with the same KV cache.
#
#   WHEELS=dir-of-wheels TOKENIZER=dir-with-tokenizer.json OUT=results-dir benchmarks/gpu_compare.sh
#
# REPEAT=N measures each level N times per stack with both servers up, in ABBA order (see
# serve_comparison.py --repeat). CEILING=1,8 first runs benchmarks/engine_ceiling.py (the
# engine in-process, no server) at those concurrencies. COMPARE_ARGS is appended to
# serve_comparison.py's arguments (e.g. "--server-cpus 1-7 --client-cpus 8-15").
#
# WHEELS (optional) holds wheels to install first without dependencies (the lent GPU machine
# has no network). The load generator is benchmarks/loadgen.py: aiperf does not fit there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install -q --no-deps --force-reinstall "$WHEELS"/*.whl || python -m pip install --no-deps --force-reinstall --user "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD/backends/trtllm:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench-results}"
CEILING="${CEILING:-}"
MODEL="$(mktemp -d)/model"
mkdir -p "$OUT"
python - "$MODEL" "${TOKENIZER:?set TOKENIZER}" <<'PY'
import sys
from pathlib import Path
from gpu_smoke import make_model
n = make_model(Path(sys.argv[1]), Path(sys.argv[2]), layers=16, hidden=2048)
print(f"model: {n / 1e9:.2f}B parameters (random, bf16)", flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for c in ${CEILING//,/ }; do
    for variant in tensorgate-engine transformers-cb; do
        python benchmarks/engine_ceiling.py --variant "$variant" --device cuda --dtype bfloat16 \
            --model-dir "$MODEL" --concurrency "$c" --total "$((c > 8 ? 4 * c : 16))" \
            --max-batch-size 256 --kv-blocks 1024 --max-batch-tokens 8192 --output-tokens 64 \
            | tee -a "$OUT/engine_ceiling.jsonl"
    done
done
python benchmarks/serve_comparison.py --device cuda --dtype bfloat16 --model-dir "$MODEL" \
    --loadgen builtin --concurrency "${CONCURRENCY:-1,8,64,256}" --max-batch-size 256 \
    --kv-blocks 1024 --max-batch-tokens 8192 --input-tokens 64 --output-tokens 64 \
    --stacks "${STACKS:-tensorgate,transformers-serve}" --repeat "${REPEAT:-1}" \
    --out "$OUT/gpu_compare.json" ${COMPARE_ARGS:-}
