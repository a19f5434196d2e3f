"""The per-request sampler of the transformers engine, checked against transformers' own warpers
and against the distribution it claims to sample."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.continuous_batching.requests import (
    FutureRequestState,
    RequestState,
)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tensorgate.executor.engines.cb_sampling import (
    LogprobBook,
    PerRequestSampler,
    RowSpec,
    _top_k_,
    _top_p_,
)

pytestmark = pytest.mark.timeout(120)


def future(request_id: str, spec: RowSpec | None, generated: int = 0) -> FutureRequestState:
    state = RequestState(request_id=request_id, initial_tokens=[1, 2, 3])
    state.generated_tokens = list(range(generated))
    if spec is not None:
        state.logit_processor_kwargs = {"row_spec": spec}
    return FutureRequestState(state, has_new_token=True, complete_blocks={}, query_length=1)


def apply(sampler: PerRequestSampler, rows: list[FutureRequestState], scores: torch.Tensor):
    args = sampler.prepare_tensor_args(rows)
    return sampler(scores.clone(), args)


@pytest.mark.parametrize("k", [1, 7, 63])
def test_top_k_matches_transformers(k):
    torch.manual_seed(k)
    logits = torch.randn(1, 64)
    ours = logits[0].clone()
    _top_k_(ours, k)
    theirs = TopKLogitsWarper(top_k=k)(None, logits.clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    torch.manual_seed(int(p * 100))
    logits = torch.randn(1, 64) * 3
    ours = logits[0].clone()
    _top_p_(ours, p)
    theirs = TopPLogitsWarper(top_p=p)(None, logits.clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert not torch.isinf(ours).all()


def test_samples_follow_the_tempered_softmax():
    torch.manual_seed(0)
    vocab, n, temperature = 8, 4000, 0.8
    logits = torch.randn(vocab)
    rows = [
        future(f"r{i}", RowSpec(do_sample=True, temperature=temperature, seed=i)) for i in range(n)
    ]
    out = apply(PerRequestSampler(LogprobBook()), rows, logits.repeat(n, 1))
    counts = torch.bincount(out.argmax(dim=-1), minlength=vocab).float()
    expected = torch.softmax(logits / temperature, dim=-1)
    total_variation = (counts / n - expected).abs().sum().item() / 2
    assert total_variation < 0.04, (counts / n, expected)


def test_seed_and_step_fix_the_draw_and_greedy_rows_are_untouched():
    torch.manual_seed(1)
    scores = torch.randn(4, 100)
    spec = RowSpec(do_sample=True, temperature=1.0, seed=5)
    rows = [future("a", spec), future("b", None), future("c", spec), future("d", spec, generated=1)]
    out = apply(PerRequestSampler(LogprobBook()), rows, scores)
    noise = out - scores
    assert torch.equal(out[1], scores[1])  # a greedy row without logprobs is not touched
    # Same seed, same step: same noise, even in another row of the batch.
    assert torch.allclose(noise[0], noise[2], atol=1e-6)
    # Another step of the same seed: other noise.
    assert not torch.allclose(noise[0], noise[3], atol=1e-3)
    again = apply(PerRequestSampler(LogprobBook()), rows, scores)
    assert torch.equal(out, again)


def test_logprobs_go_to_the_book_by_request_and_step():
    torch.manual_seed(2)
    scores = torch.randn(2, 50)
    book = LogprobBook()
    book.track("g")
    book.track("s")
    greedy = RowSpec(logprobs=True, top_n=2)
    sampled = RowSpec(do_sample=True, top_k=3, seed=1, logprobs=True, top_n=5)
    out = apply(PerRequestSampler(book), [future("g", greedy, 4), future("s", sampled, 0)], scores)
    (g,) = book.take("g", 4, 1)
    (s,) = book.take("s", 0, 1)
    expected = torch.log_softmax(scores[0], dim=-1)
    assert g.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert g.top_ids == torch.topk(expected, 2).indices.tolist()
    # Sampled with top_k=3: the chosen token is one of the 3, and only 3 alternatives exist.
    chosen = out[1].argmax().item()
    assert chosen in torch.topk(scores[1], 3).indices.tolist()
    assert len(s.top_ids) == 3 and chosen in s.top_ids
    assert math.isclose(sum(math.exp(lp) for lp in s.top_logprobs), 1.0, rel_tol=1e-5)
    # Taken entries are gone; untracked requests are never recorded.
    assert book.take("g", 4, 1) == [None]
    book.forget("g")
    apply(PerRequestSampler(book), [future("g", greedy, 5)], scores[:1])
    assert book.take("g", 5, 1) == [None]


def test_an_all_greedy_batch_is_not_read_back():
    """Reading the ticket tensor back costs a device sync per step on an accelerator; a batch
    where no row registered anything must not do it. A meta tensor raises if it is read."""
    sampler = PerRequestSampler(LogprobBook())
    scores = torch.randn(2, 10)
    sampled = RowSpec(do_sample=True, seed=3)
    # A sampled batch first: its tickets are claimed, so nothing is left over for the next.
    apply(sampler, [future("s", sampled), future("g", None)], scores)
    sampler.prepare_tensor_args([future("g", None), future("h", None)])
    unreadable = torch.empty(2, dtype=torch.int32, device="meta")
    assert sampler(scores, unreadable) is scores
    # And a batch with a registered row still reads its tickets.
    args = sampler.prepare_tensor_args([future("s", sampled, 1)])
    with pytest.raises((NotImplementedError, RuntimeError)):
        sampler(scores[:1], args.to("meta"))
