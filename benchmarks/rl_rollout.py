#!/usr/bin/env python3
"""Rollout control end to end: a real `tensorgate serve --enable-rl-control` driven through
HTTP by the trainer's client (`tensorgate.rollout.RolloutClient`), as an RL trainer drives it.
benchmarks/rl_control_executor.py measures the same operations one level down (gRPC to the
executor); this adds the router, the HTTP bodies and the client.

Per model it measures
- weight updates: the whole state dict pushed by `update_weights_from_state_dict`, time and
  GB/s. On CUDA the trainer (this process) holds the weights on the GPU and sends CUDA IPC
  handles per bucket to trtllm-serve's /update_weights, then `{"weights": null}`; one more
  push split into its parts (pack handles / HTTP round trip / the engine's copy). Against it
  the bare device copy of the same tensors (`dst.copy_(src)`, per tensor and as one buffer).
  On CPU the bytes travel as safetensors through SGLang's /update_weights_from_tensor.
- /release_memory and /resume_memory per tag: time, the bytes the engine says it freed, and
  the device's free memory (CUDA, torch.cuda.mem_get_info) or the executor's resident set (CPU)
  measured from outside.
- (--rollout) a GRPO-shaped batch: P prompts x n samples, fixed length (ignore_eos), sampled at
  temperature 1 with per-token log probabilities, all in flight at once through /generate;
  against in-process ceilings (--ceilings) on the same weights with the same continuous-batching
  settings as the engine's (page size, blocks, batch tokens, batch size, no CUDA graphs,
  synchronous batching, cuDNN attention off): `model.generate_batch` with
  `num_return_sequences=n` (transformers alone), and tensorgate's engine class without gRPC,
  router or HTTP.

Random weights in the exact Llama-3.2-1B / Llama-3.1-8B shapes (bf16, built from a config: no
download) with SmolLM2's tokenizer for the text side; prompts use ids below the tokenizer's
vocabulary. On CPU: the embedded SmolLM2-135M (fp32, the CPU engine's dtype).

    # GPU (benchmarks/gpu_rl.sh sets up the lent machine):
    python benchmarks/rl_rollout.py --device cuda --shapes 8b,1b --rollout 1b \\
        --tokenizer DIR --out results/
    # CPU, a scaled-down rollout (--stages "" skips the updates and release/resume):
    python benchmarks/rl_rollout.py --device cpu --rollout embedded --prompts 8 --n 4 \\
        --prompt-tokens 64 --new-tokens 32 --bucket-mib 640 --out results/

Results: OUT/rl_rollout_<device>.json, rewritten after every stage (a run cut short keeps what
it measured); a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Served, start_tensorgate
from engine_ceiling import prompts

from tensorgate.rollout import RolloutClient, SamplingParams
from tensorgate.rollout import weights as w

# Meta's published configs (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B), minus
# rope scaling, which changes no tensor.
SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # A smoke test of this script (e.g. on CPU): Llama-3's vocabulary, little else.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
GB = 1e9


class Report:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.data = path, {"meta": meta, "models": {}}

    def put(self, model: str, key: str, value) -> None:
        self.data["models"].setdefault(model, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=2))


def make_random(shape: str, tokenizer: Path, out: Path, device: str):
    """The trainer's model: random weights of `shape`, bf16, on `device`; saved to `out` (with
    the tokenizer) for the server to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, out / f)
    return model


def tokenizer_vocab(model_dir: Path) -> int:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    return len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(named: list[tuple[str, torch.Tensor]], trials: int) -> dict:
    """The device's own copy of the same bytes: per tensor (the engine's write pattern) and as
    one flat buffer. Bytes copied / time (the memory traffic is twice that: read + write)."""
    total = sum(w.tensor_bytes(t) for _, t in named)
    dst = [torch.empty_like(t) for _, t in named]
    per_tensor = []
    for _ in range(trials + 1):
        sync()
        t0 = time.perf_counter()
        for d, (_, s) in zip(dst, named, strict=True):
            d.copy_(s)
        sync()
        per_tensor.append(time.perf_counter() - t0)
    del dst
    a = torch.empty(total, dtype=torch.uint8, device=named[0][1].device)
    b = torch.empty_like(a)
    flat = []
    for _ in range(trials + 1):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        flat.append(time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    pt, fl = statistics.median(per_tensor[1:]), statistics.median(flat[1:])
    return {
        "bytes": total,
        "tensors": len(named),
        "per_tensor_s": per_tensor[1:],
        "flat_s": flat[1:],
        "per_tensor_gbps": total / pt / GB,
        "flat_gbps": total / fl / GB,
    }


ENGINE_MS = re.compile(r"in (\d+) ms")


async def update_breakdown(client: RolloutClient, named, bucket_bytes: int, version: str) -> dict:
    """One CUDA IPC push done bucket by bucket with the client's own pieces, timing each part:
    packing the handles (reduce_tensor + pickle + base64), the HTTP call (router + gRPC +
    executor), and the engine's copy as its reply states it."""
    pack = call = engine = 0.0
    started = time.perf_counter()
    groups = list(w.buckets(named, bucket_bytes))
    for bucket in groups:
        t0 = time.perf_counter()
        handles, keep = w.cuda_ipc_payload(bucket)
        t1 = time.perf_counter()
        r = await client.update_weights_cuda_ipc(handles)
        call += time.perf_counter() - t1
        pack += t1 - t0
        m = ENGINE_MS.search(r.message)
        engine += float(m.group(1)) / 1000 if m else float("nan")
        del keep
    t0 = time.perf_counter()
    final = await client.update_weights_cuda_ipc(None, weight_version=version)
    fin = time.perf_counter() - t0
    return {
        "buckets": len(groups),
        "total_s": time.perf_counter() - started,
        "pack_s": pack,
        "bucket_calls_s": call,
        "engine_copy_s": engine,
        "finalize_s": fin,
        "weight_version": final.weight_version,
        "finalize_message": final.message,
    }


async def measure_updates(client, state, device: str, args, report: Report, name: str) -> None:
    named = w.unique_named_tensors(state)
    total = sum(w.tensor_bytes(t) for _, t in named)
    transport = "cuda_ipc" if device == "cuda" else "tensors"
    version = 100
    for bucket_mib in args.bucket_mib:
        rows = []
        for _ in range(args.trials + 1):  # the first is a warm-up
            version += 1
            t0 = time.perf_counter()
            r = await client.update_weights_from_state_dict(
                state,
                bucket_bytes=bucket_mib << 20,
                weight_version=str(version),
                transport=transport,
            )
            dt = time.perf_counter() - t0
            if r.weight_version != str(version):
                raise SystemExit(f"update answered weight_version {r.weight_version!r}")
            m = ENGINE_MS.search(r.last.message)
            engine = float(m.group(1)) / 1000 if m else None
            rows.append({"s": dt, "requests": r.requests, "last_engine_apply_s": engine})
        best = statistics.median(x["s"] for x in rows[1:])
        out = {
            "transport": transport,
            "bytes": total,
            "tensors": len(named),
            "bucket_mib": bucket_mib,
            "requests": rows[-1]["requests"],
            "warmup_s": rows[0]["s"],
            "trials_s": [x["s"] for x in rows[1:]],
            "median_s": best,
            "gbps": total / best / GB,
        }
        if transport == "tensors":
            # The client's own share: safetensors + base64 + the JSON body, as it builds them.
            t0 = time.perf_counter()
            for bucket in w.buckets(named, bucket_mib << 20):
                w.json_with_base64_list(
                    "serialized_named_tensors", [w.safetensors_payload(bucket)], {}
                )
            out["client_serialize_s"] = time.perf_counter() - t0
        report.put(name, f"update_{transport}_{bucket_mib}MiB", out)
        print(
            f"[{name}] update {transport} buckets {bucket_mib} MiB ({out['requests']} requests): "
            f"{best * 1000:.0f} ms median of {args.trials} ({out['gbps']:.3g} GB/s, "
            f"{total / GB:.2f} GB); warm-up {rows[0]['s'] * 1000:.0f} ms; the last request's "
            f"engine apply {rows[-1]['last_engine_apply_s']} s; client serialization "
            f"{out.get('client_serialize_s', 0):.2f} s",
            flush=True,
        )
    if device == "cuda":
        version += 1
        b = await update_breakdown(client, named, args.bucket_mib[0] << 20, str(version))
        report.put(name, "update_cuda_ipc_breakdown", b)
        print(
            f"[{name}] breakdown ({b['buckets']} buckets of {args.bucket_mib[0]} MiB): total "
            f"{b['total_s'] * 1000:.0f} ms = pack {b['pack_s'] * 1000:.0f} + bucket calls "
            f"{b['bucket_calls_s'] * 1000:.0f} (engine copy {b['engine_copy_s'] * 1000:.0f}) + "
            f"finalize {b['finalize_s'] * 1000:.0f}",
            flush=True,
        )


def free_port() -> int:
    # Other servers may run on this host: a port the kernel says is free now.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def measure_memory(client, served: Served, device: str, args, report: Report, name):
    def free() -> int:
        # CUDA: the device's free bytes (the executor is the only other user of the GPU here,
        # and this process allocates nothing meanwhile); CPU: the executor's resident set,
        # negated, so that "freed" reads the same way on both.
        if device == "cuda":
            return torch.cuda.mem_get_info()[0]
        return -rss(served.pids["executor"])

    for tags in (["kv_cache"], ["model"], ["kv_cache", "model"]):
        rows = []
        for _ in range(args.memory_trials):
            f0 = free()
            t0 = time.perf_counter()
            r = await client.release_memory(tags)
            rel = time.perf_counter() - t0
            f1 = free()
            t0 = time.perf_counter()
            b = await client.resume_memory(tags)
            res = time.perf_counter() - t0
            f2 = free()
            rows.append(
                {
                    "release_s": rel,
                    "resume_s": res,
                    "engine_freed_bytes": r.raw.get("memory_delta_bytes"),
                    "engine_taken_back_bytes": -(b.raw.get("memory_delta_bytes") or 0),
                    "measured_freed_bytes": f1 - f0,
                    "measured_taken_back_bytes": f1 - f2,
                }
            )
        key = "+".join(tags)
        report.put(name, f"memory_{key}", rows)
        last = rows[-1]
        print(
            f"[{name}] release {key}: {statistics.median(x['release_s'] for x in rows) * 1000:.0f}"
            f" ms, freed {last['measured_freed_bytes'] / GB:.2f} GB measured (engine says "
            f"{(last['engine_freed_bytes'] or 0) / GB:.2f}); resume "
            f"{statistics.median(x['resume_s'] for x in rows) * 1000:.0f} ms, "
            f"{last['measured_taken_back_bytes'] / GB:.2f} GB back",
            flush=True,
        )
    if not await client.health():
        raise SystemExit("the server is not healthy after resuming every tag")


async def measure_rollout(client, vocab: int, args, report: Report, name: str) -> list:
    ids = prompts(vocab, args.prompts, args.prompt_tokens, seed=7)
    warm = SamplingParams(max_new_tokens=8, ignore_eos=True)
    await client.generate(ids[:4], warm, n=2)
    params = SamplingParams(
        max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, seed=1234
    )
    rows = []
    for _ in range(args.rollout_trials):
        t0 = time.perf_counter()
        groups = await client.generate(ids, params, n=args.n)
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for g in groups for s in g)
        expected = args.prompts * args.n * args.new_tokens
        if tokens != expected:
            raise SystemExit(f"rollout made {tokens} tokens, expected {expected}")
        if any(len(s.logprobs) != len(s.token_ids) for g in groups for s in g):
            raise SystemExit("a sample came back without a log probability per token")
        rows.append({"s": dt, "tokens": tokens, "tok_s": tokens / dt})
        print(
            f"[{name}] rollout through the server: {dt:.2f} s, {tokens / dt:.0f} tok/s", flush=True
        )
    report.put(name, "rollout_server", rows)
    return ids


def ceiling(model, ids: list[list[int]], args, engine_cb: dict, report: Report, name: str):
    """model.generate_batch on the trainer's copy of the weights (the server's weights after
    the updates above), with the engine's continuous-batching settings."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if model.device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the engine (_configure_attention)

    def gen(new: int, n: int) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            num_return_sequences=n,
            eos_token_id=-1,  # as ignore_eos: every sample makes its full length
            pad_token_id=0,
        )

    cb = ContinuousBatchingConfig(
        **engine_cb, use_cuda_graph=False, use_async_batching=False, seed=0
    )
    model.generate_batch(
        ids[:4], generation_config=gen(8, 2), continuous_batching_config=cb, warmup=False
    )
    rows = []
    for _ in range(args.rollout_trials):
        sync()
        t0 = time.perf_counter()
        out = model.generate_batch(
            ids,
            generation_config=gen(args.new_tokens, args.n),
            continuous_batching_config=cb,
            warmup=False,
        )
        sync()
        dt = time.perf_counter() - t0
        tokens = sum(len(o.generated_tokens) for o in out.values())
        rows.append({"s": dt, "tokens": tokens, "tok_s": tokens / dt, "samples": len(out)})
        print(
            f"[{name}] in-process generate_batch: {dt:.2f} s, {tokens / dt:.0f} tok/s "
            f"({len(out)} samples)",
            flush=True,
        )
    report.put(name, "rollout_ceiling_generate_batch", rows)


def engine_class_ceiling(model_dir: Path, ids, args, dtype: str, cb: dict, report, name) -> None:
    """The same batch through tensorgate's engine class in-process (as engine_ceiling.py's
    tensorgate-engine variant: our sampler with log probabilities, the wire messages built, no
    gRPC, router or HTTP): what the server would reach if serving cost nothing."""
    import queue

    from tensorgate.executor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )
    from tensorgate.v1 import executor_pb2 as pb

    eng = TransformersEngine(
        model_dir,
        TransformersSettings(
            device=args.device,
            dtype=dtype,
            max_batch_size=cb["max_requests_per_batch"],
            kv_cache_blocks=cb["num_blocks"],
            max_num_tokens=cb["max_batch_tokens"],
            block_size=cb["page_size"],
        ),
    )
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    eng.start(outputs.put)
    rid = 0

    def run(batch_ids, n: int, new: int) -> int:
        nonlocal rid
        reqs = []
        for p in batch_ids:
            for _ in range(n):
                rid += 1
                sampling = pb.SamplingParams(
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    typical_p=1.0,
                    repetition_penalty=1.0,
                    seed=rid,
                )
                reqs.append(
                    pb.GenerateRequest(
                        id=rid,
                        input_ids=p,
                        max_new_tokens=new,
                        sampling=sampling,
                        ignore_eos=True,
                        return_logprobs=True,
                    )
                )
        eng.submit(reqs)
        left, tokens = len(reqs), 0
        while left:
            for o in outputs.get(timeout=600).outputs:
                tokens += len(o.token_ids)
                if o.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    left -= 1
        return tokens

    try:
        run(ids[:4], 2, 8)
        rows = []
        for _ in range(args.rollout_trials):
            t0 = time.perf_counter()
            tokens = run(ids, args.n, args.new_tokens)
            dt = time.perf_counter() - t0
            rows.append({"s": dt, "tokens": tokens, "tok_s": tokens / dt})
            print(
                f"[{name}] in-process tensorgate engine: {dt:.2f} s, {tokens / dt:.0f} tok/s",
                flush=True,
            )
        report.put(name, "rollout_ceiling_engine_class", rows)
    finally:
        eng.shutdown()


def engine_flags(args) -> tuple[list[str], dict]:
    """The engine's settings as serve flags, and the same as ContinuousBatchingConfig fields."""
    total = args.prompt_tokens + args.new_tokens
    batch = args.prompts * args.n
    blocks = args.kv_blocks or -(-(batch * total) // args.block_size) + 64
    flags = [
        "--max-batch-size",
        str(batch),
        "--kv-cache-blocks",
        str(blocks),
        "--max-num-tokens",
        str(args.max_num_tokens),
        "--block-size",
        str(args.block_size),
        "--max-concurrent-requests",
        str(batch + 64),
    ]
    cb = {
        "page_size": args.block_size,
        "num_blocks": blocks,
        "max_batch_tokens": args.max_num_tokens,
        "max_requests_per_batch": batch,
    }
    return flags, cb


async def one_model(name: str, args, report: Report, work: Path, started: float) -> None:
    device = args.device
    if name == "embedded":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from tensorgate.models.embedded import ensure_embedded_model

        model_dir = ensure_embedded_model()
        # The trainer's copy in the CPU engine's dtype (fp32): what it would push.
        state = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state.update({k: v.float() for k, v in load_file(str(f)).items()})
        model = None
        if args.rollout == name:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        dtype = "float32"
    else:
        model_dir = work / name
        t0 = time.perf_counter()
        model = make_random(name, args.tokenizer, model_dir, device)
        state = model.state_dict()
        print(
            f"[{name}] {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
            f"made and saved in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        dtype = "bfloat16"
    if device == "cuda" and "update" in args.stages:
        bw = copy_bandwidth(w.unique_named_tensors(state), args.trials)
        report.put(name, "device_copy", bw)
        print(
            f"[{name}] device copy of the same {bw['bytes'] / GB:.2f} GB: "
            f"{bw['per_tensor_gbps']:.0f} GB/s per tensor ({bw['tensors']} tensors), "
            f"{bw['flat_gbps']:.0f} GB/s as one buffer",
            flush=True,
        )
    flags, cb = engine_flags(args)
    key = secrets.token_hex(16)
    port = args.port or free_port()
    t0 = time.perf_counter()
    served = start_tensorgate(
        port,
        [
            "--model-id",
            str(model_dir),
            "--device",
            device,
            "--dtype",
            dtype,
            "--hostname",
            "127.0.0.1",
            "--enable-rl-control",
            "--rl-control-key",
            key,
            *flags,
        ],
        work / f"serve-{name}.log",
    )
    report.put(name, "server_start_s", time.perf_counter() - t0)
    try:
        async with RolloutClient(
            served.url,
            control_key=key,
            max_concurrency=args.prompts * args.n,
            timeout_s=900,
        ) as client:
            if "update" in args.stages:
                await measure_updates(client, state, device, args, report, name)
            if "memory" in args.stages and time.monotonic() - started < args.deadline_s:
                await measure_memory(client, served, device, args, report, name)
            ids = None
            if args.rollout == name and time.monotonic() - started < args.deadline_s:
                vocab = min(tokenizer_vocab(model_dir), model.config.vocab_size)
                ids = await measure_rollout(client, vocab, args, report, name)
    finally:
        served.stop()
    if ids is not None:  # the rollout means nothing without its ceilings
        if "generate_batch" in args.ceilings:
            ceiling(model, ids, args, cb, report, name)
        if "engine" in args.ceilings and time.monotonic() - started < args.deadline_s:
            engine_class_ceiling(model_dir, ids, args, dtype, cb, report, name)
    del model, state
    if name != "embedded":
        shutil.rmtree(model_dir, ignore_errors=True)
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shapes", default="", help="random-weight shapes, e.g. 8b,1b (CUDA)")
    ap.add_argument("--rollout", default="", help="the model to roll out on: 1b, 8b, embedded")
    ap.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (random shapes)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--memory-trials", type=int, default=2)
    ap.add_argument("--rollout-trials", type=int, default=1)
    ap.add_argument(
        "--bucket-mib", default="512", help="bucket sizes to push with, MiB (first: breakdown)"
    )
    ap.add_argument("--stages", default="update,memory", help="before the rollout (--rollout)")
    ap.add_argument(
        "--ceilings",
        default="generate_batch,engine",
        help="in-process ceilings of the rollout: generate_batch (model.generate_batch), "
        "engine (tensorgate's engine class, no server)",
    )
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, help="default: every sample's full length + 64")
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip later stages after this")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    args.bucket_mib = [int(x) for x in args.bucket_mib.split(",")]
    args.ceilings = [c for c in args.ceilings.split(",") if c]
    args.stages = [c for c in args.stages.split(",") if c]
    names = [s for s in args.shapes.split(",") if s]
    if args.device == "cpu":
        names = names or ["embedded"]
    if any(n != "embedded" for n in names) and args.tokenizer is None:
        ap.error("random shapes need --tokenizer")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    import transformers

    meta["transformers"] = transformers.__version__
    report = Report(args.out / f"rl_rollout_{args.device}.json", meta)
    started = time.monotonic()
    # Checkpoints of many GB are written and read once: in memory when /dev/shm has room.
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    where = str(shm) if room > (20 << 30) else None
    with tempfile.TemporaryDirectory(prefix="tg-rl-bench-", dir=where) as d:
        work = Path(d)
        for name in names:
            if time.monotonic() - started > args.deadline_s:
                report.put(name, "skipped", "past --deadline-s")
                continue
            try:
                asyncio.run(one_model(name, args, report, work, started))
            finally:
                for log in work.glob("serve-*.log"):
                    shutil.copy(log, args.out / log.name)
    print(f"results: {report.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
