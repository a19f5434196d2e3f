"""Per-request seeded sampling inside transformers' continuous batching.

transformers' CB samples every row with one global RNG (or argmax for the whole batch), so a
request's seed could not be honoured while other requests share the batch. Instead the
manager runs in argmax mode and this processor adds Gumbel noise drawn from a generator
seeded by (request seed, step): argmax(logits / T + Gumbel) is an exact sample from
softmax(logits / T), reproducible whatever else is in the batch. Greedy rows get no noise.
Temperature, top-k and top-p come first, from transformers' own per-request warpers.
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

NO_NOISE = -1


def step_seed(seed: int, step: int) -> int:
    """A 31-bit seed for one step of one request (an int32 slot carries it)."""
    return (seed * 1_000_003 + step * 7_919) & 0x7FFF_FFFF


class GumbelNoise(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"noise_seed": int}  # noqa: RUF012 - transformers' API
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_NOISE)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        seeds = []
        for request in requests_with_new_token:
            state = request.state
            seed = state.logit_processor_kwargs.get("noise_seed", NO_NOISE)
            if seed == NO_NOISE:
                seeds.append(NO_NOISE)
                continue
            # A preempted request is re-queued with its tokens folded into the prompt.
            folded = len(state.initial_tokens) - state._true_initial_tokens
            step = state.generated_len() + (folded if state._true_initial_tokens else 0)
            seeds.append(step_seed(seed, step))
        return torch.tensor(seeds, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        seeds = tensor_arg[: scores.size(0)].tolist()
        if all(s == NO_NOISE for s in seeds):
            return scores
        generator = torch.Generator(device=scores.device)
        vocab = scores.size(1)
        tiny = torch.finfo(torch.float32).tiny
        for row, seed in enumerate(seeds):
            if seed == NO_NOISE:
                continue
            generator.manual_seed(seed)
            u = torch.rand(vocab, generator=generator, device=scores.device)
            scores[row] += -torch.log(-torch.log(u.clamp_(min=tiny)))
        return scores


def build_processor_list(vocab_size: int) -> ContinuousBatchingLogitsProcessorList:
    """Neutral defaults: a request that passes no kwargs is decoded greedily."""
    processors = [
        ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0)),
        ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=vocab_size)),
        ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=1.0)),
        GumbelNoise(),
    ]
    plist = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
    plist.logits_processor = LogitsProcessorList(processors)
    plist.tensors_required = len(processors)
    plist._retrieve_processors_kwargs()
    plist.do_processing = True
    return plist


def request_kwargs(sampling, vocab_size: int) -> dict:
    """Per-request processor kwargs from the wire's SamplingParams."""
    if not sampling.do_sample:
        return {}
    seed = sampling.seed if sampling.HasField("seed") else 0
    return {
        "temperature": float(sampling.temperature or 1.0),
        "top_k": int(min(sampling.top_k, vocab_size)) if sampling.top_k else vocab_size,
        "top_p": float(sampling.top_p) if 0.0 < sampling.top_p < 1.0 else 1.0,
        "noise_seed": int(seed % (2**31)),
    }
