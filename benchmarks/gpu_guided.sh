#!/usr/bin/env bash
# The cost of guided decoding on a GPU: benchmarks/guided_overhead.py (the same requests with and
# without a JSON schema, interleaved pairs) against the random-weight llama-shaped model of
# gpu_compare.sh (1.17 B parameters, bf16, SmolLM2's vocabulary and tokenizer).
#
#   WHEELS=dir-of-wheels TOKENIZER=dir-with-tokenizer.json OUT=results-dir benchmarks/gpu_guided.sh
#
# WHEELS (optional): wheels installed first with `pip --target` (the lent GPU machine has no
# network; its transformers is older than tensorgate's floor). TREES (optional): source trees
# that each hold a `tensorgate` package, measured one after the other with the same model, e.g.
# the code before and after a change (default: this checkout's backends/trtllm); ROUTER_SO: the
# built router extension to put into each tree. MODEL_DIR: reuse a model made before.
# CONCURRENCY, REPEAT, ROUNDS and ARGS (more guided_overhead.py arguments) as named.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
MODEL="${MODEL_DIR:-/tmp/guided-model}"
if [[ ! -f "$MODEL/config.json" ]]; then
    PYTHONPATH="$PWD/benchmarks:${PYTHONPATH:-}" python3 - "$MODEL" "${TOKENIZER:?set TOKENIZER}" <<'PY'
import shutil
import sys
from pathlib import Path

from gpu_smoke import make_model

out, tok = Path(sys.argv[1]), Path(sys.argv[2])
n = make_model(out, tok, layers=16, hidden=2048)
if (tok / "chat_template.jinja").exists():
    shutil.copy(tok / "chat_template.jinja", out / "chat_template.jinja")
print(f"model: {n / 1e9:.2f}B parameters (random, bf16)", flush=True)
PY
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for tree in ${TREES:-$PWD/backends/trtllm}; do
    if [[ -n "${ROUTER_SO:-}" ]]; then
        cp "$ROUTER_SO" "$tree/tensorgate/_router.abi3.so"
    fi
    name="$(basename "$tree")"
    echo "== $tree"
    PYTHONPATH="$tree:${PYTHONPATH:-}" python3 -c \
        "import tensorgate, torch, transformers, llguidance; print(tensorgate.__file__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    PYTHONPATH="$tree:${PYTHONPATH:-}" python3 benchmarks/guided_overhead.py --device cuda \
        --dtype bfloat16 --model-dir "$MODEL" --concurrency "${CONCURRENCY:-8,64}" \
        --output-tokens 64 --rounds "${ROUNDS:-3}" --repeat "${REPEAT:-3}" \
        --max-batch-size 256 --kv-blocks 1024 --max-batch-tokens 8192 \
        --out "$OUT/guided_gpu_$name.json" ${ARGS:-}
done
