"""`python -m tensorgate.conformance`: the engine contract, checked against a live engine.

The same checks as tensorgate's conformance tests (backends/trtllm/tests/
test_engine_conformance.py), run on the engine you have: inside the TensorRT-LLM container, on
your GPU, with your engine directory or checkpoint. tensorgate's own CI can run the trtllm
engine only against test doubles; this is how a user proves it works for real:

    python -m tensorgate.conformance --engine trtllm --model-id /engines/llama-8b
    python -m tensorgate.conformance --engine trtllm --model-id /models/Llama-3.1-8B-Instruct

Every executor setting is accepted (`--max-total-tokens`, `--tensor-parallel-size`, ...). Each
check prints PASS or FAIL with what it saw; the exit code is 0 only when every check passed (1:
a check failed; 2: the engine did not load).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tensorgate.executor.engine import Engine, EngineError
from tensorgate.executor.settings import (
    ENGINE_NAMES,
    EngineConfig,
    ExecutorSettings,
    add_arguments,
)
from tensorgate.v1 import executor_pb2 as pb

PROMPT = [1, 17, 42, 99, 3]


class CheckFailed(AssertionError):
    """A conformance check saw the engine break the contract; the message says how."""


class Skipped(Exception):
    """A check that does not apply to this engine (it claims no such feature)."""


class Outputs:
    """Every emitted output per request, as the server would gather them; records anything
    that follows a request's end."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.finish: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.after_end: list[int] = []
        self._cond = threading.Condition()

    def emit(self, batch: pb.IterationOutput) -> None:
        with self._cond:
            for o in batch.outputs:
                rid = o.request_id
                if rid in self.finish:
                    self.after_end.append(rid)
                self.tokens.setdefault(rid, []).extend(o.token_ids)
                self.logprobs.setdefault(rid, []).extend(o.logprobs)
                if o.finish_reason:
                    self.finish[rid] = o.finish_reason
                    self.errors[rid] = o.error
            self._cond.notify_all()

    def wait_finished(self, ids: list[int], timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: all(i in self.finish for i in ids), timeout):
                missing = [i for i in ids if i not in self.finish]
                raise CheckFailed(f"requests {missing} did not end within {timeout:.0f} s")

    def wait_tokens(self, rid: int, n: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.tokens.get(rid, [])) >= n, timeout):
                raise CheckFailed(f"request {rid} produced fewer than {n} tokens in {timeout} s")


@dataclass
class Conformance:
    """The checks, run in order on one started engine. Request ids are unique per run."""

    engine: Engine
    outputs: Outputs
    timeout: float = 300.0
    _ids: int = 0
    # (check, outcome "pass" | "fail" | "skip", what it saw)
    results: list[tuple[str, str, str]] = field(default_factory=list)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def request(self, n: int, prompt=PROMPT, **kw) -> pb.GenerateRequest:
        kw.setdefault("ignore_eos", True)  # any model may pick its eos at any step
        return pb.GenerateRequest(id=self.next_id(), input_ids=list(prompt), max_new_tokens=n, **kw)

    def run(self, *requests: pb.GenerateRequest) -> None:
        self.engine.submit(list(requests))
        self.outputs.wait_finished([r.id for r in requests], self.timeout)

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            raise CheckFailed(message)

    # -- the checks -----------------------------------------------------------------------------

    def check_info(self) -> str:
        info = self.engine.info()
        lim = info.limits
        self.expect(info.vocab_size > 0, f"vocab_size is {info.vocab_size}")
        self.expect(lim.max_batch_size >= 1, f"max_batch_size is {lim.max_batch_size}")
        self.expect(
            1 <= lim.max_input_tokens < lim.max_total_tokens,
            f"max_input_tokens {lim.max_input_tokens} vs max_total_tokens {lim.max_total_tokens}",
        )
        self.expect(
            info.kv_capacity_tokens >= lim.max_total_tokens,
            f"KV capacity {info.kv_capacity_tokens} tokens is less than one full request "
            f"({lim.max_total_tokens}): the router would get no usable token budget",
        )
        self.expect(
            lim.max_top_n_tokens > 0 or not info.features.top_n_tokens,
            "top_n_tokens claimed with max_top_n_tokens 0",
        )
        return (
            f"{info.engine} on {info.device}, vocab {info.vocab_size}, limits {lim}, "
            f"KV capacity {info.kv_capacity_tokens} tokens"
        )

    def check_lengths(self) -> str:
        lengths = [1, 2, 3, 5, 8, 13]
        requests = [self.request(n) for n in lengths]
        self.run(*requests)
        vocab = self.engine.info().vocab_size
        for r, n in zip(requests, lengths, strict=True):
            got = self.outputs.tokens.get(r.id, [])
            reason = self.outputs.finish[r.id]
            self.expect(
                reason == pb.FINISH_REASON_LENGTH,
                f"request for {n} tokens ended {pb.FinishReason.Name(reason)} "
                f"{self.outputs.errors.get(r.id)!r}",
            )
            self.expect(len(got) == n, f"asked for {n} tokens, got {len(got)}")
            self.expect(all(0 <= t < vocab for t in got), f"token outside the vocabulary: {got}")
        return f"{len(lengths)} requests, each ended once with exactly max_new_tokens"

    def prompt_independent(self) -> bool:
        # The synthetic engine runs no model: its tokens follow the request id, not the prompt.
        return self.engine.info().engine == "synthetic"

    def check_greedy_is_deterministic(self) -> str:
        if self.prompt_independent():
            raise Skipped("the synthetic engine's tokens do not follow the prompt")
        a, b = self.request(16), self.request(16)
        self.run(a)
        self.run(b)
        ta, tb = self.outputs.tokens[a.id], self.outputs.tokens[b.id]
        self.expect(ta == tb, f"the same greedy request gave {ta} then {tb}")
        return "the same greedy request twice gave the same 16 tokens"

    def check_seed(self) -> str:
        if not self.engine.info().features.seed:
            raise Skipped("the engine claims no seed")
        sampling = pb.SamplingParams(do_sample=True, temperature=1.0, seed=1234)
        a, b = self.request(16, sampling=sampling), self.request(16, sampling=sampling)
        self.run(a)
        self.run(b)
        ta, tb = self.outputs.tokens[a.id], self.outputs.tokens[b.id]
        self.expect(ta == tb, f"the same seeded request gave {ta} then {tb}")
        return "the same seeded sampling request twice gave the same tokens"

    def check_logprobs(self) -> str:
        if not self.engine.info().features.logprobs:
            raise Skipped("the engine claims no logprobs")
        r = self.request(8, return_logprobs=True)
        self.run(r)
        tokens, lps = self.outputs.tokens[r.id], self.outputs.logprobs[r.id]
        self.expect(len(lps) == len(tokens), f"{len(lps)} log probabilities for {len(tokens)}")
        self.expect(
            all(math.isfinite(x) and x <= 1e-4 for x in lps), f"impossible log probabilities {lps}"
        )
        return f"one finite, non-positive log probability per token ({len(tokens)})"

    def check_stop_token(self) -> str:
        if not self.engine.info().features.stop_token_ids:
            raise Skipped("the engine claims no stop token ids")
        if self.prompt_independent():
            raise Skipped("the synthetic engine's tokens do not follow the prompt")
        probe = self.request(6)
        self.run(probe)
        seen = self.outputs.tokens[probe.id]
        stop = seen[3]
        r = self.request(6, stop_token_ids=[stop])
        self.run(r)
        got = self.outputs.tokens[r.id]
        reason = self.outputs.finish[r.id]
        self.expect(
            reason == pb.FINISH_REASON_STOP_TOKEN,
            f"stop token {stop} (greedy step {seen.index(stop)}) ended the request "
            f"{pb.FinishReason.Name(reason)}: {got}",
        )
        self.expect(got == seen[: seen.index(stop) + 1], f"expected {seen} up to {stop}, got {got}")
        return f"stop token {stop} ended the request on it, the stop token reported last"

    def check_cancel(self) -> str:
        long = self.request(self.long_tokens())
        self.engine.submit([long])
        self.outputs.wait_tokens(long.id, 2, self.timeout)
        self.engine.cancel([long.id, 987_654_321])  # an unknown id is ignored
        self.outputs.wait_finished([long.id], self.timeout)
        reason = self.outputs.finish[long.id]
        self.expect(
            reason == pb.FINISH_REASON_CANCELLED, f"cancel ended it {pb.FinishReason.Name(reason)}"
        )
        n = len(self.outputs.tokens[long.id])
        time.sleep(0.2)
        self.expect(len(self.outputs.tokens[long.id]) == n, "tokens arrived after the cancel")
        return f"cancelled after {n} tokens; nothing followed"

    def check_limits(self) -> str:
        lim = self.engine.info().limits
        too_long = self.request(1, prompt=[3] * (lim.max_input_tokens + 1))
        too_many = self.request(lim.max_total_tokens - len(PROMPT) + 1)
        empty = self.request(4, prompt=[])
        zero = self.request(0)
        self.run(too_long, too_many, empty, zero)
        for r in (too_long, too_many, empty, zero):
            reason = self.outputs.finish[r.id]
            self.expect(
                reason == pb.FINISH_REASON_ERROR and self.outputs.errors[r.id],
                f"request {r.id} over the limits ended {pb.FinishReason.Name(reason)}",
            )
            self.expect(not self.outputs.tokens.get(r.id), "a refused request produced tokens")
        after = self.request(2)
        self.run(after)
        self.expect(
            self.outputs.finish[after.id] == pb.FINISH_REASON_LENGTH,
            "the engine did not serve after refusing requests",
        )
        return "over-long, over-total, empty and zero-token requests refused with a message"

    def check_stats(self) -> str:
        before = self.engine.stats()
        self.run(self.request(3), self.request(4))
        after = self.engine.stats()
        self.expect(after.requests_received >= before.requests_received + 2, "requests_received")
        self.expect(after.requests_finished >= before.requests_finished + 2, "requests_finished")
        self.expect(after.tokens_generated >= before.tokens_generated + 7, "tokens_generated")
        self.expect(after.iterations > before.iterations, "iterations did not move")
        self.expect(after.kv_block_size > 0, "kv_block_size is 0")
        total = after.kv_blocks_used + after.kv_blocks_free
        return f"counters moved; {after.kv_blocks_used} of {total} KV blocks in use"

    def check_nothing_after_the_end(self) -> str:
        self.expect(
            not self.outputs.after_end, f"outputs after a request's end: {self.outputs.after_end}"
        )
        return "no output followed any request's end"

    def check_shutdown(self) -> str:
        a, b = self.request(self.long_tokens()), self.request(self.long_tokens())
        self.engine.submit([a, b])
        self.outputs.wait_tokens(a.id, 1, self.timeout)
        self.engine.shutdown()
        self.outputs.wait_finished([a.id, b.id], 60)
        for r in (a, b):
            self.expect(
                self.outputs.finish[r.id] == pb.FINISH_REASON_ERROR,
                "shutdown did not end a live request with an error",
            )
        return "shutdown ended the live requests with an error"

    def long_tokens(self) -> int:
        return self.engine.info().limits.max_total_tokens - len(PROMPT)

    CHECKS: tuple[str, ...] = (
        "check_info",
        "check_lengths",
        "check_greedy_is_deterministic",
        "check_seed",
        "check_logprobs",
        "check_stop_token",
        "check_cancel",
        "check_limits",
        "check_stats",
        "check_nothing_after_the_end",
        "check_shutdown",  # last: it stops the engine
    )

    def run_all(self, report: Callable[[str, str, str], None]) -> bool:
        for name in self.CHECKS:
            try:
                detail, outcome = getattr(self, name)(), "pass"
            except Skipped as e:
                detail, outcome = str(e), "skip"
            except CheckFailed as e:
                detail, outcome = str(e), "fail"
            except Exception as e:  # the engine raised: that is a failure too
                detail, outcome = f"{type(e).__name__}: {e}", "fail"
            self.results.append((name, outcome, detail))
            report(name, outcome, detail)
        return all(outcome != "fail" for _, outcome, _ in self.results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tensorgate.conformance",
        description="Check a live engine against tensorgate's engine contract.",
    )
    p.add_argument("--engine", choices=ENGINE_NAMES, required=True)
    p.add_argument("--model-id", type=Path, help="checkpoint or TensorRT-LLM engine directory")
    p.add_argument("--tokenizer-name", type=Path, help="trtllm: dir with generation_config.json")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request batch")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, *, out=None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    config = EngineConfig(
        args.engine, args.model_id, args.tokenizer_name, ExecutorSettings.from_namespace(args)
    )
    from tensorgate.executor.engines import load_engine

    try:
        engine = load_engine(config)
    except EngineError as e:
        print(f"FAIL load: {e}", file=out)
        return 2
    outputs = Outputs()
    engine.start(outputs.emit)
    run = Conformance(engine, outputs, timeout=args.timeout)

    def report(name: str, outcome: str, detail: str) -> None:
        if not args.json:
            print(f"{outcome.upper()} {name.removeprefix('check_')}: {detail}", file=out)
            out.flush()

    try:
        passed = run.run_all(report)
    finally:
        engine.shutdown()
    if args.json:
        summary = [
            {"check": n.removeprefix("check_"), "outcome": outcome, "detail": d}
            for n, outcome, d in run.results
        ]
        print(json.dumps({"passed": passed, "checks": summary}), file=out)
    else:
        failed = sum(1 for _, outcome, _ in run.results if outcome == "fail")
        print(f"{'all checks passed' if passed else f'{failed} check(s) failed'}", file=out)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
