"""Serves a random-weight llama-shaped model with the transformers engine on CUDA through the
whole stack (launcher → executor → router) and measures output tokens/s at a few
concurrencies. Proof that the engine runs on a GPU, not the issue-4 benchmark.

    python benchmarks/gpu_smoke.py --tokenizer DIR [--layers 16 --hidden 2048]

Random weights: no model can be downloaded on the GPU machine; throughput does not depend on
the values. Generation ignores nothing: it stops at max_new_tokens or at a (random) eos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def make_model(out: Path, tokenizer: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_config = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = len(tok_config["model"]["vocab"]) + len(tok_config.get("added_tokens", []))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(hidden // 256, 1),
        max_position_embeddings=4096,
        eos_token_id=2,
        bos_token_id=1,
        torch_dtype="bfloat16",
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, out / f)
    return sum(p.numel() for p in model.parameters())


def one(url: str, i: int, max_new: int) -> tuple[int, float]:
    body = {
        "inputs": f"Request {i}: tell me about GPUs.",
        "parameters": {"max_new_tokens": max_new},
    }
    t = time.monotonic()
    r = requests.post(
        f"{url}/generate",
        json=body | {"parameters": body["parameters"] | {"details": True}},
        timeout=600,
    )
    r.raise_for_status()
    return r.json()["details"]["generated_tokens"], time.monotonic() - t


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    work = Path(tempfile.mkdtemp())
    params = make_model(work / "model", a.tokenizer, a.layers, a.hidden)
    print(f"model: {params / 1e9:.2f}B parameters (random, bf16)", flush=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorgate.cli",
            "serve",
            "--model-id",
            str(work / "model"),
            "--device",
            "cuda",
            "--port",
            str(a.port),
            "--hostname",
            "127.0.0.1",
            "--max-batch-size",
            str(max(a.concurrency)),
        ],
    )
    url = f"http://127.0.0.1:{a.port}"
    results = {"parameters_b": round(params / 1e9, 3), "runs": []}
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        results["info"] = requests.get(f"{url}/info", timeout=5).json()
        one(url, -1, 8)  # warm-up
        for c in a.concurrency:
            start = time.monotonic()
            with ThreadPoolExecutor(c) as pool:
                outs = list(pool.map(lambda i: one(url, i, a.max_new_tokens), range(c * 2)))
            wall = time.monotonic() - start
            tokens = sum(n for n, _ in outs)
            run = {
                "concurrency": c,
                "requests": len(outs),
                "output_tokens": tokens,
                "wall_s": round(wall, 2),
                "output_tok_per_s": round(tokens / wall, 1),
            }
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
