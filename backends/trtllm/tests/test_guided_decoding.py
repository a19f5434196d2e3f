"""Guided decoding in the transformers engine, on the embedded model (SmolLM2-135M-Instruct, its
real tokenizer) on CPU: the output follows the grammar, the request ends when the grammar is
complete, a bad grammar fails only its own request, and batch neighbours are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from conftest import Collector

from tensorgate.executor.engines import guided_decoding
from tensorgate.executor.engines.guided_decoding import GrammarBackend, GrammarError
from tensorgate.executor.engines.transformers_engine import TransformersEngine, TransformersSettings
from tensorgate.models.embedded import ensure_embedded_model
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(600)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def collector():
    return Collector()


@pytest.fixture(scope="module")
def engine(model_dir, collector):
    eng = TransformersEngine(
        model_dir, TransformersSettings(device="cpu", max_batch_size=4, max_total_tokens=512)
    )
    eng.start(collector.emit)
    yield eng
    eng.shutdown()


def prompt(tokenizer, text: str) -> list[int]:
    chat = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def req(rid, ids, n, kind=None, value="", **fields) -> pb.GenerateRequest:
    r = pb.GenerateRequest(id=rid, input_ids=ids, max_new_tokens=n, **fields)
    if kind is not None:
        r.grammar.kind = kind
        r.grammar.value = value
    return r


def run(engine, collector, *requests):
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests], timeout=500)
    return [collector.tokens[r.id] for r in requests]


def text(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_the_engine_claims_guided_decoding(engine):
    assert engine.info().features.guided_decoding


def test_a_json_schema_gives_json_that_validates_and_ends_the_request(engine, collector, tokenizer):
    ids = prompt(tokenizer, "Describe a person (name and age) as JSON.")
    (tokens,) = run(
        engine, collector, req(1, ids, 60, pb.GRAMMAR_KIND_JSON_SCHEMA, json.dumps(PERSON))
    )
    assert collector.finish[1] == pb.FINISH_REASON_STOP_TOKEN, collector.errors[1]
    value = json.loads(text(tokenizer, tokens))
    jsonschema.validate(value, PERSON)
    # Ended on the token that completed the object: nothing generated after the closing brace.
    assert text(tokenizer, tokens).rstrip().endswith("}")
    assert not text(tokenizer, tokens[:-1]).rstrip().endswith("}")


def test_a_regex_gives_a_full_match(engine, collector, tokenizer):
    pattern = r"[0-9]{3}-[a-z]{2}"
    ids = prompt(tokenizer, "Write a product code.")
    (tokens,) = run(engine, collector, req(2, ids, 20, pb.GRAMMAR_KIND_REGEX, pattern))
    assert collector.finish[2] == pb.FINISH_REASON_STOP_TOKEN, collector.errors[2]
    assert re.fullmatch(pattern, text(tokenizer, tokens))


def test_a_lark_grammar_is_followed(engine, collector, tokenizer):
    lark = 'start: answer "."\nanswer: "yes" | "no"'
    ids = prompt(tokenizer, "Is Paris the capital of France?")
    (tokens,) = run(engine, collector, req(3, ids, 10, pb.GRAMMAR_KIND_LARK, lark))
    assert collector.finish[3] == pb.FINISH_REASON_STOP_TOKEN, collector.errors[3]
    assert text(tokenizer, tokens) in ("yes.", "no.")


def test_the_grammar_overrides_what_the_model_wants(engine, collector, tokenizer):
    # Left alone, the model answers in words; the regex allows only digits.
    ids = prompt(tokenizer, "What is the capital of France?")
    free, digits = run(
        engine,
        collector,
        req(4, ids, 8),
        req(5, ids, 8, pb.GRAMMAR_KIND_REGEX, r"[0-9]{1,6}"),
    )
    assert not re.fullmatch(r"[0-9]+", text(tokenizer, free).strip())
    assert re.fullmatch(r"[0-9]{1,6}", text(tokenizer, digits))


def test_a_bad_grammar_fails_only_its_own_request(engine, collector, tokenizer):
    ids = prompt(tokenizer, "Say hello.")
    bad_regex = req(6, ids, 8, pb.GRAMMAR_KIND_REGEX, "(unclosed")
    bad_schema = req(7, ids, 8, pb.GRAMMAR_KIND_JSON_SCHEMA, "{not json")
    good = req(8, ids, 8)
    engine.submit([bad_regex, bad_schema, good])
    collector.wait_finished([6, 7, 8], timeout=500)
    assert collector.finish[6] == collector.finish[7] == pb.FINISH_REASON_ERROR
    assert "regex" in collector.errors[6] and "unclosed" in collector.errors[6]
    assert "json_schema" in collector.errors[7]
    assert collector.tokens[6] == collector.tokens[7] == []
    assert collector.finish[8] == pb.FINISH_REASON_LENGTH and len(collector.tokens[8]) == 8


def test_a_greedy_neighbour_is_identical_with_or_without_a_constrained_request(
    engine, collector, tokenizer
):
    ids = prompt(tokenizer, "Name three colours.")
    (alone,) = run(engine, collector, req(9, ids, 12))
    shared, constrained = run(
        engine,
        collector,
        req(10, ids, 12),
        req(11, ids, 40, pb.GRAMMAR_KIND_JSON_SCHEMA, json.dumps(PERSON)),
    )
    assert shared == alone
    jsonschema.validate(json.loads(text(tokenizer, constrained)), PERSON)


def test_the_backend_refuses_unknown_kinds_and_reads_the_three_it_knows(engine):
    backend: GrammarBackend = engine.grammar
    for kind, value in (
        (pb.GRAMMAR_KIND_JSON_SCHEMA, '{"type": "object"}'),
        (pb.GRAMMAR_KIND_REGEX, "a+"),
        (pb.GRAMMAR_KIND_LARK, 'start: "a"'),
    ):
        assert not backend.matcher(pb.Grammar(kind=kind, value=value)).is_error()
    with pytest.raises(GrammarError, match="kind"):
        backend.matcher(pb.Grammar(kind=pb.GRAMMAR_KIND_UNSPECIFIED, value="a"))


def test_json_is_written_as_json_dumps_unless_the_schema_says_otherwise(engine, tokenizer):
    # Free whitespace lets a small model fill max_tokens with newlines inside a value.
    backend: GrammarBackend = engine.grammar
    schema = {
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
    }

    def accepts(schema: dict, text: str) -> bool:
        m = backend.matcher(pb.Grammar(kind=pb.GRAMMAR_KIND_JSON_SCHEMA, value=json.dumps(schema)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        return m.validate_tokens(ids) == len(ids)

    assert accepts(schema, json.dumps({"a": [1, 2]}))
    assert not accepts(schema, '{\n  "a": [1, 2]}')
    assert not accepts(schema, '{"a": [1,\n 2]}')
    flexible = {**schema, "x-guidance": {"whitespace_flexible": True}}
    assert accepts(flexible, '{\n  "a": [1, 2]}')


def test_constrained_rows_in_one_batch_each_get_their_own_mask(engine, collector, tokenizer):
    ids = prompt(tokenizer, "Write something short.")
    patterns = [r"[0-9]{4}", r"[a-z]{3} [a-z]{3}", r"(yes|no)!", r"[A-Z]{2}-[0-9]{2}"]
    requests = [req(20 + i, ids, 12, pb.GRAMMAR_KIND_REGEX, p) for i, p in enumerate(patterns)]
    outputs = run(engine, collector, *requests)
    for r, p, tokens in zip(requests, patterns, outputs, strict=True):
        assert collector.finish[r.id] == pb.FINISH_REASON_STOP_TOKEN, collector.errors[r.id]
        assert re.fullmatch(p, text(tokenizer, tokens)), (p, text(tokenizer, tokens))


@pytest.fixture(scope="module")
def backend(tokenizer):
    """A backend of its own: the engine's worker, pending masks and templates are the engine's."""
    return GrammarBackend(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_masks_computed_ahead_are_the_masks_computed_in_the_step(backend, tokenizer):
    schema = pb.Grammar(kind=pb.GRAMMAR_KIND_JSON_SCHEMA, value=json.dumps(PERSON))
    starts = ['{"name": "Al', '{"name": "Bob", "age": 4', "{"]

    def matchers():
        out = []
        for start in starts:
            m = backend.matcher(schema)
            assert m.consume_tokens(tokenizer.encode(start, add_special_tokens=False))
            out.append(m)
        return out

    ahead, fresh = matchers(), matchers()
    want = backend.allowed(fresh, torch.device("cpu"))
    # Different masks per row, or the test could not see rows mixed up.
    assert not torch.equal(want[0], want[1]) and not torch.equal(want[1], want[2])
    backend.prefetch(ahead)
    assert torch.equal(backend.allowed(ahead, torch.device("cpu")), want)
    # Some rows ahead, one not, in another order: each row still gets its own mask.
    backend.prefetch(ahead[:2])
    got = backend.allowed([ahead[2], ahead[1], ahead[0]], torch.device("cpu"))
    assert torch.equal(got, want[[2, 1, 0]])
    # A mask computed ahead serves one step: the next asks the matchers again.
    assert backend._pending is None


def test_a_grammar_is_compiled_once_per_lexer_and_each_request_gets_a_matcher_of_its_own(
    backend, tokenizer, monkeypatch
):
    monkeypatch.setattr(guided_decoding, "LEXERS_PER_GRAMMAR", 2)
    # A schema no other test uses: its templates are new here.
    person = {**PERSON, "title": "compiled once"}
    schema = pb.Grammar(kind=pb.GRAMMAR_KIND_JSON_SCHEMA, value=json.dumps(person))
    a, _, c = (backend.matcher(schema) for _ in range(3))
    key = ("json_schema", schema.value)
    entries = backend._templates[key]
    assert [uses for _, uses in entries] == [2, 1]  # two templates, served in turn
    template = entries[0][0]
    start = tokenizer.encode('{"name": "Al', add_special_tokens=False)
    assert a.consume_tokens(start)
    # c (a copy of the same template) and the template are still at the start.
    assert c.validate_tokens(start) == len(start)
    assert template.validate_tokens(start) == len(start)
    masks = backend.allowed([a, c], torch.device("cpu"))
    assert not torch.equal(masks[0], masks[1])
    # A template that has served TEMPLATE_USES requests is compiled anew.
    monkeypatch.setattr(guided_decoding, "TEMPLATE_USES", 2)
    backend.matcher(schema)  # the second template's turn: its second request
    backend.matcher(schema)  # both at 2: the first is rebuilt
    assert entries[0][0] is not template and [uses for _, uses in entries] == [1, 2]
    # A grammar that cannot be built leaves nothing behind.
    bad = pb.Grammar(kind=pb.GRAMMAR_KIND_REGEX, value="(")
    with pytest.raises(GrammarError):
        backend.matcher(bad)
    assert ("regex", "(") not in backend._templates
