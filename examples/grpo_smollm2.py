"""GRPO on SmolLM2-135M-Instruct with tensorgate as the rollout engine, on CPU, in minutes.

The trainer (torch, this process) and the rollout server (`tensorgate serve`, the transformers
engine) hold the same model. Each step:

1. the server samples `n` answers to each of a few yes/no questions, the same every step
   (token ids in, exact token ids and their log probabilities out, through
   `tensorgate.rollout`);
2. a verifiable reward: 1 when the answer's first word is the right "yes" or "no", else 0;
3. advantages relative to each question's group of `n` (GRPO: reward minus the group mean,
   over the group's standard deviation);
4. the trainer recomputes the log probabilities of the sampled tokens (the mean |train -
   inference| difference is printed: the mismatch RL users watch) and takes one policy-gradient
   step (with one step per batch the clipped importance ratio of PPO/GRPO is 1: it drops out;
   no KL term);
5. the trained tensors are pushed into the running server (`update_weights_from_state_dict`,
   labelled with the step), and the next step's samples must carry that label.

The reward curve goes to a PNG (and the numbers to a JSON file beside it). Only the top
decoder layers train (`--train-layers`): the bottom of the network, the embeddings and the tied
output head stay as they are, which keeps a step and its push small on a 2-core CPU.

    pip install 'tensorgate[examples]'
    python examples/grpo_smollm2.py                      # starts its own server
    python examples/grpo_smollm2.py --url http://127.0.0.1:3000 --control-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaModel

from tensorgate.models.embedded import ensure_embedded_model
from tensorgate.rollout import RolloutClient, SamplingParams

# transformers renamed the decoder's `past_key_values` argument to `cache` (5.2x).
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else ("past_key_values")
)

# Questions a 135M model knows the answer to; half yes, half no.
QUESTIONS = [
    ("Is the sky blue?", "yes"),
    ("Is fire cold?", "no"),
    ("Do fish live in water?", "yes"),
    ("Is ice hot?", "no"),
    ("Can birds fly?", "yes"),
    ("Is the sun a planet?", "no"),
    ("Is water wet?", "yes"),
    ("Do cats bark?", "no"),
    ("Is snow white?", "yes"),
    ("Is the moon made of cheese?", "no"),
    ("Do humans need air to live?", "yes"),
    ("Is two bigger than five?", "no"),
    ("Is grass green?", "yes"),
    ("Can a dog speak English?", "no"),
    ("Does the sun rise in the east?", "yes"),
    ("Is a mouse bigger than an elephant?", "no"),
]
INSTRUCTION = " Answer yes or no."


def reward(text: str, answer: str) -> float:
    """1.0 when the first word, lowercased and stripped of punctuation, is `answer`."""
    words = text.strip().split()
    first = words[0].strip(".,!?:;\"'*()").lower() if words else ""
    return 1.0 if first == answer else 0.0


@dataclass
class StepLog:
    step: int
    reward: float
    mismatch_mean: float
    mismatch_max: float
    tokens: int
    weight_version: str
    generate_s: float
    train_s: float
    push_s: float
    push_mb: float


def group_advantages(rewards: list[float]) -> list[float]:
    t = torch.tensor(rewards)
    std = t.std() if len(rewards) > 1 else torch.tensor(0.0)
    if std < 1e-6:  # every answer alike: no signal in this group
        return [0.0] * len(rewards)
    return ((t - t.mean()) / std).tolist()


def answer_logprobs(
    model: torch.nn.Module, prompt: list[int], answers: list[list[int]], pad_id: int
) -> list[torch.Tensor]:
    """The trainer's log probability of every token of one question's answers.

    The prompt goes through the model once and its KV cache is repeated for the answers (the
    prompt is ~40 tokens, an answer ~6: this is ~4x less work than one padded batch of whole
    sequences, and exactly the same numbers and gradients: the cache keeps its autograd graph).
    The output head runs only where an answer token is predicted."""
    first = model.model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    n = len(answers)
    cache.batch_repeat_interleave(n)
    width = max(len(a) for a in answers)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    for row, a in enumerate(answers):
        ids[row, : len(a)] = torch.tensor(a)
    # Right padding needs no mask: causal attention never lets a real token see a later pad.
    rest = model.model(input_ids=ids, use_cache=False, **{CACHE_KWARG: cache})
    # The prompt's last position predicts answer token 0; answer position j predicts j + 1.
    hidden = torch.cat(
        [first.last_hidden_state[:, -1:].expand(n, 1, -1), rest.last_hidden_state[:, :-1]], dim=1
    )
    rows = [row for row, a in enumerate(answers) for _ in a]
    cols = [j for a in answers for j in range(len(a))]
    logits = model.lm_head(hidden[rows, cols]).float()
    targets = torch.tensor([t for a in answers for t in a]).unsqueeze(1)
    lp = torch.log_softmax(logits, dim=-1).gather(1, targets).squeeze(1)
    return list(lp.split([len(a) for a in answers]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path, control_key: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, TENSORGATE_RL_CONTROL_KEY=control_key)  # by env: not seen in ps
    cmd = [
        sys.executable,
        "-m",
        "tensorgate.cli",
        "serve",
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--engine",
        "transformers",
        "--device",
        "cpu",
        "--max-batch-size",
        "32",
        "--enable-rl-control",
    ]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_started(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Until the server answers /health, failing at once (with its log) if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # refused while starting, or 503 (urllib's HTTPError is an OSError)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f}s (log: {log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plot(logs: list[StepLog], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install 'tensorgate[examples]')")
        return False
    steps = [x.step for x in logs]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax1.plot(steps, [x.reward for x in logs], marker="o")
    ax1.set_ylabel("mean reward")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("GRPO on SmolLM2-135M through tensorgate (CPU)")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [x.mismatch_mean for x in logs], marker="o", color="tab:red")
    ax2.set_ylabel("mean |train - inference| logprob")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


async def train(args: argparse.Namespace, url: str, control_key: str | None) -> list[StepLog]:
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Loaded as the server's transformers engine loads it on CPU (float32).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # no dropout: the trainer's forward must match the server's
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    trained = [*layers[len(layers) - args.train_layers :], model.model.norm]
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    named_trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named_trained.values(), lr=args.lr, weight_decay=0.0)
    pad_id = tokenizer.eos_token_id
    push_mb = sum(p.numel() * p.element_size() for p in named_trained.values()) / 1e6
    print(
        f"trainer: {len(named_trained)} tensors ({push_mb:.0f} MB) train, "
        f"top {args.train_layers} of {len(layers)} layers; lr {args.lr}"
    )

    def prompt_ids(question: str) -> list[int]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question + INSTRUCTION}], add_generation_prompt=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    logs: list[StepLog] = []
    async with RolloutClient(url, control_key=control_key, api_key=args.api_key) as client:
        await client.wait_ready(timeout_s=600)
        version = await client.get_weight_version()
        print(f"server {url}: weight_version {version}")
        for step in range(args.steps):
            batch = QUESTIONS[: args.questions]
            prompts = [prompt_ids(q) for q, _ in batch]
            params = SamplingParams(
                max_new_tokens=args.max_new_tokens,
                temperature=1.0,
                seed=args.seed * 1_000_003 + step * 1000,
            )
            t0 = time.perf_counter()
            groups = await client.generate(prompts, params, n=args.n)
            t1 = time.perf_counter()
            samples = [s for g in groups for s in g]
            stale = {s.weight_version for s in samples} - {version}
            if stale:
                raise RuntimeError(f"samples of weights {stale}, expected {version}")
            rewards = {}
            advantages = {}
            for (_, answer), group in zip(batch, groups, strict=True):
                texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in group]
                rs = [reward(text, answer) for text in texts]
                for s, r, a in zip(group, rs, group_advantages(rs), strict=True):
                    rewards[id(s)] = r
                    advantages[id(s)] = a

            # A question whose answers all scored alike carries no gradient: its log
            # probabilities are recomputed (for the mismatch) without building a graph.
            lps, ordered, learn = [], [], []
            for prompt, group in zip(prompts, groups, strict=True):
                answers = [s.token_ids for s in group]
                if any(advantages[id(s)] != 0.0 for s in group):
                    lps += answer_logprobs(model, prompt, answers, pad_id)
                    learn += group
                else:
                    with torch.no_grad():
                        lps += answer_logprobs(model, prompt, answers, pad_id)
                ordered += group
            diffs = torch.cat(
                [
                    (lp.detach() - torch.tensor(s.logprobs)).abs()
                    for lp, s in zip(lps, ordered, strict=True)
                ]
            )
            n_tokens = int(diffs.numel())
            # Token-mean policy gradient (GRPO's loss with the ratio at 1 and no KL).
            loss = -sum(
                (advantages[id(s)] * lp.sum() for lp, s in zip(lps, ordered, strict=True)),
                torch.tensor(0.0),
            ) / max(n_tokens, 1)
            optimizer.zero_grad()
            if learn:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(named_trained.values(), 1.0)
            optimizer.step()
            t2 = time.perf_counter()

            version = str(step + 1)
            result = await client.update_weights_from_state_dict(
                {n: p.detach() for n, p in named_trained.items()}, weight_version=version
            )
            t3 = time.perf_counter()
            if result.weight_version != version:
                raise RuntimeError(f"server reports {result.weight_version}, pushed {version}")

            log = StepLog(
                step=step,
                reward=sum(rewards.values()) / len(rewards),
                mismatch_mean=float(diffs.mean()),
                mismatch_max=float(diffs.max()),
                tokens=n_tokens,
                weight_version=version,
                generate_s=t1 - t0,
                train_s=t2 - t1,
                push_s=t3 - t2,
                push_mb=result.bytes / 1e6,
            )
            logs.append(log)
            print(
                f"step {step:2d}  reward {log.reward:.3f}  |train-inf| logprob mean "
                f"{log.mismatch_mean:.2e} max {log.mismatch_max:.2e} ({n_tokens} tokens)  "
                f"generate {log.generate_s:.1f}s train {log.train_s:.1f}s "
                f"push {log.push_s:.1f}s ({log.push_mb:.0f} MB) -> weight_version {version}",
                flush=True,
            )
    return logs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (started with --enable-rl-control)")
    ap.add_argument(
        "--control-key", help="its --rl-control-key (default $TENSORGATE_RL_CONTROL_KEY)"
    )
    ap.add_argument("--api-key", help="its --api-key, if it has one")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument(
        "--questions", type=int, default=4, help="questions, the same every step (at most 16)"
    )
    ap.add_argument("--n", type=int, default=8, help="samples per question")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--train-layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("grpo_smollm2_reward.png"))
    args = ap.parse_args(argv)
    if not 1 <= args.questions <= len(QUESTIONS):
        ap.error(f"--questions must be in [1, {len(QUESTIONS)}]")
    torch.manual_seed(args.seed)

    # SIGTERM ends the script through its `finally`, so the server it started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    proc = None
    if args.url:
        url, key = args.url, args.control_key or os.environ.get("TENSORGATE_RL_CONTROL_KEY")
    else:
        key = secrets.token_urlsafe(24)
        log_path = Path(tempfile.mkdtemp(prefix="grpo-")) / "server.log"
        proc, url = start_server(log_path, key)
        print(f"starting tensorgate serve at {url} (log: {log_path})", flush=True)
    started = time.perf_counter()
    try:
        if proc is not None:
            wait_started(proc, url, log_path, timeout_s=900)  # the first start converts the model
        logs = asyncio.run(train(args, url, key))
    finally:
        if proc is not None:
            stop_server(proc)

    curve = [round(x.reward, 3) for x in logs]
    print(f"reward per step: {curve}")
    half = max(1, len(logs) // 2)
    first = sum(x.reward for x in logs[:half]) / half
    last = sum(x.reward for x in logs[-half:]) / half
    print(f"mean reward, first {half} steps {first:.3f} -> last {half} steps {last:.3f}")
    mismatch = sum(x.mismatch_mean * x.tokens for x in logs) / sum(x.tokens for x in logs)
    print(f"mean |train - inference| logprob over all steps: {mismatch:.2e}")
    print(f"total {time.perf_counter() - started:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if plot(logs, args.out):
        print(f"reward curve: {args.out}")
    args.out.with_suffix(".json").write_text(
        json.dumps({"steps": [asdict(x) for x in logs], "mean_mismatch": mismatch}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
