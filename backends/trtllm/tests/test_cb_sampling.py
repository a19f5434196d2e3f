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
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tensorgate.executor.engines.cb_penalties import TokenHistory, typical_
from tensorgate.executor.engines.cb_sampling import (
    LogprobBook,
    PerRequestSampler,
    RowSpec,
    RowState,
    _top_k_,
    _top_p_,
)

pytestmark = pytest.mark.timeout(120)


def future(
    request_id: str, spec: RowSpec | None, generated: int = 0, row: RowState | None = None
) -> FutureRequestState:
    state = RequestState(request_id=request_id, initial_tokens=[1, 2, 3], max_new_tokens=100)
    state.generated_tokens = list(range(generated))
    if spec is not None:
        state.logit_processor_kwargs = {"row_spec": spec}
    if row is not None:
        state.logit_processor_kwargs["row_state"] = row
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


# --- penalties, logit bias, min_new_tokens: each as its definition says, on a fixed row ------


def fixed_row(vocab: int = 32) -> torch.Tensor:
    torch.manual_seed(7)
    row = torch.randn(vocab) * 2
    row[3], row[7], row[9] = 2.5, -1.5, 0.75  # a positive, a negative, another positive
    return row


def test_repetition_penalty_is_hf_over_prompt_and_generated():
    row = fixed_row()
    state = RowState(prompt=[3, 7])
    state.history = TokenHistory([3, 7], row.numel(), row.device)
    state.history.add(9)  # generated earlier
    spec = RowSpec(repetition_penalty=1.7)
    out = apply(PerRequestSampler(LogprobBook()), [future("r", spec, 1, state)], row[None])
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 7, 9]]), row[None].clone())
    assert torch.allclose(out[0], theirs[0])
    assert out[0, 3] == pytest.approx(2.5 / 1.7) and out[0, 7] == pytest.approx(-1.5 * 1.7)
    untouched = [i for i in range(row.numel()) if i not in (3, 7, 9)]
    assert torch.equal(out[0, untouched], row[untouched])


def test_frequency_and_presence_penalties_are_openai_over_generated_only():
    row = fixed_row()
    state = RowState(prompt=[7])  # in the prompt only: not penalized by these two
    state.history = TokenHistory([7], row.numel(), row.device)
    for t in (3, 3, 9):
        state.history.add(t)
    spec = RowSpec(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply(PerRequestSampler(LogprobBook()), [future("r", spec, 3, state)], row[None])[0]
    assert out[3] == pytest.approx(2.5 - 2 * 0.5 - 0.25)
    assert out[9] == pytest.approx(0.75 - 1 * 0.5 - 0.25)
    assert out[7] == row[7]
    others = [i for i in range(row.numel()) if i not in (3, 9)]
    assert torch.equal(out[others], row[others])


def test_negative_presence_penalty_favours_seen_tokens():
    row = fixed_row()
    state = RowState(prompt=[])
    state.history = TokenHistory([], row.numel(), row.device)
    state.history.add(9)
    out = apply(
        PerRequestSampler(LogprobBook()),
        [future("r", RowSpec(presence_penalty=-1.0), 1, state)],
        row[None],
    )[0]
    assert out[9] == pytest.approx(0.75 + 1.0)


def test_logit_bias_removes_and_forces_tokens():
    row = fixed_row()
    greedy = int(row.argmax())
    ban = RowSpec(logit_bias=((greedy, -100.0),))
    force = RowSpec(logit_bias=((11, 100.0),))
    rows = [future("ban", ban, row=RowState([])), future("force", force, row=RowState([]))]
    out = apply(PerRequestSampler(LogprobBook()), rows, row.repeat(2, 1))
    assert out[0, greedy] == pytest.approx(row[greedy] - 100.0)
    assert int(out[0].argmax()) != greedy
    assert int(out[1].argmax()) == 11
    assert out[1, 11] == pytest.approx(row[11] + 100.0)


def test_min_new_tokens_masks_the_end_ids_until_reached():
    row = fixed_row()
    row[5] = 50.0  # an eos the model wants now
    spec = RowSpec(min_new_tokens=3, end_ids=(5, 9))
    sampler = PerRequestSampler(LogprobBook())
    early = apply(sampler, [future("m", spec, generated=2)], row[None])[0]
    assert early[5] == -math.inf and early[9] == -math.inf
    assert int(early.argmax()) != 5
    reached = apply(sampler, [future("m", spec, generated=3)], row[None])[0]
    assert torch.equal(reached, row)


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_matches_transformers(mass):
    torch.manual_seed(int(mass * 100))
    logits = torch.randn(1, 64) * 3
    ours = logits[0].clone()
    typical_(ours, mass)
    theirs = TypicalLogitsWarper(mass=mass)(None, logits.clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert not torch.isinf(ours).all()


def test_chosen_tokens_are_recorded_and_a_plain_neighbour_is_untouched():
    torch.manual_seed(3)
    scores = torch.randn(3, 40)
    state = RowState(prompt=[1, 2])
    spec = RowSpec(do_sample=True, seed=4, repetition_penalty=1.3)
    sampler = PerRequestSampler(LogprobBook())
    rows = [future("g", None), future("s", spec, 0, state), future("h", None)]
    out = apply(sampler, rows, scores)
    assert torch.equal(out[0], scores[0]) and torch.equal(out[2], scores[2])
    assert state.generated == [int(out[1].argmax())]
    # The history follows the recorded tokens: the next step penalizes the chosen one too.
    chosen = state.generated[0]
    assert bool(state.history.seen[chosen]) and state.history.counts[chosen] == 1


def test_the_row_state_survives_transformers_deep_copy():
    import copy

    state = RowState(prompt=[1])
    kwargs = {"row_spec": RowSpec(), "row_state": state}
    assert copy.deepcopy(kwargs)["row_state"] is state


class FakeMatcher:
    """Allows only `allowed`; fails on consume when told to; stops after `stop_after` tokens."""

    def __init__(self, allowed: list[int], fail: bool = False, stop_after: int = 99) -> None:
        self.allowed, self.fail, self.stop_after, self.consumed = allowed, fail, stop_after, []

    def is_error(self) -> bool:
        return False

    def get_error(self) -> str:
        return "token not allowed by the grammar" if self.fail else ""

    def consume_token(self, token: int) -> bool:
        self.consumed.append(token)
        return not self.fail

    def is_stopped(self) -> bool:
        return len(self.consumed) >= self.stop_after


class FakeGrammar:
    """GrammarBackend's interface to the sampler, with no worker: masks are made on demand."""

    def wait(self) -> None:
        pass

    def prefetch(self, matchers) -> None:
        pass

    def allowed(self, matchers, device):
        mask = torch.zeros(len(matchers), 64, dtype=torch.bool)
        for i, m in enumerate(matchers):
            mask[i, m.allowed] = True
        return mask


def test_the_grammar_masks_its_row_consumes_the_choice_and_ends_the_request():
    torch.manual_seed(5)
    scores = torch.randn(2, 40)
    scores[0, 30] = 99.0  # the model's favourite, which the grammar forbids
    matcher = FakeMatcher(allowed=[4, 12], stop_after=1)
    state = RowState(prompt=[1], matcher=matcher)
    guided = future("g", RowSpec(), row=state)
    plain = future("p", None)
    out = apply(PerRequestSampler(LogprobBook(), FakeGrammar()), [guided, plain], scores)
    allowed = {4, 12}
    assert all(out[0, i] == -math.inf for i in range(40) if i not in allowed)
    chosen = int(out[0].argmax())
    assert chosen in allowed and matcher.consumed == [chosen] == state.generated
    assert state.done and state.error is None
    # The manager finishes the request with this step's token.
    assert guided.state._new_tokens_limit == guided.state.generated_len() + 1
    assert torch.equal(out[1], scores[1]) and plain.state._new_tokens_limit == 100


def test_a_failing_matcher_fails_its_own_request_only():
    scores = torch.randn(2, 40)
    state = RowState(prompt=[1], matcher=FakeMatcher(allowed=[4], fail=True))
    bad = future("bad", RowSpec(), row=state)
    neighbour_state = RowState(prompt=[1], matcher=FakeMatcher(allowed=[6]))
    ok = future("ok", RowSpec(), row=neighbour_state)
    apply(PerRequestSampler(LogprobBook(), FakeGrammar()), [bad, ok], scores)
    assert "token not allowed by the grammar" in state.error
    assert bad.state._new_tokens_limit == bad.state.generated_len() + 1
    assert neighbour_state.error is None and neighbour_state.generated == [6]
    assert ok.state._new_tokens_limit == 100


def test_min_new_tokens_against_a_grammar_that_only_allows_the_end_is_an_error():
    scores = torch.randn(1, 40)
    state = RowState(prompt=[1], matcher=FakeMatcher(allowed=[5]))
    spec = RowSpec(min_new_tokens=4, end_ids=(5,))
    apply(PerRequestSampler(LogprobBook(), FakeGrammar()), [future("x", spec, 0, state)], scores)
    assert state.error is not None and "min_new_tokens" in state.error
    assert state.generated == []
